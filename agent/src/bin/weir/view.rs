//! What the commands show: the map contents joined with the agent's names, as rows for people (tables)
//! and for scripts (JSON). Pure functions of their inputs, so everything here is unit-tested without a
//! kernel.
use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context as _, bail};
use serde::{Serialize, Serializer};
use weir_agent::state::{AgentState, FrontendInfo};
use weir_common::{
    Backend, CT_FLAG_FIN, CT_FLAG_RST, CT_FLAG_SEEN, CT_FORWARD, CT_REVERSE, CtKey6, CtValue6,
    PROTO_TCP, PROTO_UDP, STAT_NAMES, SVC_FLAG_DROP, SVC_FLAG_REJECT, ServiceKey, ServiceValue,
};

use crate::table::Table;

/// `TCP`/`UDP` as Kubernetes spells them (and the agent's `/state`), else the IP protocol number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "TCP".to_owned(),
        PROTO_UDP => "UDP".to_owned(),
        other => format!("proto-{other}"),
    }
}

/// The inverse of [`proto_name`], case-insensitive, for command-line input.
pub fn proto_number(name: &str) -> Option<u8> {
    if name.eq_ignore_ascii_case("tcp") {
        Some(PROTO_TCP)
    } else if name.eq_ignore_ascii_case("udp") {
        Some(PROTO_UDP)
    } else {
        None
    }
}

/// An address and port stored in network order, as the datapath keeps them (IPv4 shown as IPv4).
pub fn endpoint(addr: &weir_common::Addr, port_be: u16) -> SocketAddr {
    SocketAddr::new(weir_common::ip_of(addr), u16::from_be(port_be))
}

fn dash(s: Option<&str>) -> String {
    match s {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => "-".to_owned(),
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// A frontend as the maps key it: address, port and IP protocol number.
type FrontendAddr = (IpAddr, u16, u8);

fn service_key_addr(key: &ServiceKey) -> FrontendAddr {
    let ep = endpoint(&key.addr_be, key.port_be);
    (ep.ip(), ep.port(), key.proto)
}

/// The agent's names for frontends, looked up by address. Empty when the agent did not answer.
#[derive(Debug, Default)]
pub struct Names {
    frontends: Vec<FrontendInfo>,
    by_addr: HashMap<FrontendAddr, usize>,
    available: bool,
}

impl Names {
    pub fn new(state: Option<&AgentState>) -> Self {
        let Some(state) = state else {
            return Self::default();
        };
        let mut by_addr = HashMap::new();
        for (i, f) in state.frontends.iter().enumerate() {
            // An entry we cannot key (an unknown protocol) only goes unnamed.
            let (Ok(ip), Some(proto)) = (f.ip.parse::<IpAddr>(), proto_number(&f.protocol)) else {
                continue;
            };
            by_addr.insert((ip, f.port, proto), i);
        }
        Self {
            frontends: state.frontends.clone(),
            by_addr,
            available: true,
        }
    }

    /// Whether names came from the agent at all (false: every name column is `-`).
    pub fn available(&self) -> bool {
        self.available
    }

    fn get(&self, addr: FrontendAddr) -> Option<&FrontendInfo> {
        self.by_addr.get(&addr).map(|&i| &self.frontends[i])
    }

    fn of_service<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a FrontendInfo> + 'a {
        self.frontends.iter().filter(move |f| f.service == service)
    }
}

/// One row of `weir service list`: a frontend as programmed in `WEIR_SERVICES`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrontendRow {
    /// `namespace/name`; `None` when the agent did not name it.
    pub service: Option<String>,
    pub port_name: Option<String>,
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// `ip:port/PROTO`.
    pub frontend: String,
    pub backend_count: u32,
    /// `None` when the frontend rejects or drops instead of balancing.
    pub table_base: Option<u32>,
    pub table_size: u32,
    /// No ready backend: TCP RST / ICMP port unreachable, like kube-proxy's REJECT.
    pub reject: bool,
    /// Traffic policy Local and no endpoint on this node: dropped silently, like kube-proxy.
    pub drop: bool,
}

impl FrontendRow {
    fn new(key: &ServiceKey, value: &ServiceValue, names: &Names) -> Self {
        let (ip, port, proto) = service_key_addr(key);
        let name = names.get((ip, port, proto));
        let reject = value.flags & SVC_FLAG_REJECT != 0;
        let drop = value.flags & SVC_FLAG_DROP != 0;
        let protocol = proto_name(proto);
        Self {
            service: name.map(|n| n.service.clone()),
            port_name: name.map(|n| n.port_name.clone()),
            frontend: format!("{ip}:{port}/{protocol}"),
            ip,
            port,
            protocol,
            backend_count: value.backend_count,
            table_base: (!reject && !drop).then_some(value.table_base),
            table_size: value.table_size,
            reject,
            drop,
        }
    }

