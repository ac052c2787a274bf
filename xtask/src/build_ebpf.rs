//! `cargo xtask build-ebpf`: builds the eBPF crate alone, as the agent's build script (aya-build)
//! does, into `<target>/bpfel-unknown-none/release/`.

use anyhow::{Context as _, Result};

use xtask::{cmd, setup};

pub fn run() -> Result<()> {
    setup::toolchain()?;
    let mut build = cmd::nightly("cargo");
    build
        .current_dir(cmd::workspace_root()?)
        .env("PATH", cmd::path_with_tools()?)
        // The flags aya-build passes: BTF for CO-RE and the loader, debug info for it.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
                "-Cdebuginfo=2".to_owned(),
                "-Clink-arg=--btf".to_owned(),
            ]
            .join("\x1f"),
        )
        .args([
            "build",
            "--release",
            "-p",
            "weir-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ]);
    cmd::announce(&build);
    cmd::run(&mut build).context("building the eBPF programs")?;
    let out = cmd::target_dir()?
        .join("bpfel-unknown-none")
        .join("release");
    eprintln!("eBPF object(s) in {}", out.display());
    Ok(())
}
