//! What the agent has programmed, by name: served as JSON on `GET /state` (metrics address) for the
//! `weir` CLI, which joins it with what it reads from the pinned maps.
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    pub node_name: String,
    pub bpffs_dir: String,
    /// The first sync is programmed and the pod interfaces present at start are attached.
    pub synced: bool,
    pub frontends: Vec<FrontendInfo>,
    /// HTTPRoute status per Service parent (Accepted, ResolvedRefs), as Kubernetes mode writes it.
    #[serde(default)]
    pub routes: Vec<crate::l7::status::RouteStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendInfo {
    /// `namespace/name` of the Service.
    pub service: String,
    pub port_name: String,
    pub ip: String,
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// Ready backends as `ip:port`.
    pub backends: Vec<String>,
    /// First chunk of the frontend's table in the `WEIR_MAGLEV` arena; `None` when it has no backend
    /// (rejects).
    pub table_base: Option<u32>,
    pub table_size: u32,
}

/// What the last sync programmed, kept as the sync left it (shared frontend states, no copies) and
/// turned into [`FrontendInfo`]s only when `/state` is asked for: rendering 30,000 frontends' strings
/// at every sync cost more than the sync itself.
#[derive(Debug, Default)]
pub struct ProgrammedView {
    pub frontends: Vec<(
        crate::model::Frontend,
        std::sync::Arc<crate::model::FrontendState>,
        Option<weir_common::ServiceValue>,
    )>,
}

impl ProgrammedView {
    pub fn frontend_infos(&self) -> Vec<FrontendInfo> {
        self.frontends
            .iter()
            .map(|(f, state, value)| FrontendInfo {
                service: state.service.to_string(),
                port_name: state.port_name.clone(),
                ip: f.ip.to_string(),
                port: f.port,
                protocol: f.protocol.to_string(),
                backends: state
                    .backends
                    .iter()
                    .map(|b| format!("{}:{}", b.ip, b.port))
                    .collect(),
                table_base: value.filter(|v| v.table_size > 0).map(|v| v.table_base),
                table_size: value.map_or(0, |v| v.table_size),
            })
            .collect()
    }
}
