//! HTTPRoute (`gateway.networking.k8s.io/v1`) validated into the proxy's route model: the parent
//! Services it attaches to, and per rule the matches, filters, weighted backends and timeouts.
//!
//! What is rejected and what is only reported follows the Gateway API's status model: a problem in a
//! rule (a bad regular expression, an unsupported filter, an out-of-range weight) makes the whole route
//! invalid (`Accepted: False`), and it is not applied; a problem in one parentRef skips that parent
//! (it is the parent's own `Accepted` condition); a backendRef that cannot be used (an unsupported
//! kind, a missing port) stays in the rule and its share of requests gets a 500, as the spec requires
//! (`ResolvedRefs: False`). The last two are [`Route::warnings`].
use std::{str::FromStr as _, time::Duration};

use gateway_api::apis::standard::httproutes::{
    HttpRoute, HttpRouteParentRefs, HttpRouteRules, HttpRouteRulesBackendRefs,
    HttpRouteRulesFilters, HttpRouteRulesFiltersRequestHeaderModifier,
    HttpRouteRulesFiltersRequestMirror, HttpRouteRulesFiltersRequestRedirect,
    HttpRouteRulesFiltersRequestRedirectPathType, HttpRouteRulesFiltersRequestRedirectScheme,
    HttpRouteRulesFiltersType, HttpRouteRulesFiltersUrlRewrite,
    HttpRouteRulesFiltersUrlRewritePathType, HttpRouteRulesMatches,
    HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesMethod, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType, HttpRouteRulesTimeouts,
};
use hyper::http::{HeaderName, HeaderValue, Method, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use regex::Regex;

use super::{
    balance::WeightedPicker,
    fault::{self, Fault, Faults},
};
use crate::model::{FieldError, NsName, object_id};

/// The resource's group; `v1` and `v1beta1` share the HTTPRoute schema.
pub const GROUP: &str = "gateway.networking.k8s.io";
pub const KIND: &str = "HTTPRoute";
/// The CRD's bound on `backendRefs[].weight`.
pub const MAX_WEIGHT: u32 = 1_000_000;
/// Compiled size bound for user regular expressions, so one route cannot make the proxy allocate
/// without limit (the `regex` crate's default is 10 MiB).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A Service port: the key both of a backendRef and of the endpoints the directory holds for it. The
/// port is the Service's port number, not the endpoints' target port (as `backendRefs[].port` is).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePort {
    pub service: NsName,
    pub port: u16,
}

impl std::fmt::Display for ServicePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.service, self.port)
    }
}

/// A route that is invalid as a whole: not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("HTTPRoute {route}: {field}: {message}")]
pub struct RouteError {
    pub route: NsName,
    pub field: String,
    pub message: String,
}

/// A Service the route attaches to (a `parentRefs` entry with `group: ""`, `kind: Service`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentRef {
    pub service: NsName,
    /// `port`: only this Service port; `None` for all of them.
    pub port: Option<u16>,
    /// `sectionName`: for a Service, the port's name.
    pub section_name: Option<String>,
}

impl ParentRef {
    /// Whether requests to this Service port are governed by the route.
    pub fn applies_to(&self, service: &NsName, port: u16, port_name: &str) -> bool {
        self.service == *service
            && self.port.is_none_or(|p| p == port)
            && self
                .section_name
                .as_deref()
                .is_none_or(|name| name == port_name)
    }
}

#[derive(Clone, Debug)]
pub struct Route {
    pub id: NsName,
    /// `metadata.creationTimestamp`, the first tie-breaker between routes; objects from files have none
    /// and rank after those that do.
    pub created: Option<Time>,
    pub parents: Vec<ParentRef>,
    pub rules: Vec<Rule>,
    /// Problems that did not invalidate the route: a skipped parentRef, an unusable backendRef.
    pub warnings: Vec<FieldError>,
}

#[derive(Clone, Debug)]
pub struct Rule {
    /// `name`, else the rule's index: how metrics and logs name it.
    pub label: String,
    pub matches: Vec<RouteMatch>,
    /// In the order given: the spec asks for filters to be applied in order where possible.
    pub filters: Vec<Filter>,
    pub backends: Vec<WeightedBackend>,
    /// Chooses among `backends` by weight, one decision per request.
    pub picker: WeightedPicker,
    pub timeouts: Timeouts,
}

/// One `matches` entry: every condition must hold.
#[derive(Clone, Debug)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub method: Option<Method>,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
}

