//! The kernel ABI of Weir: names, keys and values of every eBPF map, shared by the eBPF programs and the agent.
//!
//! Rules: `#[repr(C)]`, explicit padding, no `bool`/`Option`/enum fields, network-order fields end in `_be`,
//! and a size assertion per type so a layout change fails to compile on both sides at once.
#![no_std]

/// Frontends (ClusterIP:port/proto) → which Maglev table serves them.
pub const MAP_SERVICES: &str = "WEIR_SERVICES";
/// The Maglev slot arena: one mmapable array of [`TableChunk`]s holding every frontend's table (slot →
/// backend id) in a run of consecutive chunks the agent allocates. A table is swapped by writing the new
/// one into free chunks and then switching the frontend's `table_base` in one update; no map is
/// created or inserted per table (map-in-map updates wait for an RCU grace period each).
pub const MAP_MAGLEV: &str = "WEIR_MAGLEV";
/// Backend id → backend address.
pub const MAP_BACKENDS: &str = "WEIR_BACKENDS";
/// Connection tracking of IPv4 flows (LRU): a forward entry per client flow and a reverse entry per
/// backend reply flow. Conntrack is the only per-family map: it is on every packet's path and the
/// largest, so IPv4 keeps its 16-byte key.
pub const MAP_CONNTRACK: &str = "WEIR_CT";
/// Connection tracking of IPv6 flows, as `MAP_CONNTRACK`.
pub const MAP_CONNTRACK6: &str = "WEIR_CT6";
/// Per-CPU datapath counters indexed by the `STAT_*` constants.
pub const MAP_STATS: &str = "WEIR_STATS";
/// LPM trie of allowed client prefixes per LoadBalancer frontend (`loadBalancerSourceRanges`).
pub const MAP_SOURCE_RANGES: &str = "WEIR_SRC_RANGES";
/// ClientIP session affinity (LRU): (frontend, client address) → the backend it was sent to, and when.
pub const MAP_AFFINITY: &str = "WEIR_AFFINITY";
/// Set of (table id, backend id): lets the datapath check that an affinity's backend still belongs to
/// the frontend's current table without scanning it.
pub const MAP_MEMBERS: &str = "WEIR_MEMBERS";
/// Per-CPU packets and bytes per frontend (both directions of its flows).
pub const MAP_SERVICE_STATS: &str = "WEIR_SVC_STATS";

/// Name of the TC program attached to the node side of pod interfaces.
pub const PROG_POD_INGRESS: &str = "weir_pod_ingress";
/// Name of the TC program attached to the node's external interfaces (`--external-iface`).
pub const PROG_EXT_INGRESS: &str = "weir_ext_ingress";
/// Name of the XDP program attached (native mode) to the external interfaces, in front of the TC one.
pub const PROG_EXT_XDP: &str = "weir_ext_xdp";
/// External interfaces: ifindex → this node's addresses on it ([`ExtIface`]), the source used when
/// outside traffic is SNATed towards a backend on another node.
pub const MAP_EXT_IFACES: &str = "WEIR_EXT_IFACES";
/// Socket-level load balancing for processes in the node's own network namespace (host-network
/// clients): cgroup `connect4/6`/`sendmsg4/6` translate the destination before any packet exists,
/// `recvmsg4/6`/`getpeername4/6` show the application the frontend it asked for.
pub const PROG_SOCK_CONNECT4: &str = "weir_sock_connect4";
pub const PROG_SOCK_SENDMSG4: &str = "weir_sock_sendmsg4";
pub const PROG_SOCK_RECVMSG4: &str = "weir_sock_recvmsg4";
pub const PROG_SOCK_GETPEERNAME4: &str = "weir_sock_getpeername4";
pub const PROG_SOCK_CONNECT6: &str = "weir_sock_connect6";
pub const PROG_SOCK_SENDMSG6: &str = "weir_sock_sendmsg6";
pub const PROG_SOCK_RECVMSG6: &str = "weir_sock_recvmsg6";
pub const PROG_SOCK_GETPEERNAME6: &str = "weir_sock_getpeername6";
/// (socket cookie, backend) → the frontend the socket addressed (LRU).
pub const MAP_SOCK_REVNAT: &str = "WEIR_SOCK_REVNAT";
/// Agent settings the programs read: index `CONFIG_NETNS_COOKIE` = the network namespace whose sockets
/// the socket hooks serve (cgroup hooks see every namespace; only the agent's node is ours).
pub const MAP_CONFIG: &str = "WEIR_CONFIG";
pub const CONFIG_NETNS_COOKIE: u32 = 0;
/// `WEIR_CONFIG` index: the TCP port the agent's L7 proxy listens on (0: no proxy).
pub const CONFIG_L7_PORT: u32 = 1;
pub const CONFIG_SLOTS: u32 = 8;

