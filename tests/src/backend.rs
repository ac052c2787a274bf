//! Test backends: TCP, UDP and HTTP servers running as threads on sockets bound inside a pod's namespace.
//! Every reply names the pod and the peer address the backend saw, so a test can tell which backend it
//! reached and whether the client's address survived the trip.

use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6, sockopt};

/// How often blocked backend threads wake up to check whether their lab is being torn down.
const TICK: Duration = Duration::from_millis(100);

/// The kind of server a pod runs on a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Greets with `"<pod> <peer>\n"`, then echoes each line as `"<pod> <line>\n"` until EOF.
    Tcp,
    /// Answers each datagram with `"<pod> <peer>\n"`.
    Udp,
    /// HTTP/1.1 `200` whose body is `"<pod> <peer>\n"`, then closes.
    Http,
}

/// The line every backend reply starts with. An IPv4 peer reached through a dual-stack IPv6 socket is
/// named as plain IPv4 (`10.0.0.20:4242`, not `[::ffff:10.0.0.20]:4242`), so tests compare addresses
/// whatever socket the backend happened to use.
pub fn greeting(pod: &str, peer: SocketAddr) -> String {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    format!("{pod} {peer}\n")
}

/// Splits a reply line `"<pod> <rest>"` into the pod name and the rest.
pub fn parse_reply(line: &str) -> Option<(&str, &str)> {
    line.trim_end().split_once(' ')
}

/// Serves TCP on an already bound listener until `stop` is set.
pub fn spawn_tcp(
    listener: TcpListener,
    pod: String,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    spawn_acceptor(vec![listener], pod, stop, Protocol::Tcp)
}

/// Serves `protocol` ([`Protocol::Tcp`] or [`Protocol::Http`]) on several already bound listeners (one per
/// address family, say) from one thread, until `stop` is set.
pub fn spawn_tcp_listeners(
    listeners: Vec<TcpListener>,
    pod: String,
    stop: Arc<AtomicBool>,
    protocol: Protocol,
) -> io::Result<JoinHandle<()>> {
    if protocol == Protocol::Udp || listeners.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{protocol:?} on {} TCP listeners", listeners.len()),
        ));
    }
    spawn_acceptor(listeners, pod, stop, protocol)
}

/// Serves minimal HTTP on an already bound listener until `stop` is set.
pub fn spawn_http(
    listener: TcpListener,
    pod: String,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    spawn_acceptor(vec![listener], pod, stop, Protocol::Http)
}

/// Answers datagrams on an already bound socket until `stop` is set.
pub fn spawn_udp(
    socket: UdpSocket,
    pod: String,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    spawn_udp_sockets(vec![socket], pod, stop)
}

/// Answers datagrams on several already bound sockets (one per address family, say) from one thread,
/// until `stop` is set.
pub fn spawn_udp_sockets(
    sockets: Vec<UdpSocket>,
    pod: String,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    let Some(first) = sockets.first() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "UDP backend without a socket",
        ));
    };
    let port = first.local_addr()?.port();
    for socket in &sockets {
        // Poll says which socket is readable; non-blocking keeps a spurious wakeup from wedging the loop.
        socket.set_nonblocking(true)?;
    }
    std::thread::Builder::new()
        .name(format!("udp-{pod}-{port}"))
        .spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                match wait_readable(&sockets) {
                    Ok(ready) => {
                        for socket in ready.into_iter().map(|i| &sockets[i]) {
                            match socket.recv_from(&mut buf) {
                                Ok((_, peer)) => {
                                    // A failed reply (e.g. the client's socket is gone) is the client's
                                    // problem.
                                    let _ = socket.send_to(greeting(&pod, peer).as_bytes(), peer);
                                }
                                Err(e) if is_timeout(&e) => {}
                                Err(e) => {
                                    eprintln!("weir-tests: udp backend {pod}:{port}: {e}");
                                    return;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        eprintln!("weir-tests: udp backend {pod}:{port}: poll: {e}");
                        return;
                    }
                }
            }
        })
}