#[derive(Clone, Debug)]
pub enum PathMatch {
    Exact(String),
    /// The prefix without its trailing `/` (so `/` is the empty string): matching is on whole segments.
    Prefix(String),
    /// Anchored at both ends: the whole path must match.
    Regex(Regex),
}

#[derive(Clone, Debug)]
pub enum ValueMatch {
    Exact(String),
    /// Anchored at both ends, the `regex` crate's syntax (RE2-like).
    Regex(Regex),
}

impl ValueMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == value,
            ValueMatch::Regex(re) => re.is_match(value),
        }
    }
}

#[derive(Clone, Debug)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: ValueMatch,
}

#[derive(Clone, Debug)]
pub struct QueryMatch {
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Clone, Debug)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    UrlRewrite(UrlRewrite),
    Redirect(Redirect),
    Mirror(Mirror),
    /// An `ExtensionRef` to a Weir [`fault::HttpFaultInjection`].
    Fault(FaultFilter),
}

/// An `ExtensionRef` filter, resolved when the table is built.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultFilter {
    Resolved {
        name: NsName,
        fault: std::sync::Arc<Fault>,
    },
    /// The spec: a custom filter that cannot be resolved is not skipped; the requests it would have
    /// processed get an error (500). `reason` is the ResolvedRefs condition's.
    Unresolved {
        reason: &'static str,
        message: String,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Replaces the matched `PathPrefix`; only valid on rules whose matches are all prefixes.
    ReplacePrefixMatch(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlRewrite {
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// `http` or `https`; `None` keeps the request's.
    pub scheme: Option<&'static str>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathModifier>,
    pub status: StatusCode,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub backend: Backend,
    /// Mirror `numerator` of every `denominator` requests (`percent` is n/100; neither is 1/1).
    pub numerator: u32,
    pub denominator: u32,
}

impl Mirror {
    /// Whether this request is one of the `numerator` in every `denominator` to copy.
    pub fn should_mirror(&self, rng: &mut impl rand::Rng) -> bool {
        self.denominator > 0 && rng.random_range(0..self.denominator) < self.numerator
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Service(ServicePort),
    /// A backendRef this proxy cannot send to; requests that pick it get a 500.
    Invalid(String),
}

#[derive(Clone, Debug)]
pub struct WeightedBackend {
    pub backend: Backend,
    pub weight: u32,
    /// Filters applied only when this backend is chosen (after the rule's).
    pub filters: Vec<Filter>,
}

impl WeightedBackend {
    /// How metrics name it.
    pub fn label(&self) -> String {
        match &self.backend {
            Backend::Service(sp) => sp.to_string(),
            Backend::Invalid(_) => "invalid".to_owned(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Timeout {
    /// Not set: the proxy's default applies.
    #[default]
    Unset,
    /// `0s`: no timeout at all, as the spec asks.
    Disabled,
    After(Duration),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// `timeouts.request`: from the request's arrival to the end of the response.
    pub request: Timeout,
    /// `timeouts.backendRequest`: from sending to the backend to the end of its response.
    pub backend_request: Timeout,
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

impl Route {
    /// Validates an HTTPRoute. `Ok(None)`: valid, but attached to no Service (a Gateway's route, not
    /// ours). A route whose every Service parentRef was skipped is returned with no parents and the
    /// reasons in its warnings, so they can be reported.
    pub fn from_k8s(route: &HttpRoute) -> Result<Option<Route>, RouteError> {
        Self::from_k8s_with(route, &Faults::new())
    }

    /// [`Route::from_k8s`], resolving `ExtensionRef` filters against `faults`.
    pub fn from_k8s_with(route: &HttpRoute, faults: &Faults) -> Result<Option<Route>, RouteError> {
        let id = object_id(
            route.metadata.namespace.as_ref(),
            route.metadata.name.as_ref(),
        );
        let fail = |e: FieldError| RouteError {
            route: id.clone(),
            field: e.field,
            message: e.message,
        };
        if id.name.is_empty() {
            return Err(fail(field_error("metadata.name", "missing")));
        }
        let mut warnings = Vec::new();
        let mut parents = Vec::new();
        let mut any_service_parent = false;
        for (i, p) in route.spec.parent_refs.iter().flatten().enumerate() {
            match parent_ref(p, &id.namespace, &format!("spec.parentRefs[{i}]")) {
                ParentOutcome::NotOurs => {}
                ParentOutcome::Skipped(w) => {
                    any_service_parent = true;
                    warnings.push(w);
                }
                ParentOutcome::Service(parent) => {
                    any_service_parent = true;
                    if !parents.contains(&parent) {
                        parents.push(parent);
                    }
                }
            }
        }
        if !any_service_parent {
            return Ok(None);
        }
        let rules = match &route.spec.rules {
            // The CRD's default: one rule matching every request (with no backend, so it answers 500).
            None => vec![HttpRouteRules::default()],
            Some(rules) => rules.clone(),
        };
        let mut out = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let field = format!("spec.rules[{i}]");
            if let Some(name) = &rule.name
                && rules[..i].iter().any(|r| r.name.as_ref() == Some(name))
            {
                return Err(fail(field_error(
                    format!("{field}.name"),
                    format!("duplicate rule name {name:?}"),
                )));
            }
            out.push(
                convert_rule(rule, i, &id.namespace, &field, faults, &mut warnings)
                    .map_err(fail)?,
            );
        }
        Ok(Some(Route {
            created: route.metadata.creation_timestamp.clone(),
            id,
            parents,
            rules: out,
            warnings,
        }))
    }
}

enum ParentOutcome {
    NotOurs,
    Skipped(FieldError),
    Service(ParentRef),
}

fn parent_ref(p: &HttpRouteParentRefs, route_ns: &str, field: &str) -> ParentOutcome {
    // The API's defaults: group gateway.networking.k8s.io, kind Gateway. A Service parent must say
    // `group: ""` explicitly.
    let group = p.group.as_deref().unwrap_or(GROUP);
    let kind = p.kind.as_deref().unwrap_or("Gateway");
    if !group.is_empty() || kind != "Service" {
        return ParentOutcome::NotOurs;
    }
    let namespace = p.namespace.clone().unwrap_or_else(|| route_ns.to_owned());
    if namespace != route_ns {
        // A consumer route applies only to clients in the route's namespace (GEP-1294), which needs the
        // client's namespace per connection; the proxy does not know it yet.
        return ParentOutcome::Skipped(field_error(
            format!("{field}.namespace"),
            format!(
                "consumer routes (parent Service in namespace {namespace:?}, route in {route_ns:?}) are not supported; parent skipped"
            ),
        ));
    }
    let port = match p.port {
        None => None,
        Some(n) => match u16::try_from(n).ok().filter(|n| *n != 0) {
            Some(n) => Some(n),
            None => {
                return ParentOutcome::Skipped(field_error(
                    format!("{field}.port"),
                    format!("port {n} is outside 1-65535; parent skipped"),
                ));
            }
        },
    };
    if p.name.is_empty() {
        return ParentOutcome::Skipped(field_error(
            format!("{field}.name"),
            "missing; parent skipped",
        ));
    }
    ParentOutcome::Service(ParentRef {
        service: NsName {
            namespace,
            name: p.name.clone(),
        },
        port,
        section_name: p.section_name.clone().filter(|s| !s.is_empty()),
    })
}

fn compile_regex(pattern: &str, field: &str) -> Result<Regex, FieldError> {
    // Anchored: a Gateway API regular expression match is a match of the whole value, as in Envoy.
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| field_error(field, format!("invalid regular expression: {e}")))
}

fn convert_match(m: &HttpRouteRulesMatches, field: &str) -> Result<RouteMatch, FieldError> {
    let path = match &m.path {
        None => PathMatch::Prefix(String::new()),
        Some(p) => {
            let value = p.value.as_deref().unwrap_or("/");
            let ty = p
                .r#type
                .clone()
                .unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix);
            match ty {
                HttpRouteRulesMatchesPathType::RegularExpression => {
                    PathMatch::Regex(compile_regex(value, &format!("{field}.path.value"))?)
                }
                ty => {
                    if !value.starts_with('/') || value.contains(['?', '#']) {
                        return Err(field_error(
                            format!("{field}.path.value"),
                            format!("{value:?} must be an absolute path without query or fragment"),
                        ));
                    }
                    if ty == HttpRouteRulesMatchesPathType::Exact {
                        PathMatch::Exact(value.to_owned())
                    } else {
                        PathMatch::Prefix(value.trim_end_matches('/').to_owned())
                    }
                }
            }
        }
    };
    let mut headers: Vec<HeaderMatch> = Vec::new();
    for (i, h) in m.headers.iter().flatten().enumerate() {
        let f = format!("{field}.headers[{i}]");
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
            field_error(
                format!("{f}.name"),
                format!("invalid header name {:?}", h.name),
            )
        })?;
        // The spec: of entries naming the same header (case-insensitively), only the first counts.
        if headers.iter().any(|m| m.name == name) {
            continue;
        }
        let value = match h.r#type {
            Some(HttpRouteRulesMatchesHeadersType::RegularExpression) => {
                ValueMatch::Regex(compile_regex(&h.value, &format!("{f}.value"))?)
            }
            _ => ValueMatch::Exact(h.value.clone()),
        };
        headers.push(HeaderMatch { name, value });
    }
    let mut query: Vec<QueryMatch> = Vec::new();
    for (i, q) in m.query_params.iter().flatten().enumerate() {
        let f = format!("{field}.queryParams[{i}]");
        if q.name.is_empty() {
            return Err(field_error(format!("{f}.name"), "empty"));
        }
        // Query parameter names match exactly (case-sensitively); again only the first entry counts.
        if query.iter().any(|m| m.name == q.name) {
            continue;
        }
        let value = match q.r#type {
            Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression) => {
                ValueMatch::Regex(compile_regex(&q.value, &format!("{f}.value"))?)
            }
            _ => ValueMatch::Exact(q.value.clone()),
        };
        query.push(QueryMatch {
            name: q.name.clone(),
            value,
        });
    }
    let method = m.method.as_ref().map(|method| match method {
        HttpRouteRulesMatchesMethod::Get => Method::GET,
        HttpRouteRulesMatchesMethod::Head => Method::HEAD,
        HttpRouteRulesMatchesMethod::Post => Method::POST,
        HttpRouteRulesMatchesMethod::Put => Method::PUT,
        HttpRouteRulesMatchesMethod::Delete => Method::DELETE,
        HttpRouteRulesMatchesMethod::Connect => Method::CONNECT,
        HttpRouteRulesMatchesMethod::Options => Method::OPTIONS,
        HttpRouteRulesMatchesMethod::Trace => Method::TRACE,
        HttpRouteRulesMatchesMethod::Patch => Method::PATCH,
    });
    Ok(RouteMatch {
        path,
        method,
        headers,
        query,
    })
}

