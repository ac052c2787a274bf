//! Private bpffs mounts for labs, packet rigs and the bench: each agent or in-process datapath pins its
//! maps in its own, so runs never see each other's state.
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Creates `dir` and mounts a fresh bpffs on it.
pub fn mount(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    nix::mount::mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mount -t bpf bpf {}", dir.display()))
}

/// A bpffs mounted on `dir`, unmounted (with everything pinned in it) on drop, its directory and that
/// directory's parent removed when empty.
pub struct Bpffs(PathBuf);

impl Bpffs {
    pub fn mount(dir: PathBuf) -> anyhow::Result<Self> {
        mount(&dir)?;
        Ok(Self(dir))
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH).is_ok() {
            let _ = std::fs::remove_dir(&self.0);
            if let Some(parent) = self.0.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}
