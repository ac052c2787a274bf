//! Conntrack timeouts. The datapath stamps each entry with the time of the last packet in its direction
//! and the TCP FIN/RST it saw (`CtValue::seen_s`, `CtValue::flags`); this collector walks both
//! conntrack maps every `--conntrack-gc-interval` and deletes flows idle longer than their state allows,
//! as the kernel's conntrack does for kube-proxy. Without it entries would leave only by LRU eviction:
//! a full map then evicts live flows, and stale reply keys keep SNAT ports taken.
//!
//! A flow is two entries, forward (client → frontend) and reverse (backend → client or SNAT address),
//! judged together: its last activity is the later of the two, its state comes from both (the reverse
//! entry having seen a packet means the backend answered), and both go at once.
use std::{
    hash::Hash,
    path::Path,
    time::{Duration, Instant},
};

use aya::{
    Pod,
    maps::{HashMap, MapData, MapError},
};
use thiserror::Error;
use weir_common::{
    CT_FLAG_FIN, CT_FLAG_RST, CT_FLAG_SEEN, CT_FORWARD, CT_REVERSE, CtKey, CtKey6, CtValue,
    CtValue6, MAP_CONNTRACK, MAP_CONNTRACK6, PROTO_TCP,
};

/// Idle times, in seconds, after which a flow is forgotten (kube-proxy's and the kernel's names and
/// defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP whose backend never answered (nf_conntrack_tcp_timeout_syn_sent).
    pub tcp_syn: u32,
    /// TCP answered and open both ways (kube-proxy's --conntrack-tcp-timeout-established).
    pub tcp_established: u32,
    /// TCP closed one way only (kube-proxy's --conntrack-tcp-timeout-close-wait).
    pub tcp_close_wait: u32,
    /// TCP closed both ways (nf_conntrack_tcp_timeout_time_wait).
    pub tcp_time_wait: u32,
    /// TCP reset (nf_conntrack_tcp_timeout_close).
    pub tcp_close: u32,
    /// UDP whose backend never answered (kube-proxy's --conntrack-udp-timeout, the kernel's 30 s).
    pub udp: u32,
    /// UDP answered (kube-proxy's --conntrack-udp-timeout-stream, the kernel's 120 s).
    pub udp_stream: u32,
}

impl Timeouts {
    /// kube-proxy's and the kernel's defaults.
    pub const KUBE_PROXY: Self = Self {
        tcp_syn: 120,
        tcp_established: 86_400,
        tcp_close_wait: 3_600,
        tcp_time_wait: 120,
        tcp_close: 10,
        udp: 30,
        udp_stream: 120,
    };
}

impl Default for Timeouts {
    fn default() -> Self {
        Self::KUBE_PROXY
    }
}

/// What one entry says about its direction of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Side {
    pub seen_s: u32,
    pub flags: u8,
}

impl Timeouts {
    /// How long the flow may stay idle, from what its two entries saw (either may be gone, evicted).
    pub fn idle_limit(&self, proto: u8, forward: Option<Side>, reverse: Option<Side>) -> u32 {
        let flags = |s: Option<Side>| s.map_or(0, |s| s.flags);
        let (fwd, rev) = (flags(forward), flags(reverse));
        let answered = rev & CT_FLAG_SEEN != 0;
        if proto != PROTO_TCP {
            return if answered { self.udp_stream } else { self.udp };
        }
        if (fwd | rev) & CT_FLAG_RST != 0 {
            self.tcp_close
        } else if fwd & rev & CT_FLAG_FIN != 0 {
            self.tcp_time_wait
        } else if !answered {
            self.tcp_syn
        } else if (fwd | rev) & CT_FLAG_FIN != 0 {
            self.tcp_close_wait
        } else {
            self.tcp_established
        }
    }

    /// Whether the flow has been idle longer than its state allows at `now_s`.
    pub fn expired(
        &self,
        now_s: u32,
        proto: u8,
        forward: Option<Side>,
        reverse: Option<Side>,
    ) -> bool {
        let last = forward
            .into_iter()
            .chain(reverse)
            .map(|s| s.seen_s)
            .max()
            .unwrap_or(0);
        now_s.saturating_sub(last) > self.idle_limit(proto, forward, reverse)
    }
}

/// Seconds of CLOCK_MONOTONIC, the datapath's clock (`bpf_ktime_get_coarse_ns`).
pub fn monotonic_now_s() -> u32 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| u32::try_from(t.tv_sec()).unwrap_or(u32::MAX))
}