fn convert_rule(
    rule: &HttpRouteRules,
    index: usize,
    route_ns: &str,
    field: &str,
    faults: &Faults,
    warnings: &mut Vec<FieldError>,
) -> Result<Rule, FieldError> {
    let matches = match rule.matches.as_deref() {
        // The spec's default: a prefix match on `/`, which matches every request.
        None | Some([]) => vec![RouteMatch {
            path: PathMatch::Prefix(String::new()),
            method: None,
            headers: Vec::new(),
            query: Vec::new(),
        }],
        Some(ms) => ms
            .iter()
            .enumerate()
            .map(|(i, m)| convert_match(m, &format!("{field}.matches[{i}]")))
            .collect::<Result<_, _>>()?,
    };
    let all_prefix = matches
        .iter()
        .all(|m| matches!(m.path, PathMatch::Prefix(_)));
    let filters = convert_filters(
        rule.filters.as_deref().unwrap_or_default(),
        route_ns,
        &format!("{field}.filters"),
        all_prefix,
        true,
        faults,
        warnings,
    )?;
    let mut backends = Vec::new();
    for (i, b) in rule.backend_refs.iter().flatten().enumerate() {
        backends.push(convert_backend_ref(
            b,
            route_ns,
            &format!("{field}.backendRefs[{i}]"),
            all_prefix,
            faults,
            warnings,
        )?);
    }
    let timeouts = convert_timeouts(rule.timeouts.as_ref(), &format!("{field}.timeouts"))?;
    Ok(Rule {
        label: rule.name.clone().unwrap_or_else(|| index.to_string()),
        matches,
        filters,
        picker: WeightedPicker::new(backends.iter().map(|b| b.weight).collect()),
        backends,
        timeouts,
    })
}

