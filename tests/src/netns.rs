//! Network namespaces: creating and deleting named ones, running code inside one, and the `ip`/sysctl
//! plumbing the lab is built with.

use std::fs::File;
use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail};
use nix::sched::CloneFlags;

/// Where `ip netns add` bind-mounts the namespaces it creates.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// True when the process runs as root (effective uid 0).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Panics with a clear message unless running as root: these tests create network namespaces, veths and
/// bpffs mounts, and silently skipping them would report a green run that tested nothing.
pub fn require_root() {
    assert!(
        is_root(),
        "weir-tests need root (network namespaces, veth pairs, bpffs, eBPF programs): \
         run them as root, e.g. `sudo -E cargo test -p weir-tests`; they are never skipped"
    );
}

/// A process-unique id such as `4242-3`: the pid keeps concurrent test binaries apart, the counter keeps
/// labs inside one binary apart.
pub fn unique_id() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `ip ARGS...`, returning its stdout, or an error that names the command and quotes its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run("ip", args)
}

/// Runs a command to completion and turns a non-zero exit into an error carrying its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run `{program}` (is it installed and on PATH?)"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `f` on a fresh thread that first joins the network namespace `ns` and returns its result.
///
/// Sockets created inside `f` belong to that namespace for their whole life, so they can be handed back to
/// (and used from) any other thread. A fresh thread is used because `setns` changes only the calling
/// thread, and we never want to move the test's own thread out of its namespace. A panic in `f` is
/// propagated to the caller; failing to enter the namespace is an `Err`.
pub fn in_netns<F, T>(ns: &str, f: F) -> io::Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let path = Path::new(NETNS_RUN_DIR).join(ns);
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{ns}"))
            .spawn_scoped(scope, move || -> io::Result<T> {
                enter(&path)?;
                Ok(f())
            })?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Moves the calling thread into the network namespace bind-mounted at `path`.
pub fn enter(path: &Path) -> io::Result<()> {
    let file = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| {
        io::Error::new(
            io::Error::from(errno).kind(),
            format!("setns({}): {errno}", path.display()),
        )
    })
}

/// Writes a sysctl (dotted key, e.g. `net.ipv4.ip_forward`) inside namespace `ns`. `/proc/sys/net` shows
/// the namespace of the thread that opens the file, so this needs no `ip netns exec sysctl` process.
pub fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    in_netns(ns, || std::fs::write(&path, value))
        .and_then(|written| written)
        .with_context(|| format!("sysctl {key}={value} in netns {ns}"))
}

/// A named network namespace, deleted on drop. Deleting the name is enough to free the namespace (and
/// the veth ends inside it) once nothing else holds it: processes are killed and sockets closed first.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// `ip netns add NAME`; fails if the name already exists (names are unique per pid, so a leftover of a
    /// killed earlier run with the same pid is the only way, and refusing beats reusing it).
    pub fn create(name: &str) -> anyhow::Result<Self> {
        ip(&["netns", "add", name])?;
        Ok(Self {
            name: name.to_owned(),
        })
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("weir-tests: cannot delete netns {}: {e:#}", self.name);
        }
    }
}

/// The pid in a harness name `weir-<pid>-<n>-<role>` (netns) or `<pid>-<n>` (dirs), if it is one.
fn harness_pid(id: &str) -> Option<u32> {
    let (pid, rest) = id.split_once('-')?;
    let counter = rest.split('-').next()?;
    if counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

fn is_dead(pid: u32) -> bool {
    !Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes what harness processes that no longer exist left behind (they were killed before their
/// `Drop`s ran): `weir-<pid>-…` namespaces, `/run/weir-tests/<pid>-…` bpffs mounts and
/// `$TMPDIR/weir-tests-<pid>-…` dirs. Anything whose pid is alive is left alone. Best effort, once per
/// process.
pub fn reap_stale() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let stale = |id: &str| harness_pid(id).is_some_and(is_dead);
        for name in list_dir(Path::new(NETNS_RUN_DIR)) {
            if name.strip_prefix("weir-").is_some_and(stale) {
                eprintln!("weir-tests: deleting stale netns {name}");
                let _ = ip(&["netns", "del", &name]);
            }
        }
        let root = Path::new(crate::lab::BPFFS_ROOT);
        for id in list_dir(root) {
            if stale(&id) {
                let bpf = root.join(&id).join("bpf");
                eprintln!("weir-tests: unmounting stale {}", bpf.display());
                let _ = nix::mount::umount2(&bpf, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_dir(&bpf);
                let _ = std::fs::remove_dir(root.join(&id));
            }
        }
        let tmp = std::env::temp_dir();
        for name in list_dir(&tmp) {
            if name.strip_prefix("weir-tests-").is_some_and(stale) {
                let _ = std::fs::remove_dir_all(tmp.join(&name));
            }
        }
    });
}

fn list_dir(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::harness_pid;

    #[test]
    fn only_harness_names_carry_a_pid() {
        assert_eq!(harness_pid("4242-3-node"), Some(4242));
        assert_eq!(harness_pid("4242-3"), Some(4242));
        assert_eq!(harness_pid("scratch"), None);
        assert_eq!(harness_pid("tools-fresh"), None);
        assert_eq!(harness_pid("12-x-node"), None);
    }
}
