//! Standalone source: a directory of Kubernetes YAML (multi-document `*.yaml`/`*.yml` files) turned into
//! validated specs, re-read within a second of any change. A broken file or object is reported with file,
//! object and field, and the last good version of what it held stays in force.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use notify::{RecursiveMode, Watcher};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

pub use crate::model::Snapshot;
use crate::{
    l7::fault::{self, FaultObjects, HttpFaultInjection},
    model::{FieldError, NsName, ServiceSpec, SliceSpec, SourceUpdate, object_id},
};

/// Re-read at least this often even without a file-system event, in case a notification is lost.
const RESCAN_PERIOD: Duration = Duration::from_secs(2);
/// Coalesces the burst of events an editor or `cp` produces into one reload.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Largest config file read: a YAML tree takes several times its text in memory, so an accidental
/// (or hostile) huge file is refused before it is parsed. 1,000 Services with their slices take
/// about 0.5 MB; split larger sets over several files.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {size} bytes, larger than the {MAX_FILE_BYTES}-byte limit of a config file")]
    TooLarge { file: PathBuf, size: u64 },
    #[error("{file}: not UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 { file: PathBuf, offset: usize },
    #[error("{file}: document {doc}: invalid YAML: {source}")]
    Syntax {
        file: PathBuf,
        doc: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{file}: document {doc}: {kind} {object}: {field}: {message}")]
    Object {
        file: PathBuf,
        doc: usize,
        kind: &'static str,
        object: NsName,
        field: String,
        message: String,
    },
    #[error("{file}: document {doc}: {message}")]
    Document {
        file: PathBuf,
        doc: usize,
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ObjectKey {
    Service(NsName),
    Slice(NsName),
    Route(NsName),
    Fault(NsName),
}

/// A valid object; `None` inside means valid but not ours to program (headless, another proxy's, …).
#[derive(Clone, Debug, PartialEq)]
enum Object {
    Service(Option<std::sync::Arc<ServiceSpec>>),
    Slice(Option<std::sync::Arc<SliceSpec>>),
    Route(Box<HttpRoute>),
    Fault(Box<HttpFaultInjection>),
}

type FileObjects = BTreeMap<ObjectKey, Object>;

/// What identifies a file version without reading it: a write-then-rename makes a new inode, an in-place
/// write moves mtime/ctime and usually the length.
type Stamp = (u64, u64, i64, i64, i64, i64);

/// How long after its last modification a file read counts as settled.
const SETTLE: Duration = Duration::from_secs(1);

/// Whether a file with this stamp, read now, may be rewritten unseen within its timestamp tick.
fn racy(stamp: Option<Stamp>) -> bool {
    let Some((_, _, secs, nsecs, ..)) = stamp else {
        return true;
    };
    let modified = std::time::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
        + Duration::from_nanos(u64::try_from(nsecs).unwrap_or(0));
    // A clock before the modification time (skew) counts as racy too.
    std::time::SystemTime::now()
        .duration_since(modified)
        .map_or(true, |age| age < SETTLE)
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.ino(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

struct FileState {
    stamp: Option<Stamp>,
    /// Read less than [`SETTLE`] after its last modification: a rewrite within the same timestamp
    /// tick (file times advance in clock ticks, not nanoseconds) could leave the stamp unchanged, so
    /// the file is read again until a read happens after it settled (git's "racy clean" rule).
    racy: bool,
    /// The last good objects of the file.
    objects: FileObjects,
    /// Problems found the last time it was read.
    errors: Vec<String>,
}

/// The directory and the last good objects of each file in it.
pub struct ConfigDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// The `HTTPFaultInjection` objects of the last reload (not part of the [`Snapshot`]: they only
    /// shape the L7 route table).
    faults: FaultObjects,
}

impl ConfigDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            faults: FaultObjects::new(),
        }
    }

    /// Re-reads every file. Returns the merged snapshot and the problems (file, object, field) found.
    pub fn reload(&mut self) -> Result<(Snapshot, Vec<String>), std::io::Error> {
        self.reload_with(true)
    }

    /// With `force` false, files whose inode, size and times are unchanged are not read again: the
    /// periodic rescan then costs a `stat` per file.
    pub fn reload_with(&mut self, force: bool) -> Result<(Snapshot, Vec<String>), std::io::Error> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_config_file(p))
            .collect();
        paths.sort();
        let mut files = BTreeMap::new();
        for path in paths {
            let previous = self.files.remove(&path);
            let now = stamp(&path);
            let state = match previous {
                Some(prev) if !force && now.is_some() && prev.stamp == now && !prev.racy => prev,
                previous => {
                    let mut errors = Vec::new();
                    let objects =
                        load_file(&path, previous.as_ref().map(|p| &p.objects), &mut errors);
                    FileState {
                        stamp: now,
                        racy: racy(now),
                        objects,
                        errors: errors.iter().map(ToString::to_string).collect(),
                    }
                }
            };
            files.insert(path, state);
        }
        // Files that disappeared take their objects with them.
        self.files = files;
        let errors = self
            .files
            .values()
            .flat_map(|f| f.errors.iter().cloned())
            .collect();

        let mut snapshot = Snapshot::default();
        self.faults.clear();
        for (path, state) in &self.files {
            for (key, object) in &state.objects {
                let duplicate = match (key, object) {
                    (ObjectKey::Service(id), Object::Service(spec)) => {
                        let dup = snapshot.services.contains_key(id);
                        if let Some(spec) = spec {
                            snapshot
                                .services
                                .insert(id.clone(), std::sync::Arc::clone(spec));
                        }
                        dup
                    }
                    (ObjectKey::Slice(id), Object::Slice(spec)) => {
                        let dup = snapshot.slices.contains_key(id);
                        if let Some(spec) = spec {
                            snapshot
                                .slices
                                .insert(id.clone(), std::sync::Arc::clone(spec));
                        }
                        dup
                    }
                    (ObjectKey::Route(id), Object::Route(route)) => snapshot
                        .http_routes
                        .insert(id.clone(), (**route).clone())
                        .is_some(),
                    (ObjectKey::Fault(id), Object::Fault(f)) => {
                        self.faults.insert(id.clone(), (**f).clone()).is_some()
                    }
                    _ => false,
                };
                if duplicate {
                    warn!(file = %path.display(), object = ?key, "object defined in more than one file; the file sorting last wins");
                }
            }
        }
        Ok((snapshot, errors))
    }
}