/// A backendRef's target: a Service port, or why it cannot be used. `None` port is allowed by the
/// schema for other kinds but required for Services.
fn backend_target(
    group: Option<&str>,
    kind: Option<&str>,
    name: &str,
    namespace: Option<&str>,
    port: Option<i32>,
    route_ns: &str,
) -> Result<Backend, FieldError> {
    let group = group.unwrap_or("");
    let kind = kind.unwrap_or("Service");
    if !group.is_empty() || kind != "Service" {
        return Ok(Backend::Invalid(format!(
            "unsupported backend kind {kind:?} in group {group:?}"
        )));
    }
    if name.is_empty() {
        return Ok(Backend::Invalid("backend Service name missing".to_owned()));
    }
    let Some(port) = port else {
        return Ok(Backend::Invalid(
            "port is required for a Service backend".to_owned(),
        ));
    };
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| field_error("port", format!("port {port} is outside 1-65535")))?;
    // Mesh routes may send to Services in any namespace without a ReferenceGrant (GEP-1294: routes
    // augment Services rather than expose them).
    Ok(Backend::Service(ServicePort {
        service: NsName {
            namespace: namespace.unwrap_or(route_ns).to_owned(),
            name: name.to_owned(),
        },
        port,
    }))
}

fn convert_backend_ref(
    b: &HttpRouteRulesBackendRefs,
    route_ns: &str,
    field: &str,
    all_prefix: bool,
    faults: &Faults,
    warnings: &mut Vec<FieldError>,
) -> Result<WeightedBackend, FieldError> {
    let backend = backend_target(
        b.group.as_deref(),
        b.kind.as_deref(),
        &b.name,
        b.namespace.as_deref(),
        b.port,
        route_ns,
    )
    .map_err(|e| field_error(format!("{field}.{}", e.field), e.message))?;
    if let Backend::Invalid(reason) = &backend {
        warnings.push(field_error(
            field,
            format!("{reason}; requests routed to it get 500"),
        ));
    }
    let weight = match b.weight {
        None => 1,
        Some(w) => u32::try_from(w)
            .ok()
            .filter(|w| *w <= MAX_WEIGHT)
            .ok_or_else(|| {
                field_error(
                    format!("{field}.weight"),
                    format!("weight {w} is outside 0-{MAX_WEIGHT}"),
                )
            })?,
    };
    // The backend-level filter types are the rule-level ones under another name (the generator made a
    // type per place); converting through JSON reuses one validation for both.
    let filters: Vec<HttpRouteRulesFilters> = b
        .filters
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, f)| {
            serde_json::to_value(f)
                .and_then(serde_json::from_value)
                .map_err(|e| field_error(format!("{field}.filters[{i}]"), e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let filters = convert_filters(
        &filters,
        route_ns,
        &format!("{field}.filters"),
        all_prefix,
        false,
        faults,
        warnings,
    )?;
    Ok(WeightedBackend {
        backend,
        weight,
        filters,
    })
}

fn header_list<'a>(
    items: impl Iterator<Item = (&'a str, &'a str)>,
    field: &str,
) -> Result<Vec<(HeaderName, HeaderValue)>, FieldError> {
    let mut out: Vec<(HeaderName, HeaderValue)> = Vec::new();
    for (i, (name, value)) in items.enumerate() {
        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            field_error(
                format!("{field}[{i}].name"),
                format!("invalid header name {name:?}"),
            )
        })?;
        let v = HeaderValue::from_str(value).map_err(|_| {
            field_error(
                format!("{field}[{i}].value"),
                format!("invalid header value {value:?}"),
            )
        })?;
        // Equivalent names (case-insensitive): the first entry wins, later ones are ignored.
        if !out.iter().any(|(seen, _)| *seen == n) {
            out.push((n, v));
        }
    }
    Ok(out)
}

