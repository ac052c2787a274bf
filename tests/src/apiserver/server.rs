//! The simulator's HTTP side: hyper 1 over TCP, routing of the Kubernetes REST paths (discovery, LIST,
//! WATCH, GET, PATCH), the request log, and the streaming watch bodies.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::store::{
    self, Filter, Key, ListAt, RESOURCES, ResIdx, Store, StoreError, WatchMsg, Watcher,
};
use super::{RequestRecord, Verb};

/// The Kubernetes version the simulator claims on `/version`.
const VERSION: (&str, &str) = ("1", "34");

/// How long a watch lasts without `timeoutSeconds`: the real server picks 30–60 min.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// How long an aborted watch waits for hyper to flush what was already sent before cutting the connection.
const ABORT_FLUSH: Duration = Duration::from_millis(20);

type Body = BoxBody<Bytes, io::Error>;

/// State shared by the test-side handle and the server tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub store: Mutex<Store>,
    pub log: Mutex<Vec<RequestRecord>>,
    /// Bearer token every request must carry.
    pub token: String,
    /// False: every connection and request is closed without an answer (a network partition).
    pub reachable: AtomicBool,
    pub addr: SocketAddr,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take the server down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Accepts connections until `shutdown` fires. Connection tasks die with the runtime.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Out of fds and the like: transient; do not spin.
                eprintln!("weir-tests apiserver: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !shared.reachable.load(Ordering::SeqCst) {
            drop(stream);
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(shared.clone(), req));
            // Errors are aborted watches, partitions and clients going away: all expected.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Decodes `application/x-www-form-urlencoded` (`+` is a space, `%XX` a byte).
fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

/// What a path names.
#[derive(Debug)]
enum Route {
    Version,
    Health,
    /// `/api`
    CoreVersions,
    /// `/apis`
    Groups,
    /// `/apis/<group>`
    Group(String),
    /// `/api/v1`, `/apis/<group>/<version>`
    Resources(String, String),
    Resource {
        res: ResIdx,
        namespace: Option<String>,
        name: Option<String>,
        subresource: Option<String>,
    },
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Some(Route::Version),
        ["healthz" | "livez" | "readyz"] => return Some(Route::Health),
        ["api"] => return Some(Route::CoreVersions),
        ["apis"] => return Some(Route::Groups),
        ["apis", g] => {
            return RESOURCES
                .iter()
                .any(|r| r.group == *g)
                .then(|| Route::Group((*g).to_owned()));
        }
        ["api", v] => return Some(Route::Resources(String::new(), (*v).to_owned())),
        ["apis", g, v] => return Some(Route::Resources((*g).to_owned(), (*v).to_owned())),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some((*n).to_owned()), None),
        [p, n, s] => (*p, Some((*n).to_owned()), Some((*s).to_owned())),
        _ => return None,
    };
    let res = store::by_plural(group, version, plural)?;
    let rt = &RESOURCES[res];
    // A namespaced object is only addressable inside its namespace; a cluster-scoped one never is.
    if (namespace.is_some() && !rt.namespaced)
        || (namespace.is_none() && rt.namespaced && name.is_some())
    {
        return None;
    }
    Some(Route::Resource {
        res,
        namespace,
        name,
        subresource,
    })
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn status_response(
    code: u16,
    reason: &str,
    message: &str,
    details: Option<Value>,
) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &store::status(code, reason, message, details),
    )
}

fn store_error(e: StoreError) -> Response<Body> {
    match e {
        StoreError::Expired(message) => status_response(410, "Expired", &message, None),
        StoreError::TooLarge(rv) => status_response(
            504,
            "Timeout",
            &format!("Too large resource version: {rv}"),
            Some(json!({
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                "retryAfterSeconds": 1,
            })),
        ),
        StoreError::BadRequest(message) => status_response(400, "BadRequest", &message, None),
        StoreError::NotFound { resource, name } => {
            let rt = &RESOURCES[resource];
            status_response(
                404,
                "NotFound",
                &format!(
                    "{}{} \"{name}\" not found",
                    rt.plural,
                    group_suffix(rt.group)
                ),
                Some(json!({"name": name, "group": rt.group, "kind": rt.plural})),
            )
        }
    }
}

