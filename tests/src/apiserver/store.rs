//! The simulator's storage: an etcd-like multi-version store under one global resourceVersion counter, the
//! resource types it serves, label and field selectors, and the open watches it feeds.
//!
//! Every write gets the next revision and is kept as a revision of its key (MVCC), so a LIST can be served
//! at an older revision (paginated lists continue at the revision of their first page, as etcd does) and a
//! WATCH can replay every change after the revision it starts from. Compaction drops what the history no
//! longer needs; starting from before it is "410 Gone".

use std::collections::BTreeMap;
use std::sync::Arc;

use hyper::body::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::UnboundedSender;

/// A resource type the simulator serves.
#[derive(Debug)]
pub struct ResourceType {
    /// Plural resource name as in URLs (`services`).
    pub plural: &'static str,
    /// API group; empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Built-in (not a CRD). The real API server omits `apiVersion`/`kind` from the items of a built-in
    /// type's list (typed encoding) but keeps them for custom resources (unstructured encoding).
    pub builtin: bool,
    /// Has a `status` subresource (PATCH `.../status` writes only `.status`).
    pub status: bool,
}

impl ResourceType {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The kind of a LIST answer (`ServiceList`).
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }
}

/// Everything the simulator serves: what the agent watches (Services, EndpointSlices, its Node, HTTPRoutes)
/// and the Gateway API types a Gateway-aware agent would watch next.
pub const RESOURCES: &[ResourceType] = &[
    ResourceType {
        plural: "services",
        group: "",
        version: "v1",
        kind: "Service",
        namespaced: true,
        builtin: true,
        status: true,
    },
    ResourceType {
        plural: "nodes",
        group: "",
        version: "v1",
        kind: "Node",
        namespaced: false,
        builtin: true,
        status: true,
    },
    ResourceType {
        plural: "endpointslices",
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        namespaced: true,
        builtin: true,
        status: false,
    },
    ResourceType {
        plural: "httproutes",
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "HTTPRoute",
        namespaced: true,
        builtin: false,
        status: true,
    },
    // Weir's fault injection CRD (ExtensionRef filters of HTTPRoutes).
    ResourceType {
        plural: "httpfaultinjections",
        group: "weir.dev",
        version: "v1alpha1",
        kind: "HTTPFaultInjection",
        namespaced: true,
        builtin: false,
        status: false,
    },
    ResourceType {
        plural: "gateways",
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "Gateway",
        namespaced: true,
        builtin: false,
        status: true,
    },
    ResourceType {
        plural: "gatewayclasses",
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "GatewayClass",
        namespaced: false,
        builtin: false,
        status: true,
    },
];

/// Index into [`RESOURCES`].
pub type ResIdx = usize;

/// The resource type with `group` and `plural`.
pub fn by_plural(group: &str, version: &str, plural: &str) -> Option<ResIdx> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource type of an object's `apiVersion` + `kind`, or of a bare kind or plural name.
pub fn by_kind(api_version: Option<&str>, kind: &str) -> Option<ResIdx> {
    RESOURCES.iter().position(|r| {
        (r.kind.eq_ignore_ascii_case(kind) || r.plural == kind)
            && api_version.is_none_or(|v| v == r.api_version())
    })
}

/// Watch event types as they appear on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One revision of one object.
#[derive(Clone, Debug)]
struct Rev {
    rv: u64,
    event: EventType,
    /// The object as of this revision, `metadata.resourceVersion` = `rv`. For a deletion: the last state,
    /// stamped with the deletion's revision (what the real API server puts in a DELETED event).
    object: Arc<Value>,
    /// The previous state, to turn a change into ADDED/DELETED for a watch whose selector it enters or
    /// leaves.
    prev: Option<Arc<Value>>,
}

/// `(resource, namespace, name)`; cluster-scoped objects have an empty namespace. Ordered like etcd keys
/// (`/registry/<resource>/<namespace>/<name>`), which is the order LIST returns items in.
pub type Key = (ResIdx, String, String);

