//! The kernel side as the agent sees it: loads the embedded eBPF object with its maps pinned under
//! `--bpffs-dir`, attaches the pod-ingress program to interfaces, and implements [`MapWriter`] on the
//! pinned maps.
use std::{
    collections::HashMap as StdHashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapError as AyaMapError, PerCpuArray, PerCpuHashMap,
        lpm_trie::Key as LpmKey,
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use tracing::{info, warn};
use weir_common::{
    Backend, CONFIG_L7_PORT, CONFIG_NETNS_COOKIE, CtKey, CtKey6, CtValue, CtValue6, ExtIface,
    MAP_AFFINITY, MAP_BACKENDS, MAP_CONFIG, MAP_CONNTRACK, MAP_CONNTRACK6, MAP_EXT_IFACES,
    MAP_MAGLEV, MAP_MEMBERS, MAP_SERVICE_STATS, MAP_SERVICES, MAP_SOURCE_RANGES, MAP_STATS,
    MemberKey, PROG_EXT_INGRESS, PROG_EXT_XDP, PROG_POD_INGRESS, PROG_SOCK_CONNECT4,
    PROG_SOCK_CONNECT6, PROG_SOCK_GETPEERNAME4, PROG_SOCK_GETPEERNAME6, PROG_SOCK_RECVMSG4,
    PROG_SOCK_RECVMSG6, PROG_SOCK_SENDMSG4, PROG_SOCK_SENDMSG6, SOURCE_RANGE_FRONTEND_BITS,
    STAT_COUNT, ServiceCounters, ServiceKey, ServiceValue, SourceRangeKey, TABLE_CHUNK_SLOTS,
    TableChunk,
};

use crate::reconcile::{Adopted, MapError, MapWriter};

/// Map capacities, set at load time.
#[derive(Clone, Copy, Debug)]
pub struct Capacities {
    pub services: u32,
    pub backends: u32,
    /// Chunks of `TABLE_CHUNK_SLOTS` slots in the Maglev arena.
    pub maglev_chunks: u32,
    pub affinity: u32,
    pub conntrack: u32,
    /// `WEIR_SRC_RANGES`: loadBalancerSourceRanges prefixes, one entry per frontend and prefix.
    pub source_ranges: u32,
    /// `WEIR_SOCK_REVNAT` (LRU): host-network sockets translated by the socket-level hooks.
    pub sock_revnat: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object (maps pinned under {pin_dir}): {source}")]
    Load {
        pin_dir: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("eBPF object has no {what} named {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("{context}: {source}")]
    Program {
        context: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: AyaMapError,
    },
}

/// Which program an interface gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// The node side of a pod interface.
    Pod,
    /// An interface facing outside the node (`--external-iface`).
    External,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::Pod => PROG_POD_INGRESS,
            Hook::External => PROG_EXT_INGRESS,
        }
    }

    fn pin_prefix(self) -> &'static str {
        match self {
            Hook::Pod => "pod-ingress-",
            Hook::External => "ext-ingress-",
        }
    }
}

/// How an interface came to be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// It already was, by this process.
    Already,
    /// A link pinned by a previous agent was adopted and its program replaced atomically.
    Replaced,
    /// A new link was created and pinned.
    New,
}

/// One pod interface's TCX link, pinned under `<bpffs>/links/` so it outlives a crashed agent.
struct Attachment {
    name: String,
    link: FdLink,
    pin: PathBuf,
}

/// The loaded object: owns the program and its attachments.
pub struct Datapath {
    ebpf: Ebpf,
    ext_ifaces: HashMap<MapData, u32, ExtIface>,
    links_dir: PathBuf,
    attached: StdHashMap<u32, Attachment>,
    /// The XDP fast path's links on external interfaces, by ifindex (pinned as `ext-xdp-<ifindex>`).
    xdp: StdHashMap<u32, Attachment>,
}