impl ConfigDir {
    /// The `HTTPFaultInjection` objects found by the last reload.
    pub fn faults(&self) -> &FaultObjects {
        &self.faults
    }
}

fn is_config_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    // Dotfiles are editors' and writers' temporaries (write-then-rename).
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml")) && path.is_file()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    metadata: Option<MetaNames>,
}

#[derive(Deserialize)]
struct MetaNames {
    name: Option<String>,
    namespace: Option<String>,
}

fn load_file(
    path: &Path,
    previous: Option<&FileObjects>,
    errors: &mut Vec<ConfigError>,
) -> FileObjects {
    let text = match read_text(path) {
        Ok(t) => t,
        Err(e) => {
            errors.push(*e);
            return previous.cloned().unwrap_or_default();
        }
    };
    // Parse every document first: a syntax error anywhere means we cannot trust this file's content,
    // so the last good version of the whole file stays in force.
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        match serde_yaml::Value::deserialize(doc) {
            Ok(v) => docs.push(v),
            Err(source) => {
                errors.push(ConfigError::Syntax {
                    file: path.to_owned(),
                    doc: i,
                    source,
                });
                return previous.cloned().unwrap_or_default();
            }
        }
    }

    let mut objects = FileObjects::new();
    for (i, value) in docs.into_iter().enumerate() {
        if value.is_null() {
            continue;
        }
        let meta: TypeMeta = match serde_yaml::from_value(value.clone()) {
            Ok(m) => m,
            Err(e) => {
                errors.push(ConfigError::Document {
                    file: path.to_owned(),
                    doc: i,
                    message: format!("not a Kubernetes object: {e}"),
                });
                continue;
            }
        };
        let names = meta.metadata.as_ref();
        let id = object_id(
            names.and_then(|m| m.namespace.as_ref()),
            names.and_then(|m| m.name.as_ref()),
        );
        let (key, parsed) = match (meta.api_version.as_deref(), meta.kind.as_deref()) {
            (Some("v1"), Some("Service")) => (
                ObjectKey::Service(id.clone()),
                decode::<Service>(value).and_then(|s| {
                    ServiceSpec::from_k8s(&s).map(|o| Object::Service(o.map(std::sync::Arc::new)))
                }),
            ),
            (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => (
                ObjectKey::Slice(id.clone()),
                decode::<EndpointSlice>(value).and_then(|s| {
                    SliceSpec::from_k8s(&s).map(|o| Object::Slice(o.map(std::sync::Arc::new)))
                }),
            ),
            (Some("gateway.networking.k8s.io/v1"), Some("HTTPRoute")) => (
                ObjectKey::Route(id.clone()),
                crate::l7::route::http_route_from_value(value).map(|r| Object::Route(Box::new(r))),
            ),
            (Some(api), Some(fault::KIND))
                if api == format!("{}/{}", fault::GROUP, fault::VERSION) =>
            {
                (
                    ObjectKey::Fault(id.clone()),
                    fault::from_value(value).map(|f| Object::Fault(Box::new(f))),
                )
            }
            (api, kind) => {
                debug!(file = %path.display(), doc = i, ?api, ?kind, "ignoring object of a kind this agent does not use");
                continue;
            }
        };
        let kind = match key {
            ObjectKey::Service(_) => "Service",
            ObjectKey::Slice(_) => "EndpointSlice",
            ObjectKey::Route(_) => "HTTPRoute",
            ObjectKey::Fault(_) => fault::KIND,
        };
        // The API server validates names; a file has nobody else to do it.
        let parsed = validate_names(&key, &id).and(parsed);
        match parsed {
            Ok(object) => {
                objects.insert(key, object);
            }
            Err(FieldError { field, message }) => {
                errors.push(ConfigError::Object {
                    file: path.to_owned(),
                    doc: i,
                    kind,
                    object: NsName {
                        namespace: truncated(&id.namespace),
                        name: truncated(&id.name),
                    },
                    field,
                    message,
                });
                // Keep what this object was before it broke, if it was here before.
                if let Some(old) = previous.and_then(|p| p.get(&key)) {
                    objects.insert(key, old.clone());
                }
            }
        }
    }
    objects
}

