//! The proxy server: accepts HTTP/1.1 (keep-alive) and HTTP/2 with prior knowledge (h2c) on one
//! listener, finds each request's rule, applies its filters, and forwards it to one endpoint of the
//! chosen backend through pooled connections, streaming bodies both ways.
use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use http_body_util::BodyExt as _;
use hyper::{
    Method, Request, Response, StatusCode, Uri, Version,
    body::{Body as _, Incoming},
    client::conn::http2,
    header::{CONTENT_TYPE, EXPECT, HOST, LOCATION, TE},
    http::{HeaderMap, HeaderValue, request::Parts},
    service::service_fn,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use rand::Rng as _;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, warn};

use super::{
    body::{self, BoxError, Done, MirrorBody, ProxyBody, ResponseBody, TeeBody},
    directory::ServiceDirectory,
    fault::Fault,
    filters::{
        RedirectContext, append_forwarded_for, host_without_port, modify_path, redirect_location,
        strip_hop_by_hop,
    },
    metrics::{L7Metrics, RuleLabels},
    route::{
        Backend, FaultFilter, Filter, HeaderModifier, Mirror, PathMatch, Redirect, ServicePort,
        Timeout,
    },
    table::{Lookup, Parent, RequestView, RouteTable},
};

/// Names the Service frontend (ClusterIP:port) a client dialled, from an accepted connection's peer and
/// local addresses. `None` closes the connection: the proxy cannot serve a client it cannot place.
pub trait FrontendResolver: Send + Sync + 'static {
    fn resolve(&self, peer: &SocketAddr, local: &SocketAddr) -> Option<SocketAddr>;
}

impl<F> FrontendResolver for F
where
    F: Fn(&SocketAddr, &SocketAddr) -> Option<SocketAddr> + Send + Sync + 'static,
{
    fn resolve(&self, peer: &SocketAddr, local: &SocketAddr) -> Option<SocketAddr> {
        self(peer, local)
    }
}

/// The default resolver: the eBPF steering hands the proxy sockets whose local address is the
/// original destination, so the local address is the frontend.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalAddr;

