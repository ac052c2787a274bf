//! Follows the node's interfaces over rtnetlink: reports pod interfaces (by name prefix) as they appear
//! and disappear, and lists the node's addresses.
use std::net::IpAddr;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::AddressAttribute,
    link::{LinkAttribute, LinkMessage},
};
use rtnetlink::{
    constants::RTMGRP_LINK,
    packet_core::NetlinkPayload,
    sys::{AsyncSocket, SocketAddr},
};
use tokio::sync::mpsc;
use tracing::warn;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    Present {
        index: u32,
        name: String,
    },
    Gone {
        index: u32,
    },
    /// Every interface present at start has been reported.
    InitialDumpDone,
}

#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error("opening an rtnetlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("subscribing to link notifications: {0}")]
    Subscribe(#[source] std::io::Error),
    #[error("dumping {what}: {source}")]
    Dump {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
}

fn link_name(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// Sends a `Present` for every existing interface with `prefix`, then one per change until `tx` closes.
/// Subscribes before dumping so no interface created in between is missed (duplicates are harmless).
pub async fn watch_pod_links(
    prefix: String,
    tx: mpsc::Sender<LinkEvent>,
) -> Result<(), LinksError> {
    let (mut conn, handle, mut messages) =
        rtnetlink::new_connection().map_err(LinksError::Socket)?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, RTMGRP_LINK))
        .map_err(LinksError::Subscribe)?;
    tokio::spawn(conn);

    let mut dump = handle.link().get().execute();
    while let Some(msg) = dump.try_next().await.map_err(|source| LinksError::Dump {
        what: "links",
        source,
    })? {
        if let Some(name) = link_name(&msg).filter(|n| n.starts_with(&prefix)) {
            let ev = LinkEvent::Present {
                index: msg.header.index,
                name: name.to_owned(),
            };
            if tx.send(ev).await.is_err() {
                return Ok(());
            }
        }
    }

    if tx.send(LinkEvent::InitialDumpDone).await.is_err() {
        return Ok(());
    }

    while let Some((msg, _)) = messages.next().await {
        let ev = match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                match link_name(&link).filter(|n| n.starts_with(&prefix)) {
                    Some(name) => LinkEvent::Present {
                        index: link.header.index,
                        name: name.to_owned(),
                    },
                    None => continue,
                }
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => LinkEvent::Gone {
                index: link.header.index,
            },
            _ => continue,
        };
        if tx.send(ev).await.is_err() {
            return Ok(());
        }
    }
    warn!("rtnetlink notification stream ended");
    Ok(())
}

/// The node's global addresses (not loopback, not link-local), the default for `--node-ip`.
pub async fn node_addresses() -> Result<Vec<IpAddr>, LinksError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(LinksError::Socket)?;
    let task = tokio::spawn(conn);
    let mut out = Vec::new();
    let mut dump = handle.address().get().execute();
    let result = loop {
        match dump.try_next().await {
            Ok(Some(msg)) => {
                for attr in &msg.attributes {
                    if let AddressAttribute::Address(ip) = attr {
                        let usable = match ip {
                            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
                            IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
                        };
                        if usable && !out.contains(ip) {
                            out.push(*ip);
                        }
                    }
                }
            }
            Ok(None) => break Ok(out),
            Err(source) => {
                break Err(LinksError::Dump {
                    what: "addresses",
                    source,
                });
            }
        }
    };
    task.abort();
    result
}
