//! The L7 proxy end to end on loopback, unprivileged: real hyper backends that echo what they received
//! (their name, method, path, headers, body size and hash), the proxy in between with routes decoded
//! from HTTPRoute YAML, and HTTP/1.1 (fresh and keep-alive) and HTTP/2 prior-knowledge clients.
use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use gateway_api::apis::standard::httproutes::HttpRoute;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    client::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::{Value, json};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, oneshot},
};
use weir_agent::{
    l7::{
        L7Proxy, ProxyConfig, RouteError, RouteTable, ServiceDirectory,
        body::{BoxError, ProxyBody, empty, full},
        metrics::RuleLabels,
        route::http_route_from_yaml,
    },
    model::NsName,
};
use xxhash_rust::xxh3::Xxh3;

/// The frontend (ClusterIP:port) the test resolver says every client dialled: Service shop/web:80.
const WEB: &str = "10.96.0.10:80";
/// A Service with no route: plain load balancing to its own endpoints.
const PLAIN: &str = "10.96.0.20:80";
/// An address no Service owns.
const UNKNOWN: &str = "10.96.0.30:80";
const CHUNK: usize = 1 << 20;
const CHUNKS: usize = 20;
/// Every test must finish well within this, or it fails instead of hanging.
const TEST_LIMIT: Duration = Duration::from_secs(90);

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn svc(name: &str) -> NsName {
    NsName {
        namespace: "shop".into(),
        name: name.into(),
    }
}

/// Byte counts one side reports so the other can wait for them (the streaming tests' lockstep).
#[derive(Default)]
struct Progress {
    bytes: AtomicU64,
    notify: Notify,
}

impl Progress {
    fn add(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    async fn wait_for(&self, at_least: u64) {
        loop {
            // Registered before the check, so an `add` in between is not missed.
            let notified = self.notify.notified();
            if self.bytes.load(Ordering::SeqCst) >= at_least {
                return;
            }
            notified.await;
        }
    }
}

/// A backend Service's only endpoint: a hyper server (HTTP/1.1 and h2c) that answers with a JSON echo
/// of the request and records it.
#[derive(Clone)]
struct Backend {
    name: &'static str,
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Value>>>,
    /// Upload bytes received on `/upload`.
    received: Arc<Progress>,
    /// Download bytes the test client reports having received from `/download`.
    client_got: Arc<Progress>,
}

fn chunk(i: usize) -> Bytes {
    Bytes::from(vec![(i % 251) as u8; CHUNK])
}

fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v)
    })
}

impl Backend {
    async fn start(name: &'static str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let backend = Backend {
            name,
            addr: listener.local_addr().expect("backend address"),
            seen: Arc::default(),
            received: Arc::default(),
            client_got: Arc::default(),
        };
        let b = backend.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let b = b.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let b = b.clone();
                        async move { Ok::<_, Infallible>(b.handle(req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        backend
    }

    fn seen(&self) -> Vec<Value> {
        self.seen.lock().expect("seen lock").clone()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let (parts, mut body) = req.into_parts();
        if parts.uri.path() == "/download" {
            return self.download();
        }
        let lockstep = parts.uri.path() == "/upload";
        let mut bytes = 0u64;
        let mut hash = Xxh3::new();
        let mut aborted = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        bytes += d.len() as u64;
                        hash.update(d);
                        if lockstep {
                            self.received.add(d.len());
                        }
                    }
                }
                Err(_) => {
                    aborted = true;
                    break;
                }
            }
        }
        let query = parts.uri.query().unwrap_or("");
        if let Some(ms) = query_value(query, "delay") {
            tokio::time::sleep(Duration::from_millis(ms.parse().expect("delay ms"))).await;
        }
        let mut headers: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in &parts.headers {
            headers
                .entry(k.to_string())
                .or_default()
                .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
        }
        let echo = json!({
            "name": self.name,
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "authority": parts.uri.authority().map(|a| a.to_string()),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body_bytes": bytes,
            "body_hash": hash.digest(),
            "body_aborted": aborted,
        });
        self.seen.lock().expect("seen lock").push(echo.clone());
        let mut resp = Response::new(full(echo.to_string()));
        let h = resp.headers_mut();
        h.insert("x-backend", self.name.parse().expect("header"));
        if query_value(query, "hop") == Some("1") {
            h.insert("connection", "x-hop-resp".parse().expect("header"));
            h.insert("x-hop-resp", "1".parse().expect("header"));
            h.insert("keep-alive", "timeout=5".parse().expect("header"));
            h.insert("proxy-authenticate", "Basic".parse().expect("header"));
        }
        resp
    }

    /// 20 MiB in 1 MiB chunks, each sent only once the client reports having received all before it:
    /// a proxy that collected the body before passing it on would never let it start.
    fn download(&self) -> Response<ProxyBody> {
        let got = self.client_got.clone();
        let stream = futures::stream::unfold(0usize, move |i| {
            let got = got.clone();
            async move {
                if i == CHUNKS {
                    return None;
                }
                got.wait_for((i * CHUNK) as u64).await;
                Some((Ok::<_, BoxError>(Frame::data(chunk(i))), i + 1))
            }
        });
        Response::new(StreamBody::new(stream).boxed_unsync())
    }
}