fn group_suffix(group: &str) -> String {
    if group.is_empty() {
        String::new()
    } else {
        format!(".{group}")
    }
}

/// One request: checks reachability and the token, answers, and logs what it was.
async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
    if !shared.reachable.load(Ordering::SeqCst) {
        // An error from the service makes hyper close the connection without answering.
        return Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the simulated API server is unreachable",
        ));
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = parse_query(req.uri().query());
    let mut record = RequestRecord {
        method: method.to_string(),
        path: path.clone(),
        query,
        verb: Verb::Other,
        resource: None,
        status: 0,
        expired: false,
    };
    let authorized = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t == shared.token);
    let resp = if authorized {
        dispatch(&shared, req, &mut record).await
    } else {
        status_response(401, "Unauthorized", "Unauthorized", None)
    };
    record.status = resp.status().as_u16();
    record.expired |= record.status == 410;
    lock(&shared.log).push(record);
    Ok(resp)
}

async fn dispatch(
    shared: &Shared,
    req: Request<Incoming>,
    record: &mut RequestRecord,
) -> Response<Body> {
    let Some(route) = route(&record.path) else {
        return no_such_path();
    };
    let Route::Resource {
        res,
        namespace,
        name,
        subresource,
    } = route
    else {
        record.verb = Verb::Discovery;
        if req.method() != Method::GET {
            return method_not_allowed(req.method());
        }
        return discovery(shared, &route);
    };
    let rt = &RESOURCES[res];
    record.resource = Some(rt.plural);
    let is_watch = matches!(record.param("watch"), Some("true" | "1"));
    match (req.method().clone(), name) {
        (Method::GET, None) if is_watch => {
            record.verb = Verb::Watch;
            watch(shared, res, namespace, record)
        }
        (Method::GET, None) => {
            record.verb = Verb::List;
            list(shared, res, namespace, record)
        }
        (Method::GET, Some(name)) => {
            record.verb = Verb::Get;
            if subresource
                .as_deref()
                .is_some_and(|s| s != "status" || !rt.status)
            {
                return no_such_path();
            }
            let key: Key = (res, namespace.unwrap_or_default(), name.clone());
            match lock(&shared.store).get(&key) {
                Some(object) => json_response(StatusCode::OK, &object),
                None => store_error(StoreError::NotFound {
                    resource: res,
                    name,
                }),
            }
        }
        (Method::PATCH, Some(name)) => {
            record.verb = Verb::Patch;
            let status_only = match subresource.as_deref() {
                None => false,
                Some("status") if rt.status => true,
                Some(_) => {
                    return no_such_path();
                }
            };
            patch(
                shared,
                req,
                (res, namespace.unwrap_or_default(), name),
                status_only,
            )
            .await
        }
        (method, _) => method_not_allowed(&method),
    }
}

/// The real server's answer to a path it does not serve.
fn no_such_path() -> Response<Body> {
    status_response(
        404,
        "NotFound",
        "the server could not find the requested resource",
        None,
    )
}

fn method_not_allowed(method: &Method) -> Response<Body> {
    status_response(
        405,
        "MethodNotAllowed",
        &format!("the server does not allow this method on the requested resource: {method}"),
        None,
    )
}

