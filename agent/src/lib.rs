//! The Weir node agent as a library: the `weir-agent` binary runs [`agent::run`]; the `weir` CLI and the
//! tests use the map types, the model and the state endpoint's types from here.
pub mod agent;
pub mod arena;
pub mod bpffs;
pub mod cli;
pub mod conntrack_gc;
pub mod datapath;
pub mod health_check;
pub mod http;
pub mod kube_source;
pub mod l7;
pub mod l7_steering;
pub mod links;
pub mod maglev;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod standalone;
pub mod state;
