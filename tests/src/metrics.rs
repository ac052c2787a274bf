//! Reading the agent's `/metrics` from a test: one scrape, and one sample out of it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use crate::client::http_get;
use crate::lab::Lab;

/// The agent's default `--metrics-addr`.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:10249";

/// `GET /metrics` at the default address, from inside the lab's node namespace.
pub fn scrape(lab: &Lab) -> anyhow::Result<String> {
    let addr: SocketAddr = DEFAULT_METRICS_ADDR.parse().context("metrics address")?;
    let resp = lab
        .in_node(|| http_get(addr, "/metrics", Duration::from_secs(2)))
        .context("enter the node netns")?
        .context("GET /metrics")?;
    anyhow::ensure!(resp.status == 200, "/metrics answered {}", resp.status);
    Ok(resp.body)
}

/// The value of the sample whose name and labels are exactly `series` (e.g.
/// `weir_datapath_packets_total{reason="drop_source_range"}`), `None` if absent.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// [`scrape`] then [`sample`], 0 when the series is absent (a counter that never moved).
pub fn counter(lab: &Lab, series: &str) -> anyhow::Result<f64> {
    Ok(sample(&scrape(lab)?, series).unwrap_or(0.0))
}