/// A config file's text, refused when too large or not UTF-8.
fn read_text(path: &Path) -> Result<String, Box<ConfigError>> {
    use std::io::Read as _;
    let read_error = |source| {
        Box::new(ConfigError::Read {
            file: path.to_owned(),
            source,
        })
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let size = file.metadata().map_err(read_error)?.len();
    if size > MAX_FILE_BYTES {
        return Err(Box::new(ConfigError::TooLarge {
            file: path.to_owned(),
            size,
        }));
    }
    // Read at most one byte past the limit: the file may grow between the stat and the read.
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Box::new(ConfigError::TooLarge {
            file: path.to_owned(),
            size: bytes.len() as u64,
        }));
    }
    String::from_utf8(bytes).map_err(|e| {
        Box::new(ConfigError::NotUtf8 {
            file: path.to_owned(),
            offset: e.utf8_error().valid_up_to(),
        })
    })
}

/// Whether `s` is a DNS-1123 label (lower-case alphanumerics and `-`, starting and ending with an
/// alphanumeric, at most 63 characters); with `alpha_first`, a DNS-1035 label (starts with a letter).
fn is_dns_label(s: &str, alpha_first: bool) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| alnum(c) || *c == b'-')
        && b.first().is_some_and(|c| {
            if alpha_first {
                c.is_ascii_lowercase()
            } else {
                alnum(c)
            }
        })
        && b.last().is_some_and(alnum)
}

/// Whether `s` is a DNS-1123 subdomain (dot-separated labels, at most 253 characters).
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(|l| is_dns_label(l, false))
}

