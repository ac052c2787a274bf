//! The services every experiment programs: N ClusterIP Services with E endpoints each, named and
//! addressed the same way whether they become eBPF map entries (through the agent's own model), agent
//! YAML, iptables rules or nftables rules.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::Context as _;
use weir_agent::model::{NsName, Snapshot};
use weir_agent::standalone::ConfigDir;
use weir_tests::yaml::{documents, endpointslice_yaml, service_yaml};

pub const NAMESPACE: &str = "bench";
pub const PORT_NAME: &str = "http";
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// kube-proxy's `--cluster-cidr`: pod traffic from inside it is not masqueraded.
pub const CLUSTER_CIDR: &str = "10.0.0.0/8";
/// The service CIDR (kube-proxy's nftables mode drops traffic to unallocated ClusterIPs in it).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// Services per agent config file.
const SERVICES_PER_FILE: usize = 500;

/// The ClusterIP of service `i` (10.96.0.1 upwards; 10.96.0.0/12 holds a million).
pub fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// Endpoint `j` of service `i` when it is not a real pod: unique, inside the cluster CIDR, never dialled.
pub fn fake_endpoint(i: usize, j: usize, per_service: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 1)) + (i * per_service + j) as u32)
}

/// One Service with one TCP port (80 → 8080) and its EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDef {
    pub index: usize,
    pub name: String,
    pub vip: Ipv4Addr,
    pub endpoints: Vec<Ipv4Addr>,
}

impl ServiceDef {
    pub fn new(index: usize, endpoints: Vec<Ipv4Addr>) -> Self {
        Self {
            index,
            name: format!("svc-{index}"),
            vip: vip(index),
            endpoints,
        }
    }

    /// kube-proxy's `ServicePortName`: `namespace/name:port`.
    pub fn port_name(&self) -> String {
        format!("{NAMESPACE}/{}:{PORT_NAME}", self.name)
    }

    pub fn slice_id(&self) -> NsName {
        NsName {
            namespace: NAMESPACE.to_owned(),
            name: format!("{}-1", self.name),
        }
    }

    /// Service and EndpointSlice documents for the agent's config dir.
    pub fn yaml(&self) -> String {
        let ready: Vec<(Ipv4Addr, bool)> = self.endpoints.iter().map(|ip| (*ip, true)).collect();
        documents(&[
            service_yaml(
                NAMESPACE,
                &self.name,
                &self.vip.to_string(),
                &[(PORT_NAME, SERVICE_PORT, "TCP", TARGET_PORT)],
            ),
            endpointslice_yaml(
                NAMESPACE,
                &format!("{}-1", self.name),
                &self.name,
                &[(PORT_NAME, TARGET_PORT, "TCP")],
                &ready,
            ),
        ])
    }

    /// The config file holding this service when it has a file of its own.
    pub fn own_file(&self) -> String {
        format!("{}.yaml", self.name)
    }
}

/// N services with `per_service` fake endpoints each, except those in `real`, which get the given ones.
pub fn catalog(
    n: usize,
    per_service: usize,
    real: &BTreeMap<usize, Vec<Ipv4Addr>>,
) -> Vec<ServiceDef> {
    (0..n)
        .map(|i| {
            let endpoints = real.get(&i).cloned().unwrap_or_else(|| {
                (0..per_service)
                    .map(|j| fake_endpoint(i, j, per_service))
                    .collect()
            });
            ServiceDef::new(i, endpoints)
        })
        .collect()
}

/// Turns YAML written by [`write_config_dir`] into the agent's snapshot with the agent's own standalone
/// source (`ConfigDir`): the same parsing and validation as `weir-agent --config-dir`. Only files
/// changed since the last call are read again.
pub fn load_snapshot(config: &mut ConfigDir) -> anyhow::Result<Snapshot> {
    let (snapshot, errors) = config
        .reload_with(false)
        .context("reading the config dir")?;
    anyhow::ensure!(errors.is_empty(), "config errors: {}", errors.join("; "));
    Ok(snapshot)
}

