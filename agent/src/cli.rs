//! Command-line flags of `weir-agent` (names follow kube-proxy's where one exists).
use std::{net::IpAddr, net::SocketAddr, path::PathBuf};

use clap::Parser;
use weir_common::{DEFAULT_BACKENDS_MAX, DEFAULT_CONNTRACK_MAX, DEFAULT_SERVICES_MAX};

#[derive(Debug, Parser)]
#[command(
    name = "weir-agent",
    version,
    about = "Weir: eBPF Service load balancing in place of kube-proxy"
)]
pub struct Args {
    /// Standalone mode: directory of YAML files holding core/v1 Service and discovery.k8s.io/v1
    /// EndpointSlice objects (multi-document); re-applied within 1 s of any change.
    #[arg(long, value_name = "DIR")]
    pub config_dir: PathBuf,

    /// Attach the datapath to the node side of every interface whose name starts with this.
    #[arg(long, value_name = "PREFIX", default_value = "lxc")]
    pub pod_iface_prefix: String,

    /// Interface facing outside the node (repeatable); reserved for NodePort/LoadBalancer, checked to exist.
    #[arg(long = "external-iface", value_name = "IFACE")]
    pub external_ifaces: Vec<String>,

    /// Node address (repeatable); default: the node's global addresses from netlink.
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<IpAddr>,

    /// Where maps are pinned; mounted as bpffs if it is not one.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/weir")]
    pub bpffs_dir: PathBuf,

    /// Health endpoint: GET /healthz is 200 once the first full sync is programmed, 503 before.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10256")]
    pub health_addr: SocketAddr,

    /// Prometheus metrics endpoint (GET /metrics).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    pub metrics_addr: SocketAddr,

    /// Capacity of the frontend map (ClusterIP:port/protocol entries); the Maglev table map gets 1,024 more
    /// for tables being swapped in.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SERVICES_MAX)]
    pub max_services: u32,

    /// Capacity of the backend map (distinct endpoint address:port/protocol).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BACKENDS_MAX)]
    pub max_backends: u32,

    /// Capacity of the LRU connection-tracking map (two entries per flow).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONNTRACK_MAX)]
    pub max_conntrack: u32,
}