/// Typed handles on the pinned maps, moved to the reconciler.
pub struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// The slot arena, written through mappings of one table's pages at a time.
    maglev: MapData,
    maglev_chunks: u32,
    backends: HashMap<MapData, u32, Backend>,
    service_stats: PerCpuHashMap<MapData, ServiceKey, ServiceCounters>,
    members: HashMap<MapData, MemberKey, u32>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    /// Writable handles on the pinned conntrack maps, to purge the flows of deleted frontends.
    conntrack: HashMap<MapData, CtKey, CtValue>,
    conntrack6: HashMap<MapData, CtKey6, CtValue6>,
    /// Which backend ids each table's members are, to delete them with the table.
    member_index: StdHashMap<u32, Vec<u32>>,
}

/// Read-only handles for metrics.
pub struct StatsReader {
    stats: PerCpuArray<MapData, u64>,
    conntrack: aya::maps::Map,
    conntrack6: aya::maps::Map,
    service_stats: PerCpuHashMap<MapData, ServiceKey, ServiceCounters>,
    conntrack_max: u32,
}

impl Datapath {
    pub fn load(
        pin_dir: &Path,
        caps: Capacities,
    ) -> Result<(Self, Maps, StatsReader), DatapathError> {
        let object = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir"));
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(MAP_SERVICES, caps.services)
            .map_max_entries(MAP_SERVICE_STATS, caps.services)
            .map_max_entries(MAP_BACKENDS, caps.backends)
            .map_max_entries(MAP_MAGLEV, caps.maglev_chunks)
            .map_max_entries(MAP_CONNTRACK, caps.conntrack)
            .map_max_entries(MAP_CONNTRACK6, caps.conntrack)
            .map_max_entries(MAP_AFFINITY, caps.affinity)
            .map_max_entries(MAP_SOURCE_RANGES, caps.source_ranges)
            .map_max_entries(weir_common::MAP_SOCK_REVNAT, caps.sock_revnat)
            // Each backend usually belongs to one table; swaps briefly hold two.
            .map_max_entries(MAP_MEMBERS, caps.backends.saturating_mul(4))
            .load(object)
            .map_err(|source| DatapathError::Load {
                pin_dir: pin_dir.display().to_string(),
                source: Box::new(source),
            })?;
        for name in [PROG_POD_INGRESS, PROG_EXT_INGRESS] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing {
                    what: "program",
                    name,
                })?
                .try_into()
                .map_err(|source| DatapathError::Program {
                    context: format!("{name} is not a TC classifier"),
                    source,
                })?;
            prog.load().map_err(|source| DatapathError::Program {
                context: format!("verifying {name}"),
                source,
            })?;
        }
        {
            let prog: &mut Xdp = ebpf
                .program_mut(PROG_EXT_XDP)
                .ok_or(DatapathError::Missing {
                    what: "program",
                    name: PROG_EXT_XDP,
                })?
                .try_into()
                .map_err(|source| DatapathError::Program {
                    context: format!("{PROG_EXT_XDP} is not an XDP program"),
                    source,
                })?;
            prog.load().map_err(|source| DatapathError::Program {
                context: format!("verifying {PROG_EXT_XDP}"),
                source,
            })?;
        }
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing {
                    what: "program",
                    name,
                })?
                .try_into()
                .map_err(|source| DatapathError::Program {
                    context: format!("{name} is not a cgroup sock_addr program"),
                    source,
                })?;
            prog.load().map_err(|source| DatapathError::Program {
                context: format!("verifying {name}"),
                source,
            })?;
        }
        let ext_ifaces = take_map(&mut ebpf, MAP_EXT_IFACES)?;

        let maglev = match take_raw(&mut ebpf, MAP_MAGLEV)? {
            aya::maps::Map::Array(m) => m,
            _ => {
                return Err(DatapathError::Missing {
                    what: "array map",
                    name: MAP_MAGLEV,
                });
            }
        };
        // A map pinned by an earlier agent keeps its size, whatever --maglev-slots says now.
        let maglev_chunks =
            maglev
                .info()
                .map(|i| i.max_entries())
                .map_err(|source| DatapathError::Map {
                    name: MAP_MAGLEV,
                    source,
                })?;
        if maglev_chunks != caps.maglev_chunks {
            warn!(
                pinned = u64::from(maglev_chunks) * u64::from(TABLE_CHUNK_SLOTS),
                asked = u64::from(caps.maglev_chunks) * u64::from(TABLE_CHUNK_SLOTS),
                "the pinned Maglev arena keeps its size; remove its pin (and restart) to resize it"
            );
        }
        let maps = Maps {
            services: take_map(&mut ebpf, MAP_SERVICES)?,
            maglev,
            maglev_chunks,
            backends: take_map(&mut ebpf, MAP_BACKENDS)?,
            members: take_map(&mut ebpf, MAP_MEMBERS)?,
            member_index: StdHashMap::new(),
            conntrack: MapData::from_pin(pin_dir.join(MAP_CONNTRACK))
                .and_then(|m| HashMap::try_from(aya::maps::Map::LruHashMap(m)))
                .map_err(|source| DatapathError::Map {
                    name: MAP_CONNTRACK,
                    source,
                })?,
            conntrack6: MapData::from_pin(pin_dir.join(MAP_CONNTRACK6))
                .and_then(|m| HashMap::try_from(aya::maps::Map::LruHashMap(m)))
                .map_err(|source| DatapathError::Map {
                    name: MAP_CONNTRACK6,
                    source,
                })?,
            source_ranges: LpmTrie::try_from(take_raw(&mut ebpf, MAP_SOURCE_RANGES)?).map_err(
                |source| DatapathError::Map {
                    name: MAP_SOURCE_RANGES,
                    source,
                },
            )?,
            service_stats: PerCpuHashMap::try_from(take_raw(&mut ebpf, MAP_SERVICE_STATS)?)
                .map_err(|source| DatapathError::Map {
                    name: MAP_SERVICE_STATS,
                    source,
                })?,
        };
        let stats = StatsReader {
            stats: PerCpuArray::try_from(take_raw(&mut ebpf, MAP_STATS)?).map_err(|source| {
                DatapathError::Map {
                    name: MAP_STATS,
                    source,
                }
            })?,
            conntrack: take_raw(&mut ebpf, MAP_CONNTRACK)?,
            conntrack6: take_raw(&mut ebpf, MAP_CONNTRACK6)?,
            // A second handle on the pinned map: the writer deletes a frontend's counters with it.
            service_stats: MapData::from_pin(pin_dir.join(MAP_SERVICE_STATS))
                .and_then(|m| PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(m)))
                .map_err(|source| DatapathError::Map {
                    name: MAP_SERVICE_STATS,
                    source,
                })?,
            conntrack_max: caps.conntrack,
        };
        let links_dir = pin_dir.join("links");
        std::fs::create_dir_all(&links_dir).map_err(|source| DatapathError::Io {
            context: format!("creating {}", links_dir.display()),
            source,
        })?;
        Ok((
            Self {
                ebpf,
                ext_ifaces,
                links_dir,
                attached: StdHashMap::new(),
                xdp: StdHashMap::new(),
            },
            maps,
            stats,
        ))
    }

    fn program(&mut self, hook: Hook) -> Result<&mut SchedClassifier, DatapathError> {
        let name = hook.program();
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing {
                what: "program",
                name,
            })?
            .try_into()
            .map_err(|source| DatapathError::Program {
                context: "program type".to_owned(),
                source,
            })
    }

    fn pin_path(&self, hook: Hook, index: u32) -> PathBuf {
        self.links_dir.join(format!("{}{index}", hook.pin_prefix()))
    }

    /// Socket-level load balancing for this network namespace's own processes: the cgroup hooks are
    /// attached at the root of the cgroup v2 hierarchy mounted at `cgroup_root` (they then see every
    /// process) and told which namespace is ours by its cookie.
    pub fn attach_socket_lb(&mut self, cgroup_root: &Path) -> Result<(), DatapathError> {
        let cookie = netns_cookie().map_err(|source| DatapathError::Io {
            context: "reading this network namespace's cookie (SO_NETNS_COOKIE)".to_owned(),
            source,
        })?;
        let mut config: Array<&mut MapData, u64> = Array::try_from(
            self.ebpf
                .map_mut(MAP_CONFIG)
                .ok_or(DatapathError::Missing {
                    what: "map",
                    name: MAP_CONFIG,
                })?,
        )
        .map_err(|source| DatapathError::Map {
            name: MAP_CONFIG,
            source,
        })?;
        config
            .set(CONFIG_NETNS_COOKIE, cookie, 0)
            .map_err(|source| DatapathError::Map {
                name: MAP_CONFIG,
                source,
            })?;
        let cgroup = std::fs::File::open(cgroup_root).map_err(|source| DatapathError::Io {
            context: format!("opening cgroup {}", cgroup_root.display()),
            source,
        })?;
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing {
                    what: "program",
                    name,
                })?
                .try_into()
                .map_err(|source| DatapathError::Program {
                    context: format!("{name} type"),
                    source,
                })?;
            // A bpf_link (kernel ≥ 5.7) coexists with other agents' links on the same cgroup (other
            // nodes' namespaces on one host, in tests) by nature; link_create takes no attach flags.
            prog.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|source| DatapathError::Program {
                    context: format!("attaching {name} to {}", cgroup_root.display()),
                    source,
                })?;
        }
        info!(cgroup = %cgroup_root.display(), cookie, "socket-level load balancing for host processes");
        Ok(())
    }

    /// Tells the datapath which port the L7 proxy listens on (0: none).
    pub fn set_l7_port(&mut self, port: u16) -> Result<(), DatapathError> {
        let mut config: Array<&mut MapData, u64> = Array::try_from(
            self.ebpf
                .map_mut(MAP_CONFIG)
                .ok_or(DatapathError::Missing {
                    what: "map",
                    name: MAP_CONFIG,
                })?,
        )
        .map_err(|source| DatapathError::Map {
            name: MAP_CONFIG,
            source,
        })?;
        config
            .set(CONFIG_L7_PORT, u64::from(port), 0)
            .map_err(|source| DatapathError::Map {
                name: MAP_CONFIG,
                source,
            })
    }

    /// Records this node's addresses on an external interface, which outside traffic to a backend on
    /// another node is SNATed to (a family without an address there is not SNATed).
    pub fn set_external_address(
        &mut self,
        index: u32,
        v4: Option<Ipv4Addr>,
        v6: Option<Ipv6Addr>,
    ) -> Result<(), DatapathError> {
        let value = ExtIface {
            addr4_be: v4.map_or(0, |a| u32::from(a).to_be()),
            addr6_be: v6.map_or([0; 4], |a| weir_common::addr_of(IpAddr::V6(a))),
        };
        self.ext_ifaces
            .insert(index, value, 0)
            .map_err(|source| DatapathError::Map {
                name: MAP_EXT_IFACES,
                source,
            })
    }

    /// Serves the ingress of `name` (index `index`). A link pinned by a previous agent for this index
    /// gets its program replaced in one `bpf_link_update`, so the interface is never without a program
    /// across a restart or upgrade; otherwise a new link is created and pinned.
    pub fn attach(
        &mut self,
        index: u32,
        name: &str,
        hook: Hook,
    ) -> Result<Attached, DatapathError> {
        if self.attached.contains_key(&index) {
            // Same index: the link follows the device, whatever its name now.
            return Ok(Attached::Already);
        }
        let pin = self.pin_path(hook, index);
        let prog = self.program(hook)?;
        if pin.exists() {
            match adopt_link(prog, &pin) {
                Ok(link) => {
                    self.attached.insert(
                        index,
                        Attachment {
                            name: name.to_owned(),
                            link,
                            pin,
                        },
                    );
                    info!(iface = name, index, "adopted pinned link, program replaced");
                    return Ok(Attached::Replaced);
                }
                Err(e) => {
                    // Typically the device it belonged to is gone and the index was reused.
                    warn!(
                        iface = name,
                        index, "cannot adopt pinned link ({e}); attaching anew"
                    );
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        let link_id =
            prog.attach(name, TcAttachType::Ingress)
                .map_err(|source| DatapathError::Program {
                    context: format!("attaching {} to {name} ingress", hook.program()),
                    source,
                })?;
        let link = pin_new_link(prog.take_link(link_id), name, &pin)?;
        self.attached.insert(
            index,
            Attachment {
                name: name.to_owned(),
                link,
                pin,
            },
        );
        info!(iface = name, index, program = hook.program(), "attached");
        Ok(Attached::New)
    }

    /// Puts the XDP fast path in front of the TC program of an external interface, in native (driver)
    /// mode. A link pinned by a previous agent gets its program replaced atomically; otherwise a new
    /// link is created and pinned (`links/ext-xdp-<ifindex>`), so the fast path survives a crash like
    /// the TC links do. An error (a driver without native XDP) leaves the interface to TC alone.
    pub fn attach_xdp(&mut self, index: u32, name: &str) -> Result<Attached, DatapathError> {
        if self.xdp.contains_key(&index) {
            return Ok(Attached::Already);
        }
        let pin = self.links_dir.join(format!("{XDP_PIN_PREFIX}{index}"));
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROG_EXT_XDP)
            .ok_or(DatapathError::Missing {
                what: "program",
                name: PROG_EXT_XDP,
            })?
            .try_into()
            .map_err(|source| DatapathError::Program {
                context: format!("{PROG_EXT_XDP} is not an XDP program"),
                source,
            })?;
        let adopted = if pin.exists() {
            match adopt_xdp_link(prog, &pin) {
                Ok(link) => Some(link),
                Err(e) => {
                    warn!(
                        iface = name,
                        index, "cannot adopt pinned XDP link ({e}); attaching anew"
                    );
                    let _ = std::fs::remove_file(&pin);
                    None
                }
            }
        } else {
            None
        };
        let (link, attached) = match adopted {
            Some(link) => (link, Attached::Replaced),
            None => {
                let id = prog
                    .attach_to_if_index(index, XdpMode::Driver)
                    .map_err(|source| DatapathError::Program {
                        context: format!("attaching {PROG_EXT_XDP} to {name} (native mode)"),
                        source,
                    })?;
                (pin_new_link(prog.take_link(id), name, &pin)?, Attached::New)
            }
        };
        self.xdp.insert(
            index,
            Attachment {
                name: name.to_owned(),
                link,
                pin,
            },
        );
        info!(
            iface = name,
            index,
            program = PROG_EXT_XDP,
            ?attached,
            "XDP attached (native)"
        );
        Ok(attached)
    }

    /// Interfaces with the XDP fast path.
    pub fn xdp_count(&self) -> usize {
        self.xdp.len()
    }

    /// Forgets an interface that is gone: the kernel already released the attachment with the device.
    pub fn forget(&mut self, index: u32) {
        if let Some(a) = self.attached.remove(&index) {
            release(a);
            info!(index, "pod interface removed");
        }
    }

    /// Removes pinned links of interfaces that no longer exist (left by an agent that died).
    pub fn prune_links(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.links_dir) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let index = name
                .to_str()
                .and_then(|n| {
                    n.strip_prefix(Hook::Pod.pin_prefix())
                        .or_else(|| n.strip_prefix(Hook::External.pin_prefix()))
                        .or_else(|| n.strip_prefix(XDP_PIN_PREFIX))
                })
                .and_then(|n| n.parse::<u32>().ok());
            let known = |i: u32| self.attached.contains_key(&i) || self.xdp.contains_key(&i);
            if index.is_none_or(|i| !known(i)) {
                info!(pin = %entry.path().display(), "removing the pinned link of a vanished interface");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    pub fn attached_count(&self) -> usize {
        self.attached.len()
    }

    /// Detaches from every interface (SIGTERM path): unpinning and closing the last fd releases each link.
    pub fn detach_all(&mut self) {
        for (index, a) in self.xdp.drain() {
            info!(iface = %a.name, index, "XDP detached");
            release(a);
        }
        for (index, a) in self.attached.drain() {
            info!(iface = %a.name, index, "detached");
            release(a);
        }
    }
}

const SOCK_PROGRAMS: [&str; 8] = [
    PROG_SOCK_CONNECT4,
    PROG_SOCK_SENDMSG4,
    PROG_SOCK_RECVMSG4,
    PROG_SOCK_GETPEERNAME4,
    PROG_SOCK_CONNECT6,
    PROG_SOCK_SENDMSG6,
    PROG_SOCK_RECVMSG6,
    PROG_SOCK_GETPEERNAME6,
];

/// The cookie the kernel gives this network namespace (what `bpf_get_netns_cookie` returns in it).
fn netns_cookie() -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is that large.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Unpins and drops a link; with no pin and no fd left, the kernel detaches it.
fn release(a: Attachment) {
    if let Err(e) = std::fs::remove_file(&a.pin)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(pin = %a.pin.display(), "cannot remove link pin: {e}");
    }
    drop(a.link);
}

/// A link just taken from its program, pinned at `pin` (so it outlives this process) and kept as an fd
/// link, whatever the program type.
fn pin_new_link<L>(
    taken: Result<L, aya::programs::ProgramError>,
    name: &str,
    pin: &Path,
) -> Result<FdLink, DatapathError>
where
    L: TryInto<FdLink, Error = aya::programs::links::LinkError>,
{
    let link: FdLink = taken
        .map_err(|source| DatapathError::Program {
            context: format!("taking the link of {name}"),
            source,
        })?
        .try_into()
        .map_err(|e| DatapathError::Io {
            context: format!("the link of {name} is not an fd link"),
            source: io::Error::other(e.to_string()),
        })?;
    let pinned = link.pin(pin).map_err(|e| DatapathError::Io {
        context: format!("pinning the link of {name} at {}", pin.display()),
        source: io::Error::other(e.to_string()),
    })?;
    Ok(FdLink::from(pinned))
}

/// Pin name prefix of the XDP links (`ext-xdp-<ifindex>`).
const XDP_PIN_PREFIX: &str = "ext-xdp-";

fn adopt_xdp_link(prog: &mut Xdp, pin: &Path) -> Result<FdLink, String> {
    let pinned = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?;
    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())?;
    let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
    prog.take_link(id)
        .map_err(|e| e.to_string())?
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| e.to_string())
}