impl FrontendResolver for LocalAddr {
    fn resolve(&self, _peer: &SocketAddr, local: &SocketAddr) -> Option<SocketAddr> {
        Some(*local)
    }
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The request timeout of rules that set none; `None` (the default) means none, as for L4 traffic:
    /// the spec leaves an unset timeout to the implementation.
    pub default_request_timeout: Option<Duration>,
    /// Bound on connecting to an endpoint (502 after it).
    pub connect_timeout: Duration,
    /// Idle pooled HTTP/1.1 connections to backends are closed after this.
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// An HTTP/1.1 client must send a request's headers within this (a slow-loris bound). hyper starts
    /// it while waiting for the next request, so it is also how long an idle keep-alive connection
    /// stays open; it is longer than common client pools' idle timeouts (Go's 90 s) so that the
    /// client, not the proxy, closes idle connections.
    pub header_read_timeout: Duration,
    /// Body frames buffered per mirror before the mirror is cut off rather than slow the request.
    pub mirror_buffer_frames: usize,
    /// A mirrored request is abandoned after this (its response is ignored anyway).
    pub mirror_timeout: Duration,
    /// After shutdown is asked, open connections get this long to finish their requests.
    pub shutdown_grace: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            default_request_timeout: None,
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 64,
            header_read_timeout: Duration::from_secs(120),
            mirror_buffer_frames: 64,
            mirror_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// HTTP/2 connections to endpoints, one per endpoint (HTTP/2 multiplexes). The legacy client cannot
/// be used here: it takes the `:authority` it sends from the URI it also picks the connection by, so
/// it could not send the client's authority to an endpoint chosen by address.
struct H2Pool {
    conns: Mutex<HashMap<SocketAddr, http2::SendRequest<ProxyBody>>>,
    connect_timeout: Duration,
}

impl H2Pool {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, http2::SendRequest<ProxyBody>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn connection(&self, ep: SocketAddr) -> Result<http2::SendRequest<ProxyBody>, BoxError> {
        let cached = self.lock().get(&ep).filter(|s| !s.is_closed()).cloned();
        if let Some(sender) = cached {
            return Ok(sender);
        }
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(ep))
            .await
            .map_err(|_| format!("connecting to {ep} timed out"))??;
        stream.set_nodelay(true)?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%ep, "l7: HTTP/2 backend connection ended: {e}");
            }
        });
        // Two requests racing to a new endpoint may both connect; the later one is kept, and the other
        // connection closes once its request is done and its handle dropped.
        self.lock().insert(ep, sender.clone());
        Ok(sender)
    }

    async fn send(
        &self,
        ep: SocketAddr,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        // What is needed to send a bodiless idempotent request again (RFC 9110 §9.2.2 allows it).
        let replay = (idempotent(req.method()) && req.body().is_end_stream()).then(|| {
            (
                req.method().clone(),
                req.uri().clone(),
                req.headers().clone(),
            )
        });
        let mut sender = self.connection(ep).await?;
        let req = match sender.try_send_request(req).await {
            Ok(resp) => return Ok(resp),
            // hyper hands the request back only when none of it was sent: the cached connection had
            // gone away (the backend closed it while idle). It is safe to send again, once.
            Err(mut e) => match e.take_message() {
                Some(req) => req,
                None => {
                    let err = e.into_error();
                    match replay {
                        // The connection failed under the request (GOAWAY, REFUSED_STREAM, closed):
                        // a bodiless idempotent request can be sent again on a new connection, as
                        // HTTP clients do.
                        Some((method, uri, headers)) if connection_failed(&err) => {
                            let mut req = Request::new(body::empty());
                            *req.method_mut() = method;
                            *req.uri_mut() = uri;
                            *req.version_mut() = Version::HTTP_2;
                            *req.headers_mut() = headers;
                            req
                        }
                        _ => return Err(err.into()),
                    }
                }
            },
        };
        self.lock().remove(&ep);
        let mut sender = self.connection(ep).await?;
        Ok(sender.send_request(req).await?)
    }

    fn retain(&self, keep: &HashSet<SocketAddr>) {
        self.lock()
            .retain(|ep, sender| keep.contains(ep) && !sender.is_closed());
    }
}

/// RFC 9110 §9.2.2: requests whose repetition has the same effect as one.
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether an HTTP/2 request failed with its connection rather than on its own merits: the backend
/// refused the stream, went away (GOAWAY), or the connection broke or closed under it.
fn connection_failed(err: &hyper::Error) -> bool {
    if err.is_closed() || err.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || h2.is_io();
        }
        if e.is::<std::io::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

struct Shared {
    config: ProxyConfig,
    routes: watch::Sender<Arc<RouteTable>>,
    directory: watch::Sender<Arc<ServiceDirectory>>,
    http1: Client<HttpConnector, ProxyBody>,
    http2: H2Pool,
    metrics: L7Metrics,
}

/// The proxy. Clones share the same state; routes and Services are swapped with [`L7Proxy::set_routes`]
/// and [`L7Proxy::set_directory`] while connections stay open (each request reads the current ones).
#[derive(Clone)]
pub struct L7Proxy {
    shared: Arc<Shared>,
}

#[derive(Clone, Copy, Debug)]
struct ConnInfo {
    peer: SocketAddr,
    frontend: SocketAddr,
}

impl L7Proxy {
    pub fn new(config: ProxyConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // The proxy forwards the client's Host; the URI only names the endpoint to connect to.
            .set_host(false)
            .build(connector);
        Self {
            shared: Arc::new(Shared {
                http2: H2Pool {
                    conns: Mutex::new(HashMap::new()),
                    connect_timeout: config.connect_timeout,
                },
                config,
                routes: watch::Sender::new(Arc::new(RouteTable::default())),
                directory: watch::Sender::new(Arc::new(ServiceDirectory::default())),
                http1,
                metrics: L7Metrics::new(),
            }),
        }
    }

