//! A Kubernetes API server simulator for the agent's Kubernetes mode: real HTTP/1.1 over TCP speaking the
//! list/watch protocol (paginated LIST, chunked WATCH with bookmarks, 410 Gone after compaction), driven by
//! the test through [`ApiServer`].
//!
//! No kube-apiserver can run here, so this reproduces what kube-rs's watcher relies on:
//! - one global resourceVersion counter (etcd's revision), stamped on every object and every list;
//! - LIST (`GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/nodes`,
//!   `/apis/gateway.networking.k8s.io/v1/httproutes`, their `/namespaces/{ns}/` forms) returning a
//!   `*List` with `metadata.resourceVersion`, honouring `limit`/`continue` (later pages are served at the
//!   first page's revision), `resourceVersion`/`resourceVersionMatch`, `fieldSelector` on `metadata.name`
//!   and `metadata.namespace`, and `labelSelector`; items of built-in types carry no `apiVersion`/`kind`,
//!   as on the real server;
//! - WATCH (`watch=true|1`) from `resourceVersion=N`: every change after N, then live changes, as
//!   newline-delimited JSON in a chunked response; `BOOKMARK`s (only `apiVersion`, `kind`,
//!   `metadata.resourceVersion`) for `allowWatchBookmarks=true`; the stream ends after `timeoutSeconds`;
//!   DELETED carries the last state stamped with the deletion's revision;
//! - a WATCH from a compacted revision gets HTTP 200 and one `ERROR` event whose object is a `Status` with
//!   `code: 410, reason: Expired`, then the stream ends: that is what the real server sends, and kube-rs 4.2
//!   only re-lists on that (an HTTP 410 answer to a watch would make it retry the same watch forever); an
//!   expired `continue` token or `resourceVersionMatch=Exact` LIST gets HTTP 410 with the `Status` body;
//! - GET and PATCH (merge / apply, including `.../status`) of single objects, and the discovery
//!   documents (`/version`, `/api`, `/apis`, `/api/v1`, `/apis/{group}/{version}`).
//!
//! Every request must carry `Authorization: Bearer` [`TOKEN`] (the kubeconfig from
//! [`ApiServer::write_kubeconfig`] does), and is logged with its verb so tests can assert how a client
//! talked (e.g. that it re-listed after a 410).

mod objects;
mod server;
mod store;

#[cfg(test)]
mod kube_tests;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

pub use objects::{echo_service, endpointslice, from_yaml, node, service};

use server::{Shared, lock};
use store::Store;

/// The bearer token the simulator requires and its kubeconfigs carry.
pub const TOKEN: &str = "weir-tests-token";

/// The Kubernetes verb of a logged request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    List,
    Watch,
    Get,
    Patch,
    /// `/version`, `/api`, `/apis`, group and resource lists, health.
    Discovery,
    /// Anything else (unknown paths, unsupported methods).
    Other,
}

/// One request the simulator answered.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    /// The URL path, without the query.
    pub path: String,
    /// Decoded query parameters, in order.
    pub query: Vec<(String, String)>,
    pub verb: Verb,
    /// The resource's plural name (`services`), for resource requests.
    pub resource: Option<&'static str>,
    /// The HTTP status (a watch answered with a 410 ERROR event is 200: see `expired`).
    pub status: u16,
    /// Answered "410 Gone" (HTTP 410, or a watch's ERROR event with code 410).
    pub expired: bool,
}

impl RequestRecord {
    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A running simulator; stops (closing every connection) on drop. See the module docs.
#[derive(Debug)]
pub struct ApiServer {
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on 127.0.0.1 (a free port) in the caller's network namespace.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    }

    /// Listens on `addr` in the caller's network namespace.
    pub fn start_on(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
        Self::from_listener(listener)
    }

