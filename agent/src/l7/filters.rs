//! What HTTPRoute filters and a proxy hop do to a request or response: header modifiers, path
//! rewrites, redirect locations, hop-by-hop header removal and `X-Forwarded-For`.
use std::net::IpAddr;

use hyper::http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{CONNECTION, SET_COOKIE, TE, TRAILER, TRANSFER_ENCODING, UPGRADE},
};

use super::route::{HeaderModifier, PathMatch, PathModifier, Redirect};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

impl HeaderModifier {
    /// Set replaces every value, add appends to what is there (as the spec's example, one
    /// comma-separated value; `Set-Cookie` stays a separate line since it cannot be joined), remove
    /// drops every value.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            append_joined(headers, name, value);
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// Appends `value` to the header as one comma-joined value.
fn append_joined(headers: &mut HeaderMap, name: &HeaderName, value: &HeaderValue) {
    if *name == SET_COOKIE || !headers.contains_key(name) {
        headers.append(name.clone(), value.clone());
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for v in headers.get_all(name) {
        if !joined.is_empty() {
            joined.push(b',');
        }
        joined.extend_from_slice(v.as_bytes());
    }
    joined.push(b',');
    joined.extend_from_slice(value.as_bytes());
    match HeaderValue::from_bytes(&joined) {
        Ok(v) => {
            headers.insert(name.clone(), v);
        }
        // Cannot happen (both parts were valid values), but appending keeps the meaning anyway.
        Err(_) => {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// Applies a path modifier. `matched` is the match that selected the rule: `ReplacePrefixMatch`
/// replaces its prefix, on segment boundaries, as the spec's table shows (`/foo/bar` with prefix
/// `/foo` and replacement `/xyz` → `/xyz/bar`; with replacement `` or `/` → `/bar`).
pub fn modify_path(path: &str, matched: &PathMatch, modifier: &PathModifier) -> String {
    match modifier {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplacePrefixMatch(replacement) => {
            // Validation allows this modifier only on prefix-matched rules; anything else keeps the
            // path rather than guessing.
            let PathMatch::Prefix(prefix) = matched else {
                return path.to_owned();
            };
            // A path that no longer has the prefix (rewritten by an earlier filter) is left alone.
            let Some(rest) = path
                .strip_prefix(prefix.as_str())
                .filter(|rest| rest.is_empty() || rest.starts_with('/'))
            else {
                return path.to_owned();
            };
            let replacement = replacement.trim_end_matches('/');
            let out = format!("{replacement}{rest}");
            if out.is_empty() { "/".to_owned() } else { out }
        }
    }
}

/// Where the client dialled and what it asked for: the inputs of a redirect's `Location`.
#[derive(Clone, Copy, Debug)]
pub struct RedirectContext<'a> {
    /// The request's scheme (`http`: the proxy speaks plain text).
    pub scheme: &'a str,
    /// The request's host (Host or `:authority`) without a port.
    pub host: &'a str,
    /// The port the client dialled: the Service port, which plays the Gateway listener's role.
    pub listener_port: u16,
    pub path: &'a str,
    pub query: Option<&'a str>,
}

/// The `Location` of a RequestRedirect. Per the spec: the scheme and host default to the request's; the
/// port is the filter's, else the scheme's well-known port when the filter sets a scheme, else the
/// listener's; port 80 with http and 443 with https are left out. The query is kept.
pub fn redirect_location(r: &Redirect, matched: &PathMatch, ctx: &RedirectContext<'_>) -> String {
    let scheme = r.scheme.unwrap_or(ctx.scheme);
    let host = r.hostname.as_deref().unwrap_or(ctx.host);
    let port = match (r.port, r.scheme) {
        (Some(p), _) => p,
        (None, Some("https")) => 443,
        (None, Some(_)) => 80,
        (None, None) => ctx.listener_port,
    };
    let path = match &r.path {
        Some(m) => modify_path(ctx.path, matched, m),
        None => ctx.path.to_owned(),
    };
    let mut out = format!("{scheme}://{host}");
    if !matches!((scheme, port), ("http", 80) | ("https", 443)) {
        out.push_str(&format!(":{port}"));
    }
    out.push_str(&path);
    if let Some(q) = ctx.query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// The host part of an authority (`name:port`, `[v6]:port`).
pub fn host_without_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        // Keep the brackets: the result goes back into a URL.
        return rest
            .find(']')
            .map(|end| &authority[..end + 2])
            .unwrap_or(authority);
    }
    authority
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(authority)
}

/// Removes the headers that describe one connection, not the message (RFC 9110 §7.6.1): those named in
/// `Connection`, then Connection, Keep-Alive, Proxy-*, TE, Trailer, Transfer-Encoding and Upgrade.
/// Returns whether `TE: trailers` was present, which an HTTP/2 hop may carry on (gRPC needs it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    let te_trailers = headers
        .get_all(TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for name in [
        CONNECTION,
        KEEP_ALIVE,
        TE,
        TRAILER,
        TRANSFER_ENCODING,
        UPGRADE,
    ] {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
    te_trailers
}

/// Appends the client's address to `X-Forwarded-For` (one comma-separated value).
pub fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let ip = client.to_string();
    let value = HeaderValue::from_str(&ip).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    append_joined(headers, &X_FORWARDED_FOR, &value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(p: &str) -> PathMatch {
        PathMatch::Prefix(p.trim_end_matches('/').to_owned())
    }

    /// The table in the spec's HTTPPathModifier.ReplacePrefixMatch documentation, row by row.
    #[test]
    fn replace_prefix_match_follows_the_spec_table() {
        let rows = [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            // A prefix of `/` replaces nothing but the leading slash's segment boundary.
            ("/foo", "/", "/xyz", "/xyz/foo"),
            // A path without the prefix (already rewritten) stays as it is.
            ("/other/bar", "/foo", "/xyz", "/other/bar"),
            ("/foobar", "/foo", "/xyz", "/foobar"),
        ];
        for (path, p, replacement, want) in rows {
            let got = modify_path(
                path,
                &prefix(p),
                &PathModifier::ReplacePrefixMatch(replacement.to_owned()),
            );
            assert_eq!(got, want, "{path} with prefix {p} → {replacement}");
        }
        assert_eq!(
            modify_path(
                "/a/b",
                &prefix("/a"),
                &PathModifier::ReplaceFullPath("/c".into())
            ),
            "/c"
        );
    }

    fn redirect(scheme: Option<&'static str>, host: Option<&str>, port: Option<u16>) -> Redirect {
        Redirect {
            scheme,
            hostname: host.map(str::to_owned),
            port,
            path: None,
            status: hyper::http::StatusCode::FOUND,
        }
    }

    /// HTTPRequestRedirectFilter.port: the filter's port, else the scheme's well-known port when a
    /// scheme is set, else the listener's; 80 for http and 443 for https are left out.
    #[test]
    fn redirect_location_ports_and_defaults() {
        let ctx = RedirectContext {
            scheme: "http",
            host: "web.default",
            listener_port: 8080,
            path: "/a",
            query: Some("x=1"),
        };
        let m = prefix("/");
        let cases = [
            (redirect(None, None, None), "http://web.default:8080/a?x=1"),
            (
                redirect(None, Some("example.com"), None),
                "http://example.com:8080/a?x=1",
            ),
            (
                redirect(Some("https"), None, None),
                "https://web.default/a?x=1",
            ),
            (
                redirect(Some("http"), None, None),
                "http://web.default/a?x=1",
            ),
            (
                redirect(Some("https"), None, Some(8443)),
                "https://web.default:8443/a?x=1",
            ),
            (redirect(None, None, Some(80)), "http://web.default/a?x=1"),
        ];
        for (r, want) in cases {
            assert_eq!(redirect_location(&r, &m, &ctx), want, "{r:?}");
        }
    }

    #[test]
    fn header_modifier_set_add_remove() {
        let mut h = HeaderMap::new();
        h.insert("my-header", HeaderValue::from_static("foo"));
        h.insert("x-set", HeaderValue::from_static("old"));
        h.insert("x-gone", HeaderValue::from_static("bye"));
        let m = HeaderModifier {
            set: vec![
                (
                    HeaderName::from_static("x-set"),
                    HeaderValue::from_static("new"),
                ),
                (
                    HeaderName::from_static("x-fresh"),
                    HeaderValue::from_static("1"),
                ),
            ],
            add: vec![(
                HeaderName::from_static("my-header"),
                HeaderValue::from_static("bar,baz"),
            )],
            remove: vec![HeaderName::from_static("x-gone")],
        };
        m.apply(&mut h);
        // The spec's own example: `my-header: foo` + add `bar,baz` → `my-header: foo,bar,baz`.
        assert_eq!(h["my-header"], "foo,bar,baz");
        assert_eq!(h["x-set"], "new");
        assert_eq!(h["x-fresh"], "1");
        assert!(!h.contains_key("x-gone"));
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-authorization", HeaderValue::from_static("secret"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("trailer", HeaderValue::from_static("x-checksum"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        assert!(strip_hop_by_hop(&mut h));
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1".parse().expect("ip"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        append_forwarded_for(&mut h, "10.0.0.2".parse().expect("ip"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1,10.0.0.2");
    }

    #[test]
    fn host_without_port_handles_v4_v6_and_names() {
        assert_eq!(host_without_port("web:80"), "web");
        assert_eq!(host_without_port("web"), "web");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
        assert_eq!(host_without_port("10.0.0.1:8080"), "10.0.0.1");
    }
}