    /// The proxy's metrics; `register` them in the agent's registry.
    pub fn metrics(&self) -> &L7Metrics {
        &self.shared.metrics
    }

    /// Replaces the routes; requests already under way finish with the table they started with.
    pub fn set_routes(&self, table: RouteTable) {
        self.shared.routes.send_replace(Arc::new(table));
    }

    /// Replaces the Services and endpoints. HTTP/2 connections to endpoints no longer listed are let go.
    pub fn set_directory(&self, directory: ServiceDirectory) {
        let keep: HashSet<SocketAddr> = directory.all_endpoints().copied().collect();
        self.shared.http2.retain(&keep);
        self.shared.directory.send_replace(Arc::new(directory));
    }

    pub fn routes(&self) -> Arc<RouteTable> {
        self.shared.routes.borrow().clone()
    }

    pub fn directory(&self) -> Arc<ServiceDirectory> {
        self.shared.directory.borrow().clone()
    }

    /// Serves connections from `listener` until `shutdown` completes, then stops accepting and gives
    /// open connections [`ProxyConfig::shutdown_grace`] to finish.
    pub async fn serve(
        &self,
        listener: TcpListener,
        resolver: impl FrontendResolver,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .keep_alive(true)
            .timer(TokioTimer::new())
            .header_read_timeout(self.shared.config.header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30));
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        warn!("l7: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let local = match stream.local_addr() {
                Ok(l) => l,
                Err(e) => {
                    debug!(%peer, "l7: connection without a local address: {e}");
                    continue;
                }
            };
            let Some(frontend) = resolver.resolve(&peer, &local) else {
                debug!(%peer, %local, "l7: no frontend for connection; closed");
                continue;
            };
            if let Err(e) = stream.set_nodelay(true) {
                debug!(%peer, "l7: TCP_NODELAY: {e}");
            }
            let conn = ConnInfo { peer, frontend };
            let shared = self.shared.clone();
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, conn, req).await) }
            });
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let watched = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(e) = watched.await {
                    debug!(%peer, "l7: connection ended: {e}");
                }
            });
        }
        drop(listener);
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(self.shared.config.shutdown_grace) => {
                debug!("l7: shutdown grace period over; remaining connections dropped");
            }
        }
    }
}

/// What the rule's (and then the backend's) filters made of the request.
struct Edit<'a> {
    path: String,
    response: Vec<&'a HeaderModifier>,
    mirrors: Vec<&'a Mirror>,
    redirect: Option<&'a Redirect>,
    /// Fault injections of the filters applied so far and not yet acted on.
    faults: Vec<&'a Fault>,
    /// An `ExtensionRef` filter that could not be resolved: the request gets 500.
    unresolved: bool,
}

impl<'a> Edit<'a> {
    /// Applies filters in their order (the spec: in the order given, wherever possible).
    fn apply(&mut self, filters: &'a [Filter], matched: &PathMatch, headers: &mut HeaderMap) {
        for f in filters {
            match f {
                Filter::RequestHeaders(m) => m.apply(headers),
                Filter::ResponseHeaders(m) => self.response.push(m),
                Filter::UrlRewrite(rw) => {
                    if let Some(host) = &rw.hostname {
                        headers.insert(HOST, host.clone());
                    }
                    if let Some(p) = &rw.path {
                        self.path = modify_path(&self.path, matched, p);
                    }
                }
                Filter::Redirect(r) => {
                    self.redirect.get_or_insert(r);
                }
                Filter::Mirror(m) => self.mirrors.push(m),
                Filter::Fault(FaultFilter::Resolved { fault, .. }) => self.faults.push(fault),
                Filter::Fault(FaultFilter::Unresolved { .. }) => self.unresolved = true,
            }
        }
    }
}

