//! The agent's run loop: wires the config source, the reconciler, link events and the HTTP endpoints, and
//! detaches everything on SIGTERM.
use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use crate::{
    bpffs,
    cli::Args,
    datapath::{Capacities, Datapath},
    http::{self, Endpoint},
    links::{self, LinkEvent},
    metrics::Metrics,
    model,
    reconcile::Reconciler,
    standalone::{self, Snapshot},
};

/// After a sync with failed map operations, try again this soon.
const RETRY_AFTER_ERRORS: Duration = Duration::from_secs(1);

pub async fn run(args: Args) -> anyhow::Result<()> {
    if !args.config_dir.is_dir() {
        bail!(
            "--config-dir {}: not a directory",
            args.config_dir.display()
        );
    }
    for iface in &args.external_ifaces {
        nix::net::if_::if_nametoindex(iface.as_str())
            .with_context(|| format!("--external-iface {iface}: no such interface"))?;
    }
    let node_ips = if args.node_ips.is_empty() {
        links::node_addresses()
            .await
            .context("reading node addresses")?
    } else {
        args.node_ips.clone()
    };
    info!(?node_ips, external_ifaces = ?args.external_ifaces, "node");

    if bpffs::ensure(&args.bpffs_dir)? {
        info!(dir = %args.bpffs_dir.display(), "mounted bpffs");
    }
    let caps = Capacities {
        services: args.max_services,
        backends: args.max_backends,
        maglev_tables: args.max_services.saturating_add(1024),
        conntrack: args.max_conntrack,
    };
    let (mut datapath, maps, stats) = Datapath::load(&args.bpffs_dir, caps)?;
    let metrics = Arc::new(Metrics::new());
    metrics.set_stats_reader(stats);
    http::serve(args.health_addr, Endpoint::Health, metrics.clone())
        .await
        .with_context(|| format!("--health-addr {}", args.health_addr))?;
    http::serve(args.metrics_addr, Endpoint::Metrics, metrics.clone())
        .await
        .with_context(|| format!("--metrics-addr {}", args.metrics_addr))?;

    let adopted = maps.dump();
    if !adopted.services.is_empty() {
        info!(
            frontends = adopted.services.len(),
            backends = adopted.backends.len(),
            "adopting state from pinned maps"
        );
    }
    let mut reconciler = Reconciler::adopt(maps, adopted);

    let (snap_tx, mut snap_rx) = watch::channel::<Option<Snapshot>>(None);
    let config_errors = metrics.config_errors.clone();
    let dir = args.config_dir.clone();
    tokio::spawn(async move {
        let count = move |n: usize| {
            config_errors.inc_by(n as u64);
        };
        if let Err(e) = standalone::watch_dir(dir, snap_tx, count).await {
            error!("config source stopped: {e:#}");
        }
    });

    let (link_tx, mut link_rx) = mpsc::channel(256);
    let (link_err_tx, mut link_err_rx) = mpsc::channel::<String>(1);
    let prefix = args.pod_iface_prefix.clone();
    tokio::spawn(async move {
        if let Err(e) = links::watch_pod_links(prefix, link_tx).await {
            let _ = link_err_tx.send(e.to_string()).await;
        }
    });
    // Healthy means "serving": the first sync is programmed and every pod interface present at start is
    // attached, so a client that waited for /healthz never races the attach.
    let mut links_ready = false;
    let mut first_sync_done = false;

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut snapshot: Option<Snapshot> = None;

    loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = snap_rx.changed() => {
                if changed.is_err() {
                    warn!("config source ended; keeping the last programmed state");
                    // Keep serving; only signals end the agent now.
                    snap_rx = watch::channel(None).1;
                    continue;
                }
                snapshot = snap_rx.borrow_and_update().clone();
                retry_at = sync(&mut reconciler, snapshot.as_ref(), &metrics);
                first_sync_done |= snapshot.is_some();
                metrics.synced.store(first_sync_done && links_ready, Ordering::Relaxed);
            }
            () = retry => {
                retry_at = sync(&mut reconciler, snapshot.as_ref(), &metrics);
            }
            ev = link_rx.recv() => match ev {
                Some(LinkEvent::Present { index, name }) => {
                    if let Err(e) = datapath.attach(index, &name) {
                        // The interface may have vanished between the event and the attach.
                        warn!(iface = %name, index, "cannot attach: {e}");
                    }
                    metrics.attached_interfaces.set(datapath.attached_count() as i64);
                }
                Some(LinkEvent::Gone { index }) => {
                    datapath.forget(index);
                    metrics.attached_interfaces.set(datapath.attached_count() as i64);
                }
                Some(LinkEvent::InitialDumpDone) => {
                    links_ready = true;
                    metrics.synced.store(first_sync_done && links_ready, Ordering::Relaxed);
                }
                None => {}
            },
            Some(e) = link_err_rx.recv() => {
                // Without link events no pod interface can be attached: fail loudly so the DaemonSet
                // restarts us, rather than serve a datapath that silently misses pods.
                datapath.detach_all();
                bail!("watching pod interfaces: {e}");
            }
            _ = sigterm.recv() => { info!("SIGTERM: detaching"); break; }
            _ = sigint.recv() => { info!("SIGINT: detaching"); break; }
        }
    }
    datapath.detach_all();
    info!("stopped");
    Ok(())
}

/// One sync; returns when to retry if some map operation failed.
fn sync(
    reconciler: &mut Reconciler<crate::datapath::Maps>,
    snapshot: Option<&Snapshot>,
    metrics: &Metrics,
) -> Option<tokio::time::Instant> {
    let snapshot = snapshot?;
    let started = Instant::now();
    let desired = model::desired(snapshot.services.values(), snapshot.slices.values());
    let report = reconciler.sync(&desired);
    let elapsed = started.elapsed();
    metrics.sync_duration.observe(elapsed.as_secs_f64());
    metrics.syncs.inc();
    metrics.sync_errors.inc_by(report.errors as u64);
    metrics
        .frontends
        .set(reconciler.programmed_frontends() as i64);
    metrics
        .backends
        .set(reconciler.programmed_backends() as i64);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics.last_sync_timestamp.set(now);
    info!(
        frontends = desired.frontends.len(),
        written = report.frontends_written,
        deleted = report.frontends_deleted,
        errors = report.errors,
        took_us = elapsed.as_micros() as u64,
        "synced"
    );
    (report.errors > 0).then(|| tokio::time::Instant::now() + RETRY_AFTER_ERRORS)
}