    fn table_cell(&self) -> String {
        match self.table_base {
            Some(base) => format!("{base}/{}", self.table_size),
            None if self.drop => "drop".to_owned(),
            None => "reject".to_owned(),
        }
    }

    fn sort_key(&self) -> (bool, Option<String>, IpAddr, u16, String) {
        // Named frontends first, grouped by Service; unnamed ones after, by address.
        (
            self.service.is_none(),
            self.service.clone(),
            self.ip,
            self.port,
            self.protocol.clone(),
        )
    }
}

/// `weir service list`.
#[derive(Debug, Serialize)]
pub struct ServiceList {
    /// False when the agent's `/state` was not available and services are unnamed.
    pub names_from_agent: bool,
    pub frontends: Vec<FrontendRow>,
}

pub fn service_list(services: &[(ServiceKey, ServiceValue)], names: &Names) -> ServiceList {
    // A ClusterIP's "any other port" entry (port 0) is how the datapath refuses undefined ports; it is
    // not a frontend anybody dials, so it is not listed.
    let mut frontends: Vec<FrontendRow> = services
        .iter()
        .filter(|(k, _)| u16::from_be(k.port_be) != weir_agent::model::ANY_OTHER_PORT)
        .map(|(k, v)| FrontendRow::new(k, v, names))
        .collect();
    frontends.sort_by_key(FrontendRow::sort_key);
    ServiceList {
        names_from_agent: names.available(),
        frontends,
    }
}

impl ServiceList {
    pub fn render(&self) -> String {
        if self.frontends.is_empty() {
            return "no frontends programmed\n".to_owned();
        }
        let mut t = Table::new(&["SERVICE", "PORT NAME", "FRONTEND", "BACKENDS", "TABLE"]);
        for f in &self.frontends {
            t.row(vec![
                dash(f.service.as_deref()),
                dash(f.port_name.as_deref()),
                f.frontend.clone(),
                f.backend_count.to_string(),
                f.table_cell(),
            ]);
        }
        t.render()
    }
}

/// What `weir service get` was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// `namespace/name`: needs the agent's names.
    Service(String),
    /// `ip:port[/proto]`: works from the maps alone.
    Frontend { addr: SocketAddr, proto: Option<u8> },
}

impl Selector {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let s = s.trim();
        let (addr_part, proto_part) = match s.rsplit_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        if let Ok(addr) = addr_part.parse::<SocketAddr>() {
            let proto = match proto_part {
                None => None,
                Some(p) => Some(proto_number(p).with_context(|| {
                    format!("{s:?}: unknown protocol {p:?} (expected TCP or UDP)")
                })?),
            };
            return Ok(Self::Frontend { addr, proto });
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self::Service(s.to_owned()))
            }
            _ => bail!(
                "{s:?} is neither NAMESPACE/NAME nor a frontend IP:PORT[/PROTO] (e.g. default/echo or \
                 10.96.0.10:80/TCP)"
            ),
        }
    }

    fn matches(&self, addr: FrontendAddr) -> bool {
        match self {
            Self::Service(_) => false,
            Self::Frontend { addr: a, proto } => {
                a.ip() == addr.0 && a.port() == addr.1 && proto.is_none_or(|p| p == addr.2)
            }
        }
    }
}

/// One backend of a frontend's Maglev table, with its share of the slots.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendShare {
    pub id: u32,
    /// `ip:port`; `None` when the id is missing from `WEIR_BACKENDS` (the datapath drops such flows).
    pub address: Option<String>,
    pub slots: u64,
    /// Percent of the table's slots.
    pub share_percent: f64,
}

/// One frontend of `weir service get`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrontendDetail {
    #[serde(flatten)]
    pub frontend: FrontendRow,
    /// False for a frontend the agent names but that is not in `WEIR_SERVICES` (yet, or its write failed).
    pub programmed: bool,
    /// Slots actually read from the table (its array length).
    pub slots_read: u64,
    pub backends: Vec<BackendShare>,
    /// Why the table could not be read, if it could not.
    pub error: Option<String>,
}

/// `weir service get`.
#[derive(Debug, Serialize)]
pub struct ServiceDetail {
    pub selector: String,
    pub names_from_agent: bool,
    pub frontends: Vec<FrontendDetail>,
}

/// Counts the slots per backend id; in id order.
pub fn slot_shares(slots: &[u32], backends: &BTreeMap<u32, Backend>) -> Vec<BackendShare> {
    let mut counts: BTreeMap<u32, u64> = BTreeMap::new();
    for id in slots {
        *counts.entry(*id).or_default() += 1;
    }
    let total = slots.len() as u64;
    counts
        .into_iter()
        .map(|(id, n)| BackendShare {
            id,
            address: backends
                .get(&id)
                .map(|b| endpoint(&b.addr_be, b.port_be).to_string()),
            slots: n,
            share_percent: percent(n, total),
        })
        .collect()
}

