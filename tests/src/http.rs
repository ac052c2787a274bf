//! HTTP for the L7 tests: an echo backend (HTTP/1.1 and h2c on one port, hyper) that answers every
//! request with what it received, and a client that speaks HTTP/1.1 or HTTP/2 with prior knowledge
//! over one connection made from a pod's namespace.
//!
//! The echo reply is JSON (`pod`, `method`, `path`, `query`, `version`, `headers`), with response
//! headers `x-backend: <pod>` and `x-backend-extra: 1`. A request header `x-echo-delay-ms: N` makes the
//! backend wait N ms before answering (for timeouts and fault delays).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::{http1, http2};
use hyper::header::{HOST, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Deserialize;

use crate::lab::Pod;

/// The request header that delays an echo reply, in milliseconds.
pub const DELAY_HEADER: &str = "x-echo-delay-ms";

/// What the echo backend received, as it reports it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Echo {
    pub pod: String,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Lower-case names; repeated headers joined with `,`.
    pub headers: BTreeMap<String, String>,
}

impl Echo {
    /// The value of header `name` (lower case) as the backend saw it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A running echo backend: how many requests it has answered.
#[derive(Debug, Clone, Default)]
pub struct EchoCounter(Arc<AtomicUsize>);

impl EchoCounter {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Starts an echo backend on `0.0.0.0:port` in `pod`, listening when this returns; it stops with the
/// lab.
pub fn serve_echo(pod: &Pod, port: u16) -> anyhow::Result<EchoCounter> {
    let bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = pod
        .run(|| std::net::TcpListener::bind(bind))
        .and_then(|r| r)
        .with_context(|| format!("echo backend on {}:{port}", pod.name()))?;
    listener
        .set_nonblocking(true)
        .context("non-blocking listener")?;
    let counter = EchoCounter::default();
    let (name, count) = (pod.name().to_owned(), counter.0.clone());
    pod.spawn_backend(format!("echo-{name}-{port}"), move |stop| {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("weir-tests: echo backend {name}: runtime: {e}");
                return;
            }
        };
        rt.block_on(echo_loop(listener, name, count, stop));
    })?;
    Ok(counter)
}

async fn echo_loop(
    listener: std::net::TcpListener,
    pod: String,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("weir-tests: echo backend {pod}: {e}");
            return;
        }
    };
    let pod: Arc<str> = pod.into();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true);
    let builder = Arc::new(builder);
    while !stop.load(Ordering::Relaxed) {
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        let Ok(Ok((stream, _peer))) = accepted else {
            continue;
        };
        let (pod, count, builder) = (pod.clone(), count.clone(), builder.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (pod, count) = (pod.clone(), count.clone());
                async move { Ok::<_, Infallible>(echo(&pod, &count, req).await) }
            });
            // Clients hanging up mid-request are normal in timeout tests.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn echo(
    pod: &str,
    count: &AtomicUsize,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    // Read the body so a mirrored or proxied request completes as a client would expect.
    let _ = body.collect().await;
    if let Some(ms) = parts
        .headers
        .get(DELAY_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    count.fetch_add(1, Ordering::SeqCst);
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|joined| {
                joined.push(',');
                joined.push_str(&v);
            })
            .or_insert(v);
    }
    // HTTP/2 carries the host as `:authority`; report it as Host like HTTP/1.1.
    if let Some(a) = parts.uri.authority() {
        headers
            .entry("host".to_owned())
            .or_insert_with(|| a.to_string());
    }
    let body = serde_json::json!({
        "pod": pod,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(pod) {
        h.insert("x-backend", v);
    }
    h.insert("x-backend-extra", HeaderValue::from_static("1"));
    resp
}

/// Which HTTP a [`Conn`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (h2c, as gRPC clients do).
    Http2,
}

/// A request to send: method, path with query, headers. Host defaults to [`Req::DEFAULT_HOST`].
#[derive(Debug, Clone)]
pub struct Req {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub host: String,
}

impl Req {
    pub const DEFAULT_HOST: &str = "web.default";

    pub fn get(path: &str) -> Self {
        Self::new(Method::GET, path)
    }

