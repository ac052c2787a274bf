//! `cargo xtask setup`: installs what the build and the tests need, idempotently.
//!
//! 1. `rust-src` for the nightly toolchain (the eBPF crate is built with `-Z build-std=core`).
//! 2. bpf-linker, built against the nightly toolchain's own libLLVM (see TOOLCHAIN.md), into the
//!    tools directory (`$WEIR_TOOLS_DIR`, default `$HOME/.cache/weir-tools`), and symlinked into
//!    `$CARGO_HOME/bin` so that a plain `cargo build` of the agent finds it.
//! 3. The Debian packages the integration tests and the bench use.
//!
//! Prints one line per thing it installs or changes, or `setup: ok` when everything was there.

use std::{
    env, fs,
    io::Read as _,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cmd;

/// The bpf-linker release we build; 0.13.0 links LLVM dynamically from `LLVM_PREFIX`.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the integration tests, the demo and the bench use (nginx: the bench's L7 baseline,
/// run as its own process with its own config, never as the system service).
const PACKAGES: &[&str] = &[
    "iproute2", "iptables", "nftables", "ethtool", "curl", "nginx",
];

/// Counts what setup changed, to print `setup: ok` when it changed nothing.
#[derive(Default)]
struct Report {
    changes: usize,
}

impl Report {
    fn changed(&mut self, line: &str) {
        self.changes += 1;
        println!("setup: {line}");
    }
}

/// `cargo xtask setup`: everything, as root.
pub fn run() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "cargo xtask setup must run as root (it installs Debian packages, and the tests and the \
         demo create network namespaces and load eBPF programs); rerun it as root, e.g. with sudo"
    );
    let mut report = Report::default();
    toolchain_inner(&mut report)?;
    ensure_packages(&mut report)?;
    if report.changes == 0 {
        println!("setup: ok");
    }
    Ok(())
}

/// The parts that need no root: rust-src and bpf-linker. Quiet when nothing changes.
pub fn toolchain() -> Result<()> {
    toolchain_inner(&mut Report::default())
}

fn toolchain_inner(report: &mut Report) -> Result<()> {
    ensure_rust_src(report)?;
    ensure_bpf_linker(report)
}

/// Where bpf-linker and its LLVM prefix live: `$WEIR_TOOLS_DIR`, else `$HOME/.cache/weir-tools`.
pub fn tools_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("WEIR_TOOLS_DIR").filter(|dir| !dir.is_empty()) {
        return std::path::absolute(&dir)
            .with_context(|| format!("making WEIR_TOOLS_DIR={} absolute", dir.display()));
    }
    let home = env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .context("HOME is not set; set WEIR_TOOLS_DIR to choose where to install tools")?;
    Ok(PathBuf::from(home).join(".cache").join("weir-tools"))
}

/// `$CARGO_HOME`, else `$HOME/.cargo`.
fn cargo_home() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("CARGO_HOME").filter(|dir| !dir.is_empty()) {
        return std::path::absolute(&dir)
            .with_context(|| format!("making CARGO_HOME={} absolute", dir.display()));
    }
    let home = env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