/// Builds `weir service get`. `read_table` reads one Maglev table (slot → backend id) by base chunk and size; its
/// failure is reported on that frontend, not for the whole command.
pub fn service_get(
    selector: &Selector,
    selector_text: &str,
    services: &[(ServiceKey, ServiceValue)],
    backends: &BTreeMap<u32, Backend>,
    names: &Names,
    mut read_table: impl FnMut(u32, u32) -> anyhow::Result<Vec<u32>>,
) -> anyhow::Result<ServiceDetail> {
    let programmed: HashMap<FrontendAddr, (&ServiceKey, &ServiceValue)> = services
        .iter()
        .map(|(k, v)| (service_key_addr(k), (k, v)))
        .collect();
    let mut wanted: Vec<FrontendAddr> = match selector {
        Selector::Service(service) => {
            if !names.available() {
                bail!(
                    "cannot find Service {service} without the agent's names (see the warning above); \
                     ask for a frontend instead, e.g. `weir service get 10.96.0.10:80/TCP`"
                );
            }
            let mut addrs = Vec::new();
            for f in names
                .of_service(service)
                .filter(|f| f.port != weir_agent::model::ANY_OTHER_PORT)
            {
                match (f.ip.parse::<IpAddr>(), proto_number(&f.protocol)) {
                    (Ok(ip), Some(proto)) => addrs.push((ip, f.port, proto)),
                    _ => continue,
                }
            }
            if addrs.is_empty() {
                bail!("the agent serves no frontend of Service {service}");
            }
            addrs
        }
        Selector::Frontend { .. } => {
            let addrs: Vec<FrontendAddr> = programmed
                .keys()
                .copied()
                .filter(|a| selector.matches(*a))
                .collect();
            if addrs.is_empty() {
                bail!("no frontend {selector_text} in WEIR_SERVICES");
            }
            addrs
        }
    };
    wanted.sort();
    wanted.dedup();

    let mut frontends = Vec::new();
    for addr in wanted {
        let Some((key, value)) = programmed.get(&addr) else {
            // Named by the agent but absent from the map: show it, flagged, rather than hide it.
            let (ip, port, proto) = addr;
            let name = names.get(addr);
            let protocol = proto_name(proto);
            frontends.push(FrontendDetail {
                frontend: FrontendRow {
                    service: name.map(|n| n.service.clone()),
                    port_name: name.map(|n| n.port_name.clone()),
                    frontend: format!("{ip}:{port}/{protocol}"),
                    ip,
                    port,
                    protocol,
                    backend_count: 0,
                    table_base: None,
                    table_size: 0,
                    reject: false,
                    drop: false,
                },
                programmed: false,
                slots_read: 0,
                backends: Vec::new(),
                error: Some("not in WEIR_SERVICES".to_owned()),
            });
            continue;
        };
        let row = FrontendRow::new(key, value, names);
        let (shares, slots_read, error) = match row.table_base {
            None => (Vec::new(), 0, None),
            Some(base) => match read_table(base, row.table_size) {
                Ok(slots) => (slot_shares(&slots, backends), slots.len() as u64, None),
                Err(e) => (Vec::new(), 0, Some(format!("{e:#}"))),
            },
        };
        frontends.push(FrontendDetail {
            frontend: row,
            programmed: true,
            slots_read,
            backends: shares,
            error,
        });
    }
    frontends.sort_by_key(|f| f.frontend.sort_key());
    Ok(ServiceDetail {
        selector: selector_text.to_owned(),
        names_from_agent: names.available(),
        frontends,
    })
}

impl ServiceDetail {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (i, f) in self.frontends.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let r = &f.frontend;
            let name = match (&r.service, &r.port_name) {
                (Some(s), Some(p)) if !p.is_empty() => format!("{s}, port {p}"),
                (Some(s), _) => s.clone(),
                _ => "unnamed".to_owned(),
            };
            let state = if !f.programmed {
                "not programmed".to_owned()
            } else if r.reject {
                "rejects: no ready backend".to_owned()
            } else if r.drop {
                "drops: no endpoint on this node (traffic policy Local)".to_owned()
            } else {
                format!(
                    "table at chunk {}, {} slots, {} backends",
                    r.table_base.unwrap_or_default(),
                    r.table_size,
                    r.backend_count
                )
            };
            let _ = writeln!(out, "{} ({name}): {state}", r.frontend);
            if let Some(e) = &f.error {
                let _ = writeln!(out, "  error: {e}");
            }
            if !f.backends.is_empty() {
                let mut t = Table::new(&["BACKEND ID", "ADDRESS", "SLOTS", "SHARE"]);
                for b in &f.backends {
                    t.row(vec![
                        b.id.to_string(),
                        b.address
                            .clone()
                            .unwrap_or_else(|| "? (not in WEIR_BACKENDS)".to_owned()),
                        b.slots.to_string(),
                        format!("{:.1}%", b.share_percent),
                    ]);
                }
                for line in t.render().lines() {
                    let _ = writeln!(out, "  {line}");
                }
            }
        }
        out
    }
}

