//! Running child processes, and the paths every command shares.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::setup;

/// The workspace root: the parent of this crate's manifest directory.
pub fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .with_context(|| format!("{} has no parent directory", manifest_dir.display()))
}

/// Cargo's target directory for the workspace: `$CARGO_TARGET_DIR` if set, else `<workspace>/target`.
pub fn target_dir() -> Result<PathBuf> {
    match env::var_os("CARGO_TARGET_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => std::path::absolute(&dir)
            .with_context(|| format!("making CARGO_TARGET_DIR={} absolute", dir.display())),
        None => Ok(workspace_root()?.join("target")),
    }
}

/// The release binary of the agent, as built by [`build_agent`].
pub fn agent_bin() -> Result<PathBuf> {
    Ok(target_dir()?.join("release").join("weir-agent"))
}

/// `$PATH` with the tools directory's `bin/` in front, so that build scripts (aya-build) find
/// `bpf-linker` even when `$CARGO_HOME/bin` is not on `$PATH`.
pub fn path_with_tools() -> Result<OsString> {
    let tools_bin = setup::tools_dir()?.join("bin");
    let current = env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(tools_bin).chain(env::split_paths(&current));
    env::join_paths(dirs).context("building PATH with the tools directory")
}

/// A stable `cargo` command run in the workspace root, with the tools on `$PATH`.
pub fn cargo() -> Result<Command> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root()?)
        .env("PATH", path_with_tools()?);
    Ok(cmd)
}

/// A command run through `rustup run nightly`, so it gets the nightly toolchain whatever `$PATH`
/// and `$RUSTUP_TOOLCHAIN` say.
pub fn nightly(program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", program]);
    // These would point a nightly cargo at the stable compiler.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(key);
    }
    cmd
}

/// `cargo build --release -p weir-agent` (its build script also builds the eBPF object).
pub fn build_agent() -> Result<()> {
    let mut cmd = cargo()?;
    cmd.args(["build", "--release", "-p", "weir-agent"]);
    announce(&cmd);
    run(&mut cmd)
}

/// Prints the command about to run, as a step header.
pub fn announce(cmd: &Command) {
    eprintln!("==> {}", display(cmd));
}

/// The command line, for messages.
pub fn display(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` with its output streamed to ours; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` with stdin closed and its output captured, whatever its exit status.
pub fn capture(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{}`", display(cmd)))
}

/// Runs `cmd` quietly; fails with its stderr and stdout unless it exits 0. Returns its stdout.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = capture(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}{}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", display(cmd)))
}
