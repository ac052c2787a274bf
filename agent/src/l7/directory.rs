//! The Services the proxy knows: which Service port each frontend (ClusterIP:port) belongs to, and the
//! ready endpoints of every Service port. The agent fills it from its snapshot; the proxy reads it per
//! request.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
};

use super::route::ServicePort;
use crate::model::{Desired, Frontend, NsName, Protocol, ServiceSpec};

/// What a frontend address belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFrontend {
    pub service: ServicePort,
    /// The Service port's name, which a parentRef's `sectionName` selects.
    pub port_name: String,
}

#[derive(Clone, Debug, Default)]
pub struct ServiceDirectory {
    frontends: HashMap<SocketAddr, ServiceFrontend>,
    endpoints: HashMap<ServicePort, Arc<[SocketAddr]>>,
}

impl ServiceDirectory {
    /// Declares that `frontend` is `service`'s port `port` (named `port_name`, empty when unnamed).
    pub fn insert_frontend(
        &mut self,
        frontend: SocketAddr,
        service: NsName,
        port: u16,
        port_name: impl Into<String>,
    ) {
        self.frontends.insert(
            frontend,
            ServiceFrontend {
                service: ServicePort { service, port },
                port_name: port_name.into(),
            },
        );
    }

    /// Sets the ready endpoints of a Service port (replacing what it had).
    pub fn set_endpoints(
        &mut self,
        service: NsName,
        port: u16,
        endpoints: impl IntoIterator<Item = SocketAddr>,
    ) {
        let mut list: Vec<SocketAddr> = endpoints.into_iter().collect();
        list.sort();
        list.dedup();
        self.endpoints
            .insert(ServicePort { service, port }, list.into());
    }

    pub fn frontend(&self, addr: &SocketAddr) -> Option<&ServiceFrontend> {
        self.frontends.get(addr)
    }

    pub fn frontends(&self) -> impl Iterator<Item = (&SocketAddr, &ServiceFrontend)> {
        self.frontends.iter()
    }

    /// The ready endpoints of a Service port; empty when it has none or is unknown.
    pub fn endpoints(&self, service: &ServicePort) -> &[SocketAddr] {
        self.endpoints.get(service).map(|e| &e[..]).unwrap_or(&[])
    }

    /// Every endpoint address the directory holds, so connection pools can let go of the others.
    pub fn all_endpoints(&self) -> impl Iterator<Item = &SocketAddr> {
        self.endpoints.values().flat_map(|e| e.iter())
    }

    /// The directory for the agent's state: every ClusterIP × TCP port of every Service is a frontend,
    /// and a Service port's endpoints are the backends the datapath would use for its ClusterIP (so
    /// readiness, traffic policy and topology are chosen exactly as for L4 traffic).
    pub fn from_model(
        services: &BTreeMap<NsName, std::sync::Arc<ServiceSpec>>,
        desired: &Desired,
    ) -> Self {
        let mut dir = Self::default();
        for svc in services.values() {
            for port in svc.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
                let mut endpoints = Vec::new();
                for ip in &svc.cluster_ips {
                    dir.insert_frontend(
                        SocketAddr::new(*ip, port.port),
                        svc.id.clone(),
                        port.port,
                        port.name.clone(),
                    );
                    let frontend = Frontend {
                        ip: *ip,
                        port: port.port,
                        protocol: Protocol::Tcp,
                    };
                    if let Some(state) = desired.frontends.get(&frontend) {
                        endpoints
                            .extend(state.backends.iter().map(|b| SocketAddr::new(b.ip, b.port)));
                    }
                }
                dir.set_endpoints(svc.id.clone(), port.port, endpoints);
            }
        }
        dir
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::model::{BackendAddr, FrontendState, ServicePort as SpecPort};

    fn ns(name: &str) -> NsName {
        NsName {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[test]
    fn from_model_maps_cluster_ips_and_endpoints() {
        let spec = ServiceSpec {
            id: ns("web"),
            cluster_ips: vec!["10.96.0.10".parse().expect("ip")],
            ports: vec![
                SpecPort {
                    name: "http".into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    node_port: None,
                },
                SpecPort {
                    name: "dns".into(),
                    port: 53,
                    protocol: Protocol::Udp,
                    node_port: None,
                },
            ],
            external_ips: vec![],
            lb_ips: vec![],
            source_ranges: vec![],
            internal_local: false,
            external_local: false,
            prefer_close: false,
            proxy_name: None,
            affinity_timeout: None,
            health_check_node_port: None,
        };
        let mut desired = Desired::default();
        desired.frontends.insert(
            Frontend {
                ip: "10.96.0.10".parse().expect("ip"),
                port: 80,
                protocol: Protocol::Tcp,
            },
            std::sync::Arc::new(FrontendState {
                service: ns("web"),
                port_name: "http".into(),
                backends: BTreeSet::from([
                    BackendAddr {
                        ip: "10.0.0.2".parse().expect("ip"),
                        port: 8080,
                        protocol: Protocol::Tcp,
                    },
                    BackendAddr {
                        ip: "10.0.0.1".parse().expect("ip"),
                        port: 8080,
                        protocol: Protocol::Tcp,
                    },
                ]),
                drop_when_empty: false,
                affinity_timeout_s: 0,
                source_ranges: vec![],
                l7: false,
            }),
        );
        let services = BTreeMap::from([(ns("web"), std::sync::Arc::new(spec))]);
        let dir = ServiceDirectory::from_model(&services, &desired);
        let f = dir
            .frontend(&"10.96.0.10:80".parse().expect("addr"))
            .expect("frontend");
        assert_eq!(f.service.service, ns("web"));
        assert_eq!(f.service.port, 80);
        assert_eq!(f.port_name, "http");
        // UDP ports are not HTTP frontends.
        assert!(
            dir.frontend(&"10.96.0.10:53".parse().expect("addr"))
                .is_none()
        );
        let eps: Vec<String> = dir
            .endpoints(&f.service)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(eps, ["10.0.0.1:8080", "10.0.0.2:8080"]);
    }
}