fn adopt_link(prog: &mut SchedClassifier, pin: &Path) -> Result<FdLink, String> {
    let pinned = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())?;
    let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
    prog.take_link(id)
        .map_err(|e| e.to_string())?
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| e.to_string())
}

fn take_raw(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    ebpf.take_map(name)
        .ok_or(DatapathError::Missing { what: "map", name })
}

fn take_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    HashMap::try_from(take_raw(ebpf, name)?).map_err(|source| DatapathError::Map { name, source })
}

fn map_error(map: &'static str, op: &'static str, e: AyaMapError) -> MapError {
    MapError {
        map,
        op,
        message: e.to_string(),
    }
}

/// A shared mapping of the arena pages that hold chunks `[base, base + chunks)`, unmapped on drop. Only
/// the pages of one table are mapped, and only while it is written or read: the whole arena mapped
/// for good would count every page in the agent's RSS.
struct ArenaWindow {
    addr: *mut libc::c_void,
    len: usize,
    /// Where chunk `base` starts inside the mapping.
    skip: usize,
}

impl ArenaWindow {
    const CHUNK_BYTES: usize = std::mem::size_of::<TableChunk>();

    fn map(
        arena: &MapData,
        arena_chunks: u32,
        base: u32,
        slots: usize,
        write: bool,
    ) -> io::Result<Self> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let chunks = slots.div_ceil(TABLE_CHUNK_SLOTS as usize);
        if base as usize + chunks > arena_chunks as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "chunks {base}..{} lie outside the {arena_chunks}-chunk arena",
                    base as usize + chunks
                ),
            ));
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        // The kernel page-aligns the array's data, so byte 0 of the mapping is chunk 0.
        let start = base as usize * Self::CHUNK_BYTES;
        let offset = start / page * page;
        let skip = start - offset;
        let len = (skip + slots * 4).div_ceil(page) * page;
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a BPF_F_MMAPABLE array; the range was checked to lie inside
        // the array (the kernel checks it again and fails the call otherwise).
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                arena.fd().as_fd().as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { addr, len, skip })
    }

    /// The first mapped slot of chunk `base`.
    fn slots(&self) -> *mut u32 {
        // SAFETY: `skip < len` by construction in `map`, so the result stays inside the mapping; chunk
        // boundaries are multiples of 4 bytes, so it is aligned for u32.
        unsafe { self.addr.cast::<u8>().add(self.skip) }.cast::<u32>()
    }
}

