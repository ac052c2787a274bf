//! Command-line flags of `weir-agent` (names follow kube-proxy's where one exists).
use std::{net::IpAddr, net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use weir_common::{
    DEFAULT_AFFINITY_MAX, DEFAULT_BACKENDS_MAX, DEFAULT_CONNTRACK_MAX, DEFAULT_MAGLEV_SLOTS,
    DEFAULT_SERVICES_MAX, DEFAULT_SOCK_REVNAT_MAX, DEFAULT_SOURCE_RANGES_MAX,
};

#[derive(Debug, Parser)]
#[command(
    name = "weir-agent",
    version,
    about = "Weir: eBPF Service load balancing in place of kube-proxy"
)]
pub struct Args {
    /// Standalone mode: directory of YAML files holding core/v1 Service and discovery.k8s.io/v1
    /// EndpointSlice objects (multi-document); re-applied within 1 s of any change.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    pub config_dir: Option<PathBuf>,

    /// Kubernetes mode: follow the API server named in this kubeconfig. Without this flag and without
    /// --config-dir, the in-cluster configuration is used (service account of the DaemonSet pod).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// This node's name (Kubernetes mode: the Node object to watch); default: the host name, as
    /// kube-proxy's --hostname-override.
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,

    /// This node's zone, for topology-aware routing (`trafficDistribution: PreferClose`, zone hints);
    /// default: the Node's `topology.kubernetes.io/zone` label in Kubernetes mode, none in standalone mode.
    #[arg(long, value_name = "ZONE")]
    pub node_zone: Option<String>,

    /// Serve Services labelled `service.kubernetes.io/service-proxy-name` with this value (and unlabelled
    /// ones); Services labelled with another name belong to another proxy and are skipped.
    #[arg(long, value_name = "NAME")]
    pub service_proxy_name: Option<String>,