fn text_reply(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(format!("{message}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

impl Shared {
    /// A response the proxy makes itself (no backend body): metrics are recorded now.
    fn local_reply(
        &self,
        resp: Response<ProxyBody>,
        labels: RuleLabels,
        start: Instant,
    ) -> Response<ProxyBody> {
        Done {
            metrics: self.metrics.clone(),
            labels,
            status: resp.status(),
            start,
        }
        .record();
        resp
    }

    /// Acts on what the filters applied so far asked for: a 500 for an unresolvable `ExtensionRef`,
    /// then each fault's delay and abort. `Some` is the response to give instead of forwarding.
    async fn inject_faults(
        &self,
        edit: &mut Edit<'_>,
        labels: &RuleLabels,
        start: Instant,
    ) -> Option<Response<ProxyBody>> {
        if edit.unresolved {
            return Some(self.local_reply(
                text_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "an ExtensionRef filter of the matched rule cannot be resolved",
                ),
                labels.clone(),
                start,
            ));
        }
        for fault in std::mem::take(&mut edit.faults) {
            let decision = fault.decide(&mut rand::rng());
            if let Some(delay) = decision.delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(status) = decision.abort {
                return Some(self.local_reply(
                    text_reply(status, "fault injected (HTTPFaultInjection abort)"),
                    labels.clone(),
                    start,
                ));
            }
        }
        None
    }

    async fn send(
        &self,
        ep: SocketAddr,
        h2: bool,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        if h2 {
            self.http2.send(ep, req).await
        } else {
            Ok(self.http1.request(req).await?)
        }
    }

    /// Sends a copy of the request to one endpoint of the mirror's backend, in the background.
    fn spawn_mirror(
        self: &Arc<Self>,
        mirror: &Mirror,
        directory: &ServiceDirectory,
        parts: &Parts,
        body: ProxyBody,
        h2: bool,
        labels: &RuleLabels,
    ) {
        let Backend::Service(target) = &mirror.backend else {
            return;
        };
        let endpoints = directory.endpoints(target);
        let backend = target.to_string();
        if endpoints.is_empty() {
            self.metrics.mirrored(labels, &backend, false);
            return;
        }
        // The spec: a mirror goes to a single endpoint of its backend.
        let ep = endpoints[rand::rng().random_range(0..endpoints.len())];
        let req = match upstream_request(parts, ep, h2, body) {
            Ok(r) => r,
            Err(e) => {
                debug!("l7: mirror request: {e}");
                self.metrics.mirrored(labels, &backend, false);
                return;
            }
        };
        let shared = self.clone();
        let labels = labels.clone();
        tokio::spawn(async move {
            let sent = tokio::time::timeout(shared.config.mirror_timeout, async {
                let resp = shared.send(ep, h2, req).await?;
                // The response is ignored, but read to its end so the connection can be reused.
                resp.into_body().collect().await?;
                Ok::<_, BoxError>(())
            })
            .await;
            let ok = matches!(sent, Ok(Ok(())));
            if !ok {
                debug!(%ep, "l7: mirrored request failed: {sent:?}");
            }
            shared.metrics.mirrored(&labels, &backend, ok);
        });
    }
}

/// The request to send to `ep`: over HTTP/1.1 the URI names the endpoint (to pick the pooled
/// connection) and Host stays the client's; over HTTP/2 the client's authority is the `:authority`.
fn upstream_request(
    parts: &Parts,
    ep: SocketAddr,
    h2: bool,
    body: ProxyBody,
) -> Result<Request<ProxyBody>, BoxError> {
    let mut headers = parts.headers.clone();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let (uri, version) = if h2 {
        let authority = headers
            .remove(HOST)
            .and_then(|h| h.to_str().ok().map(str::to_owned))
            .unwrap_or_else(|| ep.to_string());
        (
            Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(path_and_query)
                .build()?,
            Version::HTTP_2,
        )
    } else {
        (
            Uri::builder()
                .scheme("http")
                .authority(ep.to_string())
                .path_and_query(path_and_query)
                .build()?,
            Version::HTTP_11,
        )
    };
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    Ok(req)
}

fn deadline_from(start: Instant, t: Option<Duration>) -> Option<tokio::time::Instant> {
    t.map(|d| tokio::time::Instant::from_std(start) + d)
}

fn earliest(
    a: Option<tokio::time::Instant>,
    b: Option<tokio::time::Instant>,
) -> Option<tokio::time::Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn handle(
    shared: Arc<Shared>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    // Each request takes the current tables; a swap never disturbs one under way.
    let routes = shared.routes.borrow().clone();
    let directory = shared.directory.borrow().clone();
    let (mut parts, body) = req.into_parts();
    let client_h2 = parts.version == Version::HTTP_2;
    let mut labels = RuleLabels::default();

    // End-to-end headers only, for matching and forwarding alike.
    let te_trailers = strip_hop_by_hop(&mut parts.headers);
    // hyper answers `Expect: 100-continue` itself when the body is first read; the backend must not.
    parts.headers.remove(EXPECT);
    // HTTP/2 carries the host as `:authority`; as a Host header it is matched (GAMMA points users to
    // Host header matches) and rewritten like HTTP/1's.
    if !parts.headers.contains_key(HOST) {
        let authority = parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_else(|| conn.frontend.to_string());
        if let Ok(v) = HeaderValue::from_str(&authority) {
            parts.headers.insert(HOST, v);
        }
    }

    // A tunnel is not a request to route: the datapath sends such traffic here only by mistake.
    if parts.method == Method::CONNECT {
        return shared.local_reply(
            text_reply(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not proxied"),
            labels,
            start,
        );
    }
    let Some(front) = directory.frontend(&conn.frontend) else {
        return shared.local_reply(
            text_reply(StatusCode::NOT_FOUND, "no Service behind this address"),
            labels,
            start,
        );
    };
    labels.service = front.service.to_string();
    let parent = Parent {
        service: &front.service.service,
        port: front.service.port,
        port_name: &front.port_name,
    };
    let lookup = routes.find(
        &parent,
        &RequestView {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
        },
    );
    let mut edit = Edit {
        path: parts.uri.path().to_owned(),
        response: Vec::new(),
        mirrors: Vec::new(),
        redirect: None,
        faults: Vec::new(),
        unresolved: false,
    };
    let (target, timeouts): (ServicePort, _) = match lookup {
        Lookup::NoMatch => {
            return shared.local_reply(
                text_reply(
                    StatusCode::NOT_FOUND,
                    "no HTTPRoute rule matches this request",
                ),
                labels,
                start,
            );
        }
        // A Service without a route for this port is a plain Service (routes augment Services): its
        // own endpoints serve, as the L4 datapath would.
        Lookup::NoRoutes => (front.service.clone(), Default::default()),
        Lookup::Matched(sel) => {
            labels.route = sel.route.id.to_string();
            labels.rule = sel.rule.label.clone();
            edit.apply(&sel.rule.filters, &sel.matched.path, &mut parts.headers);
            if let Some(resp) = shared.inject_faults(&mut edit, &labels, start).await {
                return resp;
            }
            if let Some(r) = edit.redirect {
                return shared.local_reply(
                    redirect_response(r, &sel.matched.path, &parts, conn, &edit.response),
                    labels,
                    start,
                );
            }
            let picked = sel.rule.picker.pick(&mut rand::rng());
            let Some(wb) = picked.map(|i| &sel.rule.backends[i]) else {
                return shared.local_reply(
                    text_reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the matched rule has no backend with a weight above 0",
                    ),
                    labels,
                    start,
                );
            };
            labels.backend = wb.label();
            let Backend::Service(target) = &wb.backend else {
                return shared.local_reply(
                    text_reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the chosen backendRef is invalid",
                    ),
                    labels,
                    start,
                );
            };
            edit.apply(&wb.filters, &sel.matched.path, &mut parts.headers);
            if let Some(resp) = shared.inject_faults(&mut edit, &labels, start).await {
                return resp;
            }
            (target.clone(), sel.rule.timeouts)
        }
    };
    if labels.backend.is_empty() {
        labels.backend = target.to_string();
    }
    let endpoints = directory.endpoints(&target);
    if endpoints.is_empty() {
        return shared.local_reply(
            text_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the chosen backend has no ready endpoint",
            ),
            labels,
            start,
        );
    }
    let ep = endpoints[rand::rng().random_range(0..endpoints.len())];

    // The final URI: the (possibly rewritten) path with the original query.
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{}?{q}", edit.path),
        None => edit.path.clone(),
    };
    match Uri::builder().path_and_query(path_and_query).build() {
        Ok(uri) => parts.uri = uri,
        Err(e) => {
            return shared.local_reply(
                text_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("rewritten path is not a valid URI: {e}"),
                ),
                labels,
                start,
            );
        }
    }
    append_forwarded_for(&mut parts.headers, conn.peer.ip());
    if client_h2 && te_trailers {
        // The one TE value HTTP/2 allows, which gRPC needs end to end.
        parts
            .headers
            .insert(TE, HeaderValue::from_static("trailers"));
    }

    // Mirrors get a copy of the request as the filters left it, the body teed frame by frame.
    let mirrors: Vec<&Mirror> = {
        let mut rng = rand::rng();
        edit.mirrors
            .iter()
            .copied()
            .filter(|m| m.should_mirror(&mut rng))
            .collect()
    };
    let body = if mirrors.is_empty() {
        body::incoming(body)
    } else {
        let mut tee = TeeBody::new(body);
        let copies: Vec<MirrorBody> = mirrors
            .iter()
            .map(|_| tee.mirror(shared.config.mirror_buffer_frames))
            .collect();
        for (m, copy) in mirrors.iter().zip(copies) {
            shared.spawn_mirror(
                m,
                &directory,
                &parts,
                copy.boxed_unsync(),
                client_h2,
                &labels,
            );
        }
        tee.boxed_unsync()
    };

    let upstream = match upstream_request(&parts, ep, client_h2, body) {
        Ok(r) => r,
        Err(e) => {
            return shared.local_reply(
                text_reply(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                labels,
                start,
            );
        }
    };
    let timeout = |t: Timeout, default: Option<Duration>| match t {
        Timeout::Unset => default,
        Timeout::Disabled => None,
        Timeout::After(d) => Some(d),
    };
    let deadline = earliest(
        deadline_from(
            start,
            timeout(timeouts.request, shared.config.default_request_timeout),
        ),
        deadline_from(Instant::now(), timeout(timeouts.backend_request, None)),
    );
    let sent = shared.send(ep, client_h2, upstream);
    let result = match deadline {
        Some(d) => match tokio::time::timeout_at(d, sent).await {
            Ok(r) => r,
            Err(_) => {
                return shared.local_reply(
                    text_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                    labels,
                    start,
                );
            }
        },
        None => sent.await,
    };
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            debug!(%ep, "l7: upstream request failed: {e}");
            return shared.local_reply(
                text_reply(StatusCode::BAD_GATEWAY, "upstream connection failed"),
                labels,
                start,
            );
        }
    };
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    for m in &edit.response {
        m.apply(&mut rparts.headers);
    }
    rparts.version = if client_h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let done = Done {
        metrics: shared.metrics.clone(),
        labels,
        status: rparts.status,
        start,
    };
    Response::from_parts(
        rparts,
        ResponseBody::new(rbody, deadline, done).boxed_unsync(),
    )
}

fn redirect_response(
    r: &Redirect,
    matched: &PathMatch,
    parts: &Parts,
    conn: ConnInfo,
    response_mods: &[&HeaderModifier],
) -> Response<ProxyBody> {
    let frontend_ip = conn.frontend.ip().to_string();
    let host = parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(host_without_port)
        .unwrap_or(&frontend_ip);
    let location = redirect_location(
        r,
        matched,
        &RedirectContext {
            scheme: "http",
            host,
            listener_port: conn.frontend.port(),
            path: parts.uri.path(),
            query: parts.uri.query(),
        },
    );
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = r.status;
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(LOCATION, v);
        }
        Err(_) => {
            return text_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "redirect location is not a valid header value",
            );
        }
    }
    for m in response_mods {
        m.apply(resp.headers_mut());
    }
    resp
}