/// `count` services spread evenly over `0..n` (at the middles of `count` equal parts), so that in
/// kube-proxy's iptables mode, whose KUBE-SERVICES chain is walked in order, they sit on average halfway.
pub fn spread_indices(n: usize, count: usize) -> Vec<usize> {
    let count = count.min(n).max(1);
    let mut v: Vec<usize> = (0..count)
        .map(|k| ((2 * k + 1) * n) / (2 * count))
        .collect();
    v.dedup();
    v
}

/// Writes the agent config for `defs` into `dir`: services in `own_file` get a file each (so one can be
/// rewritten alone), the rest go `SERVICES_PER_FILE` to a file named after its first service, so that
/// services added later land in new files.
pub fn write_config_dir(dir: &Path, defs: &[ServiceDef], own_file: &[usize]) -> anyhow::Result<()> {
    let write = |name: String, text: &str| -> anyhow::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))
    };
    let mut chunk = String::new();
    let mut first = None;
    let mut in_chunk = 0;
    for d in defs {
        if own_file.contains(&d.index) {
            write(d.own_file(), &d.yaml())?;
            continue;
        }
        first.get_or_insert(d.index);
        chunk.push_str(&d.yaml());
        in_chunk += 1;
        if in_chunk == SERVICES_PER_FILE {
            write(format!("services-{:07}.yaml", first.unwrap_or(0)), &chunk)?;
            (chunk, first, in_chunk) = (String::new(), None, 0);
        }
    }
    if let Some(first) = first {
        write(format!("services-{first:07}.yaml"), &chunk)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_and_in_range() {
        assert_eq!(vip(0), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(vip(255), Ipv4Addr::new(10, 96, 1, 0));
        assert_eq!(vip(99_999), Ipv4Addr::new(10, 97, 134, 160));
        assert_eq!(fake_endpoint(0, 0, 10), Ipv4Addr::new(10, 128, 0, 1));
        assert_eq!(fake_endpoint(1, 2, 10), Ipv4Addr::new(10, 128, 0, 13));
    }

    #[test]
    fn catalog_goes_through_the_agents_own_config_parser() {
        let real = BTreeMap::from([(1, vec![Ipv4Addr::new(10, 0, 1, 1)])]);
        let defs = catalog(3, 2, &real);
        assert_eq!(defs.len(), 3);
        assert_eq!(defs[1].endpoints, vec![Ipv4Addr::new(10, 0, 1, 1)]);
        assert_eq!(defs[2].endpoints.len(), 2);
        let dir = std::env::temp_dir().join(format!("weir-bench-scenario-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_config_dir(&dir, &defs[..2], &[1]).unwrap();
        let mut config = ConfigDir::new(&dir);
        assert_eq!(load_snapshot(&mut config).unwrap().services.len(), 2);
        write_config_dir(&dir, &defs[2..], &[]).unwrap();
        let snap = load_snapshot(&mut config).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((snap.services.len(), snap.slices.len()), (3, 3));
        let slice = &snap.slices[&defs[1].slice_id()];
        assert_eq!(slice.endpoints.len(), 1);
        assert_eq!(slice.endpoints[0].ip, Ipv4Addr::new(10, 0, 1, 1));
        let id = NsName {
            namespace: NAMESPACE.to_owned(),
            name: "svc-0".to_owned(),
        };
        assert_eq!(snap.services[&id].cluster_ips, vec![vip(0)]);
    }

    #[test]
    fn spread_indices_sit_in_the_middles() {
        assert_eq!(spread_indices(1, 4), vec![0]);
        assert_eq!(spread_indices(1000, 4), vec![125, 375, 625, 875]);
        assert_eq!(spread_indices(3, 4), vec![0, 1, 2]);
    }

    #[test]
    fn yaml_round_trips_through_the_agent_model() {
        let d = ServiceDef::new(7, vec![Ipv4Addr::new(10, 0, 1, 1)]);
        let y = d.yaml();
        assert!(y.contains("clusterIP: \"10.96.0.8\""), "{y}");
        assert!(y.contains("kubernetes.io/service-name: \"svc-7\""), "{y}");
    }
}