/// Waits up to one [`TICK`] for any of `fds` to become readable; returns the indices of those that are.
fn wait_readable<F: AsFd>(fds: &[F]) -> nix::Result<Vec<usize>> {
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
        .collect();
    // Millisecond timeouts fit in u16 by construction of TICK.
    let tick = PollTimeout::from(TICK.as_millis() as u16);
    match poll(&mut polled, tick) {
        Ok(0) | Err(nix::errno::Errno::EINTR) => Ok(Vec::new()),
        Ok(_) => Ok(polled
            .iter()
            .enumerate()
            .filter(|(_, p)| p.revents().is_some_and(|r| !r.is_empty()))
            .map(|(i, _)| i)
            .collect()),
        Err(e) => Err(e),
    }
}

fn spawn_acceptor(
    listeners: Vec<TcpListener>,
    pod: String,
    stop: Arc<AtomicBool>,
    protocol: Protocol,
) -> io::Result<JoinHandle<()>> {
    let Some(first) = listeners.first() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "TCP backend without a listener",
        ));
    };
    let port = first.local_addr()?.port();
    for listener in &listeners {
        // Non-blocking so a connection that vanishes between poll and accept cannot wedge the loop.
        listener.set_nonblocking(true)?;
    }
    std::thread::Builder::new()
        .name(format!("{protocol:?}-{pod}-{port}").to_lowercase())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let ready = match wait_readable(&listeners) {
                    Ok(ready) => ready,
                    Err(e) => {
                        eprintln!("weir-tests: {protocol:?} backend {pod}:{port}: poll: {e}");
                        break;
                    }
                };
                for listener in ready.into_iter().map(|i| &listeners[i]) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            let (conn_pod, conn_stop) = (pod.clone(), stop.clone());
                            let spawned = std::thread::Builder::new()
                                .name(format!("conn-{pod}-{port}"))
                                .spawn(move || {
                                    let (pod, stop) = (&conn_pod, &conn_stop);
                                    let result = match protocol {
                                        Protocol::Http => handle_http(stream, pod, peer, stop),
                                        _ => handle_tcp(stream, pod, peer, stop),
                                    };
                                    // Resets and timeouts are normal when clients give up: not worth
                                    // noise.
                                    drop(result);
                                });
                            if let Err(e) = spawned {
                                eprintln!(
                                    "weir-tests: backend {pod}:{port}: cannot spawn handler: {e}"
                                );
                            }
                        }
                        Err(e) if is_timeout(&e) => {}
                        Err(e) => eprintln!("weir-tests: backend {pod}:{port}: accept: {e}"),
                    }
                }
            }
        })
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Greets, then echoes complete lines prefixed with the pod name until EOF or teardown.
fn handle_tcp(
    mut stream: TcpStream,
    pod: &str,
    peer: SocketAddr,
    stop: &AtomicBool,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(TICK))?;
    stream.write_all(greeting(pod, peer).as_bytes())?;
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let mut reply = format!("{pod} ").into_bytes();
                    reply.extend_from_slice(&line);
                    stream.write_all(&reply)?;
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads a request head (up to the blank line) and answers `200` with the greeting as body.
fn handle_http(
    mut stream: TcpStream,
    pod: &str,
    peer: SocketAddr,
    stop: &AtomicBool,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(TICK))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline || head.len() > 64 * 1024 {
            return Ok(());
        }
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    let body = greeting(pod, peer);
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

/// A TCP listener on `[::]:port` that takes IPv6 only (`IPV6_V6ONLY`), so it sits beside an IPv4
/// listener on `0.0.0.0:port` instead of clashing with it: the IPv4 side of a backend stays exactly the
/// socket it always was.
pub fn listen_tcp_v6only(port: u16) -> io::Result<TcpListener> {
    let fd = v6only_socket(SockType::Stream, port)?;
    socket::listen(&fd, Backlog::new(128).map_err(io::Error::from)?).map_err(io::Error::from)?;
    Ok(TcpListener::from(fd))
}

/// A UDP socket on `[::]:port` that takes IPv6 only; see [`listen_tcp_v6only`].
pub fn bind_udp_v6only(port: u16) -> io::Result<UdpSocket> {
    Ok(UdpSocket::from(v6only_socket(SockType::Datagram, port)?))
}

fn v6only_socket(ty: SockType, port: u16) -> io::Result<OwnedFd> {
    let fd = socket::socket(AddressFamily::Inet6, ty, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    // As std's own listeners do, so a restarted backend can rebind a port in TIME_WAIT.
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    socket::bind(fd.as_raw_fd(), &addr)?;
    Ok(fd)
}