/// An address of either family as four network-order words: IPv6 as is, IPv4 as the IPv4-mapped IPv6
/// address `::ffff:a.b.c.d` (so the IPv4 address is the last word). Every map but conntrack keys on it,
/// which is also what a dual-stack socket's `connect6` to a mapped address hands the socket hooks.
pub type Addr = [u32; 4];

/// The third word of an IPv4-mapped address (bytes `00 00 ff ff`).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// `::ffff:a.b.c.d` for a network-order IPv4 address.
#[inline(always)]
pub const fn v4_mapped(addr_be: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, addr_be]
}

#[inline(always)]
pub const fn is_v4_mapped(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

/// The map form of an address.
pub fn addr_of(ip: core::net::IpAddr) -> Addr {
    let octets = match ip {
        core::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        core::net::IpAddr::V6(v6) => v6.octets(),
    };
    let mut words = [0u32; 4];
    for (i, w) in words.iter_mut().enumerate() {
        *w = u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ]);
    }
    words
}

/// The address a map entry names (IPv4-mapped back to IPv4).
pub fn ip_of(addr: &Addr) -> core::net::IpAddr {
    if is_v4_mapped(addr) {
        return core::net::IpAddr::V4(u32::from_be(addr[3]).into());
    }
    let mut octets = [0u8; 16];
    for (i, w) in addr.iter().enumerate() {
        octets[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    core::net::IpAddr::V6(octets.into())
}

/// A socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub backend_addr_be: Addr,
    pub backend_port_be: u16,
    pub pad: u16,
    pub pad2: u32,
}

/// The frontend that socket addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevValue {
    pub frontend_addr_be: Addr,
    pub frontend_port_be: u16,
    pub pad: u16,
}

/// `MAP_EXT_IFACES` value: this node's addresses on an external interface (all-zero: none of that
/// family), the SNAT source for outside flows sent to a backend on another node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtIface {
    pub addr4_be: u32,
    pub addr6_be: Addr,
}

pub const DEFAULT_SOCK_REVNAT_MAX: u32 = 65_536;

/// The XDP fast path's next-hop cache (not pinned, written and read by the XDP program only): what the
/// FIB answered for a destination entering on an interface, so an established flow's packets skip a
/// `bpf_fib_lookup` each. Only answers that leave through an external interface with a resolved
/// neighbour are kept.
pub const MAP_NEXT_HOPS: &str = "WEIR_NEXT_HOPS";
pub const NEXT_HOPS_MAX: u32 = 4_096;
/// A cached next hop is used for this many seconds after its FIB lookup, then looked up again: a
/// route or neighbour change reaches the fast path within 2 s.
pub const NEXT_HOP_TTL_S: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NextHopKey {
    /// Destination as the packet leaves (after translation).
    pub daddr_be: Addr,
    /// Interface the packet came in on (the FIB lookup's input interface).
    pub ifindex: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// Egress interface.
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// When the FIB said so, in whole seconds of CLOCK_MONOTONIC.
    pub checked_s: u32,
}

/// First port of the range SNAT allocates from (up to 65535), as Cilium's default.
pub const SNAT_PORT_MIN: u16 = 32_768;

