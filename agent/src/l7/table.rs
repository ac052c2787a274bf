//! The route table: every valid route's matches, per parent Service, sorted once in the Gateway API's
//! precedence order so that a request takes the first match; and the weighted backend choice.
use std::{borrow::Cow, cmp::Reverse, collections::HashMap, net::SocketAddr, sync::Arc};

use gateway_api::apis::standard::httproutes::HttpRoute;
use hyper::http::{HeaderMap, Method};

use super::{
    directory::ServiceDirectory,
    fault::Faults,
    route::{PathMatch, Route, RouteError, RouteMatch, Rule},
};
use crate::model::NsName;

/// What a request offers to matching.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// The path as received (not decoded or normalised).
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// The Service port a request was sent to.
#[derive(Clone, Copy, Debug)]
pub struct Parent<'a> {
    pub service: &'a NsName,
    pub port: u16,
    pub port_name: &'a str,
}

/// One `matches` entry of one rule, with where it applies.
#[derive(Clone, Debug)]
struct Entry {
    route: Arc<Route>,
    rule: usize,
    matched: usize,
    /// Index into the route's parents of the parentRef this entry came from.
    parent: usize,
}

/// The result of matching a request.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// No route is attached to this Service port: it is a plain Service.
    NoRoutes,
    /// Routes are attached but none matches: 404.
    NoMatch,
    Matched(Selected<'a>),
}

#[derive(Clone, Copy, Debug)]
pub struct Selected<'a> {
    pub route: &'a Route,
    pub rule: &'a Rule,
    /// The match that selected the rule (its prefix is what `ReplacePrefixMatch` replaces).
    pub matched: &'a RouteMatch,
}

#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    by_service: HashMap<NsName, Vec<Entry>>,
    routes: Vec<Arc<Route>>,
}

/// Precedence among path matches. The spec ranks Exact over Prefix and leaves RegularExpression to
/// the implementation; like Envoy Gateway, a regular expression ranks between them.
fn path_rank(p: &PathMatch) -> (u8, Reverse<usize>) {
    match p {
        PathMatch::Exact(v) => (0, Reverse(v.len())),
        PathMatch::Regex(re) => (1, Reverse(re.as_str().len())),
        PathMatch::Prefix(v) => (2, Reverse(v.len())),
    }
}

impl RouteTable {
    /// Builds the table from validated routes; routes attached to no Service contribute nothing.
    pub fn new(routes: impl IntoIterator<Item = Route>) -> Self {
        let routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
        let mut by_service: HashMap<NsName, Vec<Entry>> = HashMap::new();
        for route in &routes {
            for (p, parent) in route.parents.iter().enumerate() {
                let entries = by_service.entry(parent.service.clone()).or_default();
                for (r, rule) in route.rules.iter().enumerate() {
                    for m in 0..rule.matches.len() {
                        entries.push(Entry {
                            route: route.clone(),
                            rule: r,
                            matched: m,
                            parent: p,
                        });
                    }
                }
            }
        }
        for entries in by_service.values_mut() {
            // HTTPRouteRule.matches: across all rules of the routes on a parent, precedence goes to the
            // match with an Exact path, then the longest Prefix, then a method, then the most header
            // matches, then the most query param matches; ties go to the oldest route, then the first
            // by "{namespace}/{name}", then the first rule (and match) in list order.
            entries.sort_by_cached_key(|e| {
                let m = &e.route.rules[e.rule].matches[e.matched];
                (
                    path_rank(&m.path),
                    m.method.is_none(),
                    Reverse(m.headers.len()),
                    Reverse(m.query.len()),
                    // Routes without a timestamp (from files) count as the newest.
                    e.route.created.is_none(),
                    e.route.created.clone(),
                    e.route.id.clone(),
                    e.rule,
                    e.matched,
                )
            });
        }
        Self { by_service, routes }
    }

