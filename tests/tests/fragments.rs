//! IPv4 fragments addressed to a ClusterIP cannot be balanced (only the first carries ports): they are
//! dropped and counted, while whole datagrams keep working.

use std::{net::SocketAddr, time::Duration};

use weir_tests::{
    Lab,
    client::http_get,
    scenario::{self, UDP_PORT, cluster_addr},
};

#[test]
fn udp_fragments_to_a_cluster_ip_are_counted_as_drops() {
    let lab = Lab::new().expect("lab");
    let (_backends, client, _agent) = scenario::start_standard(&lab).expect("scene");
    client
        .udp_request(cluster_addr(UDP_PORT.0), Duration::from_secs(2))
        .expect("a whole datagram is served");

    // 4,000 bytes over a 1,500-byte MTU: the client's kernel sends three fragments.
    let sent = client
        .run(|| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.connect(cluster_addr(UDP_PORT.0))?;
            s.send(&[0u8; 4000])
        })
        .expect("enter client netns")
        .expect("send a fragmented datagram");
    assert_eq!(sent, 4000);

    let addr: SocketAddr = "127.0.0.1:10249".parse().expect("addr");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let metrics = lab
            .in_node(|| http_get(addr, "/metrics", Duration::from_secs(2)))
            .expect("node netns")
            .expect("metrics");
        let drops = metrics
            .body
            .lines()
            .find(|l| l.starts_with("weir_datapath_packets_total{reason=\"drop_fragment\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if drops >= 3.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fragments not counted: {drops}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
