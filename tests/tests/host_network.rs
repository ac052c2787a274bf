//! Host-network clients: processes in the node's own network namespace reach ClusterIPs through the
//! socket-level hooks (connect/sendmsg translate, recvmsg/getpeername translate back), with no packet
//! ever crossing a pod interface on the way out.

use std::{net::UdpSocket, time::Duration};

use weir_tests::{
    Lab,
    client::{tcp_connect, tcp_request},
    scenario::{self, TCP_PORT, Tally, UDP_PORT, cluster_addr, parse_greeting},
};

const T: Duration = Duration::from_secs(2);

#[test]
fn host_network_clients_reach_cluster_ips_through_socket_hooks() {
    let lab = Lab::new().expect("lab");
    let (backends, _client, _agent) = scenario::start_standard(&lab).expect("scene");

    // TCP: balanced over every backend; the socket's peer is the ClusterIP it dialled.
    let tally = lab
        .in_node(|| {
            let mut t = Tally::default();
            for i in 0..60 {
                let line = tcp_request(cluster_addr(TCP_PORT.0), T)
                    .unwrap_or_else(|e| panic!("host connection {i}: {e}"));
                t.add(&parse_greeting(&line).expect("greeting").0);
            }
            let conn = tcp_connect(cluster_addr(TCP_PORT.0), T).expect("connect");
            assert_eq!(
                conn.stream().peer_addr().expect("getpeername"),
                cluster_addr(TCP_PORT.0),
                "getpeername shows the ClusterIP"
            );
            t
        })
        .expect("enter node netns");
    for b in &backends {
        assert!(
            tally.get(b.name()) > 0,
            "{} never chosen: {tally}",
            b.name()
        );
    }

    // UDP, unconnected: the reply appears to come from the ClusterIP.
    lab.in_node(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(T)).expect("timeout");
        for _ in 0..10 {
            s.send_to(b"ping", cluster_addr(UDP_PORT.0))
                .expect("sendto");
            let mut buf = [0u8; 256];
            let (n, from) = s.recv_from(&mut buf).expect("reply");
            assert_eq!(
                from,
                cluster_addr(UDP_PORT.0),
                "recvfrom shows the ClusterIP"
            );
            parse_greeting(&String::from_utf8_lossy(&buf[..n])).expect("backend reply");
        }
    })
    .expect("enter node netns");
}