impl Drop for ArenaWindow {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region `map` mapped.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Deleting what is not there is success: deletes are idempotent so retries and pruning can overlap.
fn ignore_missing(r: Result<(), AyaMapError>) -> Result<(), AyaMapError> {
    match r {
        Err(AyaMapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(AyaMapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl Maps {
    /// Reads what a previous agent left in the pinned maps.
    pub fn dump(&mut self) -> Adopted {
        self.member_index.clear();
        for key in self.members.keys().filter_map(Result::ok) {
            self.member_index
                .entry(key.table_id)
                .or_default()
                .push(key.backend_id);
        }
        Adopted {
            services: self.services.iter().filter_map(Result::ok).collect(),
            backends: self.backends.iter().filter_map(Result::ok).collect(),
            tables: self.member_index.keys().copied().collect(),
        }
    }
}

fn source_range_key(frontend: ServiceKey, (addr, len): (IpAddr, u8)) -> LpmKey<SourceRangeKey> {
    // IPv4 ranges are over the IPv4-mapped form: its 96-bit prefix is fixed.
    let mapped_bits = if addr.is_ipv4() { 96 } else { 0 };
    LpmKey::new(
        SOURCE_RANGE_FRONTEND_BITS + mapped_bits + u32::from(len),
        SourceRangeKey {
            frontend,
            addr_be: weir_common::addr_of(addr),
        },
    )
}

/// The frontend a conntrack entry's flow was addressed to.
fn frontend_key(addr_be: weir_common::Addr, port_be: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        addr_be,
        port_be,
        proto,
        pad: 0,
    }
}

impl Maps {
    fn delete_members(&mut self, table_id: u32) {
        for backend_id in self.member_index.remove(&table_id).unwrap_or_default() {
            // Stale members only make an affinity check pass for a backend that is gone from the
            // table, and BACKENDS is checked too; a failed delete is logged, not fatal.
            if let Err(e) = ignore_missing(self.members.remove(&MemberKey {
                table_id,
                backend_id,
            })) {
                warn!(table_id, backend_id, "cannot delete table member: {e}");
            }
        }
    }
}

impl MapWriter for Maps {
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError> {
        self.backends
            .insert(id, backend, 0)
            .map_err(|e| map_error(MAP_BACKENDS, "insert", e))
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), MapError> {
        ignore_missing(self.backends.remove(&id)).map_err(|e| map_error(MAP_BACKENDS, "delete", e))
    }

    fn arena_chunks(&self) -> u32 {
        self.maglev_chunks
    }

    fn put_table(&mut self, base: u32, slots: &[u32], members: &[u32]) -> Result<(), MapError> {
        let window = ArenaWindow::map(&self.maglev, self.maglev_chunks, base, slots.len(), true)
            .map_err(|e| MapError {
                map: MAP_MAGLEV,
                op: "map table",
                message: e.to_string(),
            })?;
        // SAFETY: the window maps at least `slots.len()` writable u32s from chunk `base`, which the
        // allocator gave this table alone; no packet reads them before the frontend is switched here.
        unsafe {
            std::ptr::copy_nonoverlapping(slots.as_ptr(), window.slots(), slots.len());
        }
        drop(window);
        // Members next: by the time the table is reachable, affinity checks against it work.
        for (i, backend_id) in members.iter().enumerate() {
            let key = MemberKey {
                table_id: base,
                backend_id: *backend_id,
            };
            if let Err(e) = self.members.insert(key, 1, 0) {
                for b in &members[..i] {
                    let _ = self.members.remove(&MemberKey {
                        table_id: base,
                        backend_id: *b,
                    });
                }
                return Err(map_error(MAP_MEMBERS, "insert", e));
            }
        }
        self.member_index.insert(base, members.to_vec());
        Ok(())
    }

    fn table_equals(&mut self, base: u32, slots: &[u32]) -> bool {
        let Ok(window) =
            ArenaWindow::map(&self.maglev, self.maglev_chunks, base, slots.len(), false)
        else {
            return false;
        };
        // SAFETY: the window maps at least `slots.len()` readable u32s from chunk `base`; only this
        // agent writes the arena, and not concurrently with this read.
        let current = unsafe { std::slice::from_raw_parts(window.slots(), slots.len()) };
        current == slots
    }

    fn delete_table(&mut self, base: u32) -> Result<(), MapError> {
        self.delete_members(base);
        Ok(())
    }

    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| map_error(MAP_SERVICES, "insert", e))
    }

    fn put_source_range(&mut self, key: ServiceKey, range: (IpAddr, u8)) -> Result<(), MapError> {
        self.source_ranges
            .insert(&source_range_key(key, range), 1, 0)
            .map_err(|e| map_error(MAP_SOURCE_RANGES, "insert", e))
    }

    fn delete_source_range(
        &mut self,
        key: ServiceKey,
        range: (IpAddr, u8),
    ) -> Result<(), MapError> {
        ignore_missing(self.source_ranges.remove(&source_range_key(key, range)))
            .map_err(|e| map_error(MAP_SOURCE_RANGES, "delete", e))
    }

    fn purge_flows(
        &mut self,
        frontends: &std::collections::BTreeSet<ServiceKey>,
    ) -> Result<usize, MapError> {
        // Collect first: deleting while walking the keys can make the walk restart.
        let doomed: Vec<CtKey> = self
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                let (addr, port) = if v.kind == weir_common::CT_REVERSE {
                    (v.nat_addr_be, v.nat_port_be)
                } else {
                    (k.daddr_be, k.dport_be)
                };
                frontends.contains(&frontend_key(weir_common::v4_mapped(addr), port, k.proto))
            })
            .map(|(k, _)| k)
            .collect();
        for k in &doomed {
            ignore_missing(self.conntrack.remove(k))
                .map_err(|e| map_error(MAP_CONNTRACK, "delete", e))?;
        }
        let doomed6: Vec<CtKey6> = self
            .conntrack6
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                let (addr, port) = if v.kind == weir_common::CT_REVERSE {
                    (v.nat_addr_be, v.nat_port_be)
                } else {
                    (k.daddr_be, k.dport_be)
                };
                frontends.contains(&frontend_key(addr, port, k.proto))
            })
            .map(|(k, _)| k)
            .collect();
        for k in &doomed6 {
            ignore_missing(self.conntrack6.remove(k))
                .map_err(|e| map_error(MAP_CONNTRACK6, "delete", e))?;
        }
        Ok(doomed.len() + doomed6.len())
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapError> {
        ignore_missing(self.services.remove(&key))
            .map_err(|e| map_error(MAP_SERVICES, "delete", e))?;
        // Counters go with the frontend, so a later frontend on the same address starts from zero.
        ignore_missing(self.service_stats.remove(&key))
            .map_err(|e| map_error(MAP_SERVICE_STATS, "delete", e))
    }
}

