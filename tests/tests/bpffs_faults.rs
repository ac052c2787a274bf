//! A bpffs the agent cannot use (issue 7, item 5): a pin directory that cannot be created, or a
//! read-only bpffs, stops the agent at start with an error naming the directory and a non-zero exit;
//! a missing directory on a writable file system is created and mounted.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use weir_tests::{Lab, agent_binary, netns};

/// A mount made by the test, detached on drop.
struct Mounted(PathBuf);

impl Mounted {
    fn new(fstype: &str, dir: &Path, flags: MsFlags) -> Self {
        std::fs::create_dir_all(dir).expect("create mount point");
        mount(Some(fstype), dir, Some(fstype), flags, None::<&str>)
            .unwrap_or_else(|e| panic!("mount -t {fstype} {}: {e}", dir.display()));
        Self(dir.to_owned())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Runs the agent in the lab's node namespace with `--bpffs-dir dir` until it exits (or 20 s pass):
/// exit code and output.
fn run_agent(lab: &Lab, bpffs: &Path) -> (Option<i32>, String) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", lab.node_netns()])
        .arg(agent_binary().expect("agent binary"))
        .arg("--config-dir")
        .arg(lab.config_dir())
        .args(["--pod-iface-prefix", lab.pod_iface_prefix()])
        .arg("--bpffs-dir")
        .arg(bpffs)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the agent");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (status.code(), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            return (None, String::from_utf8_lossy(&out.stderr).into_owned());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_unusable_bpffs_dir_is_a_clear_error_at_start_and_a_missing_one_is_created() {
    netns::require_root();
    let lab = Lab::new().expect("lab");
    let root = lab.dir().join("bpffs-faults");

    // Missing, and its parent is read-only: cannot be created.
    let ro_tmpfs = Mounted::new("tmpfs", &root.join("ro"), MsFlags::MS_RDONLY);
    let dir = ro_tmpfs.0.join("weir");
    let (code, out) = run_agent(&lab, &dir);
    println!("read-only parent: exit {code:?}: {}", out.trim_end());
    assert!(
        code.is_some_and(|c| c != 0),
        "must exit non-zero: {code:?}\n{out}"
    );
    assert!(
        out.contains(&format!("creating pin directory {}", dir.display()))
            && out.contains("Read-only file system"),
        "the error names the directory and the cause:\n{out}"
    );

    // A read-only bpffs.
    let ro_bpffs = Mounted::new("bpf", &root.join("robpf"), MsFlags::MS_RDONLY);
    let (code, out) = run_agent(&lab, &ro_bpffs.0);
    println!("read-only bpffs: exit {code:?}: {}", out.trim_end());
    assert!(
        code.is_some_and(|c| c != 0),
        "must exit non-zero: {code:?}\n{out}"
    );
    assert!(
        out.contains(&format!("{} is not writable", ro_bpffs.0.display())),
        "the error names the directory:\n{out}"
    );

    // Missing on a writable file system: created and mounted, and the agent comes up.
    let rw_tmpfs = Mounted::new("tmpfs", &root.join("rw"), MsFlags::empty());
    let dir = rw_tmpfs.0.join("a/b/weir");
    let mut child = Command::new("ip")
        .args(["netns", "exec", lab.node_netns()])
        .arg(agent_binary().expect("agent binary"))
        .arg("--config-dir")
        .arg(lab.config_dir())
        .args(["--pod-iface-prefix", lab.pod_iface_prefix()])
        .arg("--bpffs-dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    let healthy = loop {
        let ok = lab
            .in_node(|| {
                weir_tests::client::http_get(
                    "127.0.0.1:10256".parse().expect("addr"),
                    "/healthz",
                    Duration::from_millis(500),
                )
            })
            .expect("enter node")
            .is_ok_and(|r| r.status == 200);
        if ok || Instant::now() > deadline {
            break ok;
        }
        if child.try_wait().expect("wait").is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // SIGTERM: a clean exit.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = child.wait().expect("wait");
    assert!(
        healthy,
        "an agent with a missing (creatable) --bpffs-dir becomes healthy"
    );
    assert!(status.success(), "{status:?}");
    assert!(dir.is_dir(), "{} was created", dir.display());
}
