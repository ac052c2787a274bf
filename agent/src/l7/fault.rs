//! Fault injection, which HTTPRoute lacks and Istio's VirtualService offers: Weir's own
//! `HTTPFaultInjection` object (`weir.dev/v1alpha1`, namespaced, CRD in manifests/), named from an
//! HTTPRoute rule (or backendRef) by an `ExtensionRef` filter in the route's namespace. It delays
//! and/or aborts a percentage of the requests that rule serves, before any backend is chosen.
//!
//! ```yaml
//! apiVersion: weir.dev/v1alpha1
//! kind: HTTPFaultInjection
//! metadata: {name: flaky, namespace: default}
//! spec:
//!   delay: {fixedDelay: 500ms, percentage: 10}
//!   abort: {httpStatus: 503, percentage: 5}
//! ```
use std::{borrow::Cow, collections::BTreeMap, str::FromStr as _, time::Duration};

use hyper::StatusCode;
use k8s_openapi::{NamespaceResourceScope, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde::{Deserialize, Serialize};

use crate::model::{FieldError, NsName, object_id};

pub const GROUP: &str = "weir.dev";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "HTTPFaultInjection";
pub const PLURAL: &str = "httpfaultinjections";

/// The object as stored in the API server (or a YAML file).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpFaultInjection {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: HttpFaultInjectionSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFaultInjectionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelaySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DelaySpec {
    /// A Gateway API duration (`500ms`, `2s`, `1m`).
    pub fixed_delay: String,
    /// Share of requests delayed, 0–100 (fractions allowed); default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AbortSpec {
    /// The status answered instead of forwarding, 200–599.
    pub http_status: i32,
    /// Share of requests aborted, 0–100 (fractions allowed); default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<f64>,
}

impl kube::Resource for HttpFaultInjection {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        PLURAL.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A validated fault: what to do to a request, each part with its probability (0.0–1.0).
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(StatusCode, f64)>,
}

/// What the fault does to one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultDecision {
    pub delay: Option<Duration>,
    pub abort: Option<StatusCode>,
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn probability(p: Option<f64>, field: &str) -> Result<f64, FieldError> {
    match p {
        None => Ok(1.0),
        Some(p) if (0.0..=100.0).contains(&p) => Ok(p / 100.0),
        Some(p) => Err(field_error(field, format!("{p} is outside 0-100"))),
    }
}

impl Fault {
    pub fn from_k8s(obj: &HttpFaultInjection) -> Result<Fault, FieldError> {
        let spec = &obj.spec;
        let delay = match &spec.delay {
            None => None,
            Some(d) => {
                let parsed = gateway_api::Duration::from_str(&d.fixed_delay).map_err(|e| {
                    field_error(
                        "spec.delay.fixedDelay",
                        format!("invalid duration {:?}: {e}", d.fixed_delay),
                    )
                })?;
                let ms = u64::try_from(parsed.as_millis()).unwrap_or(u64::MAX);
                Some((
                    Duration::from_millis(ms),
                    probability(d.percentage, "spec.delay.percentage")?,
                ))
            }
        };
        let abort = match &spec.abort {
            None => None,
            Some(a) => {
                let status = u16::try_from(a.http_status)
                    .ok()
                    .filter(|s| (200..=599).contains(s))
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .ok_or_else(|| {
                        field_error(
                            "spec.abort.httpStatus",
                            format!("{} is outside 200-599", a.http_status),
                        )
                    })?;
                Some((status, probability(a.percentage, "spec.abort.percentage")?))
            }
        };
        if delay.is_none() && abort.is_none() {
            return Err(field_error("spec", "neither delay nor abort is set"));
        }
        Ok(Fault { delay, abort })
    }

    /// Draws this request's fate: delay and abort are decided independently, as Istio does.
    pub fn decide(&self, rng: &mut impl rand::Rng) -> FaultDecision {
        let hit =
            |p: f64, rng: &mut dyn rand::RngCore| p >= 1.0 || rand::Rng::random::<f64>(rng) < p;
        FaultDecision {
            delay: self.delay.and_then(|(d, p)| hit(p, rng).then_some(d)),
            abort: self.abort.and_then(|(s, p)| hit(p, rng).then_some(s)),
        }
    }
}

/// The objects as a source read them, by namespace/name (what the sources publish).
pub type FaultObjects = BTreeMap<NsName, HttpFaultInjection>;

/// The valid faults by namespace/name: what `ExtensionRef` filters resolve against.
pub type Faults = BTreeMap<NsName, std::sync::Arc<Fault>>;

/// Validates every object; the invalid ones are left out and reported as `kind ns/name: field: message`.
pub fn validate_all<'a>(
    objects: impl IntoIterator<Item = &'a HttpFaultInjection>,
) -> (Faults, Vec<String>) {
    let mut out = Faults::new();
    let mut problems = Vec::new();
    for obj in objects {
        let id = object_id(obj.metadata.namespace.as_ref(), obj.metadata.name.as_ref());
        match Fault::from_k8s(obj) {
            Ok(f) => {
                out.insert(id, std::sync::Arc::new(f));
            }
            Err(e) => problems.push(format!("{KIND} {id}: {}: {}", e.field, e.message)),
        }
    }
    (out, problems)
}

/// Decodes an `HTTPFaultInjection` from a parsed YAML document, naming the failing field.
pub fn from_value(doc: serde_yaml::Value) -> Result<HttpFaultInjection, FieldError> {
    let obj: HttpFaultInjection = serde_path_to_error::deserialize(doc)
        .map_err(|e| field_error(e.path().to_string(), e.inner().to_string()))?;
    // Checked here too so a file gets the same report as the API server's validation would give.
    Fault::from_k8s(&obj)?;
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(yaml: &str) -> HttpFaultInjection {
        from_value(serde_yaml::from_str(yaml).expect("yaml")).expect("valid")
    }

    #[test]
    fn parses_and_validates() {
        let f = Fault::from_k8s(&obj(
            "metadata: {name: f}\nspec: {delay: {fixedDelay: 250ms, percentage: 12.5}, abort: {httpStatus: 503}}",
        ))
        .expect("valid");
        assert_eq!(f.delay, Some((Duration::from_millis(250), 0.125)));
        assert_eq!(f.abort, Some((StatusCode::SERVICE_UNAVAILABLE, 1.0)));
        for bad in [
            "spec: {}",
            "spec: {abort: {httpStatus: 99}}",
            "spec: {abort: {httpStatus: 503, percentage: 101}}",
            "spec: {delay: {fixedDelay: soon}}",
            "spec: {delay: {fixedDelay: 1s, extra: 1}}",
        ] {
            let doc = serde_yaml::from_str(bad).expect("yaml");
            assert!(from_value(doc).is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn percentages_are_honoured() {
        let f = Fault {
            delay: Some((Duration::from_millis(1), 0.25)),
            abort: Some((StatusCode::IM_A_TEAPOT, 0.0)),
        };
        let mut rng = rand::rng();
        let delayed = (0..10_000)
            .filter(|_| f.decide(&mut rng).delay.is_some())
            .count();
        assert!(
            (2_200..=2_800).contains(&delayed),
            "{delayed} of 10000 at 25 %"
        );
        assert!((0..1000).all(|_| f.decide(&mut rng).abort.is_none()));
    }
}
