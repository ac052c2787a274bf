//! The L7 proxy for Gateway API HTTPRoutes attached to Services (GAMMA): connections that the eBPF
//! datapath steers to the agent are served by a hyper server that decides per request where it goes.
//!
//! The pieces, in the order a request meets them:
//! - [`proxy::FrontendResolver`] names the Service frontend (ClusterIP:port) the client dialled, from
//!   the accepted socket's addresses (by default its local address, which the steering preserves);
//! - [`directory::ServiceDirectory`] maps that frontend to its Service and port, and every Service port
//!   to its ready endpoints;
//! - [`table::RouteTable`] holds the validated routes ([`route`]) of every parent Service in the
//!   Gateway API's precedence order and picks the matching rule and then a backend by weight;
//! - [`proxy::L7Proxy`] applies the rule's filters ([`filters`]), forwards through pooled connections
//!   with streaming bodies ([`body`]) and records [`metrics`].
//!
//! How the agent runs it:
//! ```no_run
//! # use std::collections::BTreeMap;
//! # use gateway_api::apis::standard::httproutes::HttpRoute;
//! # use weir_agent::model::{Desired, NsName, ServiceSpec};
//! # async fn run(
//! #     registry: &mut prometheus_client::registry::Registry,
//! #     routes: Vec<HttpRoute>,
//! #     services: BTreeMap<NsName, std::sync::Arc<ServiceSpec>>,
//! #     desired: Desired,
//! # ) -> std::io::Result<()> {
//! use weir_agent::l7::{L7Proxy, LocalAddr, ProxyConfig, RouteTable, ServiceDirectory};
//! let proxy = L7Proxy::new(ProxyConfig::default());
//! proxy.metrics().register(registry);
//! // At every snapshot: the routes (their problems are for the log and, later, route status) and
//! // the Services with their endpoints, as the datapath would pick them.
//! let (table, problems) = RouteTable::from_k8s(&routes);
//! for p in &problems {
//!     tracing::warn!("{p}");
//! }
//! let directory = ServiceDirectory::from_model(&services, &desired);
//! // The frontends whose connections the datapath should steer here.
//! let _steer = table.steered_frontends(&directory);
//! proxy.set_routes(table);
//! proxy.set_directory(directory);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:15001").await?;
//! proxy.serve(listener, LocalAddr, std::future::pending()).await;
//! # Ok(())
//! # }
//! ```
pub mod balance;
pub mod body;
pub mod directory;
pub mod fault;
pub mod filters;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod status;
pub mod status_writer;
pub mod table;

pub use directory::{ServiceDirectory, ServiceFrontend};
pub use metrics::L7Metrics;
pub use proxy::{FrontendResolver, L7Proxy, LocalAddr, ProxyConfig};
pub use route::{Route, RouteError, ServicePort};
pub use table::RouteTable;
