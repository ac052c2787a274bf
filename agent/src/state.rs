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