fn convert_header_modifier(
    m: &HttpRouteRulesFiltersRequestHeaderModifier,
    field: &str,
) -> Result<HeaderModifier, FieldError> {
    let set = header_list(
        m.set
            .iter()
            .flatten()
            .map(|h| (h.name.as_str(), h.value.as_str())),
        &format!("{field}.set"),
    )?;
    let add = header_list(
        m.add
            .iter()
            .flatten()
            .map(|h| (h.name.as_str(), h.value.as_str())),
        &format!("{field}.add"),
    )?;
    let mut remove = Vec::new();
    for (i, name) in m.remove.iter().flatten().enumerate() {
        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            field_error(
                format!("{field}.remove[{i}]"),
                format!("invalid header name {name:?}"),
            )
        })?;
        if !remove.contains(&n) {
            remove.push(n);
        }
    }
    Ok(HeaderModifier { set, add, remove })
}

fn path_modifier(
    full: Option<&String>,
    prefix: Option<&String>,
    is_prefix_type: bool,
    all_prefix: bool,
    field: &str,
) -> Result<PathModifier, FieldError> {
    if is_prefix_type {
        let Some(p) = prefix else {
            return Err(field_error(
                format!("{field}.replacePrefixMatch"),
                "required for type ReplacePrefixMatch",
            ));
        };
        if !all_prefix {
            return Err(field_error(
                format!("{field}.replacePrefixMatch"),
                "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
            ));
        }
        if !p.is_empty() && !p.starts_with('/') {
            return Err(field_error(
                format!("{field}.replacePrefixMatch"),
                format!("{p:?} must be empty or start with '/'"),
            ));
        }
        Ok(PathModifier::ReplacePrefixMatch(p.clone()))
    } else {
        let Some(p) = full else {
            return Err(field_error(
                format!("{field}.replaceFullPath"),
                "required for type ReplaceFullPath",
            ));
        };
        if !p.starts_with('/') || p.contains(['?', '#']) {
            return Err(field_error(
                format!("{field}.replaceFullPath"),
                format!("{p:?} must be an absolute path without query or fragment"),
            ));
        }
        Ok(PathModifier::ReplaceFullPath(p.clone()))
    }
}