fn ensure_rust_src(report: &mut Report) -> Result<()> {
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("listing the nightly toolchain's components (is the nightly toolchain installed?)")?;
    if has_rust_src(&installed) {
        return Ok(());
    }
    cmd::output(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .context("installing rust-src for the nightly toolchain")?;
    report.changed("installed rust-src for the nightly toolchain");
    Ok(())
}

fn has_rust_src(component_list: &str) -> bool {
    component_list
        .lines()
        .map(str::trim)
        .any(|line| line == "rust-src" || line.starts_with("rust-src-"))
}

/// What we need to know about the nightly toolchain's LLVM.
struct NightlyLlvm {
    /// Major LLVM version, for bpf-linker's `llvm-<MAJOR>` feature.
    major: u32,
    /// The shared libLLVM inside the nightly sysroot.
    library: PathBuf,
    /// Its file name, which is also its soname (what bpf-linker asks the loader for).
    basename: String,
}

fn nightly_llvm() -> Result<NightlyLlvm> {
    let version = cmd::output(cmd::nightly("rustc").arg("-vV"))
        .context("asking the nightly toolchain for its version (is it installed?)")?;
    let major = llvm_major(&version)?;
    let sysroot = cmd::output(cmd::nightly("rustc").args(["--print", "sysroot"]))
        .context("asking the nightly toolchain for its sysroot")?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let mut candidates = Vec::new();
    for entry in fs::read_dir(&lib_dir).with_context(|| format!("reading {}", lib_dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", lib_dir.display()))?;
        if let Some(name) = entry.file_name().to_str()
            && name.starts_with("libLLVM.so.")
        {
            candidates.push(name.to_owned());
        }
    }
    candidates.sort();
    let basename = match candidates.as_slice() {
        [one] => one.clone(),
        [] => bail!(
            "no libLLVM.so.* in {}; bpf-linker needs the nightly toolchain's shared LLVM",
            lib_dir.display()
        ),
        many => bail!(
            "several libLLVM.so.* in {}: {}; cannot tell which one rustc uses",
            lib_dir.display(),
            many.join(", ")
        ),
    };
    ensure!(
        basename.starts_with(&format!("libLLVM.so.{major}")),
        "{} does not match the nightly's LLVM version {major}",
        lib_dir.join(&basename).display()
    );
    Ok(NightlyLlvm {
        major,
        library: lib_dir.join(&basename),
        basename,
    })
}

/// The major version from `rustc -vV`'s `LLVM version: 22.1.4` line.
fn llvm_major(rustc_vv: &str) -> Result<u32> {
    let version = rustc_vv
        .lines()
        .find_map(|line| line.trim().strip_prefix("LLVM version:"))
        .context("`rustc +nightly -vV` printed no `LLVM version:` line")?
        .trim();
    let major = version.split('.').next().unwrap_or_default();
    major
        .parse()
        .with_context(|| format!("cannot parse the LLVM major version from {version:?}"))
}

/// What the stamp file records about a bpf-linker build; a change means a rebuild.
fn stamp_contents(llvm: &NightlyLlvm) -> String {
    format!(
        "bpf-linker {BPF_LINKER_VERSION}\nllvm-{}\n{}\n",
        llvm.major, llvm.basename
    )
}

fn ensure_bpf_linker(report: &mut Report) -> Result<()> {
    let llvm = nightly_llvm()?;
    let tools = tools_dir()?;
    let prefix = tools.join("llvm-prefix");
    refresh_llvm_prefix(&prefix.join("lib"), &llvm)?;

    let bin = tools.join("bin").join("bpf-linker");
    let stamp = tools.join("bpf-linker.stamp");
    let want = stamp_contents(&llvm);
    let have = match fs::read_to_string(&stamp) {
        Ok(have) => Some(have),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(err).with_context(|| format!("reading {}", stamp.display())),
    };
    let runs = linker_runs(&bin);

    if runs && have.as_deref() == Some(want.as_str()) {
        // Up to date.
    } else if runs && have.is_none() && links_library(&bin, &llvm.basename)? {
        // Installed without a stamp (by hand, or by an older xtask) against this very libLLVM.
        write_atomically(&stamp, &want)?;
        report.changed(&format!(
            "recorded the existing bpf-linker {BPF_LINKER_VERSION} in {} (links {})",
            tools.display(),
            llvm.basename
        ));
    } else {
        build_bpf_linker(&tools, &prefix, &llvm)?;
        ensure!(
            linker_runs(&bin),
            "{} was built but `{} --version` does not report {BPF_LINKER_VERSION}",
            bin.display(),
            bin.display()
        );
        write_atomically(&stamp, &want)?;
        report.changed(&format!(
            "installed bpf-linker {BPF_LINKER_VERSION} (LLVM {}, {}) in {}",
            llvm.major,
            llvm.basename,
            tools.display()
        ));
    }

    link_into_cargo_home(&bin, report)
}

/// Makes `<prefix>/lib` hold exactly `libLLVM.so` and `<basename>`, both pointing at the
/// nightly's libLLVM. Stale versioned links are removed, so that a bpf-linker built against an
/// older LLVM fails to start (and gets rebuilt) instead of silently loading the wrong library.
fn refresh_llvm_prefix(lib: &Path, llvm: &NightlyLlvm) -> Result<()> {
    fs::create_dir_all(lib).with_context(|| format!("creating {}", lib.display()))?;
    for entry in fs::read_dir(lib).with_context(|| format!("reading {}", lib.display()))? {
        let entry = entry.with_context(|| format!("reading {}", lib.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("libLLVM") && name != "libLLVM.so" && name != llvm.basename {
            let path = entry.path();
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    for name in ["libLLVM.so", llvm.basename.as_str()] {
        ensure_symlink(&lib.join(name), &llvm.library)?;
    }
    Ok(())
}

/// Points `link` at `target`, replacing whatever is there atomically. Returns whether it changed.
fn ensure_symlink(link: &Path, target: &Path) -> Result<bool> {
    if fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(false);
    }
    let name = link
        .file_name()
        .with_context(|| format!("{} has no file name", link.display()))?;
    let mut tmp_name = name.to_owned();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = link.with_file_name(tmp_name);
    let _ = fs::remove_file(&tmp);
    symlink(target, &tmp)
        .with_context(|| format!("creating symlink {} -> {}", tmp.display(), target.display()))?;
    fs::rename(&tmp, link).with_context(|| {
        let _ = fs::remove_file(&tmp);
        format!("replacing {}", link.display())
    })?;
    Ok(true)
}

/// Whether `bin --version` runs and reports the pinned version.
fn linker_runs(bin: &Path) -> bool {
    let Ok(out) = cmd::capture(Command::new(bin).arg("--version")) else {
        return false;
    };
    out.status.success()
        && String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .any(|word| word == BPF_LINKER_VERSION)
}

/// Whether the binary names `soname` (its dynamic section lists the libraries it needs by name).
fn links_library(bin: &Path, soname: &str) -> Result<bool> {
    let mut bytes = Vec::new();
    fs::File::open(bin)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", bin.display()))?;
    let needle = format!("{soname}\0");
    Ok(bytes
        .windows(needle.len())
        .any(|window| window == needle.as_bytes()))
}

fn build_bpf_linker(tools: &Path, prefix: &Path, llvm: &NightlyLlvm) -> Result<()> {
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {} \
         (takes a minute or two)",
        llvm.major
    );
    fs::create_dir_all(tools).with_context(|| format!("creating {}", tools.display()))?;
    let mut install = Command::new("cargo");
    install
        // Outside the workspace, so its config and toolchain pins do not apply.
        .current_dir(tools)
        .env("LLVM_PREFIX", prefix)
        .args([
            "install",
            "--quiet",
            "--locked",
            "--force",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{}", llvm.major))
        .arg("--root")
        .arg(tools);
    cmd::run(&mut install).context("building bpf-linker")
}

/// `$CARGO_HOME/bin/bpf-linker` -> `<tools>/bin/bpf-linker`, for aya-build in a plain `cargo build`.
fn link_into_cargo_home(bin: &Path, report: &mut Report) -> Result<()> {
    let cargo_bin = cargo_home()?.join("bin");
    fs::create_dir_all(&cargo_bin).with_context(|| format!("creating {}", cargo_bin.display()))?;
    let link = cargo_bin.join("bpf-linker");
    if ensure_symlink(&link, bin)? {
        report.changed(&format!("linked {} -> {}", link.display(), bin.display()));
    }
    Ok(())
}

fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let mut tmp_name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_owned();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn ensure_packages(report: &mut Report) -> Result<()> {
    let mut missing = Vec::new();
    for &package in PACKAGES {
        if !package_installed(package)? {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    cmd::output(Command::new("apt-get").args(["update", "-qq"]))
        .context("updating the apt package lists")?;
    cmd::output(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq"])
            .args(&missing),
    )
    .with_context(|| format!("installing {}", missing.join(" ")))?;
    for &package in &missing {
        ensure!(
            package_installed(package)?,
            "apt-get installed {package} but dpkg does not list it as installed"
        );
    }
    report.changed(&format!("installed {}", missing.join(" ")));
    Ok(())
}

fn package_installed(package: &str) -> Result<bool> {
    let out = cmd::capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .context("running dpkg-query (setup supports Debian-based systems)")?;
    // dpkg-query exits 1 for a package it has never heard of.
    Ok(out.status.success() && status_is_installed(&String::from_utf8_lossy(&out.stdout)))
}

/// `${Status}` is `<want> <flag> <status>`, e.g. `install ok installed`.
fn status_is_installed(status: &str) -> bool {
    let words: Vec<&str> = status.split_whitespace().collect();
    matches!(words.as_slice(), [_, "ok", "installed"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llvm_major() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                  host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv).ok(), Some(22));
        assert!(llvm_major("rustc 1.0.0\n").is_err());
        assert!(llvm_major("LLVM version: x.1\n").is_err());
    }

    #[test]
    fn finds_rust_src() {
        assert!(has_rust_src(
            "cargo-x86_64-unknown-linux-gnu\nrust-src\nrustc-x86_64-unknown-linux-gnu\n"
        ));
        assert!(!has_rust_src(
            "cargo-x86_64-unknown-linux-gnu\nrust-std-x86_64-unknown-linux-gnu\n"
        ));
    }

    #[test]
    fn dpkg_status() {
        assert!(status_is_installed("install ok installed"));
        assert!(status_is_installed("hold ok installed"));
        assert!(!status_is_installed("deinstall ok config-files"));
        assert!(!status_is_installed("install ok half-installed"));
        assert!(!status_is_installed(""));
    }

    #[test]
    fn stamp_names_version_and_library() {
        let llvm = NightlyLlvm {
            major: 22,
            library: PathBuf::from("/sysroot/lib/libLLVM.so.22.1-rust-1.97.0-nightly"),
            basename: "libLLVM.so.22.1-rust-1.97.0-nightly".to_owned(),
        };
        let stamp = stamp_contents(&llvm);
        assert!(stamp.contains(BPF_LINKER_VERSION));
        assert!(stamp.contains("libLLVM.so.22.1-rust-1.97.0-nightly"));
    }

    #[test]
    fn symlinks_are_replaced() -> Result<()> {
        let dir = env::temp_dir().join(format!("xtask-symlink-test-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let link = dir.join("link");
        assert!(ensure_symlink(&link, Path::new("/a"))?);
        assert!(!ensure_symlink(&link, Path::new("/a"))?);
        assert!(ensure_symlink(&link, Path::new("/b"))?);
        assert_eq!(fs::read_link(&link)?, PathBuf::from("/b"));
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