#[derive(Debug, Error)]
pub enum GcError {
    #[error("opening pinned map {name}: {source}")]
    Open {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("deleting from {name}: {source}")]
    Delete {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// One walk over both maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Entries looked at (an LRU map changes under the walk, so this is approximate).
    pub scanned: u64,
    pub deleted: u64,
}

/// One family's conntrack entry layout, as the collector needs it.
trait Entry: Pod {
    type Key: Pod + Eq + Hash;
    const MAP: &'static str;
    fn kind(&self) -> u8;
    fn side(&self) -> Side;
    /// The entry with its time set to `now_s`.
    fn stamped(self, now_s: u32) -> Self;
    /// The key of the other entry of the same flow.
    fn partner(&self, key: &Self::Key) -> Self::Key;
    fn proto(key: &Self::Key) -> u8;
}

/// The other entry's key: a forward entry (client → frontend, rewritten to the backend, and with a
/// peer, from the SNAT/hairpin address) pairs with the reverse entry of the backend's replies, and
/// back. `addr_none` is the family's "no peer" address.
fn partner_ends<A: Copy + PartialEq>(
    kind: u8,
    (saddr, sport, daddr, dport): (A, u16, A, u16),
    (nat, nat_port, peer, peer_port): (A, u16, A, u16),
    addr_none: A,
) -> (A, u16, A, u16) {
    let has_peer = peer != addr_none;
    if kind == CT_FORWARD {
        // Replies come from the backend, to the peer (SNAT, hairpin) or else to the client.
        if has_peer {
            (nat, nat_port, peer, peer_port)
        } else {
            (nat, nat_port, saddr, sport)
        }
    } else {
        // The request went from the client (the peer, or else where the reply goes) to the frontend.
        if has_peer {
            (peer, peer_port, nat, nat_port)
        } else {
            (daddr, dport, nat, nat_port)
        }
    }
}

/// The two families' entries have the same fields, of different address types.
macro_rules! conntrack_entry {
    ($value:ty, $key:ident, $map:expr, $none:expr) => {
        impl Entry for $value {
            type Key = $key;
            const MAP: &'static str = $map;
            fn kind(&self) -> u8 {
                self.kind
            }
            fn side(&self) -> Side {
                Side {
                    seen_s: self.seen_s,
                    flags: self.flags,
                }
            }
            fn stamped(self, seen_s: u32) -> Self {
                Self { seen_s, ..self }
            }
            fn partner(&self, k: &$key) -> $key {
                let (saddr_be, sport_be, daddr_be, dport_be) = partner_ends(
                    self.kind,
                    (k.saddr_be, k.sport_be, k.daddr_be, k.dport_be),
                    (
                        self.nat_addr_be,
                        self.nat_port_be,
                        self.peer_addr_be,
                        self.peer_port_be,
                    ),
                    $none,
                );
                $key {
                    saddr_be,
                    daddr_be,
                    sport_be,
                    dport_be,
                    proto: k.proto,
                    pad: [0; 3],
                }
            }
            fn proto(key: &$key) -> u8 {
                key.proto
            }
        }
    };
}

conntrack_entry!(CtValue, CtKey, MAP_CONNTRACK, 0);
conntrack_entry!(CtValue6, CtKey6, MAP_CONNTRACK6, [0; 4]);

/// The collector's handles on the pinned conntrack maps.
pub struct Collector {
    /// Each map with the most keys a walk of it visits.
    v4: (HashMap<MapData, CtKey, CtValue>, usize),
    v6: (HashMap<MapData, CtKey6, CtValue6>, usize),
    timeouts: Timeouts,
}

impl Collector {
    /// Opens the maps the agent pinned under `pin_dir` (its own handles: the walk runs on its own
    /// thread, apart from the reconciler's).
    pub fn open(pin_dir: &Path, timeouts: Timeouts) -> Result<Self, GcError> {
        fn open<K: Pod, V: Pod>(
            pin_dir: &Path,
            name: &'static str,
        ) -> Result<(HashMap<MapData, K, V>, usize), GcError> {
            MapData::from_pin(pin_dir.join(name))
                .and_then(|m| {
                    // A key deleted under a walk (LRU eviction) restarts it: bound it by capacity.
                    let bound = m
                        .info()
                        .map_or(usize::MAX / 2, |i| i.max_entries() as usize)
                        * 2;
                    Ok((HashMap::try_from(aya::maps::Map::LruHashMap(m))?, bound))
                })
                .map_err(|source| GcError::Open { name, source })
        }
        Ok(Self {
            v4: open(pin_dir, MAP_CONNTRACK)?,
            v6: open(pin_dir, MAP_CONNTRACK6)?,
            timeouts,
        })
    }

    /// Walks both maps once at `now_s` and deletes the expired flows.
    pub fn pass(&mut self, now_s: u32) -> Result<Pass, GcError> {
        let plan = self.plan(now_s);
        self.apply(plan)
    }

