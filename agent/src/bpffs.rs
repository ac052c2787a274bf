//! Makes sure the pin directory is on a bpffs (and the cgroup root on cgroup v2): `ip netns exec` and
//! containers often show a /sys without them.
use std::path::Path;

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, statfs},
};

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("creating pin directory {dir}: {source}")]
    Create {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("checking the file system of {dir}: {source}")]
    Stat {
        dir: String,
        #[source]
        source: nix::Error,
    },
    #[error("mounting bpffs on {dir}: {source} (is the agent root, with CAP_SYS_ADMIN?)")]
    Mount {
        dir: String,
        #[source]
        source: nix::Error,
    },
    #[error("{dir} is not writable: {source}")]
    ReadOnly {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

/// Returns true when this call mounted it.
pub fn ensure(dir: &Path) -> Result<bool, BpffsError> {
    let d = dir.display().to_string();
    std::fs::create_dir_all(dir).map_err(|source| BpffsError::Create {
        dir: d.clone(),
        source,
    })?;
    let fs = statfs(dir).map_err(|source| BpffsError::Stat {
        dir: d.clone(),
        source,
    })?;
    let mounted = if fs.filesystem_type() == BPF_FS_MAGIC {
        false
    } else {
        mount(
            Some("bpf"),
            dir,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| BpffsError::Mount {
            dir: d.clone(),
            source,
        })?;
        true
    };
    // Pinning fails late and obscurely on a read-only bpffs; say so up front.
    // bpffs refuses names containing a dot.
    let probe = dir.join("weir-write-probe");
    std::fs::create_dir(&probe)
        .and_then(|()| std::fs::remove_dir(&probe))
        .map_err(|source| BpffsError::ReadOnly { dir: d, source })?;
    Ok(mounted)
}

/// Makes sure `dir` is a cgroup v2 mount (mounting one there if not). Returns true when this call
/// mounted it.
pub fn ensure_cgroup2(dir: &Path) -> Result<bool, BpffsError> {
    let d = dir.display().to_string();
    std::fs::create_dir_all(dir).map_err(|source| BpffsError::Create {
        dir: d.clone(),
        source,
    })?;
    let fs = statfs(dir).map_err(|source| BpffsError::Stat {
        dir: d.clone(),
        source,
    })?;
    if fs.filesystem_type() == CGROUP2_SUPER_MAGIC {
        return Ok(false);
    }
    mount(
        Some("cgroup2"),
        dir,
        Some("cgroup2"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| BpffsError::Mount { dir: d, source })?;
    Ok(true)
}