/// `BPF_F_MMAPABLE` on the slot arena: the agent writes a table with one memory copy into a mapping of
/// just that table's pages, instead of a syscall per chunk.
pub const MAGLEV_ARENA_FLAGS: u32 = 0x400;
/// Slots per arena element. 256 four-byte slots (1 KB) waste half a KB per table on average in the
/// last chunk, and keep the element a divisor of the page size so chunk `c` sits at byte `c * 1024`
/// of the mapping.
pub const TABLE_CHUNK_SLOTS: u32 = 256;

/// One element of `MAP_MAGLEV`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableChunk {
    pub slots: [u32; TABLE_CHUNK_SLOTS as usize],
}

pub const DEFAULT_SERVICES_MAX: u32 = 65_536;
pub const DEFAULT_BACKENDS_MAX: u32 = 65_536;
/// Arena chunks by default: 2^24 slots (64 MB), room for about a thousand 16-backend tables (16,001
/// slots each) plus the swaps in flight; `--maglev-slots` changes it.
pub const DEFAULT_MAGLEV_SLOTS: u64 = 1 << 24;
pub const DEFAULT_MAGLEV_CHUNKS: u32 = (DEFAULT_MAGLEV_SLOTS / TABLE_CHUNK_SLOTS as u64) as u32;
pub const DEFAULT_CONNTRACK_MAX: u32 = 262_144;
pub const DEFAULT_AFFINITY_MAX: u32 = 65_536;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `ServiceValue::flags`: the service has no ready endpoint; the datapath rejects (TCP RST / ICMP
/// port unreachable) like kube-proxy's REJECT rule.
pub const SVC_FLAG_REJECT: u32 = 1;
/// `ServiceValue::flags`: a traffic policy of Local left this frontend without a usable endpoint on this
/// node; kube-proxy drops such traffic silently rather than rejecting it.
pub const SVC_FLAG_DROP: u32 = 2;
/// `ServiceValue::flags`: new flows are admitted only from the prefixes in `MAP_SOURCE_RANGES` for this
/// frontend (a LoadBalancer IP with `loadBalancerSourceRanges`).
pub const SVC_FLAG_SOURCE_RANGES: u32 = 4;
/// `ServiceValue::flags`: an HTTPRoute is attached: TCP connections from pods go to the agent's L7 proxy
/// (socket assignment, the original destination kept) instead of a backend.
pub const SVC_FLAG_L7: u32 = 8;
/// Packet mark the datapath sets on connections it hands to the L7 proxy; the agent routes marked
/// packets to the local host (`ip rule fwmark` → a table with a `local 0.0.0.0/0` route), as TPROXY does.
pub const L7_MARK: u32 = 0x0057_4500;
/// The policy routing table holding that local route.
pub const L7_ROUTE_TABLE: u32 = 0x5745;

/// `CtValue::kind`: the entry rewrites the destination (client → frontend becomes client → backend).
pub const CT_FORWARD: u8 = 1;
/// `CtValue::kind`: the entry rewrites the source (backend → client becomes frontend → client).
pub const CT_REVERSE: u8 = 2;
/// `CtValue::flags`: a packet hit the entry after it was created (on a reverse entry: the backend
/// replied).
pub const CT_FLAG_SEEN: u8 = 1;
/// `CtValue::flags`: a TCP FIN went this entry's way (cleared by a SYN: the tuple was reused).
pub const CT_FLAG_FIN: u8 = 2;
/// `CtValue::flags`: a TCP RST went this entry's way (cleared by a SYN).
pub const CT_FLAG_RST: u8 = 4;

/// Source address of hairpin flows as their backend sees them (169.254.42.1, link-local like Cilium's):
/// never assigned anywhere, only the datapath translates it.
pub const HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];
/// The IPv6 hairpin source, `fd00:5745:4952::1` (a unique local address, "WEIR"), assigned nowhere. Not
/// link-local: a pod would look for a link-local address on its own link instead of sending the reply
/// to its gateway.
pub const HAIRPIN_ADDR6: Addr = [
    u32::from_ne_bytes([0xfd, 0x00, 0x57, 0x45]),
    u32::from_ne_bytes([0x49, 0x52, 0, 0]),
    0,
    u32::from_ne_bytes([0, 0, 0, 1]),
];

