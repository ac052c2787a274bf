//! The agent's run loop: wires a config source (YAML directory or Kubernetes), the reconciler, link
//! events and the HTTP endpoints, and detaches everything on SIGTERM.
use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{debug, error, info, warn};
use weir_common::TABLE_CHUNK_SLOTS;

use crate::{
    bpffs,
    cli::Args,
    conntrack_gc,
    datapath::{Capacities, Datapath, Hook, Maps},
    health_check::HealthCheckServers,
    http::{self, Endpoint},
    kube_source,
    l7::{
        L7Proxy, LocalAddr, ProxyConfig, RouteTable, ServiceDirectory,
        fault::{self, FaultObjects},
        status::{self, RouteStatus},
        status_writer,
    },
    l7_steering,
    links::{self, LinkEvent},
    metrics::Metrics,
    model::{self, DesiredCache, NodeContext, NodeInfo, SourceUpdate},
    reconcile::Reconciler,
    standalone,
    state::{AgentState, ProgrammedView},
};

/// After a sync with failed map operations, try again this soon; the delay doubles while syncs keep
/// failing (a full map refuses the same frontends every time, and each try rebuilds their tables), up
/// to `MAX_RETRY_AFTER_ERRORS`. A new change is synced at once whatever the delay.
const RETRY_AFTER_ERRORS: Duration = Duration::from_secs(1);
const MAX_RETRY_AFTER_ERRORS: Duration = Duration::from_secs(16);

enum Source {
    Dir(std::path::PathBuf),
    Kubernetes(Box<kube::Config>),
}

async fn source(args: &Args) -> anyhow::Result<Source> {
    if let Some(dir) = &args.config_dir {
        if !dir.is_dir() {
            bail!("--config-dir {}: not a directory", dir.display());
        }
        return Ok(Source::Dir(dir.clone()));
    }
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context(
            "no --config-dir or --kubeconfig given, and not running in a cluster (in-cluster config unavailable)",
        )?,
    };
    Ok(Source::Kubernetes(Box::new(config)))
}

