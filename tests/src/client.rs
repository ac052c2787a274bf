//! Clients that run in whatever network namespace the calling thread is in (use [`crate::Pod`]'s methods
//! or [`crate::in_netns`] to pick one), and the error classification tests assert on.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

/// How a client operation failed, as far as the datapath's behaviour is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// An active refusal: a TCP RST to the SYN, or an ICMP port unreachable (seen as `ECONNREFUSED` on a
    /// connected socket, TCP or UDP).
    Refused,
    /// Nothing came back within the timeout.
    TimedOut,
    /// An ICMP host/network unreachable (`EHOSTUNREACH`/`ENETUNREACH`).
    Unreachable,
    /// The peer closed (or reset) the connection before sending what was expected.
    Closed,
    /// Anything else (including failing to enter the namespace).
    Other,
}

/// A failed client operation: what failed, against which address, how long it took, and the OS error.
#[derive(Debug)]
pub struct ClientError {
    pub failure: Failure,
    pub op: &'static str,
    pub addr: SocketAddr,
    pub elapsed: Duration,
    pub source: io::Error,
}

impl ClientError {
    pub(crate) fn new(
        op: &'static str,
        addr: SocketAddr,
        started: Instant,
        source: io::Error,
    ) -> Self {
        Self {
            failure: classify(&source),
            op,
            addr,
            elapsed: started.elapsed(),
            source,
        }
    }

    /// Shorthand for `self.failure`.
    pub fn failure(&self) -> Failure {
        self.failure
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} failed after {:?}: {:?} ({})",
            self.op, self.addr, self.elapsed, self.failure, self.source
        )
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Maps an OS error to the [`Failure`] tests care about. A read timeout shows up as `EAGAIN`
/// (`WouldBlock`) on Linux, a connect timeout as `TimedOut`: both are "nothing came back".
pub fn classify(e: &io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Failure::Refused,
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failure::TimedOut,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => Failure::Unreachable,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::BrokenPipe => Failure::Closed,
        _ => Failure::Other,
    }
}

/// An open TCP connection to a test backend. Line-oriented: the backend greets with one line and then
/// echoes every line it receives, prefixed by its pod name.
#[derive(Debug)]
pub struct TcpConn {
    reader: BufReader<TcpStream>,
    addr: SocketAddr,
}

impl TcpConn {
    /// The address connected to (for a ClusterIP, the ClusterIP: the socket is connected to it).
    pub fn peer_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The client's own address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.reader.get_ref().local_addr()
    }

    /// The underlying stream, e.g. to shut it down or change timeouts.
    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    /// Reads one line (without its newline). EOF before a full line is a [`Failure::Closed`] error.
    pub fn read_line(&mut self) -> Result<String, ClientError> {
        let started = Instant::now();
        let mut buf = Vec::new();
        match self.reader.read_until(b'\n', &mut buf) {
            Ok(_) if buf.ends_with(b"\n") => {
                buf.pop();
                Ok(String::from_utf8_lossy(&buf).into_owned())
            }
            Ok(_) => Err(ClientError::new(
                "tcp read",
                self.addr,
                started,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {:?}", String::from_utf8_lossy(&buf)),
                ),
            )),
            Err(e) => Err(ClientError::new("tcp read", self.addr, started, e)),
        }
    }

    /// Sends `line` plus a newline.
    pub fn send_line(&mut self, line: &str) -> Result<(), ClientError> {
        let started = Instant::now();
        let mut msg = Vec::with_capacity(line.len() + 1);
        msg.extend_from_slice(line.as_bytes());
        msg.push(b'\n');
        self.reader
            .get_mut()
            .write_all(&msg)
            .map_err(|e| ClientError::new("tcp write", self.addr, started, e))
    }

    /// Sends a line and returns the reply line (the backend's `"<pod> <line>"`).
    pub fn exchange(&mut self, line: &str) -> Result<String, ClientError> {
        self.send_line(line)?;
        self.read_line()
    }
}

/// Connects with `timeout` as connect, read and write timeout.
pub fn tcp_connect(addr: SocketAddr, timeout: Duration) -> Result<TcpConn, ClientError> {
    let started = Instant::now();
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| ClientError::new("tcp connect", addr, started, e))?;
    let setup = stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .and_then(|()| stream.set_nodelay(true));
    setup.map_err(|e| ClientError::new("tcp setup", addr, started, e))?;
    Ok(TcpConn {
        reader: BufReader::new(stream),
        addr,
    })
}

/// Connects, reads the backend's greeting line (`"<pod> <client_ip>:<client_port>"`, or
/// `"<pod> [<client_ip6>]:<client_port>"` over IPv6) and closes.
pub fn tcp_request(addr: SocketAddr, timeout: Duration) -> Result<String, ClientError> {
    tcp_connect(addr, timeout)?.read_line()
}

/// One UDP reply: its text (without newline) and the address it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpReply {
    pub line: String,
    pub from: SocketAddr,
}

/// Sends one datagram from a fresh, *connected* socket and waits for the reply. Being connected is what
/// makes an ICMP port unreachable surface as `ECONNREFUSED` ([`Failure::Refused`]); it also means the
/// kernel drops replies from any other source, so a reply from the wrong address shows up as a timeout.
/// Use [`udp_request_unconnected`] to see the source of a reply.
pub fn udp_request(addr: SocketAddr, timeout: Duration) -> Result<UdpReply, ClientError> {
    let started = Instant::now();
    let err = |e| ClientError::new("udp request", addr, started, e);
    let sock = UdpSocket::bind(any_port_like(addr)).map_err(err)?;
    sock.set_read_timeout(Some(timeout)).map_err(err)?;
    sock.connect(addr).map_err(err)?;
    sock.send(b"hello\n").map_err(err)?;
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).map_err(err)?;
    Ok(UdpReply {
        line: reply_line(&buf[..n]),
        from,
    })
}

/// Like [`udp_request`] but from an unconnected socket, which accepts a reply from any source and reports
/// it: the way to assert that replies come back from the ClusterIP rather than from a backend. ICMP errors
/// are not reported on unconnected sockets, so a refusal looks like a timeout here.
pub fn udp_request_unconnected(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<UdpReply, ClientError> {
    let started = Instant::now();
    let err = |e| ClientError::new("udp request (unconnected)", addr, started, e);
    let sock = UdpSocket::bind(any_port_like(addr)).map_err(err)?;
    sock.set_read_timeout(Some(timeout)).map_err(err)?;
    sock.send_to(b"hello\n", addr).map_err(err)?;
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).map_err(err)?;
    Ok(UdpReply {
        line: reply_line(&buf[..n]),
        from,
    })
}

/// The wildcard address with an ephemeral port in `addr`'s family: a client socket for IPv6 targets is an
/// IPv6 socket, so its replies and ICMPv6 errors reach it as such.
pub fn any_port_like(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

fn reply_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end_matches('\n')
        .to_owned()
}

/// A parsed HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// A minimal HTTP/1.1 `GET` with `Connection: close`, reading until the server closes.
pub fn http_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse, ClientError> {
    let conn = tcp_connect(addr, timeout)?;
    let started = Instant::now();
    let err = |e| ClientError::new("http get", addr, started, e);
    let mut stream = conn.reader.into_inner();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(err)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(err)?;
    let text = String::from_utf8_lossy(&raw);
    let bad = |what: &str| {
        err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} in response {text:?}"),
        ))
    };
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of head"))?;
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    Ok(HttpResponse {
        status,
        body: body.to_owned(),
    })
}