/// Datapath counters (index into `MAP_STATS`).
pub const STAT_FWD_NEW: u32 = 0;
pub const STAT_FWD_ESTABLISHED: u32 = 1;
pub const STAT_REVERSE_NAT: u32 = 2;
pub const STAT_REJECT_TCP: u32 = 3;
pub const STAT_REJECT_UDP: u32 = 4;
pub const STAT_DROP_NO_BACKEND: u32 = 5;
pub const STAT_DROP_REJECT_FAILED: u32 = 6;
pub const STAT_DROP_REWRITE_FAILED: u32 = 7;
pub const STAT_PASS_NOT_SERVICE: u32 = 8;
pub const STAT_PASS_UNPARSED: u32 = 9;
pub const STAT_DROP_NO_LOCAL_ENDPOINT: u32 = 10;
pub const STAT_DROP_SOURCE_RANGE: u32 = 11;
pub const STAT_ICMP_TRANSLATED: u32 = 12;
pub const STAT_SNAT_NEW: u32 = 13;
pub const STAT_DROP_SNAT_EXHAUSTED: u32 = 14;
pub const STAT_DROP_FRAGMENT: u32 = 15;
pub const STAT_L7_STEERED: u32 = 16;
pub const STAT_DROP_L7_NO_PROXY: u32 = 17;
/// A TCP RST to a frontend that rejects: never answered (RFC 793), dropped.
pub const STAT_DROP_RESET_TO_REJECTING: u32 = 18;
/// Packets the XDP fast path translated and sent back out itself (also counted by their kind:
/// `forward_new`, `forward_established`, `reverse_nat`).
pub const STAT_XDP_FORWARDED: u32 = 19;
/// Packets the XDP fast path left to the stack (and the TC program).
pub const STAT_XDP_PASS: u32 = 20;
pub const STAT_COUNT: u32 = 21;
/// Size of `MAP_STATS`: room for counters added later, so a pinned map survives an upgrade that adds one.
pub const STAT_SLOTS: u32 = 64;

/// Human names of the counters, in index order (metrics labels, CLI).
pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "forward_new",
    "forward_established",
    "reverse_nat",
    "reject_tcp",
    "reject_udp",
    "drop_no_backend",
    "drop_reject_failed",
    "drop_rewrite_failed",
    "pass_not_service",
    "pass_unparsed",
    "drop_no_local_endpoint",
    "drop_source_range",
    "icmp_error_translated",
    "snat_new",
    "drop_snat_exhausted",
    "drop_fragment",
    "l7_steered",
    "drop_l7_no_proxy",
    "drop_reset_to_rejecting",
    "xdp_forwarded",
    "xdp_pass",
];

/// A frontend: the address a client connects to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr_be: Addr,
    pub port_be: u16,
    pub proto: u8,
    pub pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// First chunk of this frontend's Maglev table in `MAP_MAGLEV` (slot `s` is in chunk
    /// `table_base + s / TABLE_CHUNK_SLOTS`); also the table's identity in `MAP_MEMBERS`.
    pub table_base: u32,
    /// Number of slots (a prime); 0 when the service has no backend.
    pub table_size: u32,
    pub backend_count: u32,
    /// `SVC_FLAG_*`.
    pub flags: u32,
    /// ClientIP session affinity: a client's new connections go to its last backend while they come less
    /// than this many seconds apart; 0 disables affinity.
    pub affinity_timeout_s: u32,
    pub pad: u32,
}

/// Data of a `MAP_SOURCE_RANGES` key (after the LPM prefix length): the frontend matches exactly (160
/// bits), then the client address by the range's prefix, so the key's prefix length is 160 + range bits
/// (+ 96 for an IPv4 range, whose addresses are IPv4-mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    pub frontend: ServiceKey,
    pub addr_be: Addr,
}

