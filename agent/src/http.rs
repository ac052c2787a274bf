//! The health and metrics endpoints (kube-proxy's healthz and metrics ports).
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Bytes, header, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::metrics::Metrics;

#[derive(Clone, Copy, Debug)]
pub enum Endpoint {
    Health,
    Metrics,
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

fn handle(
    kind: Endpoint,
    metrics: &Metrics,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    match (kind, req.uri().path()) {
        (Endpoint::Health, "/healthz" | "/livez") => {
            let healthy = metrics.healthy();
            let last = metrics.last_sync_timestamp.get();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            let body =
                format!("{{\"healthy\":{healthy},\"lastUpdated\":{last},\"currentTime\":{now}}}\n");
            let status = if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            respond(status, "application/json", body)
        }
        (Endpoint::Metrics, "/state") => {
            respond(StatusCode::OK, "application/json", metrics.state_json())
        }
        (Endpoint::Metrics, "/metrics") => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    }
}

/// Binds now (so a taken port fails the start) and serves in the background.
pub async fn serve(addr: SocketAddr, kind: Endpoint, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let resp = handle(kind, &metrics, &req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(%peer, "http connection: {e}");
                }
            });
        }
    });
    Ok(())
}
