//! Weir's privileged test harness: network-namespace labs, in-namespace backends and clients, the agent guard.
//!
//! A [`Lab`] is one "node" network namespace plus any number of "pod" namespaces wired to it Calico-style
//! (a veth per pod, no bridge). Backends and clients run as threads inside those namespaces, and an
//! [`Agent`] runs the real `weir-agent` binary in the node namespace. Everything is torn down on `Drop`,
//! also when a test panics, and names are unique per process and lab so tests run in parallel.
//! A [`Cluster`] puts several labs (nodes) and outside hosts on one L2 fabric, for cross-node tests.
//!
//! Every lab needs root; the harness panics (never skips) without it.

pub mod agent;
pub mod apiserver;
pub mod backend;
pub mod bpffs;
pub mod client;
pub mod cluster;
pub mod http;
pub mod lab;
pub mod metrics;
pub mod netns;
pub mod packet;
pub mod raw;
pub mod raw_bpf;
pub mod scenario;
pub mod yaml;

pub use agent::{Agent, agent_binary};
pub use client::{ClientError, Failure, HttpResponse, TcpConn, UdpReply};
pub use cluster::Cluster;
pub use lab::{Lab, Pod};
pub use netns::{in_netns, is_root, require_root};
