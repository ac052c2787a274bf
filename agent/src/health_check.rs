//! kube-proxy's health check node ports: for each LoadBalancer Service with externalTrafficPolicy Local,
//! an HTTP server on its healthCheckNodePort tells the cloud load balancer whether this node has a ready
//! local endpoint (200) or not (503), so it only sends traffic to nodes that can serve it.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use http_body_util::Full;
use hyper::{Response, StatusCode, body::Bytes, header, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::{metrics::Metrics, model::HealthCheck};

struct Server {
    check: Arc<RwLock<HealthCheck>>,
    task: JoinHandle<()>,
}

/// The running servers, one per port; `sync` starts, updates and stops them.
#[derive(Default)]
pub struct HealthCheckServers {
    servers: BTreeMap<u16, Server>,
}

impl HealthCheckServers {
    pub async fn sync(&mut self, checks: Vec<HealthCheck>, metrics: &Arc<Metrics>) {
        let wanted: BTreeMap<u16, HealthCheck> = checks.into_iter().map(|c| (c.port, c)).collect();
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port);
            if !keep {
                server.task.abort();
                info!(port, "health check server stopped");
            }
            keep
        });
        for (port, check) in wanted {
            if let Some(server) = self.servers.get(&port) {
                if let Ok(mut c) = server.check.write() {
                    *c = check;
                }
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    // Another process holds the port; the next sync tries again.
                    warn!(port, service = %check.service, "cannot serve the health check node port: {e}");
                    continue;
                }
            };
            info!(port, service = %check.service, "health check server started");
            let check = Arc::new(RwLock::new(check));
            let task = tokio::spawn(serve(listener, check.clone(), metrics.clone()));
            self.servers.insert(port, Server { check, task });
        }
    }
}

async fn serve(listener: TcpListener, check: Arc<RwLock<HealthCheck>>, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let check = check.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                let resp = respond(&check, &metrics);
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(%peer, "health check connection: {e}");
            }
        });
    }
}

/// kube-proxy's answer: JSON naming the Service with the local endpoint count, the same count in
/// `X-Load-Balancing-Endpoint-Weight`, 200 when there is a local endpoint and the proxy is healthy.
fn respond(check: &RwLock<HealthCheck>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (namespace, name, local) = match check.read() {
        Ok(c) => (
            c.service.namespace.clone(),
            c.service.name.clone(),
            c.local_endpoints,
        ),
        Err(_) => (String::new(), String::new(), 0),
    };
    let healthy = metrics.healthy();
    let body = serde_json::json!({
        "service": {"namespace": namespace, "name": name},
        "localEndpoints": local,
        "serviceProxyHealthy": healthy,
    })
    .to_string();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = if local > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "X-Load-Balancing-Endpoint-Weight",
        header::HeaderValue::from(local),
    );
    resp
}
