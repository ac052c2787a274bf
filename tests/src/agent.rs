//! The agent guard: runs the real `weir-agent` binary in a lab's node namespace, captures its log, checks
//! its health endpoint, and stops it (SIGTERM, then SIGKILL) when asked or when dropped.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::client::{self, ClientError};
use crate::lab::Lab;

/// The agent's default `--health-addr`.
pub const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:10256";

/// How many log lines to show when a test fails.
const TAIL_LINES: usize = 80;

/// The agent binary: `$WEIR_AGENT_BIN` if set, else `<workspace>/target/release/weir-agent`, else
/// `<workspace>/target/debug/weir-agent` (`$CARGO_TARGET_DIR` replaces `<workspace>/target` when set).
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("WEIR_AGENT_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("WEIR_AGENT_BIN={} does not exist", bin.display());
        }
        return Ok(bin);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_relative() {
                workspace.join(t)
            } else {
                t
            }
        })
        .unwrap_or_else(|| workspace.join("target"));
    let candidates = [
        target.join("release/weir-agent"),
        target.join("debug/weir-agent"),
    ];
    if let Some(bin) = candidates.iter().find(|c| c.is_file()) {
        return Ok(bin.canonicalize().unwrap_or_else(|_| bin.clone()));
    }
    bail!(
        "no weir-agent binary: looked for {} and {}; build it first (`cargo build --release -p weir-agent`, \
         or `cargo xtask build`) or point WEIR_AGENT_BIN at one",
        candidates[0].display(),
        candidates[1].display()
    )
}

/// A running agent. Borrowing the lab guarantees the agent stops before its namespaces go away.
#[derive(Debug)]
pub struct Agent<'lab> {
    lab: &'lab Lab,
    child: Child,
    status: Option<ExitStatus>,
    log_path: PathBuf,
    health_addr: SocketAddr,
}

impl<'lab> Agent<'lab> {
    /// Runs `ip netns exec <node> <agent> --config-dir <dir> --pod-iface-prefix <prefix> --bpffs-dir <dir>
    /// [extra_args]`, stdout and stderr into a log file in the lab's dir. `ip netns exec` execs the agent,
    /// so the child's pid is the agent's.
    pub fn start(lab: &'lab Lab, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_wrapped(lab, &[], extra_args)
    }

    /// [`Agent::start`] with `wrapper` (a program and its arguments, e.g. `setpriv ... --`) between
    /// `ip netns exec <node>` and the agent, to run it with fewer privileges. The wrapper must exec the
    /// agent, so the child's pid stays the agent's.
    pub fn start_wrapped(
        lab: &'lab Lab,
        wrapper: &[&str],
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let bin = agent_binary()?;
        let bpffs = lab.bpffs_dir()?;
        let log_path = lab.next_agent_log();
        let log =
            File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
        let log2 = log.try_clone().context("dup agent log fd")?;
        let health_addr = flag_value(extra_args, "--health-addr")
            .unwrap_or(DEFAULT_HEALTH_ADDR)
            .parse()
            .context("--health-addr is not an IP:port")?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", lab.node_netns()])
            .args(wrapper)
            .arg(&bin);
        // Standalone from the lab's config dir unless the test picks Kubernetes mode.
        if flag_value(extra_args, "--kubeconfig").is_none() {
            cmd.arg("--config-dir").arg(lab.config_dir());
        }
        cmd.args(["--pod-iface-prefix", lab.pod_iface_prefix()])
            .arg("--bpffs-dir")
            .arg(&bpffs)
            .args(extra_args)
            // The log is a file: colour escapes would only make it harder to read and grep.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. If the test process is
        // killed outright (so no Drop runs), the kernel sends the agent SIGTERM instead of leaving it
        // running in a namespace nobody will delete.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        eprintln!(
            "weir-tests: started {} (pid {}) in netns {}, log {}",
            bin.display(),
            child.id(),
            lab.node_netns(),
            log_path.display()
        );
        Ok(Self {
            lab,
            child,
            status: None,
            log_path,
            health_addr,
        })
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            if Instant::now() > deadline {
                bail!(
                    "agent log has no {needle:?} after {timeout:?}; tail:\n{}",
                    self.log_tail(TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// True while the agent process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.poll_exit().is_none()
    }

    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// `GET /healthz` on the health address, from inside the node namespace; returns the status code.
    pub fn healthz(&self) -> Result<u16, ClientError> {
        let addr = self.health_addr;
        let started = Instant::now();
        self.lab
            .in_node(|| client::http_get(addr, "/healthz", Duration::from_secs(1)))
            .map_err(|e| ClientError::new("healthz", addr, started, e))
            .and_then(|r| r)
            .map(|r| r.status)
    }

    /// Polls `/healthz` until it answers 200. Fails early (with the log's tail) if the agent exits.
    pub fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.poll_exit() {
                bail!(
                    "agent exited ({status}) before becoming healthy; log tail:\n{}",
                    self.log_tail(TAIL_LINES)
                );
            }
            let last = match self.healthz() {
                Ok(200) => return Ok(()),
                Ok(code) => format!("HTTP {code}"),
                Err(e) => e.to_string(),
            };
            if started.elapsed() > timeout {
                bail!(
                    "agent not healthy after {timeout:?} (last answer: {last}); log tail:\n{}",
                    self.log_tail(TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends SIGTERM and waits (up to 10 s) for the agent to exit; returns its exit status. An agent that
    /// does not exit is killed and reported as an error.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.poll_exit() {
            return Ok(status);
        }
        self.signal(Signal::SIGTERM);
        if let Some(status) = self.wait_exit(Duration::from_secs(10)) {
            return Ok(status);
        }
        self.signal(Signal::SIGKILL);
        let _ = self.wait_exit(Duration::from_secs(5));
        bail!(
            "agent did not exit within 10 s of SIGTERM (killed); log tail:\n{}",
            self.log_tail(TAIL_LINES)
        )
    }

    /// SIGKILL, as a crash or an OOM kill would: no cleanup runs. Returns once the agent is reaped.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.poll_exit() {
            return Ok(status);
        }
        self.signal(Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(5))
            .context("agent still running 5 s after SIGKILL")
    }

    fn signal(&self, signal: Signal) {
        // The pid is our unreaped child, so it cannot have been reused.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.poll_exit() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        if self.poll_exit().is_none() {
            self.signal(Signal::SIGTERM);
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                eprintln!(
                    "weir-tests: agent {} ignored SIGTERM for 5 s: SIGKILL",
                    self.pid()
                );
                self.signal(Signal::SIGKILL);
                let _ = self.child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "----- weir-agent log tail ({}, exit {:?}) -----\n{}\n----- end of agent log -----",
                self.log_path.display(),
                self.status,
                self.log_tail(TAIL_LINES)
            );
        }
    }
}

/// The value of `--flag VALUE` or `--flag=VALUE` in `args`.
fn flag_value<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, arg)| {
        if *arg == flag {
            args.get(i + 1).copied()
        } else {
            arg.strip_prefix(flag)
                .and_then(|rest| rest.strip_prefix('='))
        }
    })
}