    /// The walk of [`Self::pass`]: which entries have expired at `now_s`, with the times that judged
    /// them (and adoption of unstamped entries). Nothing is deleted yet.
    pub fn plan(&mut self, now_s: u32) -> Plan {
        Plan {
            v4: walk(&mut self.v4.0, self.v4.1, &self.timeouts, now_s),
            v6: walk(&mut self.v6.0, self.v6.1, &self.timeouts, now_s),
        }
    }

    /// The deletions of [`Self::pass`]: each planned entry whose flow no packet touched since the walk.
    pub fn apply(&mut self, plan: Plan) -> Result<Pass, GcError> {
        let a = delete(&mut self.v4.0, plan.v4)?;
        let b = delete(&mut self.v6.0, plan.v6)?;
        Ok(Pass {
            scanned: a.scanned + b.scanned,
            deleted: a.deleted + b.deleted,
        })
    }
}

/// The expired entries a walk found, to be deleted by [`Collector::apply`].
pub struct Plan {
    v4: Walked<CtKey>,
    v6: Walked<CtKey6>,
}

impl Plan {
    /// Entries planned for deletion.
    pub fn expired(&self) -> usize {
        self.v4.doomed.len() + self.v6.doomed.len()
    }
}

struct Walked<K> {
    scanned: u64,
    doomed: Vec<Doomed<K>>,
}

/// An expired entry and the stamps it was judged by: its own and its partner's (when it had one).
struct Doomed<K> {
    key: K,
    seen_s: u32,
    partner: Option<(K, u32)>,
    reverse: bool,
}

fn walk<V: Entry>(
    map: &mut HashMap<MapData, V::Key, V>,
    bound: usize,
    timeouts: &Timeouts,
    now_s: u32,
) -> Walked<V::Key> {
    let mut walked = Walked {
        scanned: 0,
        doomed: Vec::new(),
    };
    // Collected first and deleted after the walk: deleting the walk's current key would restart it
    // from the first key.
    let mut unstamped: Vec<V::Key> = Vec::new();
    for item in map.iter().take(bound) {
        let Ok((key, value)) = item else { continue };
        walked.scanned += 1;
        if value.side().seen_s == 0 {
            // Written by a datapath that did not stamp entries (an older agent's pinned map): its
            // idle time counts from now, rather than from boot, which would expire live flows.
            unstamped.push(key);
            continue;
        }
        let partner_key = value.partner(&key);
        // Only a true partner counts: an entry of the opposite kind that points back at this one.
        let partner = map
            .get(&partner_key, 0)
            .ok()
            .filter(|p| p.kind() != value.kind() && p.partner(&partner_key) == key);
        let (forward, reverse) = match value.kind() {
            CT_REVERSE => (partner.map(|p| p.side()), Some(value.side())),
            _ => (Some(value.side()), partner.map(|p| p.side())),
        };
        if timeouts.expired(now_s, V::proto(&key), forward, reverse) {
            walked.doomed.push(Doomed {
                key,
                seen_s: value.side().seen_s,
                partner: partner.map(|p| (partner_key, p.side().seen_s)),
                reverse: value.kind() == CT_REVERSE,
            });
        }
    }
    for key in unstamped {
        if let Ok(v) = map.get(&key, 0)
            && v.side().seen_s == 0
        {
            // A lost race with the datapath stamping it is harmless: both write "now".
            let _ = map.insert(key, v.stamped(now_s), 0);
        }
    }
    // Reverse entries go first. Deleted second, the reverse entry of a connection that reused the
    // tuple between the two deletions would be the new connection's, leaving its replies untranslated.
    walked.doomed.sort_by_key(|d| !d.reverse);
    walked
}

fn delete<V: Entry>(
    map: &mut HashMap<MapData, V::Key, V>,
    walked: Walked<V::Key>,
) -> Result<Pass, GcError> {
    let mut pass = Pass {
        scanned: walked.scanned,
        deleted: 0,
    };
    for d in walked.doomed {
        // A packet since the walk revived the flow: keep it. Either side counts: a client reusing the
        // tuple stamps only the forward entry, and deleting the reverse one under it would leave the
        // backend's replies untranslated. A partner gone since the walk was deleted just before (or
        // evicted): nothing to keep.
        if !map
            .get(&d.key, 0)
            .is_ok_and(|v| v.side().seen_s == d.seen_s)
        {
            continue;
        }
        if let Some((partner, seen_s)) = &d.partner
            && map
                .get(partner, 0)
                .is_ok_and(|p| p.side().seen_s != *seen_s)
        {
            continue;
        }
        match map.remove(&d.key) {
            Ok(()) => pass.deleted += 1,
            // Evicted or deleted by the reconciler meanwhile.
            Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            }
            Err(source) => {
                return Err(GcError::Delete {
                    name: V::MAP,
                    source,
                });
            }
        }
    }
    Ok(pass)
}