fn node_name(args: &Args) -> String {
    args.node_name.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    })
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let source = source(&args).await?;
    let node_name = node_name(&args);
    let startup_ips = if args.node_ips.is_empty() {
        links::node_addresses()
            .await
            .context("reading node addresses")?
    } else {
        args.node_ips.clone()
    };
    info!(node = %node_name, node_ips = ?startup_ips, external_ifaces = ?args.external_ifaces, "node");

    if bpffs::ensure(&args.bpffs_dir)? {
        info!(dir = %args.bpffs_dir.display(), "mounted bpffs");
    }
    let caps = Capacities {
        services: args.max_services,
        backends: args.max_backends,
        maglev_chunks: u32::try_from(args.maglev_slots.div_ceil(u64::from(TABLE_CHUNK_SLOTS)))
            .context("--maglev-slots: too many")?,
        conntrack: args.max_conntrack,
        affinity: args.max_affinity,
        source_ranges: args.max_source_ranges,
        sock_revnat: args.max_sock_revnat,
    };
    let (mut datapath, maps, stats) = Datapath::load(&args.bpffs_dir, caps)?;
    if args.conntrack_gc_interval.is_zero() {
        bail!("--conntrack-gc-interval must be more than 0");
    }
    let gc = conntrack_gc::Collector::open(&args.bpffs_dir, args.conntrack_timeouts())
        .context("conntrack garbage collector")?;
    // Traffic from outside the node (NodePort, externalIPs, LoadBalancer IPs) enters here.
    for iface in &args.external_ifaces {
        let index = nix::net::if_::if_nametoindex(iface.as_str())
            .with_context(|| format!("--external-iface {iface}: no such interface"))?;
        let (v4, v6) = iface_addresses(iface);
        for (family, missing) in [("IPv4", v4.is_none()), ("IPv6", v6.is_none())] {
            if missing {
                warn!(
                    iface = %iface,
                    "no {family} address: outside {family} traffic arriving here cannot be SNATed to backends on other nodes"
                );
            }
        }
        datapath
            .set_external_address(index, v4, v6)
            .with_context(|| format!("--external-iface {iface}"))?;
        datapath
            .attach(index, iface, Hook::External)
            .with_context(|| format!("--external-iface {iface}"))?;
        if !args.no_xdp {
            // The TC program already serves the interface: without native XDP it simply has all of
            // the work, so a driver that cannot run XDP is not an error.
            if let Err(e) = datapath.attach_xdp(index, iface) {
                warn!(iface = %iface, "no XDP fast path, TC serves this interface alone: {e:#}");
            }
        }
    }
    if !args.no_socket_lb {
        match bpffs::ensure_cgroup2(&args.cgroup_root) {
            Ok(mounted) => {
                if mounted {
                    info!(dir = %args.cgroup_root.display(), "mounted cgroup v2");
                }
                datapath
                    .attach_socket_lb(&args.cgroup_root)
                    .context("socket-level load balancing (--no-socket-lb to run without)")?;
            }
            Err(e) => bail!("{e} (--no-socket-lb to run without socket-level load balancing)"),
        }
    }
    let proxy = L7Proxy::new(ProxyConfig::default());
    let metrics = Arc::new(Metrics::with_extra(args.healthz_timeout, |r| {
        proxy.metrics().register(r)
    }));
    if args.l7_proxy_port != 0 {
        let listener = l7_steering::transparent_listener(args.l7_proxy_port)?;
        l7_steering::ensure_policy_routing().await?;
        datapath.set_l7_port(args.l7_proxy_port)?;
        let serving = proxy.clone();
        tokio::spawn(async move {
            serving
                .serve(listener, LocalAddr, std::future::pending::<()>())
                .await;
        });
        info!(
            port = args.l7_proxy_port,
            "L7 proxy for HTTPRoutes listening"
        );
    }
    {
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("conntrack-gc".into())
            .spawn(move || {
                conntrack_gc::run(gc, args.conntrack_gc_interval, |pass, took| {
                    metrics.conntrack_gc_runs.inc();
                    metrics.conntrack_gc_deleted.inc_by(pass.deleted);
                    metrics.conntrack_gc_duration.set(took.as_secs_f64());
                    if pass.deleted > 0 {
                        debug!(
                            scanned = pass.scanned,
                            deleted = pass.deleted,
                            "conntrack garbage collected"
                        );
                    }
                });
            })
            .context("starting the conntrack garbage collector")?;
    }
    metrics.set_stats_reader(stats);
    metrics.set_state(AgentState {
        node_name: node_name.clone(),
        bpffs_dir: args.bpffs_dir.display().to_string(),
        ..AgentState::default()
    });
    http::serve(args.health_addr, Endpoint::Health, metrics.clone())
        .await
        .with_context(|| format!("--health-addr {}", args.health_addr))?;
    http::serve(args.metrics_addr, Endpoint::Metrics, metrics.clone())
        .await
        .with_context(|| format!("--metrics-addr {}", args.metrics_addr))?;

    let mut maps = maps;
    let adopted = maps.dump();
    if !adopted.services.is_empty() {
        info!(
            frontends = adopted.services.len(),
            backends = adopted.backends.len(),
            tables = adopted.tables.len(),
            "adopting state from pinned maps"
        );
    }
    let mut reconciler = Reconciler::adopt(maps, adopted);
    let mut desired_cache = DesiredCache::default();
    let mut health_checks = HealthCheckServers::default();

    let (update_tx, mut update_rx) = watch::channel::<Option<SourceUpdate>>(None);
    // HTTPFaultInjection objects: they only shape the L7 route table, so they travel apart from the
    // snapshot; a change re-syncs.
    let (faults_tx, mut faults_rx) = watch::channel(FaultObjects::new());
    // Route status: computed at every sync, written to the API server in Kubernetes mode.
    let (status_tx, status_rx) = watch::channel(Vec::new());
    let mut l7_state = L7State {
        proxy: proxy.clone(),
        faults: FaultObjects::new(),
        reported: Default::default(),
        statuses: status_tx,
    };
    let config_errors = metrics.config_errors.clone();
    let count = move |n: usize| {
        config_errors.inc_by(n as u64);
    };
    match source {
        Source::Dir(dir) => {
            info!(dir = %dir.display(), "standalone mode");
            tokio::spawn(async move {
                if let Err(e) = standalone::watch_dir(dir, update_tx, faults_tx, count).await {
                    error!("config source stopped: {e:#}");
                }
            });
        }
        Source::Kubernetes(config) => {
            info!(server = %config.cluster_url, "kubernetes mode");
            let client =
                kube::Client::try_from(*config).context("building the Kubernetes client")?;
            let node = node_name.clone();
            tokio::spawn(status_writer::run(client.clone(), status_rx));
            tokio::spawn(async move {
                if let Err(e) = kube_source::run(client, node, update_tx, faults_tx, count).await {
                    error!("kubernetes source stopped: {e:#}");
                }
            });
        }
    }

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
    let mut update: Option<SourceUpdate> = None;
    // A sync is due at this time (coalescing changes, or retrying after errors).
    let mut sync_at: Option<tokio::time::Instant> = None;
    let mut last_sync: Option<tokio::time::Instant> = None;
    let mut retry_after = RETRY_AFTER_ERRORS;

    loop {
        let due = async {
            match sync_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = update_rx.changed() => {
                if changed.is_err() {
                    warn!("config source ended; keeping the last programmed state");
                    update_rx = watch::channel(None).1;
                    continue;
                }
                update = update_rx.borrow_and_update().clone();
                if update.is_some() {
                    metrics.mark_pending();
                    // kube-proxy's min-sync-period: never sync more often than this; changes in between
                    // wait and are programmed together.
                    let earliest = last_sync
                        .map_or_else(tokio::time::Instant::now, |t| t + args.min_sync_period);
                    sync_at = Some(sync_at.map_or(earliest, |t| t.min(earliest)));
                }
            }
            changed = faults_rx.changed() => {
                if changed.is_err() {
                    faults_rx = watch::channel(FaultObjects::new()).1;
                    continue;
                }
                l7_state.faults = faults_rx.borrow_and_update().clone();
                if update.is_some() {
                    let earliest = last_sync
                        .map_or_else(tokio::time::Instant::now, |t| t + args.min_sync_period);
                    sync_at = Some(sync_at.map_or(earliest, |t| t.min(earliest)));
                }
            }
            () = due => {
                sync_at = None;
                if let Some(u) = &update {
                    let node = node_context(&args, &node_name, &startup_ips, u.snapshot.node.as_ref());
                    health_checks.sync(model::health_checks(&u.snapshot, &node), &metrics).await;
                    let errors = sync(&mut reconciler, u, &metrics, &caps, &mut desired_cache, &node, &mut l7_state);
                    last_sync = Some(tokio::time::Instant::now());
                    first_sync_done = true;
                    metrics.set_synced(first_sync_done && links_ready);
                    if errors {
                        sync_at = Some(tokio::time::Instant::now() + retry_after);
                        retry_after = (retry_after * 2).min(MAX_RETRY_AFTER_ERRORS);
                    } else {
                        retry_after = RETRY_AFTER_ERRORS;
                    }
                }
            }
            ev = link_rx.recv() => match ev {
                Some(LinkEvent::Present { index, name }) => {
                    if let Err(e) = datapath.attach(index, &name, Hook::Pod) {
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
                    datapath.prune_links();
                    links_ready = true;
                    metrics.set_synced(first_sync_done && links_ready);
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
    if args.keep_datapath_on_exit {
        info!("leaving the datapath attached for the next agent (--keep-datapath-on-exit)");
    } else {
        datapath.detach_all();
    }
    info!("stopped");
    Ok(())
}

/// The first IPv4 and the first global IPv6 address of `iface`, the sources for SNAT of outside traffic
/// it carries (a link-local address cannot be routed back to).
fn iface_addresses(iface: &str) -> (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>) {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return (None, None);
    };
    let addrs: Vec<_> = addrs
        .filter(|a| a.interface_name == iface)
        .filter_map(|a| a.address)
        .collect();
    let v4 = addrs
        .iter()
        .find_map(|a| a.as_sockaddr_in().map(|sin| sin.ip()));
    let v6 = addrs
        .iter()
        .filter_map(|a| a.as_sockaddr_in6().map(|sin| sin.ip()))
        .find(|ip| !ip.is_unicast_link_local() && !ip.is_loopback());
    (v4, v6)
}

/// Node IPs for NodePorts: `--node-ip` if given, else the Node object's addresses when the source knows
/// them, else the node's addresses read from netlink at start; both families.
fn node_context(
    args: &Args,
    name: &str,
    startup_ips: &[std::net::IpAddr],
    node: Option<&NodeInfo>,
) -> NodeContext {
    let ips = if !args.node_ips.is_empty() {
        &args.node_ips
    } else if let Some(n) = node.filter(|n| !n.addresses.is_empty()) {
        &n.addresses
    } else {
        startup_ips
    };
    let mut ips: Vec<std::net::IpAddr> = ips.to_vec();
    ips.sort();
    ips.dedup();
    // The flag wins, as kube-proxy's flags win over what it reads from its Node.
    let zone = args
        .node_zone
        .clone()
        .or_else(|| node.and_then(|n| n.zone.clone()));
    NodeContext {
        ips,
        name: name.to_owned(),
        zone,
        service_proxy_name: args.service_proxy_name.clone(),
    }
}

/// What the L7 side keeps between syncs: the fault objects from the source and the problems already
/// logged (each is logged once, not at every sync).
struct L7State {
    proxy: L7Proxy,
    faults: FaultObjects,
    reported: std::collections::BTreeSet<String>,
    /// The latest route statuses (the Kubernetes writer follows it).
    statuses: watch::Sender<Vec<RouteStatus>>,
}

impl L7State {
    fn report(&mut self, problems: std::collections::BTreeSet<String>) {
        for p in problems.difference(&self.reported) {
            warn!("{p}");
        }
        self.reported = problems;
    }
}

/// Frontends of Service ports with an HTTPRoute go to the L7 proxy; the proxy gets the routes and the
/// endpoints the L4 side computed (same readiness, policies, topology).
fn steer_routed_frontends(
    snapshot: &model::Snapshot,
    desired: &mut model::Desired,
    l7: &mut L7State,
) {
    let (faults, mut problems) = fault::validate_all(l7.faults.values());
    let (table, route_problems) = RouteTable::from_k8s_with(snapshot.http_routes.values(), &faults);
    let statuses = status::compute(&snapshot.http_routes, &snapshot.services, &faults);
    l7.statuses.send_if_modified(|current| {
        if *current == statuses {
            return false;
        }
        // The same conditions Kubernetes mode writes, in the log (once per change) and on /state.
        for s in statuses.iter().filter(|s| !current.contains(s)) {
            let all_true = s
                .parents
                .iter()
                .all(|p| p.conditions.iter().all(|c| c.is_true()));
            if all_true {
                info!("{s}");
            } else {
                warn!("{s}");
            }
        }
        *current = statuses;
        true
    });
    problems.extend(route_problems.iter().map(|p| format!("HTTPRoute {p}")));
    l7.report(problems.into_iter().collect());
    // Without routes nothing is steered and the proxy needs no endpoints: building the directory
    // of every Service would cost a big cluster tens of milliseconds at every sync.
    let directory = if snapshot.http_routes.is_empty() {
        ServiceDirectory::default()
    } else {
        ServiceDirectory::from_model(&snapshot.services, desired)
    };
    for addr in table.steered_frontends(&directory) {
        // Steering is IPv4 only: the proxy's transparent listener and policy route are IPv4; an IPv6
        // frontend of a routed Service stays L4-balanced.
        let std::net::SocketAddr::V4(v4) = addr else {
            continue;
        };
        let key = model::Frontend {
            ip: std::net::IpAddr::V4(*v4.ip()),
            port: v4.port(),
            protocol: model::Protocol::Tcp,
        };
        if let Some(state) = desired.frontends.get_mut(&key) {
            std::sync::Arc::make_mut(state).l7 = true;
        }
    }
    l7.proxy.set_routes(table);
    l7.proxy.set_directory(directory);
}

/// One sync; returns whether some map operation failed (and a retry is due).
fn sync(
    reconciler: &mut Reconciler<Maps>,
    update: &SourceUpdate,
    metrics: &Metrics,
    caps: &Capacities,
    cache: &mut DesiredCache,
    node: &NodeContext,
    l7: &mut L7State,
) -> bool {
    let snapshot = &update.snapshot;
    let started = Instant::now();
    let (mut desired, recomputed) = cache.update(snapshot, node);
    let computed = started.elapsed();
    steer_routed_frontends(snapshot, &mut desired, l7);
    let steered = started.elapsed();
    let report = reconciler.sync(&desired);
    let elapsed = started.elapsed();
    tracing::debug!(
        desired_us = computed.as_micros() as u64,
        l7_us = (steered - computed).as_micros() as u64,
        maps_us = (elapsed - steered).as_micros() as u64,
        "sync steps"
    );
    metrics.sync_duration.observe(elapsed.as_secs_f64());
    metrics
        .programming_latency
        .observe(update.changed_at.elapsed().as_secs_f64());
    metrics.syncs.inc();
    metrics.sync_errors.inc_by(report.errors as u64);
    metrics
        .refused_frontends
        .set(report.frontends_refused as i64);
    metrics
        .frontends
        .set(reconciler.programmed_frontends() as i64);
    metrics
        .backends
        .set(reconciler.programmed_backends() as i64);
    metrics.set_fill(
        weir_common::MAP_SERVICES,
        reconciler.programmed_frontends(),
        caps.services,
    );
    metrics.set_fill(
        weir_common::MAP_BACKENDS,
        reconciler.programmed_backends(),
        caps.backends,
    );
    metrics.set_fill(
        weir_common::MAP_MAGLEV,
        reconciler.arena().used() as usize,
        reconciler.arena().capacity(),
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics.last_sync_timestamp.set(now);
    metrics.clear_pending();

    let frontend_count = desired.frontends.len();
    metrics.set_programmed(ProgrammedView {
        frontends: desired
            .frontends
            .into_iter()
            .map(|(f, state)| {
                let value = reconciler.programmed(&crate::reconcile::service_key(&f));
                (f, state, value)
            })
            .collect(),
    });
    let routes = l7.statuses.borrow().clone();
    metrics.update_state(|s| s.routes = routes);

    info!(
        frontends = frontend_count,
        services_recomputed = recomputed,
        written = report.frontends_written,
        deleted = report.frontends_deleted,
        errors = report.errors,
        refused = report.frontends_refused,
        took_us = elapsed.as_micros() as u64,
        "synced"
    );
    // A sync frees what it parsed and built (YAML trees, Maglev tables), often more than the agent
    // keeps.
    crate::memory::release_free_memory();
    report.errors > 0
}