fn discovery(shared: &Shared, route: &Route) -> Response<Body> {
    let body = match route {
        Route::Version => json!({
            "major": VERSION.0,
            "minor": VERSION.1,
            "gitVersion": format!("v{}.{}.0+weir-sim", VERSION.0, VERSION.1),
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z",
            "goVersion": "go1.24.0",
            "compiler": "gc",
            "platform": "linux/amd64",
        }),
        Route::Health => {
            let mut resp = Response::new(
                Full::new(Bytes::from_static(b"ok"))
                    .map_err(|never: Infallible| match never {})
                    .boxed(),
            );
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return resp;
        }
        Route::CoreVersions => json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}
            ],
        }),
        Route::Groups => {
            let mut groups: Vec<&str> = RESOURCES
                .iter()
                .map(|r| r.group)
                .filter(|g| !g.is_empty())
                .collect();
            groups.dedup();
            json!({
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": groups.iter().map(|g| group_doc(g)).collect::<Vec<_>>(),
            })
        }
        Route::Group(g) => group_doc(g),
        Route::Resources(group, version) => {
            let resources: Vec<Value> = RESOURCES
                .iter()
                .filter(|r| r.group == group && r.version == version)
                .flat_map(|r| {
                    let main = json!({
                        "name": r.plural,
                        "singularName": r.kind.to_ascii_lowercase(),
                        "namespaced": r.namespaced,
                        "kind": r.kind,
                        "verbs": ["get", "list", "patch", "watch"],
                    });
                    let status = r.status.then(|| {
                        json!({
                            "name": format!("{}/status", r.plural),
                            "singularName": "",
                            "namespaced": r.namespaced,
                            "kind": r.kind,
                            "verbs": ["get", "patch"],
                        })
                    });
                    std::iter::once(main).chain(status)
                })
                .collect();
            if resources.is_empty() {
                return no_such_path();
            }
            let group_version = if group.is_empty() {
                version.clone()
            } else {
                format!("{group}/{version}")
            };
            json!({
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": group_version,
                "resources": resources,
            })
        }
        Route::Resource { .. } => {
            return no_such_path();
        }
    };
    json_response(StatusCode::OK, &body)
}

fn group_doc(group: &str) -> Value {
    let gv = RESOURCES
        .iter()
        .find(|r| r.group == group)
        .map(|r| json!({"groupVersion": r.api_version(), "version": r.version}))
        .unwrap_or_else(|| json!({}));
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": [gv.clone()],
        "preferredVersion": gv,
    })
}

/// The continue token: opaque to clients (the real one is base64 JSON holding the revision and the key
/// to start after); hex JSON here.
fn encode_continue(rv: u64, key: &Key) -> String {
    let raw = json!({"rv": rv, "ns": key.1, "name": key.2}).to_string();
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str, res: ResIdx) -> Option<(u64, Key)> {
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    let v: Value = serde_json::from_slice(&bytes?).ok()?;
    Some((
        v.get("rv")?.as_u64()?,
        (
            res,
            v.get("ns")?.as_str()?.to_owned(),
            v.get("name")?.as_str()?.to_owned(),
        ),
    ))
}

fn filter_of(namespace: Option<String>, record: &RequestRecord) -> Result<Filter, StoreError> {
    Filter::parse(
        namespace,
        record.param("fieldSelector"),
        record.param("labelSelector"),
    )
}