    /// Least time between two syncs: changes arriving faster are coalesced into one (kube-proxy's
    /// --min-sync-period).
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_duration)]
    pub min_sync_period: Duration,

    /// /healthz turns 503 when a change has waited longer than this to be programmed.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub healthz_timeout: Duration,

    /// Attach the datapath to the node side of every interface whose name starts with this.
    #[arg(long, value_name = "PREFIX", default_value = "lxc")]
    pub pod_iface_prefix: String,

    /// Interface facing outside the node (repeatable): the datapath is attached to its ingress so NodePorts,
    /// externalIPs and LoadBalancer IPs are balanced for outside clients. Must exist at start.
    #[arg(long = "external-iface", value_name = "IFACE")]
    pub external_ifaces: Vec<String>,

    /// Node address (repeatable); default: the Node's addresses (Kubernetes mode) or the node's global
    /// addresses from netlink.
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<IpAddr>,

    /// Where maps and program links are pinned; mounted as bpffs if it is not one.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/weir")]
    pub bpffs_dir: PathBuf,

    /// cgroup v2 hierarchy whose root gets the socket-level load balancing hooks for processes in the
    /// node's own network namespace (host-network clients); mounted there if it is not cgroup v2.
    #[arg(long, value_name = "DIR", default_value = "/run/weir/cgroupv2")]
    pub cgroup_root: PathBuf,

    /// Do not attach the socket-level hooks: host-network processes then do not reach Services.
    #[arg(long)]
    pub no_socket_lb: bool,

    /// Do not put the XDP fast path (native mode) on the external interfaces: their TC program then
    /// does all the work, in the stack.
    #[arg(long)]
    pub no_xdp: bool,

    /// Port of the L7 proxy for Services with a Gateway API HTTPRoute (pods' connections to them are
    /// steered to it by the datapath); 0 disables it (such Services' TCP ports then drop).
    #[arg(long, value_name = "PORT", default_value_t = 15001)]
    pub l7_proxy_port: u16,

    /// Health endpoint: GET /healthz is 200 once the first full sync is programmed and pod interfaces
    /// are attached, 503 before and when a sync is overdue.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10256")]
    pub health_addr: SocketAddr,

    /// Prometheus metrics (GET /metrics) and the programmed state as JSON (GET /state, for `weir`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    pub metrics_addr: SocketAddr,

    /// On SIGTERM, leave the programs attached (their links stay pinned) instead of detaching them, so a
    /// rolling update of the DaemonSet never leaves pods without Service translation; the next agent
    /// adopts the links.
    #[arg(long)]
    pub keep_datapath_on_exit: bool,

    /// Capacity of the frontend map (ClusterIP:port/protocol entries; every ClusterIP also has one
    /// "any other port" entry per protocol) and of the per-frontend counters map.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SERVICES_MAX)]
    pub max_services: u32,

    /// Slots in the Maglev arena that holds every frontend's table, 4 bytes each, preallocated. A
    /// frontend with N backends needs the smallest prime ≥ 1000·2^⌈log2 N⌉ (1 backend: 1,009; 10:
    /// 16,001), rounded up to 256, and a table being replaced briefly needs room for both. Rounded up
    /// to a multiple of 256.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAGLEV_SLOTS)]
    pub maglev_slots: u64,

    /// Capacity of the backend map (distinct endpoint address:port/protocol).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BACKENDS_MAX)]
    pub max_backends: u32,

    /// Capacity of the LRU connection-tracking map (two entries per flow).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONNTRACK_MAX)]
    pub max_conntrack: u32,

    /// How often idle flows are removed from the conntrack maps (each pass walks both maps).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub conntrack_gc_interval: Duration,

    /// Idle TCP flows the backend answered are forgotten after this (kube-proxy's flag; the kernel
    /// setting it writes is nf_conntrack_tcp_timeout_established).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_established: Duration,

    /// Idle TCP flows closed (FIN) one way only are forgotten after this (kube-proxy's flag).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_close_wait: Duration,

    /// TCP flows whose backend never answered are forgotten after this idle time (the kernel's
    /// nf_conntrack_tcp_timeout_syn_sent).
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_syn: Duration,

    /// TCP flows closed (FIN) both ways are forgotten after this (nf_conntrack_tcp_timeout_time_wait).
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_time_wait: Duration,

    /// TCP flows reset (RST) by either side are forgotten after this (nf_conntrack_tcp_timeout_close).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_close: Duration,

    /// Idle UDP flows the backend never answered are forgotten after this (kube-proxy's flag).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub conntrack_udp_timeout: Duration,

    /// Idle UDP flows the backend answered are forgotten after this (kube-proxy's flag).
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    pub conntrack_udp_timeout_stream: Duration,

    /// Capacity of the LRU ClientIP session-affinity map (one entry per client and frontend).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_AFFINITY_MAX)]
    pub max_affinity: u32,

    /// Capacity of the loadBalancerSourceRanges map (one entry per LoadBalancer frontend and allowed
    /// prefix).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SOURCE_RANGES_MAX)]
    pub max_source_ranges: u32,

    /// Capacity of the LRU map of host-network sockets translated by the socket-level hooks (one entry
    /// per connected or sending socket; the oldest is forgotten first).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SOCK_REVNAT_MAX)]
    pub max_sock_revnat: u32,
}

impl Args {
    /// The conntrack timeouts in whole seconds (a timeout under a second is one second: the datapath
    /// stamps entries once a second).
    pub fn conntrack_timeouts(&self) -> crate::conntrack_gc::Timeouts {
        let s = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
        crate::conntrack_gc::Timeouts {
            tcp_syn: s(self.conntrack_tcp_timeout_syn),
            tcp_established: s(self.conntrack_tcp_timeout_established),
            tcp_close_wait: s(self.conntrack_tcp_timeout_close_wait),
            tcp_time_wait: s(self.conntrack_tcp_timeout_time_wait),
            tcp_close: s(self.conntrack_tcp_timeout_close),
            udp: s(self.conntrack_udp_timeout),
            udp_stream: s(self.conntrack_udp_timeout_stream),
        }
    }
}

/// `250ms`, `1s`, `2m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
