//! The agent's side of steering connections to the L7 proxy: a transparent listener (it accepts
//! connections addressed to ClusterIPs, which the datapath assigns to it) and the policy route that makes
//! the node deliver the marked packets locally, as TPROXY needs.
use std::net::{Ipv4Addr, SocketAddr};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    route::{RouteScope, RouteType},
    rule::RuleAction,
};
use rtnetlink::RouteMessageBuilder;
use tokio::net::{TcpListener, TcpSocket};
use weir_common::{L7_MARK, L7_ROUTE_TABLE};

#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("L7 proxy listener on port {port}: {source}")]
    Listener {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("policy routing for the L7 proxy: {0}")]
    Route(String),
}

/// A listener on every address of `port` with IP_TRANSPARENT, so the sockets it accepts can have a
/// ClusterIP (an address of no interface) as their local address.
pub fn transparent_listener(port: u16) -> Result<TcpListener, SteeringError> {
    let err = |source| SteeringError::Listener { port, source };
    let socket = TcpSocket::new_v4().map_err(err)?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpTransparent, &true)
        .map_err(|e| err(std::io::Error::from(e)))?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket
        .bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        .map_err(err)?;
    socket.listen(1024).map_err(err)
}

/// `ip rule add fwmark L7_MARK lookup L7_ROUTE_TABLE` and `ip route add local 0.0.0.0/0 dev lo table
/// L7_ROUTE_TABLE`, each only if missing (a restarted agent finds them in place).
pub async fn ensure_policy_routing() -> Result<(), SteeringError> {
    let fail = |what: &str, e: rtnetlink::Error| SteeringError::Route(format!("{what}: {e}"));
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| SteeringError::Route(e.to_string()))?;
    let task = tokio::spawn(conn);
    let result = async {
        let lo = handle
            .link()
            .get()
            .match_name("lo".to_owned())
            .execute()
            .try_next()
            .await
            .map_err(|e| fail("finding lo", e))?
            .ok_or_else(|| SteeringError::Route("no lo interface".to_owned()))?
            .header
            .index;
        let rule = handle
            .rule()
            .add()
            .v4()
            .fw_mark(L7_MARK)
            .table_id(L7_ROUTE_TABLE)
            .priority(L7_ROUTE_TABLE)
            .action(RuleAction::ToTable);
        ignore_exists(rule.execute().await).map_err(|e| fail("adding the fwmark rule", e))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .table_id(L7_ROUTE_TABLE)
            .output_interface(lo)
            .build();
        ignore_exists(handle.route().add(route).execute().await)
            .map_err(|e| fail("adding the local route", e))
    }
    .await;
    task.abort();
    result
}

fn ignore_exists(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e))
            if e.code.map(|c| -c.get()) == Some(nix::libc::EEXIST) =>
        {
            Ok(())
        }
        other => other,
    }
}