/// Names as the API server would accept them: a Service's name is a DNS-1035 label (it becomes a DNS
/// name), other objects' names DNS-1123 subdomains, namespaces DNS-1123 labels. A missing name is left
/// to the object's own validation, which names the field.
fn validate_names(key: &ObjectKey, id: &NsName) -> Result<(), FieldError> {
    if !is_dns_label(&id.namespace, false) {
        return Err(FieldError {
            field: "metadata.namespace".to_owned(),
            message: format!(
                "{:?} is not a DNS-1123 label (a-z, 0-9, '-', at most 63 characters)",
                truncated(&id.namespace)
            ),
        });
    }
    if id.name.is_empty() {
        return Ok(());
    }
    let (valid, rule) = match key {
        ObjectKey::Service(_) => (
            is_dns_label(&id.name, true),
            "a DNS-1035 label (a-z, 0-9, '-', starting with a letter, at most 63 characters)",
        ),
        _ => (
            is_dns_subdomain(&id.name),
            "a DNS-1123 subdomain (a-z, 0-9, '-', '.', at most 253 characters)",
        ),
    };
    if valid {
        Ok(())
    } else {
        Err(FieldError {
            field: "metadata.name".to_owned(),
            message: format!(
                "{:?} ({} bytes) is not {rule}",
                truncated(&id.name),
                id.name.len()
            ),
        })
    }
}

/// At most 80 characters of `s`, so a megabyte name does not make a megabyte log line.
fn truncated(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn decode<T: serde::de::DeserializeOwned>(value: serde_yaml::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| FieldError {
        field: match e.path().to_string() {
            p if p == "." => "(object)".to_owned(),
            p => p,
        },
        message: e.into_inner().to_string(),
    })
}

/// Watches `dir` and publishes a new snapshot whenever its content changes, and the
/// `HTTPFaultInjection` objects on `faults_tx` (before the snapshot that comes with them). Runs until
/// the receiver is dropped.
pub async fn watch_dir(
    dir: PathBuf,
    tx: watch::Sender<Option<SourceUpdate>>,
    faults_tx: watch::Sender<FaultObjects>,
    config_errors: impl Fn(usize) + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let (ev_tx, mut ev_rx) = mpsc::channel::<()>(16);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Reads of the files (including our own) raise access events; only changes matter.
        if res.is_ok_and(|ev| !matches!(ev.kind, notify::EventKind::Access(_))) {
            // A full channel already holds a pending reload; dropping this event loses nothing.
            let _ = ev_tx.try_send(());
        }
    })
    .context("creating the config-dir watcher")?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;

    let mut config = ConfigDir::new(&dir);
    let mut last: Option<Snapshot> = None;
    let mut last_errors: Vec<String> = Vec::new();
    // When the file-system event that led to this reload arrived.
    let mut changed_at: Option<std::time::Instant> = None;
    loop {
        // The first read takes every file; later ones (after a file-system event or at the periodic
        // rescan) only files whose stamp changed or that were read before they settled, so a change to
        // one file among many costs that file.
        match config.reload_with(last.is_none()) {
            Ok((snapshot, messages)) => {
                faults_tx.send_if_modified(|faults| {
                    let changed = faults != config.faults();
                    if changed {
                        faults.clone_from(config.faults());
                    }
                    changed
                });
                // Report each problem once, not on every rescan.
                if messages != last_errors {
                    for m in messages.iter().filter(|m| !last_errors.contains(m)) {
                        error!("config: {m}; skipped");
                    }
                    config_errors(messages.iter().filter(|m| !last_errors.contains(m)).count());
                    last_errors = messages;
                }
                if last.as_ref() != Some(&snapshot) {
                    info!(
                        services = snapshot.services.len(),
                        endpoint_slices = snapshot.slices.len(),
                        "config dir changed"
                    );
                    last = Some(snapshot.clone());
                    let update = SourceUpdate {
                        snapshot,
                        changed_at: changed_at.unwrap_or_else(std::time::Instant::now),
                    };
                    if tx.send(Some(update)).is_err() {
                        return Ok(());
                    }
                }
            }
            Err(e) => error!(dir = %dir.display(), "cannot list config dir: {e}"),
        }
        tokio::select! {
            ev = ev_rx.recv() => {
                if ev.is_none() {
                    return Ok(());
                }
                changed_at = Some(std::time::Instant::now());
                tokio::time::sleep(DEBOUNCE).await;
                while ev_rx.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(RESCAN_PERIOD) => changed_at = None,
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod hostile;