    /// Validates HTTPRoutes and builds the table from the valid ones. The errors name the routes that
    /// were left out and why; the warnings of routes that were applied follow them (parents skipped,
    /// backendRefs that will answer 500).
    pub fn from_k8s<'a>(
        routes: impl IntoIterator<Item = &'a HttpRoute>,
    ) -> (Self, Vec<RouteError>) {
        Self::from_k8s_with(routes, &Faults::new())
    }

    /// [`RouteTable::from_k8s`], resolving `ExtensionRef` filters against `faults`.
    pub fn from_k8s_with<'a>(
        routes: impl IntoIterator<Item = &'a HttpRoute>,
        faults: &Faults,
    ) -> (Self, Vec<RouteError>) {
        let mut valid = Vec::new();
        let mut problems = Vec::new();
        for r in routes {
            match Route::from_k8s_with(r, faults) {
                Ok(Some(route)) => {
                    problems.extend(route.warnings.iter().map(|w| RouteError {
                        route: route.id.clone(),
                        field: w.field.clone(),
                        message: w.message.clone(),
                    }));
                    valid.push(route);
                }
                Ok(None) => {}
                Err(e) => problems.push(e),
            }
        }
        (Self::new(valid), problems)
    }

    /// The applied routes.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// Whether any route is attached to this Service port.
    pub fn has_routes(&self, parent: &Parent<'_>) -> bool {
        self.by_service.get(parent.service).is_some_and(|entries| {
            entries.iter().any(|e| {
                e.route.parents[e.parent].applies_to(parent.service, parent.port, parent.port_name)
            })
        })
    }

    /// The frontends whose Service port has a route: the connections the datapath should steer to
    /// the proxy.
    pub fn steered_frontends(&self, directory: &ServiceDirectory) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = directory
            .frontends()
            .filter(|(_, f)| {
                self.has_routes(&Parent {
                    service: &f.service.service,
                    port: f.service.port,
                    port_name: &f.port_name,
                })
            })
            .map(|(addr, _)| *addr)
            .collect();
        out.sort();
        out
    }

    /// The rule for a request to `parent`, by precedence.
    pub fn find(&self, parent: &Parent<'_>, req: &RequestView<'_>) -> Lookup<'_> {
        let Some(entries) = self.by_service.get(parent.service) else {
            return Lookup::NoRoutes;
        };
        let mut attached = false;
        for e in entries {
            if !e.route.parents[e.parent].applies_to(parent.service, parent.port, parent.port_name)
            {
                continue;
            }
            attached = true;
            let rule = &e.route.rules[e.rule];
            let m = &rule.matches[e.matched];
            if matches(m, req) {
                return Lookup::Matched(Selected {
                    route: &e.route,
                    rule,
                    matched: m,
                });
            }
        }
        if attached {
            Lookup::NoMatch
        } else {
            Lookup::NoRoutes
        }
    }
}

/// PathPrefix matching on whole `/`-separated segments: `/foo` matches `/foo`, `/foo/` and `/foo/bar`
/// but not `/foobar`. `prefix` has no trailing `/`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Whether one `matches` entry holds for the request: every condition (ANDed).
pub fn matches(m: &RouteMatch, req: &RequestView<'_>) -> bool {
    let path_ok = match &m.path {
        PathMatch::Exact(v) => req.path == v,
        PathMatch::Prefix(p) => prefix_matches(p, req.path),
        PathMatch::Regex(re) => re.is_match(req.path),
    };
    if !path_ok || m.method.as_ref().is_some_and(|method| method != req.method) {
        return false;
    }
    for h in &m.headers {
        // Repeated headers are one comma-separated list (RFC 9110 §5.3). A value that is not text
        // never matches.
        let mut values = req.headers.get_all(&h.name).iter();
        let Some(first) = values.next() else {
            return false;
        };
        let Ok(first) = first.to_str() else {
            return false;
        };
        let mut joined = Cow::Borrowed(first);
        for v in values {
            let Ok(v) = v.to_str() else {
                return false;
            };
            let s = joined.to_mut();
            s.push(',');
            s.push_str(v);
        }
        if !h.value.matches(&joined) {
            return false;
        }
    }
    for q in &m.query {
        match query_param(req.query.unwrap_or(""), &q.name) {
            Some(v) if q.value.matches(&v) => {}
            _ => return false,
        }
    }
    true
}

/// The first value of a query parameter (the spec recommends the first when one repeats),
/// percent-decoded; names compare after decoding, case-sensitively.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
}

/// `%XX` decoding; invalid escapes stay as they are, and bytes that are not UTF-8 are replaced.
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(s) => Cow::Owned(s),
        Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

#[cfg(test)]
mod tests;