/// One conntrack entry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CtRow {
    /// `forward` (client → frontend, rewritten to the backend) or `reverse` (backend → client, rewritten
    /// from the frontend).
    pub direction: String,
    pub protocol: String,
    /// Source of the flow as on the wire, `ip:port`.
    pub src: String,
    /// Destination as on the wire.
    pub dst: String,
    /// The address written into the packet: the backend for forward entries, the frontend for reverse ones.
    pub nat: String,
    pub backend_id: u32,
    /// Seconds since the last packet in this entry's direction.
    pub idle_seconds: u32,
    /// What the datapath saw this way: `seen` (a packet after the first; on a reverse entry, the
    /// backend answered), `fin`, `rst`. The garbage collector's timeouts follow from them.
    pub flags: Vec<&'static str>,
    /// The Service of the frontend involved, when the agent names it.
    pub service: Option<String>,
}

/// `weir conntrack list`.
#[derive(Debug, Serialize)]
pub struct CtList {
    pub names_from_agent: bool,
    /// Entries in the map (counted while reading; an LRU map changes under the reader).
    pub total: u64,
    pub shown: usize,
    pub truncated: bool,
    pub entries: Vec<CtRow>,
}

/// Builds the conntrack listing: each flow's forward entry next to its reply's reverse entry.
pub fn conntrack_list(
    entries: &[(CtKey6, CtValue6)],
    total: u64,
    names: &Names,
    now_s: u32,
) -> CtList {
    let mut sorted: Vec<&(CtKey6, CtValue6)> = entries.iter().collect();
    // Order by the client end (source of a forward entry, destination of a reverse one), so a flow's two
    // entries sit together.
    sorted.sort_by_key(|(k, v)| {
        let (client_addr, client_port) = if v.kind == CT_REVERSE {
            (k.daddr_be, k.dport_be)
        } else {
            (k.saddr_be, k.sport_be)
        };
        (
            k.proto,
            weir_common::ip_of(&client_addr),
            u16::from_be(client_port),
            v.kind,
            weir_common::ip_of(&k.saddr_be),
            u16::from_be(k.sport_be),
        )
    });
    let rows: Vec<CtRow> = sorted
        .into_iter()
        .map(|(k, v)| {
            let src = endpoint(&k.saddr_be, k.sport_be);
            let dst = endpoint(&k.daddr_be, k.dport_be);
            let nat = endpoint(&v.nat_addr_be, v.nat_port_be);
            let (direction, frontend) = match v.kind {
                CT_FORWARD => ("forward".to_owned(), Some(dst)),
                CT_REVERSE => ("reverse".to_owned(), Some(nat)),
                other => (format!("kind-{other}"), None),
            };
            let service = frontend
                .and_then(|f| names.get((f.ip(), f.port(), k.proto)))
                .map(|n| n.service.clone());
            CtRow {
                direction,
                protocol: proto_name(k.proto),
                src: src.to_string(),
                dst: dst.to_string(),
                nat: nat.to_string(),
                backend_id: v.backend_id,
                idle_seconds: now_s.saturating_sub(v.seen_s),
                flags: [
                    (CT_FLAG_SEEN, "seen"),
                    (CT_FLAG_FIN, "fin"),
                    (CT_FLAG_RST, "rst"),
                ]
                .into_iter()
                .filter(|(bit, _)| v.flags & bit != 0)
                .map(|(_, name)| name)
                .collect(),
                service,
            }
        })
        .collect();
    CtList {
        names_from_agent: names.available(),
        total: total.max(rows.len() as u64),
        shown: rows.len(),
        truncated: total > rows.len() as u64,
        entries: rows,
    }
}

impl CtList {
    pub fn render(&self) -> String {
        if self.entries.is_empty() {
            return "no conntrack entries\n".to_owned();
        }
        let mut t = Table::new(&[
            "DIRECTION",
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "NAT",
            "BACKEND ID",
            "IDLE",
            "FLAGS",
            "SERVICE",
        ]);
        for e in &self.entries {
            t.row(vec![
                e.direction.clone(),
                e.protocol.clone(),
                e.src.clone(),
                e.dst.clone(),
                e.nat.clone(),
                e.backend_id.to_string(),
                format!("{}s", e.idle_seconds),
                if e.flags.is_empty() {
                    "-".to_owned()
                } else {
                    e.flags.join(",")
                },
                dash(e.service.as_deref()),
            ]);
        }
        t.render()
    }

