//! The L7 proxy's Prometheus metrics: requests by route rule, backend and status class, their
//! durations, and mirrored requests.
use std::time::Duration;

use hyper::http::StatusCode;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Which rule and backend served a request. Requests that matched no rule have an empty `route`
/// and `rule`; requests answered without a backend (404, redirect, 500) have an empty `backend`.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    /// The parent Service port the client dialled (`namespace/name:port`).
    pub service: String,
    /// The HTTPRoute (`namespace/name`).
    pub route: String,
    /// The rule's name, or its index.
    pub rule: String,
    /// The backend Service port (`namespace/name:port`).
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: String,
    pub route: String,
    pub rule: String,
    pub backend: String,
    /// `2xx`, `3xx`, `4xx`, `5xx` (or `1xx`).
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub route: String,
    pub rule: String,
    pub backend: String,
    /// `sent` (a response came back), `failed` (no response: no endpoint, refused, timed out,
    /// or the mirror fell behind the request body).
    pub result: String,
}

type HistogramFamily = Family<RuleLabels, Histogram, fn() -> Histogram>;

/// Cheap to clone: every clone updates the same series.
#[derive(Clone)]
pub struct L7Metrics {
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    mirrors: Family<MirrorLabels, Counter>,
}

impl Default for L7Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn duration_histogram() -> Histogram {
    // 0.5 ms to ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl L7Metrics {
    pub fn new() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            mirrors: Family::default(),
        }
    }

    /// Registers the metrics under `l7_` in the agent's registry (`weir_l7_…` with its prefix).
    pub fn register(&self, registry: &mut Registry) {
        let l7 = registry.sub_registry_with_prefix("l7");
        l7.register(
            "requests",
            "HTTP requests served by the L7 proxy, by parent Service, HTTPRoute rule, backend and status class",
            self.requests.clone(),
        );
        l7.register(
            "request_duration_seconds",
            "Time from a request's arrival to the end of its response, by parent Service, HTTPRoute rule and backend",
            self.duration.clone(),
        );
        l7.register(
            "mirror_requests",
            "Requests copied by RequestMirror filters, by result",
            self.mirrors.clone(),
        );
    }

    /// Records one finished request.
    pub fn observe(&self, labels: &RuleLabels, status: StatusCode, elapsed: Duration) {
        let code = format!("{}xx", status.as_u16() / 100);
        self.requests
            .get_or_create(&RequestLabels {
                service: labels.service.clone(),
                route: labels.route.clone(),
                rule: labels.rule.clone(),
                backend: labels.backend.clone(),
                code,
            })
            .inc();
        self.duration
            .get_or_create(labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn mirrored(&self, labels: &RuleLabels, backend: &str, sent: bool) {
        self.mirrors
            .get_or_create(&MirrorLabels {
                route: labels.route.clone(),
                rule: labels.rule.clone(),
                backend: backend.to_owned(),
                result: if sent { "sent" } else { "failed" }.to_owned(),
            })
            .inc();
    }

    /// How many requests a rule and backend answered with this status class (for tests and checks;
    /// reading creates no series).
    pub fn requests(&self, labels: &RuleLabels, code: &str) -> u64 {
        self.requests
            .get(&RequestLabels {
                service: labels.service.clone(),
                route: labels.route.clone(),
                rule: labels.rule.clone(),
                backend: labels.backend.clone(),
                code: code.to_owned(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn registered_under_the_agent_prefix() {
        let mut registry = Registry::with_prefix("weir");
        let m = L7Metrics::new();
        m.register(&mut registry);
        let labels = RuleLabels {
            service: "default/web:80".into(),
            route: "default/split".into(),
            rule: "0".into(),
            backend: "default/v1:80".into(),
        };
        m.observe(&labels, StatusCode::OK, Duration::from_millis(3));
        m.observe(&labels, StatusCode::BAD_GATEWAY, Duration::from_millis(3));
        m.mirrored(&labels, "default/shadow:80", true);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains(r#"weir_l7_requests_total{service="default/web:80",route="default/split",rule="0",backend="default/v1:80",code="2xx"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"code="5xx"} 1"#), "{text}");
        assert!(
            text.contains(r#"weir_l7_request_duration_seconds_count{service="default/web:80",route="default/split",rule="0",backend="default/v1:80"} 2"#),
            "{text}"
        );
        assert!(text.contains("weir_l7_mirror_requests_total{"), "{text}");
        assert_eq!(m.requests(&labels, "2xx"), 1);
    }
}
