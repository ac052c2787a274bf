//! Hand-made IPv4 packets with any source address (spoofing, for the security tests), and the IPv4
//! receive counter of a namespace, to prove a host saw nothing.
//!
//! Call these inside the namespace concerned ([`crate::Pod::run`]): a raw socket and `/proc/thread-self`
//! both belong to the calling thread's network namespace.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

use crate::packet::frame::{Ip4, PROTO_TCP, PROTO_UDP, TCP_SYN, Tcp, udp_segment};

/// An IPv4 TCP SYN from `src` to `dst` (header and checksums complete).
pub fn tcp_syn(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let tcp = Tcp::new(src.port(), dst.port(), TCP_SYN);
    Ip4::new(*src.ip(), *dst.ip(), PROTO_TCP).packet(&tcp.segment(*src.ip(), *dst.ip()))
}

/// An IPv4 UDP datagram from `src` to `dst` carrying `payload`.
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    Ip4::new(*src.ip(), *dst.ip(), PROTO_UDP).packet(&udp_segment(src, dst, payload))
}

/// Sends each IPv4 packet (header included, source as written) through a raw socket of the calling
/// thread's namespace: routed like any packet from it, whatever its source address. Needs root.
pub fn send_ipv4(packets: &[Vec<u8>]) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    for packet in packets {
        let dst = packet
            .get(16..20)
            .map(|d| Ipv4Addr::new(d[0], d[1], d[2], d[3]))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IPv4 packet"))?;
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: the buffer and the address are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `Ip: InReceives` of the calling thread's namespace: every IPv4 packet its stack received.
pub fn ipv4_in_receives() -> io::Result<u64> {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
    let mut ip_lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (Some(names), Some(values)) = (ip_lines.next(), ip_lines.next()) else {
        return Err(io::Error::other(
            "no Ip: lines in /proc/thread-self/net/snmp",
        ));
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "InReceives")
        .and_then(|(_, value)| value.parse().ok())
        .ok_or_else(|| io::Error::other("no Ip: InReceives in /proc/thread-self/net/snmp"))
}