fn convert_url_rewrite(
    r: &HttpRouteRulesFiltersUrlRewrite,
    all_prefix: bool,
    field: &str,
) -> Result<UrlRewrite, FieldError> {
    let hostname = match &r.hostname {
        None => None,
        Some(h) => Some(
            HeaderValue::from_str(h)
                .ok()
                .filter(|_| valid_hostname(h))
                .ok_or_else(|| {
                    field_error(
                        format!("{field}.hostname"),
                        format!("invalid hostname {h:?}"),
                    )
                })?,
        ),
    };
    let path = match &r.path {
        None => None,
        Some(p) => Some(path_modifier(
            p.replace_full_path.as_ref(),
            p.replace_prefix_match.as_ref(),
            p.r#type == HttpRouteRulesFiltersUrlRewritePathType::ReplacePrefixMatch,
            all_prefix,
            &format!("{field}.path"),
        )?),
    };
    Ok(UrlRewrite { hostname, path })
}

/// RFC 1123 host names (the API's `PreciseHostname`): letters, digits, `-` and `.`.
fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn convert_redirect(
    r: &HttpRouteRulesFiltersRequestRedirect,
    all_prefix: bool,
    field: &str,
) -> Result<Redirect, FieldError> {
    let status = match r.status_code {
        None => StatusCode::FOUND,
        Some(code @ (301 | 302 | 303 | 307 | 308)) => {
            StatusCode::from_u16(code as u16).map_err(|e| field_error(field, e.to_string()))?
        }
        Some(code) => {
            return Err(field_error(
                format!("{field}.statusCode"),
                format!("unsupported redirect status {code} (301, 302, 303, 307 or 308)"),
            ));
        }
    };
    let port = match r.port {
        None => None,
        Some(p) => Some(u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| {
            field_error(
                format!("{field}.port"),
                format!("port {p} is outside 1-65535"),
            )
        })?),
    };
    if let Some(h) = &r.hostname
        && !valid_hostname(h)
    {
        return Err(field_error(
            format!("{field}.hostname"),
            format!("invalid hostname {h:?}"),
        ));
    }
    let path = match &r.path {
        None => None,
        Some(p) => Some(path_modifier(
            p.replace_full_path.as_ref(),
            p.replace_prefix_match.as_ref(),
            p.r#type == HttpRouteRulesFiltersRequestRedirectPathType::ReplacePrefixMatch,
            all_prefix,
            &format!("{field}.path"),
        )?),
    };
    Ok(Redirect {
        scheme: r.scheme.as_ref().map(|s| match s {
            HttpRouteRulesFiltersRequestRedirectScheme::Http => "http",
            HttpRouteRulesFiltersRequestRedirectScheme::Https => "https",
        }),
        hostname: r.hostname.clone(),
        port,
        path,
        status,
    })
}

fn convert_mirror(
    m: &HttpRouteRulesFiltersRequestMirror,
    route_ns: &str,
    field: &str,
) -> Result<Mirror, FieldError> {
    let b = &m.backend_ref;
    let backend = backend_target(
        b.group.as_deref(),
        b.kind.as_deref(),
        &b.name,
        b.namespace.as_deref(),
        b.port,
        route_ns,
    )
    .map_err(|e| field_error(format!("{field}.backendRef.{}", e.field), e.message))?;
    // Unlike a backendRef, an unusable mirror target makes the filter (and so the route) invalid: the
    // spec says such a mirror must not be configured, and it has no share of traffic to fail.
    if let Backend::Invalid(reason) = &backend {
        return Err(field_error(format!("{field}.backendRef"), reason.clone()));
    }
    let (numerator, denominator) = match (m.percent, &m.fraction) {
        (Some(_), Some(_)) => {
            return Err(field_error(
                field,
                "only one of percent and fraction may be set",
            ));
        }
        (Some(p), None) => (
            u32::try_from(p).ok().filter(|p| *p <= 100).ok_or_else(|| {
                field_error(format!("{field}.percent"), format!("{p} is outside 0-100"))
            })?,
            100,
        ),
        (None, Some(f)) => {
            let denominator = f.denominator.unwrap_or(100);
            let bad = || {
                field_error(
                    format!("{field}.fraction"),
                    format!("{}/{denominator} is not a fraction in [0, 1]", f.numerator),
                )
            };
            let d = u32::try_from(denominator)
                .ok()
                .filter(|d| *d > 0)
                .ok_or_else(bad)?;
            let n = u32::try_from(f.numerator)
                .ok()
                .filter(|n| *n <= d)
                .ok_or_else(bad)?;
            (n, d)
        }
        (None, None) => (1, 1),
    };
    Ok(Mirror {
        backend,
        numerator,
        denominator,
    })
}