    /// Listens on `addr` inside network namespace `netns` (e.g. a lab's node, where the agent runs: a
    /// socket stays in the namespace it was created in, whichever thread serves it).
    pub fn start_in_netns(netns: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = crate::netns::in_netns(netns, || std::net::TcpListener::bind(addr))
            .and_then(|bound| bound)
            .with_context(|| format!("bind {addr} in netns {netns}"))?;
        Self::from_listener(listener)
    }

    /// Serves on an already bound listener, from a background thread running its own tokio runtime.
    pub fn from_listener(listener: std::net::TcpListener) -> anyhow::Result<Self> {
        let addr = listener.local_addr().context("listener address")?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            log: Mutex::new(Vec::new()),
            token: TOKEN.to_owned(),
            reachable: AtomicBool::new(true),
            addr,
        });
        let mut server = Self {
            shared,
            shutdown: None,
            thread: None,
        };
        server.serve(listener)?;
        Ok(server)
    }

    fn serve(&mut self, listener: std::net::TcpListener) -> anyhow::Result<()> {
        let addr = self.shared.addr;
        listener
            .set_nonblocking(true)
            .context("make the listener non-blocking")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("build the simulator's tokio runtime")?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener).context("register the listener")?
        };
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel();
        let serving = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("apiserver-{addr}"))
            .spawn(move || {
                runtime.block_on(server::serve(listener, serving, shutdown_rx));
                // Dropping the runtime cancels every connection task, closing their sockets.
                drop(runtime);
            })
            .context("spawn the simulator thread")?;
        self.shutdown = Some(shutdown);
        self.thread = Some(thread);
        Ok(())
    }

    /// Stops serving as a stopped API server process would: the listening socket and every connection
    /// (open watches included) are closed, so clients get "connection refused" until
    /// [`restart_in_netns`](Self::restart_in_netns). The objects and their history are kept (etcd
    /// outlives the API server), and [`apply`](Self::apply) still changes them meanwhile.
    pub fn stop(&mut self) {
        // Abort the watch streams first so their connections end as cut, not as completed watches.
        self.drop_watches();
        self.shut_down();
    }

    /// Listens again on the same address inside `netns` (where it was started), serving the same
    /// objects and history: an API server back after an outage. A no-op while it is serving.
    pub fn restart_in_netns(&mut self, netns: &str) -> anyhow::Result<()> {
        if self.thread.is_some() {
            return Ok(());
        }
        let addr = self.shared.addr;
        let listener = crate::netns::in_netns(netns, || std::net::TcpListener::bind(addr))
            .and_then(|bound| bound)
            .with_context(|| format!("bind {addr} again in netns {netns}"))?;
        self.serve(listener)
    }

    /// True between a start or restart and a [`stop`](Self::stop).
    pub fn is_serving(&self) -> bool {
        self.thread.is_some()
    }

    fn shut_down(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("weir-tests: the API server simulator thread panicked");
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://ADDR`, the kubeconfig's `server`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Writes a kubeconfig for this server to `path`. See [`write_kubeconfig`].
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        write_kubeconfig(path, &self.url())
    }

    /// Creates or replaces `object` (by `apiVersion`, `kind`, `metadata.namespace` (default `default`) and
    /// `metadata.name`): ADDED or MODIFIED to the watches that select it. An update that changes nothing
    /// is a no-op, as on the real server. Returns the object's resourceVersion.
    pub fn apply(&self, object: Value) -> anyhow::Result<u64> {
        lock(&self.shared.store)
            .apply(object)
            .map_err(anyhow::Error::msg)
    }

    /// [`apply`](Self::apply) for each object in order; returns the last resourceVersion.
    pub fn apply_all(&self, objects: impl IntoIterator<Item = Value>) -> anyhow::Result<u64> {
        let mut rv = self.resource_version();
        for object in objects {
            rv = self.apply(object)?;
        }
        Ok(rv)
    }

    /// Deletes the object: DELETED (with its last state) to the watches that selected it. `kind` is the
    /// kind (`Service`) or plural (`services`); `namespace` is ignored for cluster-scoped kinds.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> anyhow::Result<u64> {
        let key = Self::key(kind, namespace, name)?;
        lock(&self.shared.store)
            .delete(key)
            .map_err(|e| anyhow::anyhow!("delete {kind} {namespace}/{name}: {e:?}"))
    }

    /// The current object, if it exists.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> anyhow::Result<Option<Value>> {
        let key = Self::key(kind, namespace, name)?;
        Ok(lock(&self.shared.store).get(&key).map(|o| (*o).clone()))
    }

    fn key(kind: &str, namespace: &str, name: &str) -> anyhow::Result<store::Key> {
        let Some(res) = store::by_kind(None, kind) else {
            bail!("the simulator does not serve kind {kind:?}");
        };
        let ns = if store::RESOURCES[res].namespaced {
            namespace.to_owned()
        } else {
            String::new()
        };
        Ok((res, ns, name.to_owned()))
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).rv()
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that allowed bookmarks.
    pub fn send_bookmarks(&self) {
        lock(&self.shared.store).send_bookmarks();
    }

    /// Expires all history: the resourceVersion moves on (as other writes in a busy cluster would move it)
    /// and everything before it is compacted, so re-watching from any version a client has seen gets 410.
    /// Open watches are not affected until they reconnect (see [`drop_watches`](Self::drop_watches)).
    pub fn compact(&self) {
        lock(&self.shared.store).compact();
    }

    /// Closes every open watch connection abruptly (no final chunk), like a dropped connection or an API
    /// server restart. Returns how many were open.
    pub fn drop_watches(&self) -> usize {
        lock(&self.shared.store).drop_watches()
    }

    /// `false`: a partition. Open watches are cut, and every new connection or request is closed
    /// without an answer until `true` again; changes made meanwhile are only seen by re-watching or
    /// re-listing.
    pub fn set_reachable(&self, reachable: bool) {
        self.shared.reachable.store(reachable, Ordering::SeqCst);
        if !reachable {
            self.drop_watches();
        }
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.log).clone()
    }

    /// How many `verb` requests on `resource` (plural, any namespace) were answered.
    pub fn count(&self, verb: Verb, resource: &str) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.verb == verb && r.resource == Some(resource))
            .count()
    }

    /// How many `verb` requests on exactly `path` were answered.
    pub fn count_path(&self, verb: Verb, path: &str) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.verb == verb && r.path == path)
            .count()
    }

    /// Watches on `resource` (plural) that are open now.
    pub fn open_watches(&self, resource: &str) -> usize {
        match store::RESOURCES.iter().position(|r| r.plural == resource) {
            Some(res) => lock(&self.shared.store).open_watches(res),
            None => 0,
        }
    }

    /// Waits until at least `n` watches on `resource` are open.
    pub fn wait_for_watches(
        &self,
        resource: &str,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let open = self.open_watches(resource);
            if open >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{open} open watches on {resource} after {timeout:?}, wanted {n}; requests: {:#?}",
                    self.requests()
                        .iter()
                        .rev()
                        .take(10)
                        .map(|r| format!("{} {} {:?} -> {}", r.method, r.path, r.query, r.status))
                        .collect::<Vec<_>>()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Writes a kubeconfig (YAML) pointing at `server_url` (`http://ADDR`): one cluster, one user with the
/// bearer [`TOKEN`], one context, current. Usable before the server exists, so a client can be started
/// against an API server that is not up yet.
pub fn write_kubeconfig(path: &Path, server_url: &str) -> anyhow::Result<()> {
    let q = |s: &str| Value::from(s).to_string();
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: weir-sim\n  cluster:\n    server: {}\n\
         users:\n- name: weir-sim\n  user:\n    token: {}\ncontexts:\n- name: weir-sim\n  context:\n    \
         cluster: weir-sim\n    user: weir-sim\n    namespace: default\ncurrent-context: weir-sim\n",
        q(server_url),
        q(TOKEN)
    );
    std::fs::write(path, yaml).with_context(|| format!("write kubeconfig {}", path.display()))
}