    /// The note printed on stderr when the listing was cut by `--limit`.
    pub fn truncation_note(&self) -> Option<String> {
        self.truncated.then(|| {
            format!(
                "showing {} of about {} entries (--limit); raise --limit, or 0 for all",
                self.shown, self.total
            )
        })
    }
}

/// Counters in index order, serialized as a JSON object (`{"forward_new": 12, ...}`) so scripts can
/// address them by name, while the order stays the datapath's.
#[derive(Debug, PartialEq)]
pub struct Counters(pub Vec<(String, u64)>);

impl Serialize for Counters {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// Names the per-index counters. The map has spare slots for counters added later: a slot past the
/// names this binary knows shows as `stat_<index>` when it counted something (a newer datapath's
/// counter), and not at all while it is zero.
pub fn counters(values: &[u64]) -> Counters {
    Counters(
        values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match STAT_NAMES.get(i) {
                Some(name) => Some(((*name).to_owned(), *v)),
                None => (*v != 0).then(|| (format!("stat_{i}"), *v)),
            })
            .collect(),
    )
}

/// How full one pinned map is.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MapFill {
    pub name: String,
    /// Kernel map type (`hash`, `lru_hash`, `hash_of_maps`, `percpu_array`).
    pub kind: String,
    pub entries: u64,
    pub max_entries: u32,
    /// `None` for arrays, which are always full by construction: 100 % there is no alarm.
    pub fill_percent: Option<f64>,
}

impl MapFill {
    pub fn new(name: &str, kind: &str, entries: u64, max_entries: u32) -> Self {
        Self {
            name: name.to_owned(),
            kind: kind.to_owned(),
            entries,
            max_entries,
            fill_percent: percent(entries, u64::from(max_entries)).into(),
        }
    }

    /// An array: `max_entries` elements that always exist.
    pub fn array(name: &str, kind: &str, max_entries: u32) -> Self {
        Self {
            fill_percent: None,
            ..Self::new(name, kind, u64::from(max_entries), max_entries)
        }
    }
}

/// `weir stats`.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// Packets by datapath outcome, summed over CPUs.
    pub counters: Counters,
    pub maps: Vec<MapFill>,
}