struct Lab {
    proxy: L7Proxy,
    addr: SocketAddr,
    backends: HashMap<&'static str, Backend>,
    _stop: oneshot::Sender<()>,
}

fn route(name: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: shop}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]
  rules:
{rules}"
    )
}

fn table(routes: &[String]) -> (RouteTable, Vec<RouteError>) {
    let parsed: Vec<HttpRoute> = routes
        .iter()
        .map(|y| http_route_from_yaml(y).expect("route YAML"))
        .collect();
    RouteTable::from_k8s(&parsed)
}

impl Lab {
    /// Backends named `names` (each the only endpoint of Service shop/<name> port 80), routes on
    /// shop/web, and the proxy on a loopback port whose every connection is to [`WEB`].
    async fn start(routes: &[String], names: &[&'static str], config: ProxyConfig) -> Lab {
        let mut backends = HashMap::new();
        for name in names {
            backends.insert(*name, Backend::start(name).await);
        }
        let proxy = L7Proxy::new(config);
        let mut dir = ServiceDirectory::default();
        dir.insert_frontend(addr(WEB), svc("web"), 80, "http");
        dir.insert_frontend(addr(PLAIN), svc("plain"), 80, "http");
        for (name, b) in &backends {
            dir.set_endpoints(svc(name), 80, [b.addr]);
        }
        if let Some(v1) = backends.get("v1") {
            dir.set_endpoints(svc("plain"), 80, [v1.addr]);
        }
        proxy.set_directory(dir);
        let (t, problems) = table(routes);
        assert!(problems.is_empty(), "route problems: {problems:?}");
        proxy.set_routes(t);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let proxy_addr = listener.local_addr().expect("proxy address");
        let (stop, stopped) = oneshot::channel::<()>();
        let p = proxy.clone();
        tokio::spawn(async move {
            p.serve(
                listener,
                |_: &SocketAddr, _: &SocketAddr| Some(addr(WEB)),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
        });
        Lab {
            proxy,
            addr: proxy_addr,
            backends,
            _stop: stop,
        }
    }

    fn backend(&self, name: &str) -> &Backend {
        &self.backends[name]
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not an echo ({e}): {} {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn name(&self) -> String {
        self.json()["name"].as_str().expect("name").to_owned()
    }

    fn header(&self, name: &str) -> Vec<String> {
        self.json()["headers"][name]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| v.as_str().expect("string").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

async fn collect(resp: Response<Incoming>) -> Reply {
    let (parts, body) = resp.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("response body").to_bytes(),
    }
}

/// An HTTP/1.1 request for shop/web (Host `web.shop`).
fn get(path: &str) -> hyper::http::request::Builder {
    Request::builder().uri(path).header("host", "web.shop")
}

async fn h1_conn(addr: SocketAddr) -> http1::SendRequest<ProxyBody> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1 handshake");
    tokio::spawn(conn);
    sender
}

async fn h2_conn(addr: SocketAddr) -> http2::SendRequest<ProxyBody> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    sender
}

async fn send1(sender: &mut http1::SendRequest<ProxyBody>, req: Request<ProxyBody>) -> Reply {
    sender.ready().await.expect("connection ready");
    collect(sender.send_request(req).await.expect("response")).await
}

async fn send2(sender: &mut http2::SendRequest<ProxyBody>, req: Request<ProxyBody>) -> Reply {
    sender.ready().await.expect("connection ready");
    collect(sender.send_request(req).await.expect("response")).await
}

/// One request on a connection of its own.
async fn fresh(addr: SocketAddr, req: Request<ProxyBody>) -> Reply {
    let mut s = h1_conn(addr).await;
    send1(&mut s, req).await
}

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test took too long")
}

fn split_rules() -> String {
    route(
        "split",
        "  - backendRefs:
    - {name: v1, port: 80, weight: 70}
    - {name: v2, port: 80, weight: 30}
    - {name: v0, port: 80, weight: 0}",
    )
}

fn assert_split(counts: &HashMap<String, u32>, what: &str) {
    let v1 = counts.get("v1").copied().unwrap_or(0);
    let v2 = counts.get("v2").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 500, "{what}: {counts:?}");
    assert!(
        (325..=375).contains(&v1),
        "{what}: v1 got {v1} of 500 (want 70 % ± 5 points): {counts:?}"
    );
    assert!(!counts.contains_key("v0"), "{what}: weight 0 got requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_on_fresh_and_keepalive_connections_and_h2() {
    within(async {
        let lab = Lab::start(
            &[split_rules()],
            &["v0", "v1", "v2"],
            ProxyConfig::default(),
        )
        .await;

        let mut fresh_counts = HashMap::new();
        for _ in 0..500 {
            let r = fresh(lab.addr, get("/").body(empty()).expect("request")).await;
            assert_eq!(r.status, StatusCode::OK);
            *fresh_counts.entry(r.name()).or_insert(0) += 1;
        }
        assert_split(&fresh_counts, "fresh connections");

        // One keep-alive connection: the proxy decides per request, not per connection.
        let mut conn = h1_conn(lab.addr).await;
        let mut keepalive = HashMap::new();
        for _ in 0..500 {
            let r = send1(&mut conn, get("/").body(empty()).expect("request")).await;
            *keepalive.entry(r.name()).or_insert(0) += 1;
        }
        assert_split(&keepalive, "one keep-alive connection");

        // HTTP/2 with prior knowledge, one connection; the backend leg is HTTP/2 too and carries the
        // client's authority.
        let mut conn = h2_conn(lab.addr).await;
        let mut h2 = HashMap::new();
        for i in 0..500 {
            let r = send2(
                &mut conn,
                Request::get("http://web.shop/h2")
                    .body(empty())
                    .expect("request"),
            )
            .await;
            if i == 0 {
                let echo = r.json();
                assert_eq!(echo["version"], "HTTP/2.0");
                assert_eq!(echo["authority"], "web.shop");
            }
            *h2.entry(r.name()).or_insert(0) += 1;
        }
        assert_split(&h2, "HTTP/2");
        assert!(lab.backend("v0").seen().is_empty());

        // Per rule and backend metrics.
        let labels = |backend: &str| RuleLabels {
            service: "shop/web:80".into(),
            route: "shop/split".into(),
            rule: "0".into(),
            backend: backend.into(),
        };
        let v1_total = fresh_counts["v1"] + keepalive["v1"] + h2["v1"];
        assert_eq!(
            lab.proxy.metrics().requests(&labels("shop/v1:80"), "2xx"),
            u64::from(v1_total)
        );
        assert_eq!(
            lab.proxy.metrics().requests(&labels("shop/v0:80"), "2xx"),
            0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_match_type_routes_and_no_match_is_404() {
    within(async {
        let routes = [route(
            "matches",
            "  - matches: [{path: {type: Exact, value: /exact}}]
    backendRefs: [{name: exact, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /prefix}}]
    backendRefs: [{name: prefix, port: 80}]
  - matches: [{path: {type: RegularExpression, value: \"/re/[0-9]+\"}}]
    backendRefs: [{name: regex, port: 80}]
  - matches: [{path: {value: /h}, headers: [{name: X-Env, value: canary}]}]
    backendRefs: [{name: header, port: 80}]
  - matches: [{path: {value: /q}, queryParams: [{name: v, value: \"2\"}]}]
    backendRefs: [{name: query, port: 80}]
  - matches: [{path: {value: /m}, method: POST}]
    backendRefs: [{name: method, port: 80}]",
        )];
        let lab = Lab::start(
            &routes,
            &["exact", "prefix", "regex", "header", "query", "method"],
            ProxyConfig::default(),
        )
        .await;
        let cases: [(Request<ProxyBody>, Option<&str>); 13] = [
            (get("/exact").body(empty()).expect("req"), Some("exact")),
            (get("/exact/x").body(empty()).expect("req"), None),
            (
                get("/prefix/a/b").body(empty()).expect("req"),
                Some("prefix"),
            ),
            (get("/prefix").body(empty()).expect("req"), Some("prefix")),
            (get("/prefixes").body(empty()).expect("req"), None),
            (get("/re/12").body(empty()).expect("req"), Some("regex")),
            (get("/re/x").body(empty()).expect("req"), None),
            (
                get("/h")
                    .header("x-env", "canary")
                    .body(empty())
                    .expect("req"),
                Some("header"),
            ),
            (get("/h").body(empty()).expect("req"), None),
            (get("/q?v=2").body(empty()).expect("req"), Some("query")),
            (get("/q?v=1").body(empty()).expect("req"), None),
            (
                get("/m").method(Method::POST).body(empty()).expect("req"),
                Some("method"),
            ),
            (get("/m").body(empty()).expect("req"), None),
        ];
        let mut conn = h1_conn(lab.addr).await;
        for (req, want) in cases {
            let target = req.uri().to_string();
            let r = send1(&mut conn, req).await;
            match want {
                Some(name) => {
                    assert_eq!(r.status, StatusCode::OK, "{target}");
                    assert_eq!(r.name(), name, "{target}");
                }
                None => assert_eq!(r.status, StatusCode::NOT_FOUND, "{target}"),
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_without_a_usable_backend_answer_500() {
    within(async {
        let routes = [route(
            "broken",
            "  - matches: [{path: {value: /no-endpoints}}]
    backendRefs: [{name: ghost, port: 80}]
  - matches: [{path: {value: /all-zero}}]
    backendRefs: [{name: v1, port: 80, weight: 0}]
  - matches: [{path: {value: /invalid}}]
    backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: far, port: 80}]
  - matches: [{path: {value: /none}}]
  - matches: [{path: {value: /ok}}]
    backendRefs: [{name: v1, port: 80}]",
        )];
        let (_, problems) = table(&routes);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "spec.rules[2].backendRefs[0]");
        let lab = Lab::start(&[], &["v1"], ProxyConfig::default()).await;
        lab.proxy.set_routes(table(&routes).0);
        for path in ["/no-endpoints", "/all-zero", "/invalid", "/none"] {
            let r = fresh(lab.addr, get(path).body(empty()).expect("req")).await;
            assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
        }
        let r = fresh(lab.addr, get("/ok").body(empty()).expect("req")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(lab.backend("v1").seen().len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_modifiers() {
    within(async {
        let routes = [route(
            "headers",
            "  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-set, value: new}]
        add: [{name: x-add, value: b}]
        remove: [x-remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: x-resp-set, value: r}]
        add: [{name: x-resp-add, value: s}]
        remove: [x-backend]
    backendRefs: [{name: v1, port: 80}]",
        )];
        let lab = Lab::start(&routes, &["v1"], ProxyConfig::default()).await;
        let r = fresh(
            lab.addr,
            get("/")
                .header("x-set", "old")
                .header("x-add", "a")
                .header("x-remove", "1")
                .body(empty())
                .expect("req"),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-set"), ["new"]);
        assert_eq!(r.header("x-add"), ["a,b"]);
        assert!(r.header("x-remove").is_empty());
        assert_eq!(r.headers["x-resp-set"], "r");
        assert_eq!(r.headers["x-resp-add"], "s");
        assert!(!r.headers.contains_key("x-backend"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_rewrite() {
    within(async {
        let routes = [route(
            "rewrite",
            "  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: internal.example
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}
    backendRefs: [{name: v1, port: 80}]
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - type: URLRewrite
      urlRewrite:
        path: {type: ReplaceFullPath, replaceFullPath: /new}
    backendRefs: [{name: v1, port: 80}]",
        )];
        let lab = Lab::start(&routes, &["v1"], ProxyConfig::default()).await;
        let r = fresh(lab.addr, get("/api/items?x=1").body(empty()).expect("req")).await;
        let echo = r.json();
        assert_eq!(echo["path"], "/v2/items");
        assert_eq!(echo["query"], "x=1");
        assert_eq!(r.header("host"), ["internal.example"]);
        let r = fresh(lab.addr, get("/api").body(empty()).expect("req")).await;
        assert_eq!(r.json()["path"], "/v2");
        let r = fresh(lab.addr, get("/old").body(empty()).expect("req")).await;
        assert_eq!(r.json()["path"], "/new");
        assert_eq!(r.header("host"), ["web.shop"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_redirect() {
    within(async {
        let routes = [route(
            "redirects",
            "  - matches: [{path: {value: /redir}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: example.com}
    backendRefs: [{name: v1, port: 80}]
  - matches: [{path: {value: /secure}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /moved}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        port: 8443
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}",
        )];
        let lab = Lab::start(&routes, &["v1"], ProxyConfig::default()).await;
        let cases = [
            // statusCode defaults to 302; the port is the listener's (the Service port, 80 here),
            // left out for http on 80; the query is kept.
            (
                "/redir?x=1",
                StatusCode::FOUND,
                "http://example.com/redir?x=1",
            ),
            // A scheme without a port takes the scheme's well-known port, left out for https/443.
            (
                "/secure",
                StatusCode::MOVED_PERMANENTLY,
                "https://web.shop/secure",
            ),
            (
                "/moved/a/b",
                StatusCode::FOUND,
                "http://web.shop:8443/new/a/b",
            ),
        ];
        for (path, status, location) in cases {
            let r = fresh(lab.addr, get(path).body(empty()).expect("req")).await;
            assert_eq!(r.status, status, "{path}");
            assert_eq!(r.headers["location"], location, "{path}");
        }
        assert!(
            lab.backend("v1").seen().is_empty(),
            "a redirect reached a backend"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_mirror() {
    within(async {
        let routes = [route(
            "mirror",
            "  - matches: [{path: {value: /mirror}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 80}}
    backendRefs: [{name: v1, port: 80}]
  - matches: [{path: {value: /never}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow0, port: 80}, percent: 0}
    backendRefs: [{name: v1, port: 80}]",
        )];
        let lab = Lab::start(
            &routes,
            &["v1", "shadow", "shadow0"],
            ProxyConfig::default(),
        )
        .await;
        let payload: Bytes = (0..100 * 1024).map(|i| (i % 253) as u8).collect();
        let r = fresh(
            lab.addr,
            get("/mirror?k=v")
                .method(Method::POST)
                .header("x-trace", "abc")
                .body(full(payload.clone()))
                .expect("req"),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let primary = r.json();
        assert_eq!(primary["name"], "v1");
        assert_eq!(primary["body_bytes"], 100 * 1024);
        // Fire and forget: the copy arrives on its own time.
        let deadline = Instant::now() + Duration::from_secs(10);
        let copy = loop {
            if let Some(c) = lab.backend("shadow").seen().first().cloned() {
                break c;
            }
            assert!(
                Instant::now() < deadline,
                "the mirror never saw the request"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(copy["method"], "POST");
        assert_eq!(copy["path"], "/mirror");
        assert_eq!(copy["query"], "k=v");
        assert_eq!(copy["headers"]["x-trace"][0], "abc");
        assert_eq!(copy["body_bytes"], 100 * 1024);
        assert_eq!(copy["body_hash"], primary["body_hash"]);
        assert_eq!(copy["body_aborted"], false);

        for _ in 0..10 {
            let r = fresh(lab.addr, get("/never").body(empty()).expect("req")).await;
            assert_eq!(r.status, StatusCode::OK);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            lab.backend("shadow0").seen().is_empty(),
            "percent: 0 mirrored"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeouts() {
    within(async {
        let routes = [route(
            "timeouts",
            "  - matches: [{path: {value: /default}}]
    backendRefs: [{name: v1, port: 80}]
  - matches: [{path: {value: /disabled}}]
    timeouts: {request: 0s}
    backendRefs: [{name: v1, port: 80}]
  - matches: [{path: {value: /short}}]
    timeouts: {request: 200ms}
    backendRefs: [{name: v1, port: 80}]
  - matches: [{path: {value: /backend}}]
    timeouts: {request: 10s, backendRequest: 200ms}
    backendRefs: [{name: v1, port: 80}]",
        )];
        let config = ProxyConfig {
            default_request_timeout: Some(Duration::from_millis(400)),
            ..ProxyConfig::default()
        };
        let lab = Lab::start(&routes, &["v1"], config).await;
        let cases = [
            // The proxy's default applies to a rule without timeouts.
            ("/default?delay=1500", StatusCode::GATEWAY_TIMEOUT),
            ("/default?delay=0", StatusCode::OK),
            // `0s` disables the timeout, default included.
            ("/disabled?delay=1500", StatusCode::OK),
            ("/short?delay=1500", StatusCode::GATEWAY_TIMEOUT),
            ("/short?delay=0", StatusCode::OK),
            ("/backend?delay=1500", StatusCode::GATEWAY_TIMEOUT),
        ];
        for (path, want) in cases {
            let start = Instant::now();
            let r = fresh(lab.addr, get(path).body(empty()).expect("req")).await;
            assert_eq!(r.status, want, "{path}");
            if want == StatusCode::GATEWAY_TIMEOUT {
                assert!(
                    start.elapsed() < Duration::from_millis(1200),
                    "{path}: 504 only after {:?}",
                    start.elapsed()
                );
            }
        }
    })
    .await;
}

fn catch_all() -> String {
    route("all", "  - backendRefs: [{name: v1, port: 80}]")
}

/// Uploads 20 MiB in 1 MiB chunks, each sent only once the backend has received every byte before
/// it, then downloads 20 MiB the same way round. If the proxy collected a body before forwarding it,
/// neither side could make progress and the test would time out.
async fn stream_both_ways(lab: &Lab, h2: bool) {
    let backend = lab.backend("v1").clone();
    let received = backend.received.clone();
    let base = received.bytes.load(Ordering::SeqCst);
    let upload = futures::stream::unfold(0usize, move |i| {
        let received = received.clone();
        async move {
            if i == CHUNKS {
                return None;
            }
            tokio::time::timeout(
                Duration::from_secs(20),
                received.wait_for(base + (i * CHUNK) as u64),
            )
            .await
            .expect("the backend did not receive the previous chunk: the upload is not streamed");
            Some((Ok::<_, BoxError>(Frame::data(chunk(i))), i + 1))
        }
    });
    let mut sent_hash = Xxh3::new();
    for i in 0..CHUNKS {
        sent_hash.update(&chunk(i));
    }
    let body = StreamBody::new(upload).boxed_unsync();
    let reply = if h2 {
        let mut c = h2_conn(lab.addr).await;
        send2(
            &mut c,
            Request::post("http://web.shop/upload")
                .body(body)
                .expect("req"),
        )
        .await
    } else {
        fresh(
            lab.addr,
            get("/upload").method(Method::POST).body(body).expect("req"),
        )
        .await
    };
    assert_eq!(reply.status, StatusCode::OK);
    let echo = reply.json();
    assert_eq!(echo["body_bytes"], (CHUNKS * CHUNK) as u64);
    assert_eq!(echo["body_hash"], sent_hash.digest());

    let got = backend.client_got.clone();
    let base = got.bytes.load(Ordering::SeqCst);
    assert_eq!(base, 0, "one download per backend");
    let resp = if h2 {
        let mut c = h2_conn(lab.addr).await;
        c.ready().await.expect("ready");
        c.send_request(
            Request::get("http://web.shop/download")
                .body(empty())
                .expect("req"),
        )
        .await
        .expect("response")
    } else {
        let mut c = h1_conn(lab.addr).await;
        c.ready().await.expect("ready");
        c.send_request(get("/download").body(empty()).expect("req"))
            .await
            .expect("response")
    };
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut total = 0usize;
    let mut hash = Xxh3::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(20), body.frame())
        .await
        .expect("no download progress: the response is not streamed")
    {
        let frame = frame.expect("download frame");
        if let Some(d) = frame.data_ref() {
            total += d.len();
            hash.update(d);
            got.add(d.len());
        }
    }
    assert_eq!(total, CHUNKS * CHUNK);
    assert_eq!(hash.digest(), sent_hash.digest());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_over_http1() {
    within(async {
        let lab = Lab::start(&[catch_all()], &["v1"], ProxyConfig::default()).await;
        stream_both_ways(&lab, false).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_over_http2() {
    within(async {
        let lab = Lab::start(&[catch_all()], &["v1"], ProxyConfig::default()).await;
        stream_both_ways(&lab, true).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_removed_and_forwarded_for_appended() {
    within(async {
        let lab = Lab::start(&[catch_all()], &["v1"], ProxyConfig::default()).await;
        let r = fresh(
            lab.addr,
            get("/?hop=1")
                .header("connection", "x-secret")
                .header("x-secret", "1")
                .header("keep-alive", "timeout=5")
                .header("proxy-authorization", "Basic eDp5")
                .header("proxy-connection", "keep-alive")
                .header("te", "gzip")
                .header("trailer", "x-checksum")
                .header("upgrade", "foo/2")
                .header("x-kept", "yes")
                .header("x-forwarded-for", "192.0.2.1")
                .body(empty())
                .expect("req"),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let echo = r.json();
        let seen = echo["headers"].as_object().expect("headers");
        for hop in [
            "connection",
            "x-secret",
            "keep-alive",
            "proxy-authorization",
            "proxy-connection",
            "te",
            "trailer",
            "upgrade",
        ] {
            assert!(!seen.contains_key(hop), "{hop} reached the backend");
        }
        assert_eq!(r.header("x-kept"), ["yes"]);
        assert_eq!(r.header("x-forwarded-for"), ["192.0.2.1,127.0.0.1"]);
        // The backend's hop-by-hop response headers stay on its hop.
        for hop in ["x-hop-resp", "keep-alive", "proxy-authenticate"] {
            assert!(!r.headers.contains_key(hop), "{hop} reached the client");
        }
        assert_eq!(r.headers["x-backend"], "v1");

        let r = fresh(lab.addr, get("/").body(empty()).expect("req")).await;
        assert_eq!(r.header("x-forwarded-for"), ["127.0.0.1"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_swap_without_dropping_connections() {
    within(async {
        let lab = Lab::start(&[catch_all()], &["v1", "v2"], ProxyConfig::default()).await;
        let mut h1 = h1_conn(lab.addr).await;
        let mut h2 = h2_conn(lab.addr).await;
        let r = send1(&mut h1, get("/").body(empty()).expect("req")).await;
        assert_eq!(r.name(), "v1");
        let r = send2(
            &mut h2,
            Request::get("http://web.shop/").body(empty()).expect("req"),
        )
        .await;
        assert_eq!(r.name(), "v1");
        let (t, _) = table(&[route("all", "  - backendRefs: [{name: v2, port: 80}]")]);
        lab.proxy.set_routes(t);
        // The same connections, the new routes.
        let r = send1(&mut h1, get("/").body(empty()).expect("req")).await;
        assert_eq!(r.name(), "v2");
        let r = send2(
            &mut h2,
            Request::get("http://web.shop/").body(empty()).expect("req"),
        )
        .await;
        assert_eq!(r.name(), "v2");
        // And a new directory: v2's endpoint moves to v1's server.
        let mut dir = ServiceDirectory::default();
        dir.insert_frontend(addr(WEB), svc("web"), 80, "http");
        dir.set_endpoints(svc("v2"), 80, [lab.backend("v1").addr]);
        lab.proxy.set_directory(dir);
        let r = send1(&mut h1, get("/").body(empty()).expect("req")).await;
        assert_eq!(r.name(), "v1");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_without_routes_and_unknown_frontends() {
    within(async {
        let lab = Lab::start(&[catch_all()], &["v1"], ProxyConfig::default()).await;
        // More listeners on the same proxy, each claiming its connections dialled another frontend.
        for (frontend, want) in [(PLAIN, StatusCode::OK), (UNKNOWN, StatusCode::NOT_FOUND)] {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let a = listener.local_addr().expect("address");
            let p = lab.proxy.clone();
            tokio::spawn(async move {
                p.serve(
                    listener,
                    move |_: &SocketAddr, _: &SocketAddr| Some(addr(frontend)),
                    std::future::pending(),
                )
                .await;
            });
            let r = fresh(a, get("/").body(empty()).expect("req")).await;
            assert_eq!(r.status, want, "{frontend}");
            if want == StatusCode::OK {
                // A Service with no route is a plain Service: its own endpoints serve.
                assert_eq!(r.name(), "v1");
            }
        }
        // A resolver that cannot place a connection closes it.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = listener.local_addr().expect("address");
        let p = lab.proxy.clone();
        tokio::spawn(async move {
            p.serve(
                listener,
                |_: &SocketAddr, _: &SocketAddr| None,
                std::future::pending(),
            )
            .await;
        });
        let stream = TcpStream::connect(a).await.expect("connect");
        let (mut sender, conn) = http1::handshake::<_, ProxyBody>(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let sent = sender
            .send_request(get("/").body(empty()).expect("req"))
            .await;
        assert!(sent.is_err(), "an unplaced connection was served");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_is_502() {
    within(async {
        let lab = Lab::start(
            &[route("dead", "  - backendRefs: [{name: dead, port: 80}]")],
            &[],
            ProxyConfig::default(),
        )
        .await;
        // A port that was just free: nothing listens there.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("address");
        let mut dir = ServiceDirectory::default();
        dir.insert_frontend(addr(WEB), svc("web"), 80, "http");
        dir.set_endpoints(svc("dead"), 80, [closed]);
        lab.proxy.set_directory(dir);
        let r = fresh(lab.addr, get("/").body(empty()).expect("req")).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        let mut c = h2_conn(lab.addr).await;
        let r = send2(
            &mut c,
            Request::get("http://web.shop/").body(empty()).expect("req"),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    })
    .await;
}

/// An h2c endpoint that closes every connection (GOAWAY) right after its first request, as a backend
/// with a very short idle timeout or a per-connection request limit does; counts its connections.
async fn closing_h2_backend() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = listener.local_addr().expect("address");
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let served = Arc::new(Notify::new());
                let notify = served.clone();
                let service = service_fn(move |_req: Request<Incoming>| {
                    let notify = notify.clone();
                    async move {
                        notify.notify_one();
                        Ok::<_, Infallible>(Response::new(full("closing")))
                    }
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service);
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    () = served.notified() => {
                        // Shortly after the answer, as an idle timeout would.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
    });
    (a, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_backend_connections_are_replaced_when_closed() {
    within(async {
        let lab = Lab::start(
            &[route("all", "  - backendRefs: [{name: closing, port: 80}]")],
            &[],
            ProxyConfig::default(),
        )
        .await;
        let (backend, accepted) = closing_h2_backend().await;
        let mut dir = ServiceDirectory::default();
        dir.insert_frontend(addr(WEB), svc("web"), 80, "http");
        dir.set_endpoints(svc("closing"), 80, [backend]);
        lab.proxy.set_directory(dir);
        let mut c = h2_conn(lab.addr).await;
        for i in 0..5 {
            let r = send2(
                &mut c,
                Request::get("http://web.shop/").body(empty()).expect("req"),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "request {i}");
            assert_eq!(&r.body[..], b"closing");
            // Let the GOAWAY reach the proxy half of the time, and race it the other half.
            if i % 2 == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert!(
            accepted.load(Ordering::SeqCst) >= 3,
            "connections were not replaced"
        );
    })
    .await;
}

/// An h2c endpoint whose first connection answers its first request with GOAWAY and no response (a
/// backend shutting down); later connections answer 200. Counts the requests it saw.
async fn goaway_once_backend() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = listener.local_addr().expect("address");
    let requests = Arc::new(AtomicU64::new(0));
    let count = requests.clone();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let refuse = std::mem::replace(&mut first, false);
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(stream).await else {
                    return;
                };
                let mut held = Vec::new();
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    if refuse {
                        conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                        // Not answered, not reset: the GOAWAY alone ends it.
                        held.push(respond);
                        continue;
                    }
                    let _ = respond.send_response(Response::new(()), true);
                }
            });
        }
    });
    (a, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_cut_by_goaway_are_sent_again_once() {
    within(async {
        let lab = Lab::start(
            &[route("all", "  - backendRefs: [{name: leaving, port: 80}]")],
            &[],
            ProxyConfig::default(),
        )
        .await;
        let set_backend = |a: SocketAddr| {
            let mut dir = ServiceDirectory::default();
            dir.insert_frontend(addr(WEB), svc("web"), 80, "http");
            dir.set_endpoints(svc("leaving"), 80, [a]);
            lab.proxy.set_directory(dir);
        };
        let mut c = h2_conn(lab.addr).await;
        // A GET cut by GOAWAY is sent again on a new connection.
        let (backend, requests) = goaway_once_backend().await;
        set_backend(backend);
        let r = send2(
            &mut c,
            Request::get("http://web.shop/").body(empty()).expect("req"),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(requests.load(Ordering::SeqCst), 2);
        // A POST with a body is not: its body is gone, and it may have had an effect.
        let (backend, requests) = goaway_once_backend().await;
        set_backend(backend);
        let r = send2(
            &mut c,
            Request::post("http://web.shop/")
                .body(full("payload"))
                .expect("req"),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert_eq!(requests.load(Ordering::SeqCst), 1);
    })
    .await;
}