impl StatsReader {
    /// Datapath counters summed over CPUs, in `STAT_*` order.
    pub fn counters(&self) -> Vec<u64> {
        (0..STAT_COUNT)
            .map(|i| {
                self.stats
                    .get(&i, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Packets and bytes per frontend, summed over CPUs.
    pub fn service_counters(&self) -> Vec<(ServiceKey, ServiceCounters)> {
        self.service_stats
            .iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| {
                let total =
                    per_cpu
                        .iter()
                        .fold(ServiceCounters::default(), |a, c| ServiceCounters {
                            packets: a.packets + c.packets,
                            bytes: a.bytes + c.bytes,
                        });
                (k, total)
            })
            .collect()
    }

    pub fn conntrack_capacity(&self) -> u32 {
        self.conntrack_max
    }

    /// Number of conntrack entries (both directions, both families), counted by walking the keys.
    pub fn conntrack_entries(&self) -> usize {
        let v4 = match aya::maps::HashMap::<&MapData, CtKey, CtValue>::try_from(&self.conntrack) {
            Ok(map) => map.keys().filter(Result::is_ok).count(),
            Err(_) => 0,
        };
        let v6 = match aya::maps::HashMap::<&MapData, CtKey6, CtValue6>::try_from(&self.conntrack6)
        {
            Ok(map) => map.keys().filter(Result::is_ok).count(),
            Err(_) => 0,
        };
        v4 + v6
    }
}