fn convert_filters(
    filters: &[HttpRouteRulesFilters],
    route_ns: &str,
    field: &str,
    all_prefix: bool,
    rule_level: bool,
    faults: &Faults,
    warnings: &mut Vec<FieldError>,
) -> Result<Vec<Filter>, FieldError> {
    let mut out = Vec::new();
    let mut seen: Vec<&'static str> = Vec::new();
    for (i, f) in filters.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let missing = |name: &str| {
            field_error(
                format!("{field}.{name}"),
                format!("required for type {:?}", f.r#type),
            )
        };
        let (kind, filter) = match f.r#type {
            HttpRouteRulesFiltersType::RequestHeaderModifier => (
                "RequestHeaderModifier",
                Filter::RequestHeaders(convert_header_modifier(
                    f.request_header_modifier
                        .as_ref()
                        .ok_or_else(|| missing("requestHeaderModifier"))?,
                    &format!("{field}.requestHeaderModifier"),
                )?),
            ),
            HttpRouteRulesFiltersType::ResponseHeaderModifier => {
                // Same shape as the request one; the generator made two types.
                let m = f
                    .response_header_modifier
                    .as_ref()
                    .ok_or_else(|| missing("responseHeaderModifier"))?;
                let m: HttpRouteRulesFiltersRequestHeaderModifier = serde_json::to_value(m)
                    .and_then(serde_json::from_value)
                    .map_err(|e| {
                        field_error(format!("{field}.responseHeaderModifier"), e.to_string())
                    })?;
                (
                    "ResponseHeaderModifier",
                    Filter::ResponseHeaders(convert_header_modifier(
                        &m,
                        &format!("{field}.responseHeaderModifier"),
                    )?),
                )
            }
            HttpRouteRulesFiltersType::UrlRewrite => (
                "URLRewrite",
                Filter::UrlRewrite(convert_url_rewrite(
                    f.url_rewrite
                        .as_ref()
                        .ok_or_else(|| missing("urlRewrite"))?,
                    all_prefix,
                    &format!("{field}.urlRewrite"),
                )?),
            ),
            HttpRouteRulesFiltersType::RequestRedirect => {
                if !rule_level {
                    return Err(field_error(
                        format!("{field}.type"),
                        "RequestRedirect is supported only in a rule's filters, not a backendRef's",
                    ));
                }
                (
                    "RequestRedirect",
                    Filter::Redirect(convert_redirect(
                        f.request_redirect
                            .as_ref()
                            .ok_or_else(|| missing("requestRedirect"))?,
                        all_prefix,
                        &format!("{field}.requestRedirect"),
                    )?),
                )
            }
            HttpRouteRulesFiltersType::RequestMirror => (
                "RequestMirror",
                Filter::Mirror(convert_mirror(
                    f.request_mirror
                        .as_ref()
                        .ok_or_else(|| missing("requestMirror"))?,
                    route_ns,
                    &format!("{field}.requestMirror"),
                )?),
            ),
            HttpRouteRulesFiltersType::ExtensionRef => {
                let r = f
                    .extension_ref
                    .as_ref()
                    .ok_or_else(|| missing("extensionRef"))?;
                let resolved = resolve_extension(r, route_ns, faults);
                if let FaultFilter::Unresolved { message, .. } = &resolved {
                    warnings.push(field_error(
                        format!("{field}.extensionRef"),
                        format!("{message}; requests this rule serves get 500"),
                    ));
                }
                ("ExtensionRef", Filter::Fault(resolved))
            }
            // The spec: an unsupported filter must not be skipped; the route is not accepted.
            HttpRouteRulesFiltersType::Cors => {
                return Err(field_error(
                    format!("{field}.type"),
                    format!("filter type {:?} is not supported", f.r#type),
                ));
            }
        };
        // Only RequestMirror and ExtensionRef may repeat; URLRewrite and RequestRedirect exclude each
        // other.
        if kind != "RequestMirror" && kind != "ExtensionRef" && seen.contains(&kind) {
            return Err(field_error(
                format!("{field}.type"),
                format!("{kind} given more than once"),
            ));
        }
        let conflicting = match kind {
            "URLRewrite" => Some("RequestRedirect"),
            "RequestRedirect" => Some("URLRewrite"),
            _ => None,
        };
        if let Some(other) = conflicting
            && seen.contains(&other)
        {
            return Err(field_error(
                format!("{field}.type"),
                format!("{kind} cannot be combined with {other}"),
            ));
        }
        seen.push(kind);
        out.push(filter);
    }
    Ok(out)
}