impl Stats {
    pub fn render(&self) -> String {
        let mut t = Table::new(&["COUNTER", "PACKETS"]);
        for (name, v) in &self.counters.0 {
            t.row(vec![name.clone(), v.to_string()]);
        }
        let mut m = Table::new(&["MAP", "TYPE", "ENTRIES", "MAX", "FILL"]);
        for f in &self.maps {
            m.row(vec![
                f.name.clone(),
                f.kind.clone(),
                f.entries.to_string(),
                f.max_entries.to_string(),
                f.fill_percent
                    .map_or_else(|| "-".to_owned(), |p| format!("{p:.1}%")),
            ]);
        }
        format!("{}\n{}", t.render(), m.render())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All-zero value of a map type. The `weir_common` types are `Pod` (integers only), so zero is a
    /// valid value; starting from it rather than a struct literal keeps these tests compiling when the
    /// ABI grows a field.
    fn zeroed<T: aya::Pod>() -> T {
        // SAFETY: `T: Pod`: plain integers and explicit padding, for which all-zero bytes are valid.
        unsafe { std::mem::zeroed() }
    }

    fn be(ip: [u8; 4]) -> weir_common::Addr {
        weir_common::addr_of(std::net::Ipv4Addr::from(ip).into())
    }

    fn key(ip: [u8; 4], port: u16, proto: u8) -> ServiceKey {
        let mut k: ServiceKey = zeroed();
        (k.addr_be, k.port_be, k.proto) = (be(ip), port.to_be(), proto);
        k
    }

    fn value(table_base: u32, table_size: u32, backend_count: u32, flags: u32) -> ServiceValue {
        let mut v: ServiceValue = zeroed();
        (v.table_base, v.table_size, v.backend_count, v.flags) =
            (table_base, table_size, backend_count, flags);
        v
    }

    fn backend(ip: [u8; 4], port: u16) -> Backend {
        let mut b: Backend = zeroed();
        (b.addr_be, b.port_be, b.proto) = (be(ip), port.to_be(), PROTO_TCP);
        b
    }

    /// The agent's state as it serves it (JSON), so a field added to it does not break these tests.
    fn state_of(frontends: &[(&str, &str, &str, u16, &str)]) -> AgentState {
        let frontends: Vec<serde_json::Value> = frontends
            .iter()
            .map(|(service, port_name, ip, port, protocol)| {
                serde_json::json!({
                    "service": service, "port_name": port_name, "ip": ip, "port": port,
                    "protocol": protocol, "backends": [], "table_base": null, "table_size": 0,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "node_name": "node-1", "bpffs_dir": "/sys/fs/bpf/weir", "synced": true,
            "frontends": frontends,
        }))
        .expect("AgentState from JSON")
    }

    fn state() -> AgentState {
        state_of(&[
            ("default/echo", "tcp", "10.96.0.10", 80, "TCP"),
            ("default/echo", "udp", "10.96.0.10", 53, "UDP"),
            ("default/empty", "", "10.96.0.20", 80, "TCP"),
            // Named by the agent but not (yet) in the map.
            ("default/echo", "http", "10.96.0.10", 8000, "TCP"),
        ])
    }

    fn services() -> Vec<(ServiceKey, ServiceValue)> {
        vec![
            (
                key([10, 96, 0, 20], 80, PROTO_TCP),
                value(0, 0, 0, SVC_FLAG_REJECT),
            ),
            (key([10, 96, 0, 10], 53, PROTO_UDP), value(2, 7, 2, 0)),
            (key([10, 96, 0, 10], 80, PROTO_TCP), value(1, 7, 2, 0)),
            (key([10, 96, 0, 99], 443, PROTO_TCP), value(3, 7, 1, 0)),
        ]
    }

    #[test]
    fn service_list_joins_names_by_address_and_sorts_unnamed_last() {
        let st = state();
        let list = service_list(&services(), &Names::new(Some(&st)));
        assert!(list.names_from_agent);
        let cells: Vec<(Option<&str>, &str, String)> = list
            .frontends
            .iter()
            .map(|f| (f.service.as_deref(), f.frontend.as_str(), f.table_cell()))
            .collect();
        assert_eq!(
            cells,
            vec![
                (Some("default/echo"), "10.96.0.10:53/UDP", "2/7".to_owned()),
                (Some("default/echo"), "10.96.0.10:80/TCP", "1/7".to_owned()),
                (
                    Some("default/empty"),
                    "10.96.0.20:80/TCP",
                    "reject".to_owned()
                ),
                (None, "10.96.0.99:443/TCP", "3/7".to_owned()),
            ]
        );
        assert_eq!(
            list.render(),
            "SERVICE         PORT NAME   FRONTEND             BACKENDS   TABLE\n\
             default/echo    udp         10.96.0.10:53/UDP    2          2/7\n\
             default/echo    tcp         10.96.0.10:80/TCP    2          1/7\n\
             default/empty   -           10.96.0.20:80/TCP    0          reject\n\
             -               -           10.96.0.99:443/TCP   1          3/7\n"
        );
    }

    #[test]
    fn service_list_without_the_agent_shows_addresses_only() {
        let list = service_list(&services(), &Names::new(None));
        assert!(!list.names_from_agent);
        assert!(list.frontends.iter().all(|f| f.service.is_none()));
        assert_eq!(list.frontends[0].frontend, "10.96.0.10:53/UDP");
        let json = serde_json::to_value(&list).unwrap();
        assert_eq!(json["frontends"][0]["service"], serde_json::Value::Null);
        assert_eq!(json["frontends"][0]["ip"], "10.96.0.10");
        assert_eq!(json["frontends"][2]["frontend"], "10.96.0.20:80/TCP");
        assert_eq!(json["frontends"][2]["reject"], true);
        assert_eq!(json["frontends"][2]["table_base"], serde_json::Value::Null);
    }

    #[test]
    fn a_frontend_that_drops_has_no_table() {
        let services = [(
            key([192, 168, 1, 5], 30080, PROTO_TCP),
            value(4, 7, 0, SVC_FLAG_DROP),
        )];
        let list = service_list(&services, &Names::new(None));
        let row = &list.frontends[0];
        assert!(
            row.drop && !row.reject && row.table_base.is_none(),
            "{row:?}"
        );
        assert!(
            list.render()
                .contains("192.168.1.5:30080/TCP   0          drop\n")
        );
        let detail = service_get(
            &Selector::parse("192.168.1.5:30080/TCP").unwrap(),
            "192.168.1.5:30080/TCP",
            &services,
            &BTreeMap::new(),
            &Names::new(None),
            |_, _| panic!("a dropping frontend has no table to read"),
        )
        .unwrap();
        assert!(detail.render().contains("drops: no endpoint on this node"));
    }

    #[test]
    fn the_same_port_with_another_protocol_is_another_frontend() {
        let st = state_of(&[
            ("default/dns", "dns-tcp", "10.96.0.53", 53, "TCP"),
            ("default/dns", "dns", "10.96.0.53", 53, "UDP"),
        ]);
        let list = service_list(
            &[
                (key([10, 96, 0, 53], 53, PROTO_UDP), value(1, 7, 1, 0)),
                (key([10, 96, 0, 53], 53, PROTO_TCP), value(2, 7, 1, 0)),
            ],
            &Names::new(Some(&st)),
        );
        let ports: Vec<_> = list
            .frontends
            .iter()
            .map(|f| (f.port_name.as_deref(), f.protocol.as_str()))
            .collect();
        assert_eq!(ports, vec![(Some("dns-tcp"), "TCP"), (Some("dns"), "UDP")]);
    }

    #[test]
    fn selectors_parse_names_and_frontends() {
        assert_eq!(
            Selector::parse("default/echo").unwrap(),
            Selector::Service("default/echo".into())
        );
        assert_eq!(
            Selector::parse("10.96.0.10:80/tcp").unwrap(),
            Selector::Frontend {
                addr: "10.96.0.10:80".parse().unwrap(),
                proto: Some(PROTO_TCP)
            }
        );
        assert_eq!(
            Selector::parse("10.96.0.10:53").unwrap(),
            Selector::Frontend {
                addr: "10.96.0.10:53".parse().unwrap(),
                proto: None
            }
        );
        for bad in [
            "echo",
            "/echo",
            "default/",
            "a/b/c",
            "10.96.0.10:80/sctp",
            "",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn slot_shares_count_each_backend_and_sum_to_the_whole_table() {
        let backends = BTreeMap::from([
            (1, backend([10, 0, 0, 10], 8080)),
            (2, backend([10, 0, 0, 11], 8080)),
        ]);
        // Id 9 is not in the backend map: shown, not dropped.
        let slots = [1, 2, 1, 2, 1, 9, 2];
        let shares = slot_shares(&slots, &backends);
        assert_eq!(
            shares.iter().map(|s| (s.id, s.slots)).collect::<Vec<_>>(),
            vec![(1, 3), (2, 3), (9, 1)]
        );
        assert_eq!(shares[0].address.as_deref(), Some("10.0.0.10:8080"));
        assert_eq!(shares[2].address, None);
        let sum: f64 = shares.iter().map(|s| s.share_percent).sum();
        assert!((sum - 100.0).abs() < 1e-9, "{sum}");
        assert!(slot_shares(&[], &backends).is_empty());
    }

    #[test]
    fn service_get_by_name_reads_each_frontends_table() {
        let st = state();
        let names = Names::new(Some(&st));
        let backends = BTreeMap::from([
            (1, backend([10, 0, 0, 10], 8080)),
            (2, backend([10, 0, 0, 11], 8080)),
        ]);
        let mut asked = Vec::new();
        let detail = service_get(
            &Selector::Service("default/echo".into()),
            "default/echo",
            &services(),
            &backends,
            &names,
            |id, _| {
                asked.push(id);
                if id == 2 {
                    bail!("table 2 vanished");
                }
                Ok(vec![1, 2, 1, 2, 1, 2, 1])
            },
        )
        .unwrap();
        asked.sort();
        assert_eq!(asked, vec![1, 2]);
        let frontends: Vec<(&str, bool, usize, Option<&str>)> = detail
            .frontends
            .iter()
            .map(|f| {
                (
                    f.frontend.frontend.as_str(),
                    f.programmed,
                    f.backends.len(),
                    f.error.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            frontends,
            vec![
                ("10.96.0.10:53/UDP", true, 0, Some("table 2 vanished")),
                ("10.96.0.10:80/TCP", true, 2, None),
                (
                    "10.96.0.10:8000/TCP",
                    false,
                    0,
                    Some("not in WEIR_SERVICES")
                ),
            ]
        );
        let text = detail.render();
        assert!(
            text.contains(
                "10.96.0.10:80/TCP (default/echo, port tcp): table at chunk 1, 7 slots, 2 backends"
            ),
            "{text}"
        );
        assert!(
            text.contains("  1            10.0.0.10:8080   4       57.1%"),
            "{text}"
        );
        assert!(text.contains("error: table 2 vanished"), "{text}");
    }

    #[test]
    fn service_get_by_frontend_works_without_the_agent() {
        let names = Names::new(None);
        let detail = service_get(
            &Selector::parse("10.96.0.20:80").unwrap(),
            "10.96.0.20:80",
            &services(),
            &BTreeMap::new(),
            &names,
            |_, _| panic!("a rejecting frontend has no table to read"),
        )
        .unwrap();
        assert_eq!(detail.frontends.len(), 1);
        assert!(detail.frontends[0].frontend.reject);
        assert!(detail.render().contains("rejects: no ready backend"));

        let err = service_get(
            &Selector::Service("default/echo".into()),
            "default/echo",
            &services(),
            &BTreeMap::new(),
            &names,
            |_, _| Ok(Vec::new()),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("without the agent's names"),
            "{err}"
        );
        let err = service_get(
            &Selector::parse("10.1.1.1:1").unwrap(),
            "10.1.1.1:1",
            &services(),
            &BTreeMap::new(),
            &names,
            |_, _| Ok(Vec::new()),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "no frontend 10.1.1.1:1 in WEIR_SERVICES");
    }

    fn ct(
        src: ([u8; 4], u16),
        dst: ([u8; 4], u16),
        nat: ([u8; 4], u16),
        kind: u8,
    ) -> (CtKey6, CtValue6) {
        let mut k: CtKey6 = zeroed();
        (k.saddr_be, k.daddr_be, k.sport_be, k.dport_be, k.proto) = (
            be(src.0),
            be(dst.0),
            src.1.to_be(),
            dst.1.to_be(),
            PROTO_TCP,
        );
        let mut v: CtValue6 = zeroed();
        (v.nat_addr_be, v.nat_port_be, v.kind, v.backend_id) = (be(nat.0), nat.1.to_be(), kind, 2);
        (v.seen_s, v.flags) = (100, CT_FLAG_SEEN);
        (k, v)
    }

    #[test]
    fn conntrack_pairs_each_flow_and_names_its_service() {
        let client = [10, 0, 0, 20];
        let vip = ([10, 96, 0, 10], 80);
        let backend = ([10, 0, 0, 11], 8080);
        let entries = vec![
            ct(backend, (client, 40001), vip, CT_REVERSE),
            ct((client, 40002), vip, backend, CT_FORWARD),
            ct((client, 40001), vip, backend, CT_FORWARD),
            ct(backend, (client, 40002), vip, CT_REVERSE),
        ];
        let st = state();
        let list = conntrack_list(&entries, 4, &Names::new(Some(&st)), 107);
        assert!(!list.truncated);
        let rows: Vec<(&str, &str, &str)> = list
            .entries
            .iter()
            .map(|e| (e.direction.as_str(), e.src.as_str(), e.dst.as_str()))
            .collect();
        assert_eq!(
            rows,
            vec![
                ("forward", "10.0.0.20:40001", "10.96.0.10:80"),
                ("reverse", "10.0.0.11:8080", "10.0.0.20:40001"),
                ("forward", "10.0.0.20:40002", "10.96.0.10:80"),
                ("reverse", "10.0.0.11:8080", "10.0.0.20:40002"),
            ]
        );
        assert!(
            list.entries
                .iter()
                .all(|e| e.service.as_deref() == Some("default/echo"))
        );
        assert_eq!(list.entries[0].nat, "10.0.0.11:8080");
        assert_eq!(list.entries[1].nat, "10.96.0.10:80");
        let text = list.render();
        assert!(text.starts_with("DIRECTION   PROTO   SOURCE"), "{text}");
        assert!(
            text.contains("forward     TCP     10.0.0.20:40001   10.96.0.10:80     10.0.0.11:8080   2            7s     seen    default/echo"),
            "{text}"
        );
        assert_eq!(list.truncation_note(), None);
    }

    #[test]
    fn a_truncated_conntrack_listing_says_so() {
        let entries = vec![ct(
            ([10, 0, 0, 20], 1),
            ([10, 96, 0, 10], 80),
            ([10, 0, 0, 11], 8080),
            CT_FORWARD,
        )];
        let list = conntrack_list(&entries, 7, &Names::new(None), 0);
        assert!(list.truncated);
        assert_eq!(list.shown, 1);
        assert_eq!(list.entries[0].service, None);
        assert!(
            list.truncation_note()
                .unwrap()
                .starts_with("showing 1 of about 7 entries")
        );
        assert_eq!(
            conntrack_list(&[], 0, &Names::new(None), 0).render(),
            "no conntrack entries\n"
        );
    }

    #[test]
    fn counters_are_named_in_index_order_and_serialize_as_an_object() {
        let known = STAT_NAMES.len();
        let mut values = vec![0u64; known + 5];
        values[0] = 5;
        values[known + 2] = 1;
        let c = counters(&values);
        assert_eq!(c.0[0], ("forward_new".to_owned(), 5));
        // Every named counter, zero or not; of the spare slots only the one that counted.
        assert_eq!(c.0.len(), known + 1);
        assert_eq!(c.0[known], (format!("stat_{}", known + 2), 1));
        let stats = Stats {
            counters: c,
            maps: vec![MapFill::new("WEIR_SERVICES", "hash", 3, 65_536)],
        };
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["counters"]["forward_new"], 5);
        assert_eq!(json["maps"][0]["entries"], 3);
        let text = stats.render();
        // Column widths follow the longest counter name, which grows with the datapath: compare words.
        let has_line = |words: &[&str]| {
            text.lines()
                .any(|l| l.split_whitespace().eq(words.iter().copied()))
        };
        assert!(has_line(&["forward_new", "5"]), "{text}");
        assert!(
            has_line(&["WEIR_SERVICES", "hash", "3", "65536", "0.0%"]),
            "{text}"
        );
        assert_eq!(MapFill::new("x", "hash", 0, 0).fill_percent, Some(0.0));
        let array = MapFill::array("WEIR_STATS", "percpu_array", 10);
        assert_eq!((array.entries, array.fill_percent), (10, None));
    }
}