/// LIST: `limit` + `continue` pagination at a consistent revision, `resourceVersion` +
/// `resourceVersionMatch` as the real server interprets them.
fn list(
    shared: &Shared,
    res: ResIdx,
    namespace: Option<String>,
    record: &mut RequestRecord,
) -> Response<Body> {
    let rt = &RESOURCES[res];
    let filter = match filter_of(namespace, record) {
        Ok(f) => f,
        Err(e) => return store_error(e),
    };
    let limit = match record.param("limit").filter(|l| !l.is_empty()) {
        None => None,
        Some(l) => match l.parse::<usize>() {
            Ok(0) => None,
            Ok(n) => Some(n),
            Err(_) => return store_error(StoreError::BadRequest(format!("invalid limit {l:?}"))),
        },
    };
    let owned = |k: &str| record.param(k).filter(|v| !v.is_empty()).map(str::to_owned);
    let (rv, rv_match, token) = (
        owned("resourceVersion"),
        owned("resourceVersionMatch"),
        owned("continue"),
    );
    let (rv, rv_match) = (rv.as_deref(), rv_match.as_deref());
    let store = lock(&shared.store);
    let (at, start) = match token.as_deref() {
        Some(_) if rv.is_some() => {
            return store_error(StoreError::BadRequest(
                "specifying resource version is not allowed when using continue".into(),
            ));
        }
        Some(token) => match decode_continue(token, res) {
            Some((rv, _)) if rv < store.compacted() => {
                drop(store);
                record.expired = true;
                return store_error(StoreError::Expired(format!(
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter. (revision {rv} is compacted)"
                )));
            }
            Some((rv, key)) => (ListAt::Exact(rv), Some(key)),
            None => {
                return store_error(StoreError::BadRequest(format!(
                    "continue key is not valid: {token}"
                )));
            }
        },
        None => {
            let at = match (rv, rv_match) {
                (None | Some("0"), Some("Exact")) => {
                    return store_error(StoreError::BadRequest(
                        "resourceVersionMatch \"Exact\" requires a non-zero resourceVersion".into(),
                    ));
                }
                (None, Some(_)) => {
                    return store_error(StoreError::BadRequest(
                        "resourceVersionMatch is forbidden unless resourceVersion is provided"
                            .into(),
                    ));
                }
                (None | Some("0"), None | Some("NotOlderThan")) => ListAt::Latest,
                (Some(v), m) => {
                    let Ok(n) = v.parse::<u64>() else {
                        return store_error(StoreError::BadRequest(format!(
                            "invalid resource version {v:?}"
                        )));
                    };
                    match m {
                        Some("Exact") => ListAt::Exact(n),
                        None | Some("NotOlderThan") if n > store.rv() => {
                            return store_error(StoreError::TooLarge(n));
                        }
                        None | Some("NotOlderThan") => ListAt::Latest,
                        Some(other) => {
                            return store_error(StoreError::BadRequest(format!(
                                "unsupported resourceVersionMatch {other:?}"
                            )));
                        }
                    }
                }
            };
            (at, None)
        }
    };
    let page = match store.list(res, &filter, at, start.as_ref(), limit) {
        Ok(p) => p,
        Err(e) => {
            record.expired = matches!(e, StoreError::Expired(_));
            return store_error(e);
        }
    };
    drop(store);
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|o| {
            let mut o = (**o).clone();
            if rt.builtin
                && let Some(m) = o.as_object_mut()
            {
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    let mut metadata = json!({"resourceVersion": page.rv.to_string()});
    if let Some(next) = &page.next {
        metadata["continue"] = Value::from(encode_continue(page.rv, next));
        if filter.is_unselective() {
            metadata["remainingItemCount"] = Value::from(page.remaining);
        }
    }
    json_response(
        StatusCode::OK,
        &json!({
            "kind": rt.list_kind(),
            "apiVersion": rt.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    )
}

/// WATCH: a chunked stream of newline-delimited events, replaying from `resourceVersion`, ending after
/// `timeoutSeconds`; from a compacted revision a single 410 ERROR event (HTTP 200, as the real server).
fn watch(
    shared: &Shared,
    res: ResIdx,
    namespace: Option<String>,
    record: &mut RequestRecord,
) -> Response<Body> {
    let filter = match filter_of(namespace, record) {
        Ok(f) => f,
        Err(e) => return store_error(e),
    };
    let from = match record
        .param("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
    {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return store_error(StoreError::BadRequest(format!(
                    "invalid resource version {v:?}"
                )));
            }
        },
    };
    let timeout = match record.param("timeoutSeconds").filter(|t| !t.is_empty()) {
        None => DEFAULT_WATCH_TIMEOUT,
        Some(t) => match t.parse::<u64>() {
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => {
                return store_error(StoreError::BadRequest(format!(
                    "invalid timeoutSeconds {t:?}"
                )));
            }
        },
    };
    let flag = |k: &str| matches!(record.param(k), Some("true" | "1"));
    let bookmarks = flag("allowWatchBookmarks");
    let initial_events = flag("sendInitialEvents");
    let (tx, rx) = unbounded_channel();
    let watcher = Watcher {
        resource: res,
        filter,
        bookmarks,
        tx,
    };
    let registered = {
        let mut store = lock(&shared.store);
        let initial = if initial_events { None } else { from };
        store.watch(watcher, initial, initial_events)
    };
    match registered {
        Ok(true) => {}
        Ok(false) => record.expired = true,
        Err(e) => return store_error(e),
    }
    let body = StreamBody::new(WatchStream {
        rx,
        deadline: Box::pin(tokio::time::sleep(timeout)),
        abort: None,
        done: false,
    });
    let mut resp = Response::new(BodyExt::boxed(body));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache, private"),
    );
    resp
}

/// The body of a watch: event lines until the timeout (clean end), the store dropping the watch (clean
/// end), or an abort (an error, which makes hyper cut the connection without the final chunk).
struct WatchStream {
    rx: UnboundedReceiver<WatchMsg>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Set by an abort: when the connection is cut.
    abort: Option<Pin<Box<tokio::time::Sleep>>>,
    done: bool,
}

impl Stream for WatchStream {
    type Item = Result<Frame<Bytes>, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.abort.is_none() {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(WatchMsg::Line(line))) => {
                    return Poll::Ready(Some(Ok(Frame::data(line))));
                }
                Poll::Ready(Some(WatchMsg::Abort)) => {
                    // hyper discards what it has buffered when a body fails, but a real connection
                    // delivers what was sent before it broke: give it time to flush first.
                    self.abort = Some(Box::pin(tokio::time::sleep(ABORT_FLUSH)));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
        }
        if let Some(abort) = self.abort.as_mut() {
            return match abort.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.done = true;
                    Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "watch dropped by the simulator",
                    ))))
                }
                Poll::Pending => Poll::Pending,
            };
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// PATCH: merge, strategic-merge (treated as merge) and apply patches (treated as merge of the sent
/// fields, which is what server-side apply amounts to for a single field manager).
async fn patch(
    shared: &Shared,
    req: Request<Incoming>,
    key: Key,
    status_only: bool,
) -> Response<Body> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let supported = [
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/apply-patch+yaml",
    ];
    if !supported.iter().any(|s| content_type.starts_with(s)) {
        return status_response(
            415,
            "UnsupportedMediaType",
            &format!(
                "the body of the request was in an unknown format - accepted media types include: {}",
                supported.join(", ")
            ),
            None,
        );
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return status_response(400, "BadRequest", &format!("reading the body: {e}"), None);
        }
    };
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return status_response(
                400,
                "BadRequest",
                &format!("the patch is not JSON: {e}"),
                None,
            );
        }
    };
    let result = lock(&shared.store).patch(key, &patch, status_only);
    match result {
        Ok(object) => json_response(StatusCode::OK, &object),
        Err(e) => store_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_like_the_api_server() {
        assert!(matches!(
            route("/api/v1/services"),
            Some(Route::Resource {
                res: 0,
                namespace: None,
                name: None,
                ..
            })
        ));
        assert!(matches!(
            route("/api/v1/namespaces/kube-system/services/dns"),
            Some(Route::Resource { res: 0, namespace: Some(ns), name: Some(n), subresource: None }) if ns == "kube-system" && n == "dns"
        ));
        assert!(matches!(
            route("/api/v1/nodes/node-a"),
            Some(Route::Resource { res: 1, .. })
        ));
        assert!(
            route("/api/v1/namespaces/x/nodes").is_none(),
            "nodes are cluster-scoped"
        );
        assert!(
            route("/api/v1/services/x").is_none(),
            "a Service needs its namespace"
        );
        assert!(matches!(
            route("/apis/discovery.k8s.io/v1/endpointslices"),
            Some(Route::Resource { res: 2, .. })
        ));
        assert!(matches!(
            route("/apis/gateway.networking.k8s.io/v1/namespaces/a/httproutes/r/status"),
            Some(Route::Resource { res: 3, subresource: Some(s), .. }) if s == "status"
        ));
        assert!(route("/apis/apps/v1/deployments").is_none());
        assert!(matches!(route("/version"), Some(Route::Version)));
    }

    #[test]
    fn queries_are_form_decoded() {
        assert_eq!(
            parse_query(Some(
                "fieldSelector=metadata.name%3Dnode-a&watch=true&x=a+b&y"
            )),
            [
                (
                    "fieldSelector".to_owned(),
                    "metadata.name=node-a".to_owned()
                ),
                ("watch".to_owned(), "true".to_owned()),
                ("x".to_owned(), "a b".to_owned()),
                ("y".to_owned(), String::new()),
            ]
        );
        assert_eq!(url_decode("100%"), "100%");
    }

    #[test]
    fn continue_tokens_round_trip() {
        let key: Key = (2, "ns".into(), "name-1".into());
        assert_eq!(
            decode_continue(&encode_continue(42, &key), 2),
            Some((42, key))
        );
        assert_eq!(decode_continue("zz", 2), None);
    }
}