/// A message to one open watch connection.
#[derive(Debug)]
pub enum WatchMsg {
    /// One event line, newline included.
    Line(Bytes),
    /// Close the connection abruptly (no terminating chunk), like a dropped TCP connection.
    Abort,
}

/// An open watch: what it selects and where its events go.
#[derive(Debug)]
pub struct Watcher {
    pub resource: ResIdx,
    pub filter: Filter,
    pub bookmarks: bool,
    pub tx: UnboundedSender<WatchMsg>,
}

/// Errors the store answers requests with; the server turns them into `Status` objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// 410 Expired: the requested revision was compacted.
    Expired(String),
    /// 504 Timeout: a revision the store has not reached.
    TooLarge(u64),
    /// 400 BadRequest.
    BadRequest(String),
    /// 404 NotFound.
    NotFound { resource: ResIdx, name: String },
}

/// A parsed LIST/WATCH filter: namespace of the URL plus field and label selectors.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    fields: Vec<FieldReq>,
    labels: Vec<LabelReq>,
}

#[derive(Debug, Clone)]
struct FieldReq {
    field: String,
    value: String,
    equal: bool,
}

#[derive(Debug, Clone)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Splits at commas outside parentheses (`a in (x,y),b` is two terms).
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_set(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

impl Filter {
    /// Parses `fieldSelector` and `labelSelector`. Field selectors support `metadata.name` and
    /// `metadata.namespace` (what every resource type supports); others are rejected as the real server
    /// rejects unsupported field labels.
    pub fn parse(
        namespace: Option<String>,
        field_selector: Option<&str>,
        label_selector: Option<&str>,
    ) -> Result<Self, StoreError> {
        let mut fields = Vec::new();
        for term in field_selector.map(split_terms).unwrap_or_default() {
            let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, true)
            } else {
                return Err(StoreError::BadRequest(format!(
                    "invalid selector: '{term}'; can't understand '{term}'"
                )));
            };
            let field = field.trim();
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(StoreError::BadRequest(format!(
                    "field label not supported: {field}"
                )));
            }
            fields.push(FieldReq {
                field: field.to_owned(),
                value: value.trim().to_owned(),
                equal,
            });
        }
        let mut labels = Vec::new();
        for term in label_selector.map(split_terms).unwrap_or_default() {
            let bad = || StoreError::BadRequest(format!("unable to parse requirement: {term:?}"));
            let req = if let Some(key) = term.strip_prefix('!') {
                LabelReq::NotExists(key.trim().to_owned())
            } else if let Some((k, set)) = term.split_once(" notin ") {
                LabelReq::NotIn(k.trim().to_owned(), parse_set(set).ok_or_else(bad)?)
            } else if let Some((k, set)) = term.split_once(" in ") {
                LabelReq::In(k.trim().to_owned(), parse_set(set).ok_or_else(bad)?)
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelReq::NotEq(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = term.split_once("==") {
                LabelReq::Eq(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = term.split_once('=') {
                LabelReq::Eq(k.trim().to_owned(), v.trim().to_owned())
            } else if term.contains(['(', ')', ' ']) {
                return Err(bad());
            } else {
                LabelReq::Exists(term.to_owned())
            };
            labels.push(req);
        }
        Ok(Self {
            namespace,
            fields,
            labels,
        })
    }

    /// True when no field or label selector is set (the real server reports `remainingItemCount` only
    /// then).
    pub fn is_unselective(&self) -> bool {
        self.fields.is_empty() && self.labels.is_empty()
    }

    /// Whether the object at `key` matches.
    pub fn matches(&self, key: &Key, object: &Value) -> bool {
        if self.namespace.as_ref().is_some_and(|ns| *ns != key.1) {
            return false;
        }
        let fields_ok = self.fields.iter().all(|f| {
            let actual = if f.field == "metadata.name" {
                &key.2
            } else {
                &key.1
            };
            (*actual == f.value) == f.equal
        });
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        fields_ok
            && self.labels.iter().all(|req| match req {
                LabelReq::Eq(k, v) => label(k) == Some(v),
                LabelReq::NotEq(k, v) => label(k) != Some(v),
                LabelReq::In(k, set) => label(k).is_some_and(|l| set.iter().any(|v| v == l)),
                LabelReq::NotIn(k, set) => !label(k).is_some_and(|l| set.iter().any(|v| v == l)),
                LabelReq::Exists(k) => label(k).is_some(),
                LabelReq::NotExists(k) => label(k).is_none(),
            })
    }
}

/// One page of a LIST.
#[derive(Debug)]
pub struct Page {
    /// The revision the list is a snapshot of.
    pub rv: u64,
    pub items: Vec<Arc<Value>>,
    /// Where the next page starts (the key after the last item), if there is one.
    pub next: Option<Key>,
    /// Matching items after this page.
    pub remaining: usize,
}

/// How a LIST chooses its revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListAt {
    /// The newest state (no resourceVersion, `0`, or NotOlderThan a revision already reached).
    Latest,
    /// Exactly this revision (`resourceVersionMatch=Exact`, or a continue token).
    Exact(u64),
}

/// The multi-version store plus the watches it feeds.
#[derive(Debug, Default)]
pub struct Store {
    rv: u64,
    /// Revisions at or before this one are gone: a WATCH or exact LIST from before it is 410.
    compacted: u64,
    revs: BTreeMap<Key, Vec<Rev>>,
    watchers: Vec<Watcher>,
    next_uid: u64,
}

/// An RFC 3339 timestamp for `creationTimestamp` (UTC, second precision, like the API server).
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `object.metadata`, created if missing; `None` if `object` is not a JSON object.
fn metadata_mut(object: &mut Value) -> Option<&mut Map<String, Value>> {
    let meta = object
        .as_object_mut()?
        .entry("metadata")
        .or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    meta.as_object_mut()
}

fn stamp_rv(object: &Value, rv: u64) -> Value {
    let mut object = object.clone();
    if let Some(meta) = metadata_mut(&mut object) {
        meta.insert("resourceVersion".into(), Value::from(rv.to_string()));
    }
    object
}

/// `object` without the fields the server sets on every write, to tell a no-op update from a change.
fn without_rv(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(meta) = metadata_mut(&mut object) {
        meta.remove("resourceVersion");
    }
    object
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

impl Store {
    /// The newest revision.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// The compaction revision.
    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    fn latest(&self, key: &Key) -> Option<&Rev> {
        self.revs.get(key).and_then(|r| r.last())
    }

    /// The live object at `key`.
    pub fn get(&self, key: &Key) -> Option<Arc<Value>> {
        self.latest(key)
            .filter(|r| r.event != EventType::Deleted)
            .map(|r| r.object.clone())
    }

    /// Creates or replaces an object (test side: like `kubectl apply` of a whole object). The server-owned
    /// metadata (`uid`, `creationTimestamp`) is kept from the existing object or filled in; an update that
    /// changes nothing writes nothing, as on the real server. Returns the object's resourceVersion.
    pub fn apply(&mut self, mut object: Value) -> Result<u64, String> {
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .ok_or("object has no kind")?;
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .ok_or("object has no apiVersion")?;
        let res = by_kind(Some(api_version), kind)
            .ok_or_else(|| format!("the simulator does not serve {api_version} {kind}"))?;
        let rt = &RESOURCES[res];
        let meta = metadata_mut(&mut object).ok_or("object is not a JSON object")?;
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or("object has no metadata.name")?
            .to_owned();
        let ns = if rt.namespaced {
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .unwrap_or("default")
                .to_owned();
            meta.insert("namespace".into(), Value::from(ns.as_str()));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        let key = (res, ns, name);
        let existing = self.get(&key);
        let meta = metadata_mut(&mut object).ok_or("object is not a JSON object")?;
        match &existing {
            Some(old) => {
                for field in ["uid", "creationTimestamp"] {
                    if let Some(v) = old.pointer(&format!("/metadata/{field}")) {
                        meta.insert(field.into(), v.clone());
                    }
                }
            }
            None => {
                self.next_uid += 1;
                meta.entry("uid").or_insert_with(|| {
                    Value::from(format!("00000000-0000-4000-8000-{:012x}", self.next_uid))
                });
                meta.entry("creationTimestamp")
                    .or_insert_with(|| Value::from(now_rfc3339()));
            }
        }
        if let Some(old) = &existing
            && without_rv(old) == without_rv(&object)
        {
            return Ok(self.rv);
        }
        let event = if existing.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        Ok(self.write(key, event, object, existing))
    }

    /// Deletes the object at `key`; DELETED carries its last state stamped with the deletion's revision.
    pub fn delete(&mut self, key: Key) -> Result<u64, StoreError> {
        let Some(old) = self.get(&key) else {
            return Err(StoreError::NotFound {
                resource: key.0,
                name: key.2,
            });
        };
        let last = (*old).clone();
        Ok(self.write(key, EventType::Deleted, last, Some(old)))
    }

    /// Applies a merge patch to the object at `key`: to `.status` only (`status_only`, the status
    /// subresource) or to everything but `.status`. Returns the new object.
    pub fn patch(
        &mut self,
        key: Key,
        patch: &Value,
        status_only: bool,
    ) -> Result<Arc<Value>, StoreError> {
        let Some(old) = self.get(&key) else {
            return Err(StoreError::NotFound {
                resource: key.0,
                name: key.2,
            });
        };
        let mut new = (*old).clone();
        if status_only {
            if let Some(status) = patch.get("status") {
                merge_patch(&mut new["status"], status);
            }
        } else {
            let mut patch = patch.clone();
            if let Some(p) = patch.as_object_mut() {
                p.remove("status");
                p.remove("apiVersion");
                p.remove("kind");
                if let Some(m) = p.get_mut("metadata").and_then(Value::as_object_mut) {
                    for field in ["name", "namespace", "uid", "resourceVersion"] {
                        m.remove(field);
                    }
                }
            }
            merge_patch(&mut new, &patch);
        }
        if without_rv(&new) == without_rv(&old) {
            return Ok(old);
        }
        self.write(key.clone(), EventType::Modified, new, Some(old));
        self.get(&key).ok_or(StoreError::NotFound {
            resource: key.0,
            name: key.2,
        })
    }

    fn write(
        &mut self,
        key: Key,
        event: EventType,
        object: Value,
        prev: Option<Arc<Value>>,
    ) -> u64 {
        self.rv += 1;
        let rev = Rev {
            rv: self.rv,
            event,
            object: Arc::new(stamp_rv(&object, self.rv)),
            prev,
        };
        // Feed open watches under the same lock as the write, so a watch registered concurrently sees
        // each change exactly once: either in its replay or live.
        self.watchers.retain(|w| {
            if w.resource != key.0 {
                return !w.tx.is_closed();
            }
            match event_line(&key, &rev, &w.filter) {
                Some(line) => w.tx.send(WatchMsg::Line(line)).is_ok(),
                None => !w.tx.is_closed(),
            }
        });
        self.revs.entry(key).or_default().push(rev);
        self.rv
    }

    /// Makes every revision up to now unavailable, as etcd compaction plus a busy cluster do: the counter
    /// first moves past every revision a client may have seen (other objects change all the time in a real
    /// cluster), then history before it is dropped. A WATCH from any revision a client holds is then
    /// answered 410, so the client must re-list.
    pub fn compact(&mut self) {
        self.rv += 1;
        self.compact_to(self.rv);
    }

    /// Drops history at or before `rv` (keeping the state as of `rv`); watching from before `rv` is 410.
    pub fn compact_to(&mut self, rv: u64) {
        let rv = rv.min(self.rv);
        if rv <= self.compacted {
            return;
        }
        self.compacted = rv;
        self.revs.retain(|_, revs| {
            // Keep every revision after `rv` and the last one at or before it (the state as of `rv`).
            let older = revs.iter().take_while(|r| r.rv <= rv).count();
            let keep_from = older.saturating_sub(1);
            revs.drain(..keep_from);
            // A key whose state as of `rv` is deleted and that has no later revision is gone for good.
            !(revs.len() == 1 && revs[0].rv <= rv && revs[0].event == EventType::Deleted)
        });
    }

    /// One LIST page of `res` at `at`, starting after `start` (exclusive) or at the first key.
    pub fn list(
        &self,
        res: ResIdx,
        filter: &Filter,
        at: ListAt,
        start: Option<&Key>,
        limit: Option<usize>,
    ) -> Result<Page, StoreError> {
        let rv = match at {
            ListAt::Latest => self.rv,
            ListAt::Exact(rv) if rv > self.rv => return Err(StoreError::TooLarge(rv)),
            ListAt::Exact(rv) if rv < self.compacted => {
                return Err(StoreError::Expired(format!(
                    "too old resource version: {rv} ({})",
                    self.compacted
                )));
            }
            ListAt::Exact(rv) => rv,
        };
        let lower = match start {
            Some(k) => std::ops::Bound::Excluded(k.clone()),
            None => std::ops::Bound::Included((res, String::new(), String::new())),
        };
        let matching = self
            .revs
            .range((lower, std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.0 == res)
            .filter_map(|(k, revs)| {
                let rev = revs.iter().rev().find(|r| r.rv <= rv)?;
                (rev.event != EventType::Deleted && filter.matches(k, &rev.object))
                    .then(|| (k, rev.object.clone()))
            });
        let mut items = Vec::new();
        let mut next = None;
        let mut remaining = 0;
        for (k, object) in matching {
            if limit.is_some_and(|l| items.len() >= l) {
                remaining += 1;
            } else {
                next = Some(k.clone());
                items.push(object);
            }
        }
        Ok(Page {
            rv,
            items,
            next: if remaining > 0 { next } else { None },
            remaining,
        })
    }

    /// Opens a watch on `res` from revision `from`: every change after it (replayed now, then live) goes to
    /// `tx`. `from = None` (no resourceVersion, or `0`) starts with an ADDED per existing object, and with
    /// `initial_events_end` a bookmark annotated `k8s.io/initial-events-end` follows them (streaming lists).
    /// A `from` before the compaction revision gets the real server's answer: a single ERROR event with a
    /// 410 `Status`, after which the stream ends (`Ok(false)`: do not register).
    pub fn watch(
        &mut self,
        watcher: Watcher,
        from: Option<u64>,
        initial_events_end: bool,
    ) -> Result<bool, StoreError> {
        let res = watcher.resource;
        let send = |line: Bytes| {
            // A client gone before its replay finished: nothing to do, the connection task ends.
            let _ = watcher.tx.send(WatchMsg::Line(line));
        };
        match from {
            Some(from) if from < self.compacted => {
                send(status_event_line(&expired_status(&format!(
                    "too old resource version: {from} ({})",
                    self.compacted
                ))));
                return Ok(false);
            }
            Some(from) => {
                let mut replay: Vec<(&Key, &Rev)> = self
                    .revs
                    .range((res, String::new(), String::new())..)
                    .take_while(|(k, _)| k.0 == res)
                    .flat_map(|(k, revs)| revs.iter().filter(|r| r.rv > from).map(move |r| (k, r)))
                    .collect();
                replay.sort_by_key(|(_, r)| r.rv);
                for (k, rev) in replay {
                    if let Some(line) = event_line(k, rev, &watcher.filter) {
                        send(line);
                    }
                }
            }
            None => {
                let page = self.list(res, &watcher.filter, ListAt::Latest, None, None)?;
                for object in page.items {
                    send(line_of(&json!({"type": "ADDED", "object": *object})));
                }
                if initial_events_end && watcher.bookmarks {
                    send(bookmark_line(
                        res,
                        self.rv,
                        Some(("k8s.io/initial-events-end", "true")),
                    ));
                }
            }
        }
        self.watchers.push(watcher);
        Ok(true)
    }

    /// Sends a BOOKMARK at the current revision to every watch that asked for bookmarks.
    pub fn send_bookmarks(&mut self) {
        let rv = self.rv;
        self.watchers.retain(|w| {
            if w.bookmarks {
                w.tx.send(WatchMsg::Line(bookmark_line(w.resource, rv, None)))
                    .is_ok()
            } else {
                !w.tx.is_closed()
            }
        });
    }

    /// Closes every open watch abruptly; returns how many there were.
    pub fn drop_watches(&mut self) -> usize {
        let watchers = std::mem::take(&mut self.watchers);
        let open = watchers.iter().filter(|w| !w.tx.is_closed()).count();
        for w in watchers {
            let _ = w.tx.send(WatchMsg::Abort);
        }
        open
    }

    /// Open watches per resource type.
    pub fn open_watches(&self, res: ResIdx) -> usize {
        self.watchers
            .iter()
            .filter(|w| w.resource == res && !w.tx.is_closed())
            .count()
    }
}

/// The event a watch with `filter` sees for `rev`, if any: a change that moves an object into the
/// selection is ADDED, out of it DELETED (with the new state), as the real server's watch filtering does.
fn event_line(key: &Key, rev: &Rev, filter: &Filter) -> Option<Bytes> {
    let now = filter.matches(key, &rev.object);
    let before = rev.prev.as_ref().is_some_and(|p| filter.matches(key, p));
    let event = match (rev.event, before, now) {
        (EventType::Deleted, _, true) => EventType::Deleted,
        (EventType::Deleted, _, false) => return None,
        (_, true, true) => EventType::Modified,
        (_, false, true) => EventType::Added,
        (_, true, false) => EventType::Deleted,
        (_, false, false) => return None,
    };
    Some(line_of(
        &json!({"type": event.as_str(), "object": *rev.object}),
    ))
}

fn line_of(event: &Value) -> Bytes {
    let mut line = event.to_string();
    line.push('\n');
    Bytes::from(line)
}

/// A BOOKMARK event: only `apiVersion`, `kind` and `metadata.resourceVersion` (plus annotations for the
/// end of a streaming list's initial events).
fn bookmark_line(res: ResIdx, rv: u64, annotation: Option<(&str, &str)>) -> Bytes {
    let rt = &RESOURCES[res];
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some((k, v)) = annotation {
        metadata["annotations"] = json!({ k: v });
    }
    line_of(&json!({
        "type": "BOOKMARK",
        "object": {"apiVersion": rt.api_version(), "kind": rt.kind, "metadata": metadata},
    }))
}

/// An ERROR event carrying `status`.
pub fn status_event_line(status: &Value) -> Bytes {
    line_of(&json!({"type": "ERROR", "object": status}))
}

/// A `Status` object (`kind: Status`, `status: Failure`).
pub fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        s["details"] = d;
    }
    s
}

/// The 410 `Status` the real server uses for compacted revisions (`errors.NewResourceExpired`).
pub fn expired_status(message: &str) -> Value {
    status(410, "Expired", message, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, label: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "default", "labels": {"app": label}}})
    }

    fn key(name: &str) -> Key {
        (0, "default".into(), name.into())
    }

    #[test]
    fn every_write_takes_the_next_global_revision_and_noop_updates_take_none() {
        let mut s = Store::default();
        assert_eq!(s.apply(svc("a", "x")), Ok(1));
        assert_eq!(s.apply(svc("b", "x")), Ok(2));
        assert_eq!(s.apply(svc("a", "x")), Ok(2), "identical apply is a no-op");
        assert_eq!(s.apply(svc("a", "y")), Ok(3));
        let a = s.get(&key("a")).expect("a");
        assert_eq!(a["metadata"]["resourceVersion"], "3");
        assert!(a["metadata"]["uid"].is_string());
        assert_eq!(s.delete(key("a")), Ok(4));
        assert!(s.get(&key("a")).is_none());
        assert!(matches!(
            s.delete(key("a")),
            Err(StoreError::NotFound { .. })
        ));
    }

    #[test]
    fn lists_are_snapshots_and_compaction_expires_them() {
        let mut s = Store::default();
        for n in ["a", "b", "c"] {
            s.apply(svc(n, "x")).expect("apply");
        }
        let f = Filter::default();
        let page = s.list(0, &f, ListAt::Latest, None, Some(2)).expect("list");
        assert_eq!((page.rv, page.items.len(), page.remaining), (3, 2, 1));
        s.delete(key("c")).expect("delete");
        s.apply(svc("d", "x")).expect("apply");
        // The second page still shows the revision-3 world.
        let next = page.next.expect("continue");
        let page2 = s
            .list(0, &f, ListAt::Exact(3), Some(&next), Some(2))
            .expect("page 2");
        assert_eq!(page2.items.len(), 1);
        assert_eq!(page2.items[0]["metadata"]["name"], "c");
        s.compact();
        assert!(matches!(
            s.list(0, &f, ListAt::Exact(3), Some(&next), Some(2)),
            Err(StoreError::Expired(_))
        ));
        let names: Vec<_> = s
            .list(0, &f, ListAt::Latest, None, None)
            .expect("list")
            .items
            .iter()
            .map(|o| o["metadata"]["name"].clone())
            .collect();
        assert_eq!(names, ["a", "b", "d"]);
    }

    #[test]
    fn selectors_follow_the_api_server_grammar() {
        let k = key("a");
        let o = svc("a", "web");
        let f = |fs: Option<&str>, ls: Option<&str>| Filter::parse(None, fs, ls).expect("parse");
        assert!(f(Some("metadata.name=a"), None).matches(&k, &o));
        assert!(!f(Some("metadata.name!=a"), None).matches(&k, &o));
        assert!(f(Some("metadata.namespace==default,metadata.name=a"), None).matches(&k, &o));
        assert!(f(None, Some("app in (web, db),!tier")).matches(&k, &o));
        assert!(!f(None, Some("app notin (web)")).matches(&k, &o));
        assert!(f(None, Some("app")).matches(&k, &o));
        assert!(Filter::parse(None, Some("spec.clusterIP=1.2.3.4"), None).is_err());
    }

    #[test]
    fn a_watch_sees_changes_leaving_its_selection_as_deletions() {
        let mut s = Store::default();
        s.apply(svc("a", "web")).expect("apply");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let filter = Filter::parse(None, None, Some("app=web")).expect("selector");
        let w = Watcher {
            resource: 0,
            filter,
            bookmarks: true,
            tx,
        };
        assert_eq!(s.watch(w, Some(0), false), Ok(true));
        s.apply(svc("a", "db")).expect("apply");
        s.apply(svc("b", "db")).expect("apply");
        s.send_bookmarks();
        let mut lines = Vec::new();
        while let Ok(WatchMsg::Line(l)) = rx.try_recv() {
            let v: Value = serde_json::from_slice(&l).expect("json");
            lines.push(format!(
                "{} {}",
                v["type"].as_str().unwrap_or_default(),
                v["object"]["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
            ));
        }
        assert_eq!(lines, ["ADDED 1", "DELETED 2", "BOOKMARK 3"]);
    }

    #[test]
    fn watching_from_before_compaction_is_a_410_error_event() {
        let mut s = Store::default();
        s.apply(svc("a", "web")).expect("apply");
        s.compact();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let w = Watcher {
            resource: 0,
            filter: Filter::default(),
            bookmarks: true,
            tx,
        };
        assert_eq!(s.watch(w, Some(1), false), Ok(false));
        let Ok(WatchMsg::Line(l)) = rx.try_recv() else {
            panic!("no error event")
        };
        let v: Value = serde_json::from_slice(&l).expect("json");
        assert_eq!(v["type"], "ERROR");
        assert_eq!(v["object"]["code"], 410);
        assert_eq!(v["object"]["reason"], "Expired");
    }

    #[test]
    fn creation_timestamps_are_rfc3339() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