/// Runs the collector every `interval` on this thread, forever, reporting each pass to `report`.
pub fn run(mut collector: Collector, interval: Duration, report: impl Fn(Pass, Duration)) {
    loop {
        std::thread::sleep(interval);
        let started = Instant::now();
        match collector.pass(monotonic_now_s()) {
            Ok(pass) => report(pass, started.elapsed()),
            Err(e) => tracing::warn!("conntrack garbage collection: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts::KUBE_PROXY;

    fn side(flags: u8) -> Option<Side> {
        Some(Side {
            seen_s: 1000,
            flags,
        })
    }

    #[test]
    fn tcp_state_picks_the_timeout() {
        let tcp = PROTO_TCP;
        // SYN sent, no answer (the reverse entry never saw a packet).
        assert_eq!(T.idle_limit(tcp, side(0), side(0)), 120);
        assert_eq!(T.idle_limit(tcp, side(CT_FLAG_SEEN), None), 120);
        // Answered.
        assert_eq!(
            T.idle_limit(tcp, side(CT_FLAG_SEEN), side(CT_FLAG_SEEN)),
            86_400
        );
        // Half closed, either way.
        let fin = CT_FLAG_SEEN | CT_FLAG_FIN;
        assert_eq!(T.idle_limit(tcp, side(fin), side(CT_FLAG_SEEN)), 3_600);
        assert_eq!(T.idle_limit(tcp, side(CT_FLAG_SEEN), side(fin)), 3_600);
        // Closed both ways.
        assert_eq!(T.idle_limit(tcp, side(fin), side(fin)), 120);
        // Reset by either side wins over everything.
        let rst = CT_FLAG_SEEN | CT_FLAG_RST;
        assert_eq!(T.idle_limit(tcp, side(rst), side(CT_FLAG_SEEN)), 10);
        assert_eq!(T.idle_limit(tcp, side(fin), side(rst)), 10);
        assert_eq!(T.idle_limit(tcp, None, side(rst)), 10);
    }

    #[test]
    fn udp_is_longer_once_answered() {
        assert_eq!(T.idle_limit(17, side(CT_FLAG_SEEN), side(0)), 30);
        assert_eq!(T.idle_limit(17, side(0), None), 30);
        assert_eq!(T.idle_limit(17, side(0), side(CT_FLAG_SEEN)), 120);
    }

    #[test]
    fn expiry_counts_from_the_later_side() {
        let fwd = Some(Side {
            seen_s: 100,
            flags: CT_FLAG_SEEN,
        });
        let rev = Some(Side {
            seen_s: 200,
            flags: CT_FLAG_SEEN,
        });
        // UDP stream: 120 s after the reply at 200, not after the request at 100.
        assert!(!T.expired(320, 17, fwd, rev));
        assert!(T.expired(321, 17, fwd, rev));
        // An entry stamped in the future (clock granularity) is not expired.
        assert!(!T.expired(50, 17, fwd, rev));
    }

    fn key4(s: ([u8; 4], u16), d: ([u8; 4], u16)) -> CtKey {
        CtKey {
            saddr_be: u32::from_ne_bytes(s.0),
            daddr_be: u32::from_ne_bytes(d.0),
            sport_be: s.1.to_be(),
            dport_be: d.1.to_be(),
            proto: PROTO_TCP,
            pad: [0; 3],
        }
    }

    fn value4(kind: u8, nat: ([u8; 4], u16), peer: ([u8; 4], u16)) -> CtValue {
        CtValue {
            nat_addr_be: u32::from_ne_bytes(nat.0),
            nat_port_be: nat.1.to_be(),
            kind,
            flags: 0,
            backend_id: 1,
            peer_addr_be: u32::from_ne_bytes(peer.0),
            peer_port_be: peer.1.to_be(),
            pad2: [0; 2],
            seen_s: 0,
        }
    }

    #[test]
    fn partners_pair_up_as_the_datapath_records_them() {
        let client = ([10, 0, 0, 20], 40000);
        let vip = ([10, 96, 0, 10], 80);
        let backend = ([10, 0, 1, 11], 8080);
        let none = ([0; 4], 0);
        // Plain DNAT: the reply goes backend → client.
        let fwd = value4(CT_FORWARD, backend, none);
        let rev = value4(CT_REVERSE, vip, none);
        assert_eq!(fwd.partner(&key4(client, vip)), key4(backend, client));
        assert_eq!(rev.partner(&key4(backend, client)), key4(client, vip));
        // SNAT: the reply goes backend → node:port, and the reverse entry names the client as peer.
        let node = ([192, 168, 0, 1], 33000);
        let fwd = value4(CT_FORWARD, backend, node);
        let rev = value4(CT_REVERSE, vip, client);
        assert_eq!(fwd.partner(&key4(client, vip)), key4(backend, node));
        assert_eq!(rev.partner(&key4(backend, node)), key4(client, vip));
    }
}