/// An `ExtensionRef` names an object in the route's namespace; Weir knows one kind.
fn resolve_extension(
    r: &gateway_api::apis::standard::httproutes::HttpRouteRulesFiltersExtensionRef,
    route_ns: &str,
    faults: &Faults,
) -> FaultFilter {
    if r.group != fault::GROUP || r.kind != fault::KIND {
        return FaultFilter::Unresolved {
            reason: "InvalidKind",
            message: format!(
                "extensionRef kind {:?} in group {:?} is not supported (only {} {})",
                r.kind,
                r.group,
                fault::GROUP,
                fault::KIND
            ),
        };
    }
    let name = NsName {
        namespace: route_ns.to_owned(),
        name: r.name.clone(),
    };
    match faults.get(&name) {
        Some(f) => FaultFilter::Resolved {
            name,
            fault: f.clone(),
        },
        None => FaultFilter::Unresolved {
            reason: "FilterNotFound",
            message: format!("{} {name} does not exist or is invalid", fault::KIND),
        },
    }
}

fn parse_timeout(value: Option<&String>, field: &str) -> Result<Timeout, FieldError> {
    let Some(v) = value else {
        return Ok(Timeout::Unset);
    };
    let d = gateway_api::Duration::from_str(v)
        .map_err(|e| field_error(field, format!("invalid duration {v:?}: {e}")))?;
    Ok(if d.is_zero() {
        Timeout::Disabled
    } else {
        Timeout::After(Duration::from_millis(
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        ))
    })
}

fn convert_timeouts(
    t: Option<&HttpRouteRulesTimeouts>,
    field: &str,
) -> Result<Timeouts, FieldError> {
    let Some(t) = t else {
        return Ok(Timeouts::default());
    };
    let request = parse_timeout(t.request.as_ref(), &format!("{field}.request"))?;
    let backend_request = parse_timeout(
        t.backend_request.as_ref(),
        &format!("{field}.backendRequest"),
    )?;
    if let (Timeout::After(r), Timeout::After(b)) = (request, backend_request)
        && b > r
    {
        return Err(field_error(
            format!("{field}.backendRequest"),
            "must not be longer than timeouts.request",
        ));
    }
    Ok(Timeouts {
        request,
        backend_request,
    })
}

/// Decodes an HTTPRoute from a parsed YAML (or JSON) document, naming the failing field. The standalone
/// source can call this for documents whose `kind` is [`KIND`].
pub fn http_route_from_value(doc: serde_yaml::Value) -> Result<HttpRoute, FieldError> {
    let api_version = doc.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("");
    let kind = doc.get("kind").and_then(|v| v.as_str()).unwrap_or("");
    let group_ok = api_version
        .strip_prefix(GROUP)
        .is_some_and(|v| v == "/v1" || v == "/v1beta1");
    if kind != KIND || !group_ok {
        return Err(field_error(
            "kind",
            format!("expected {GROUP}/v1 {KIND}, found {api_version} {kind}"),
        ));
    }
    serde_path_to_error::deserialize(doc)
        .map_err(|e| field_error(e.path().to_string(), e.inner().to_string()))
}

/// [`http_route_from_value`] for one YAML document.
pub fn http_route_from_yaml(text: &str) -> Result<HttpRoute, FieldError> {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| field_error("", format!("invalid YAML: {e}")))?;
    http_route_from_value(doc)
}

/// [`http_route_from_value`] for JSON.
pub fn http_route_from_json(text: &str) -> Result<HttpRoute, FieldError> {
    let doc: serde_yaml::Value =
        serde_json::from_str(text).map_err(|e| field_error("", format!("invalid JSON: {e}")))?;
    http_route_from_value(doc)
}

#[cfg(test)]
mod tests;
