//! The end-to-end load: a backend server (one poll loop per pod, no thread per connection, so the
//! server's own cost stays small next to the datapath's) answering each request line with the endpoint
//! address the client reached, and clients for connection rate, request latency and endpoint probes.

use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd as _, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use weir_tests::Pod;

/// The CPU every load thread (client and servers) runs on: one CPU, so a round measures the CPU work
/// of a connection or a request (both ends and the datapath between them, whose softirq work runs on
/// the sending CPU with veths) rather than how the scheduler happened to spread the threads. The last
/// CPU, to keep away from whatever favours CPU 0.
pub fn load_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from) - 1
}

/// Pins the calling thread to [`load_cpu`].
pub fn pin() {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it; sched_setaffinity
    // reads `size_of::<cpu_set_t>()` bytes of it. Failure leaves the thread unpinned, which only adds
    // noise.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(load_cpu(), &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Servers on a set of pods, stopped and joined on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// What the servers speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// A request is a line; the reply is one line, `<pod name> <local address>`.
    Line,
    /// A request is an HTTP/1.1 header block (GETs without bodies); the reply is a 200 whose body is
    /// the pod's name. Connections stay open.
    Http,
}

impl Framing {
    fn end_of_request(self, pending: &[u8]) -> Option<usize> {
        match self {
            Framing::Line => pending.iter().position(|&b| b == b'\n').map(|i| i + 1),
            Framing::Http => pending
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|i| i + 4),
        }
    }

    pub fn reply(self, name: &str, local: IpAddr) -> Vec<u8> {
        match self {
            Framing::Line => format!("{name} {local}\n").into_bytes(),
            Framing::Http => format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{name}\n",
                name.len() + 1
            )
            .into_bytes(),
        }
    }
}

impl Servers {
    /// Line servers listening on `0.0.0.0:port` in every pod (so on all its addresses).
    pub fn start(pods: &[Pod], port: u16) -> anyhow::Result<Self> {
        Self::start_with(pods, port, Framing::Line)
    }

    /// Servers of `framing` listening on `0.0.0.0:port` in every pod, one poll loop per pod pinned
    /// to the load CPU.
    pub fn start_with(pods: &[Pod], port: u16, framing: Framing) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for pod in pods {
            let listener = pod
                .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
                .and_then(|r| r)
                .with_context(|| format!("listen on {}:{port}", pod.name()))?;
            listener.set_nonblocking(true)?;
            let (name, stop) = (pod.name().to_owned(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("bench-{name}"))
                    .spawn(move || serve(&listener, &name, &stop, framing))?,
            );
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Conn {
    stream: TcpStream,
    pending: Vec<u8>,
    reply: Vec<u8>,
}

fn serve(listener: &TcpListener, name: &str, stop: &AtomicBool, framing: Framing) {
    pin();
    let mut conns: Vec<Conn> = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let ready: Vec<bool> = {
            let mut fds = Vec::with_capacity(conns.len() + 1);
            fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
            fds.extend(
                conns
                    .iter()
                    .map(|c| PollFd::new(c.stream.as_fd(), PollFlags::POLLIN)),
            );
            match poll(&mut fds, PollTimeout::from(50u16)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("bench server {name}: poll: {e}");
                    return;
                }
            }
            fds.iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect()
        };
        let mut closed = Vec::new();
        for (i, c) in conns.iter_mut().enumerate() {
            if !ready[i + 1] {
                continue;
            }
            match c.stream.read(&mut buf) {
                Ok(0) => closed.push(i),
                Ok(n) => {
                    c.pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = framing.end_of_request(&c.pending) {
                        c.pending.drain(..end);
                        if c.stream.write_all(&c.reply).is_err() {
                            closed.push(i);
                            break;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => closed.push(i),
            }
        }
        closed.dedup();
        for i in closed.into_iter().rev() {
            conns.swap_remove(i);
        }
        if ready[0] {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let local = stream
                            .local_addr()
                            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
                        if stream.set_nonblocking(true).is_ok() {
                            let _ = stream.set_nodelay(true);
                            conns.push(Conn {
                                stream,
                                pending: Vec::new(),
                                reply: framing.reply(name, local),
                            });
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
        }
    }
}

/// Closes with a RST (SO_LINGER 0): no TIME_WAIT, so a client can open connections at full speed
/// without running out of ports.
pub fn set_linger_zero(stream: &impl AsRawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a valid socket fd with a correctly sized `linger` value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Sends one request line and reads the one-line reply; returns the endpoint address in it.
fn exchange(stream: &mut TcpStream) -> io::Result<Ipv4Addr> {
    stream.write_all(b"x\n")?;
    let mut buf = [0u8; 128];
    let mut len = 0;
    while !buf[..len].contains(&b'\n') {
        if len == buf.len() {
            return Err(io::Error::other("reply too long"));
        }
        match stream.read(&mut buf[len..])? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => len += n,
        }
    }
    let line = std::str::from_utf8(&buf[..len]).map_err(io::Error::other)?;
    line.split_whitespace()
        .nth(1)
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad reply {line:?}")))
}

/// Connect, one request, close (RST). Returns the endpoint that answered.
pub fn connect_once(target: SocketAddr, timeout: Duration) -> io::Result<Ipv4Addr> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let ep = exchange(&mut stream);
    set_linger_zero(&stream);
    ep
}

/// One connection-rate round.
#[derive(Clone, Debug, Default)]
pub struct ConnRound {
    pub ok: usize,
    pub failed: usize,
    pub elapsed: Duration,
    /// Microseconds per successful connection (connect + request + reply + close), sorted.
    pub each_us: Vec<f64>,
    pub first_error: Option<String>,
}

impl ConnRound {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// New connections (connect, one request, close) to `targets` in turn for `duration`, one at a time.
pub fn connection_rate(targets: &[SocketAddr], duration: Duration) -> ConnRound {
    pin();
    let mut round = ConnRound::default();
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < duration {
        let t = Instant::now();
        match connect_once(targets[i % targets.len()], Duration::from_secs(1)) {
            Ok(_) => {
                round.ok += 1;
                round.each_us.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Err(e) => {
                round.failed += 1;
                round.first_error.get_or_insert_with(|| e.to_string());
            }
        }
        i += 1;
    }
    round.elapsed = started.elapsed();
    round.each_us.sort_by(f64::total_cmp);
    round
}

/// Request round trips on persistent connections (one per target, used in turn); sorted microseconds.
pub fn request_latency(targets: &[SocketAddr], requests: usize) -> io::Result<Vec<f64>> {
    pin();
    let mut conns = Vec::new();
    for t in targets {
        let s = TcpStream::connect_timeout(t, Duration::from_secs(1))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        conns.push(s);
    }
    // One exchange each first: the connections' first request is not part of the steady state.
    for c in &mut conns {
        exchange(c)?;
    }
    let mut samples = Vec::with_capacity(requests);
    for r in 0..requests {
        let c = &mut conns[r % targets.len()];
        let t = Instant::now();
        exchange(c)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    for c in &conns {
        set_linger_zero(c);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}