    pub fn new(method: Method, path: &str) -> Self {
        Self {
            method,
            path: path.to_owned(),
            headers: Vec::new(),
            host: Self::DEFAULT_HOST.to_owned(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// A response as the client got it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
    /// From sending the request to the end of the body.
    pub elapsed: Duration,
}

impl Reply {
    /// The echo backend's report; fails (with the reply) when this is not one.
    pub fn echo(&self) -> anyhow::Result<Echo> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("not an echo reply: {} {:?}", self.status, self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// One client connection, made from a pod's namespace; requests go one after another on it.
pub struct Conn {
    rt: tokio::runtime::Runtime,
    sender: Sender,
    proto: Proto,
    /// Bound on each request (send to end of body).
    pub timeout: Duration,
}

impl Conn {
    /// Connects from `pod` to `addr` and does the HTTP handshake.
    pub fn connect(pod: &Pod, addr: SocketAddr, proto: Proto) -> anyhow::Result<Self> {
        let connect_timeout = Duration::from_secs(2);
        let stream = pod
            .run(|| std::net::TcpStream::connect_timeout(&addr, connect_timeout))
            .and_then(|r| r)
            .with_context(|| format!("connect from {} to {addr}", pod.name()))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        stream.set_nonblocking(true).context("non-blocking")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("client runtime")?;
        let sender = rt.block_on(async {
            let stream = tokio::net::TcpStream::from_std(stream)?;
            let io = TokioIo::new(stream);
            anyhow::Ok(match proto {
                Proto::Http1 => {
                    let (sender, conn) = http1::handshake(io).await?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    Sender::H1(sender)
                }
                Proto::Http2 => {
                    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .handshake(io)
                        .await?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    Sender::H2(sender)
                }
            })
        })?;
        Ok(Self {
            rt,
            sender,
            proto,
            timeout: Duration::from_secs(5),
        })
    }

    /// Sends `req` and reads the whole response.
    pub fn send(&mut self, req: &Req) -> anyhow::Result<Reply> {
        let mut builder = Request::builder().method(req.method.clone());
        builder = match self.proto {
            Proto::Http1 => builder.uri(req.path.as_str()).header(HOST, &req.host),
            Proto::Http2 => builder.version(Version::HTTP_2).uri(
                Uri::builder()
                    .scheme("http")
                    .authority(req.host.as_str())
                    .path_and_query(req.path.as_str())
                    .build()
                    .context("request URI")?,
            ),
        };
        for (name, value) in &req.headers {
            builder = builder.header(
                HeaderName::from_bytes(name.as_bytes()).context("header name")?,
                HeaderValue::from_str(value).context("header value")?,
            );
        }
        let request = builder.body(Full::new(Bytes::new())).context("request")?;
        let started = Instant::now();
        let timeout = self.timeout;
        let sender = &mut self.sender;
        let (parts, body) = self.rt.block_on(async {
            tokio::time::timeout(timeout, async {
                let resp = match sender {
                    Sender::H1(s) => {
                        s.ready().await?;
                        s.send_request(request).await?
                    }
                    Sender::H2(s) => {
                        s.ready().await?;
                        s.send_request(request).await?
                    }
                };
                let (parts, body) = resp.into_parts();
                let body = body.collect().await?.to_bytes();
                anyhow::Ok((parts, body))
            })
            .await
            .with_context(|| format!("no complete response within {timeout:?}"))?
        })?;
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            elapsed: started.elapsed(),
        })
    }
}

/// One request on a fresh connection.
pub fn request(pod: &Pod, addr: SocketAddr, proto: Proto, req: &Req) -> anyhow::Result<Reply> {
    Conn::connect(pod, addr, proto)?.send(req)
}

/// One request on a fresh connection that must answer `status`; returns the reply.
pub fn expect_status(
    pod: &Pod,
    addr: SocketAddr,
    proto: Proto,
    req: &Req,
    status: StatusCode,
) -> anyhow::Result<Reply> {
    let reply = request(pod, addr, proto, req)?;
    if reply.status != status.as_u16() {
        bail!(
            "{} {} ({proto:?}): expected {status}, got {} {:?}",
            req.method,
            req.path,
            reply.status,
            reply.body
        );
    }
    Ok(reply)
}