/// Bits of `SourceRangeKey` before the client address.
pub const SOURCE_RANGE_FRONTEND_BITS: u32 = 160;
pub const DEFAULT_SOURCE_RANGES_MAX: u32 = 16_384;

/// A client of a frontend, for session affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub frontend: ServiceKey,
    pub client_addr_be: Addr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub pad: u32,
    /// `bpf_ktime_get_ns` of the client's last new connection.
    pub last_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MemberKey {
    pub table_id: u32,
    pub backend_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr_be: Addr,
    pub port_be: u16,
    pub proto: u8,
    pub pad: u8,
}

/// Traffic of one frontend on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    pub packets: u64,
    pub bytes: u64,
}

/// An IPv4 flow as seen on the wire, before translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    /// Address and port written into the packet: the backend for `CT_FORWARD`, the frontend for `CT_REVERSE`.
    pub nat_addr_be: u32,
    pub nat_port_be: u16,
    /// `CT_FORWARD` or `CT_REVERSE`.
    pub kind: u8,
    /// `CT_FLAG_*`: what the datapath saw of the flow in this entry's direction, for the agent's
    /// timeouts.
    pub flags: u8,
    /// Backend chosen for the flow; a forward hit re-selects when this id no longer names `nat_addr`.
    pub backend_id: u32,
    /// The other side rewritten too, when not 0: the source on the way in (forward), the destination
    /// on the way out (reverse). Hairpin: the source becomes [`HAIRPIN_ADDR`] so the pod's reply leaves
    /// the pod; SNAT of outside traffic to a backend on another node: the source becomes this node's
    /// address and an allocated port, so the reply comes back through this node.
    pub peer_addr_be: u32,
    pub peer_port_be: u16,
    pub pad2: [u8; 2],
    /// Last packet in this direction, in whole seconds of CLOCK_MONOTONIC (`bpf_ktime_get_ns`), written
    /// at most once a second; the agent's garbage collector expires idle flows by it.
    pub seen_s: u32,
}

/// An IPv6 flow as seen on the wire, before translation (`MAP_CONNTRACK6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey6 {
    pub saddr_be: Addr,
    pub daddr_be: Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// As [`CtValue`], for IPv6 flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue6 {
    pub nat_addr_be: Addr,
    pub nat_port_be: u16,
    pub kind: u8,
    pub flags: u8,
    pub backend_id: u32,
    pub peer_addr_be: Addr,
    pub peer_port_be: u16,
    pub pad2: [u8; 2],
    pub seen_s: u32,
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 24);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 36);
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);
const _: () = assert!(core::mem::size_of::<MemberKey>() == 8);
const _: () = assert!(core::mem::size_of::<TableChunk>() == 4 * TABLE_CHUNK_SLOTS as usize);
const _: () = assert!(4096 % core::mem::size_of::<TableChunk>() == 0);
const _: () = assert!(core::mem::size_of::<SourceRangeKey>() == 36);
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 32);
const _: () = assert!(core::mem::size_of::<SockRevValue>() == 20);
const _: () = assert!(core::mem::size_of::<ExtIface>() == 20);
const _: () = assert!(core::mem::size_of::<NextHopKey>() == 20);
const _: () = assert!(core::mem::size_of::<NextHop>() == 20);
const _: () = assert!(core::mem::size_of::<Backend>() == 20);
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<CtKey6>() == 40);
const _: () = assert!(core::mem::size_of::<CtValue6>() == 48);
const _: () = assert!(core::mem::size_of::<ServiceCounters>() == 16);
const _: () = assert!(core::mem::size_of::<CtValue>() == 24);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is repr(C), made only of integers, with all padding spelled out as fields.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for ServiceCounters {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for MemberKey {}
    unsafe impl aya::Pod for TableChunk {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for CtKey6 {}
    unsafe impl aya::Pod for CtValue6 {}
    unsafe impl aya::Pod for ExtIface {}
}
