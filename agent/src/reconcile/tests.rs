use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use super::*;
use crate::model::{FrontendState, NsName, Protocol};

/// In-memory maps with an optional table count limit, to drive the failure paths.
struct FakeMaps {
    services: HashMap<ServiceKey, ServiceValue>,
    /// Tables with members, by base chunk.
    tables: BTreeMap<u32, Vec<u32>>,
    backends: HashMap<u32, Backend>,
    table_capacity: Option<usize>,
    arena_chunks: u32,
    ranges: std::collections::BTreeSet<(ServiceKey, (IpAddr, u8))>,
    purged: Vec<ServiceKey>,
}

impl Default for FakeMaps {
    fn default() -> Self {
        Self {
            services: HashMap::new(),
            tables: BTreeMap::new(),
            backends: HashMap::new(),
            table_capacity: None,
            arena_chunks: 1 << 16,
            ranges: Default::default(),
            purged: Vec::new(),
        }
    }
}

impl MapWriter for FakeMaps {
    fn arena_chunks(&self) -> u32 {
        self.arena_chunks
    }
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError> {
        self.backends.insert(id, backend);
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.backends.remove(&id);
        Ok(())
    }
    fn put_table(&mut self, base: u32, slots: &[u32], members: &[u32]) -> Result<(), MapError> {
        let mut distinct: Vec<u32> = slots.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let mut given = members.to_vec();
        given.sort_unstable();
        assert_eq!(
            distinct, given,
            "members are the table's distinct backend ids"
        );
        if self.table_capacity.is_some_and(|c| self.tables.len() >= c) {
            return Err(MapError {
                map: "maglev",
                op: "insert",
                message: "full".into(),
            });
        }
        let end = base + crate::arena::chunks_for(slots.len() as u32);
        assert!(end <= self.arena_chunks, "table written past the arena");
        for (&b, t) in &self.tables {
            let e = b + crate::arena::chunks_for(t.len() as u32);
            assert!(
                end <= b || e <= base,
                "table at {base} written over live table at {b}"
            );
        }
        self.tables.insert(base, slots.to_vec());
        Ok(())
    }
    fn table_equals(&mut self, base: u32, slots: &[u32]) -> bool {
        self.tables.get(&base).is_some_and(|t| t == slots)
    }
    fn delete_table(&mut self, base: u32) -> Result<(), MapError> {
        self.tables.remove(&base);
        Ok(())
    }
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        self.services.insert(key, value);
        Ok(())
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapError> {
        self.services.remove(&key);
        Ok(())
    }
    fn put_source_range(&mut self, key: ServiceKey, range: (IpAddr, u8)) -> Result<(), MapError> {
        self.ranges.insert((key, range));
        Ok(())
    }
    fn delete_source_range(
        &mut self,
        key: ServiceKey,
        range: (IpAddr, u8),
    ) -> Result<(), MapError> {
        self.ranges.remove(&(key, range));
        Ok(())
    }
    fn purge_flows(
        &mut self,
        frontends: &std::collections::BTreeSet<ServiceKey>,
    ) -> Result<usize, MapError> {
        self.purged.extend(frontends.iter().copied());
        Ok(frontends.len())
    }
}

impl FakeMaps {
    /// Which backend addresses a frontend's table sends traffic to, with slot counts.
    fn shares(&self, f: &Frontend) -> BTreeMap<IpAddr, usize> {
        let v = self.services[&service_key(f)];
        let mut out = BTreeMap::new();
        let table = &self.tables[&v.table_base];
        assert_eq!(table.len(), v.table_size as usize);
        for &id in table {
            let ip = weir_common::ip_of(&self.backends[&id].addr_be);
            *out.entry(ip).or_default() += 1;
        }
        out
    }
}

fn frontend(last: u8) -> Frontend {
    Frontend {
        ip: Ipv4Addr::new(10, 96, 0, last).into(),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn desired(entries: &[(Frontend, &[u8])]) -> Desired {
    let mut d = Desired::default();
    for (f, backends) in entries {
        d.frontends.insert(
            *f,
            Arc::new(FrontendState {
                service: NsName {
                    namespace: "default".into(),
                    name: format!("svc-{}", f.ip),
                },
                port_name: "http".into(),
                drop_when_empty: false,
                affinity_timeout_s: 0,
                source_ranges: Vec::new(),
                l7: false,
                backends: backends
                    .iter()
                    .map(|b| BackendAddr {
                        ip: Ipv4Addr::new(10, 0, 0, *b).into(),
                        port: 8080,
                        protocol: Protocol::Tcp,
                    })
                    .collect(),
            }),
        );
    }
    d
}

#[test]
fn programs_tables_and_swaps_them_whole_on_change() {
    let mut r = Reconciler::new(FakeMaps::default());
    let f = frontend(10);
    let report = r.sync(&desired(&[(f, &[1, 2, 3])]));
    assert_eq!(
        report,
        SyncReport {
            frontends_written: 1,
            frontends_deleted: 0,
            frontends_refused: 0,
            errors: 0
        }
    );
    let first = r.writer().services[&service_key(&f)];
    assert_eq!(first.backend_count, 3);
    assert_eq!(r.writer().shares(&f).len(), 3);
    assert_eq!(r.writer().tables.len(), 1);

    // Unchanged input writes nothing.
    assert_eq!(r.sync(&desired(&[(f, &[1, 2, 3])])).frontends_written, 0);

    r.sync(&desired(&[(f, &[1, 2])]));
    let second = r.writer().services[&service_key(&f)];
    assert_ne!(
        first.table_base, second.table_base,
        "a new table id, switched in one write"
    );
    assert_eq!(
        r.writer().tables.keys().copied().collect::<Vec<_>>(),
        [second.table_base],
        "old table deleted"
    );
    assert_eq!(
        r.writer().shares(&f).keys().copied().collect::<Vec<_>>(),
        [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]
    );
    assert_eq!(
        r.writer().backends.len(),
        2,
        "backend 3 removed once unreferenced"
    );
}

#[test]
fn no_backends_means_reject_and_removal_cleans_everything() {
    let mut r = Reconciler::new(FakeMaps::default());
    let (a, b) = (frontend(10), frontend(11));
    r.sync(&desired(&[(a, &[1]), (b, &[])]));
    let vb = r.writer().services[&service_key(&b)];
    assert_eq!(vb.flags & SVC_FLAG_REJECT, SVC_FLAG_REJECT);
    assert_eq!(vb.table_size, 0);

    let report = r.sync(&desired(&[]));
    assert_eq!(report.frontends_deleted, 2);
    let w = r.writer();
    assert!(w.services.is_empty() && w.tables.is_empty() && w.backends.is_empty());
}

#[test]
fn a_full_map_keeps_the_previous_table_and_other_services() {
    let mut r = Reconciler::new(FakeMaps::default());
    let (a, b) = (frontend(10), frontend(11));
    r.sync(&desired(&[(a, &[1, 2])]));
    let before = r.writer().services[&service_key(&a)];
    // Room for a's current table only: b's table and a's replacement cannot fit.
    let used = r.writer().tables.len();
    r.writer.table_capacity = Some(used);
    let report = r.sync(&desired(&[(a, &[1, 2, 3]), (b, &[4])]));
    assert_eq!(report.errors, 2);
    assert_eq!(
        r.writer().services[&service_key(&a)],
        before,
        "a keeps serving from its old table"
    );
    assert!(!r.writer().services.contains_key(&service_key(&b)));
    assert_eq!(
        r.writer().tables.len(),
        used,
        "no partial table left behind"
    );

    // Room appears: the next sync programs both.
    r.writer.table_capacity = None;
    let report = r.sync(&desired(&[(a, &[1, 2, 3]), (b, &[4])]));
    assert_eq!(report.errors, 0);
    assert_eq!(r.writer().shares(&a).len(), 3);
    assert_eq!(r.writer().shares(&b).len(), 1);
}

#[test]
fn adoption_keeps_backend_ids_and_prunes_orphan_tables() {
    let mut first = Reconciler::new(FakeMaps::default());
    let (a, b) = (frontend(10), frontend(11));
    first.sync(&desired(&[(a, &[1, 2]), (b, &[3])]));
    let maps = first.writer;
    let ids: BTreeMap<u32, Backend> = maps.backends.iter().map(|(k, v)| (*k, *v)).collect();
    let adopted = Adopted {
        services: maps.services.iter().map(|(k, v)| (*k, *v)).collect(),
        backends: ids.iter().map(|(k, v)| (*k, *v)).collect(),
        tables: maps.tables.keys().copied().collect(),
    };
    // A leftover table nobody references, as after a crash between writing and switching.
    let mut maps = maps;
    maps.tables.insert(999, vec![1]);
    let mut adopted = adopted;
    adopted.tables.push(999);

    let mut second = Reconciler::adopt(maps, adopted);
    second.sync(&desired(&[(a, &[1, 2])]));
    let w = second.writer();
    assert!(!w.services.contains_key(&service_key(&b)));
    let live = w.services[&service_key(&a)].table_base;
    assert_eq!(
        w.tables.keys().copied().collect::<Vec<_>>(),
        [live],
        "orphan and replaced tables pruned"
    );
    for (id, backend) in &w.backends {
        assert_eq!(ids.get(id), Some(backend), "backend ids survive a restart");
    }
    assert_eq!(w.backends.len(), 2);
}

#[test]
fn source_ranges_follow_the_frontend() {
    let mut r = Reconciler::new(FakeMaps::default());
    let f = frontend(10);
    let mut d = desired(&[(f, &[1])]);
    let net = |a: u8, len: u8| (IpAddr::from(Ipv4Addr::new(192, 0, 2, a)), len);
    Arc::make_mut(d.frontends.get_mut(&f).expect("frontend")).source_ranges =
        vec![net(0, 24), net(128, 25)];
    r.sync(&d);
    let v = r.writer().services[&service_key(&f)];
    assert_eq!(
        v.flags & weir_common::SVC_FLAG_SOURCE_RANGES,
        weir_common::SVC_FLAG_SOURCE_RANGES
    );
    assert_eq!(r.writer().ranges.len(), 2);

    Arc::make_mut(d.frontends.get_mut(&f).expect("frontend")).source_ranges = vec![net(0, 24)];
    r.sync(&d);
    assert_eq!(r.writer().ranges.len(), 1, "the removed range is deleted");

    Arc::make_mut(d.frontends.get_mut(&f).expect("frontend")).source_ranges = Vec::new();
    r.sync(&d);
    let v = r.writer().services[&service_key(&f)];
    assert_eq!(
        v.flags & weir_common::SVC_FLAG_SOURCE_RANGES,
        0,
        "no ranges: everyone allowed"
    );
    assert!(r.writer().ranges.is_empty());

    Arc::make_mut(d.frontends.get_mut(&f).expect("frontend")).source_ranges = vec![net(0, 24)];
    r.sync(&d);
    r.sync(&desired(&[]));
    assert!(r.writer().ranges.is_empty(), "deleted with the frontend");
}

#[test]
fn deleting_a_udp_frontend_purges_its_flows_but_not_tcp() {
    let mut r = Reconciler::new(FakeMaps::default());
    let tcp = frontend(10);
    let udp = Frontend {
        protocol: Protocol::Udp,
        ..frontend(11)
    };
    r.sync(&desired(&[(tcp, &[1]), (udp, &[1])]));
    r.sync(&desired(&[]));
    assert_eq!(r.writer().purged, [service_key(&udp)]);
}

#[test]
fn a_full_arena_refuses_new_tables_and_keeps_serving_the_rest() {
    // 3 backends → 4001 slots → 16 chunks; 20 chunks hold one such table and nothing more.
    let mut r = Reconciler::new(FakeMaps {
        arena_chunks: 20,
        ..FakeMaps::default()
    });
    let (a, b) = (frontend(10), frontend(11));
    assert_eq!(r.sync(&desired(&[(a, &[1, 2, 3])])).errors, 0);
    let before = r.writer().services[&service_key(&a)];
    let report = r.sync(&desired(&[(a, &[1, 2, 3]), (b, &[5, 6, 7])]));
    assert_eq!(report.errors, 1, "b's table does not fit");
    assert!(!r.writer().services.contains_key(&service_key(&b)));
    // a's replacement needs room beside the table it replaces.
    assert_eq!(r.sync(&desired(&[(a, &[1, 2, 4])])).errors, 1);
    assert_eq!(
        r.writer().services[&service_key(&a)],
        before,
        "a keeps its table"
    );
    assert_eq!(
        r.arena().used(),
        16,
        "failed allocations leave nothing behind"
    );
    // Room appears when a goes away (deleted before b is written, in the same sync).
    let report = r.sync(&desired(&[(b, &[5, 6, 7])]));
    assert_eq!(report.errors, 0);
    assert_eq!(
        r.writer().shares(&b).keys().copied().collect::<Vec<_>>(),
        [5, 6, 7].map(|x| Ipv4Addr::new(10, 0, 0, x))
    );
}

#[test]
fn adopted_tables_that_are_already_right_are_kept_in_place() {
    let mut first = Reconciler::new(FakeMaps::default());
    let (a, b) = (frontend(10), frontend(11));
    first.sync(&desired(&[(a, &[1, 2]), (b, &[3])]));
    let maps = first.writer;
    let adopted = Adopted {
        services: maps.services.iter().map(|(k, v)| (*k, *v)).collect(),
        backends: maps.backends.iter().map(|(k, v)| (*k, *v)).collect(),
        tables: maps.tables.keys().copied().collect(),
    };
    let before_a = maps.services[&service_key(&a)];
    let before_b = maps.services[&service_key(&b)];
    let mut second = Reconciler::adopt(maps, adopted);
    assert_eq!(
        second.arena().used(),
        crate::arena::chunks_for(before_a.table_size)
            + crate::arena::chunks_for(before_b.table_size)
    );
    // a unchanged, b gains a backend (a new table).
    let report = second.sync(&desired(&[(a, &[1, 2]), (b, &[3, 4])]));
    assert_eq!(report.errors, 0);
    let w = second.writer();
    assert_eq!(
        w.services[&service_key(&a)],
        before_a,
        "a's table kept, not rewritten"
    );
    assert_ne!(w.services[&service_key(&b)].table_base, before_b.table_base);
    assert_eq!(w.shares(&b).len(), 2);
    // a unchanged again: nothing to write at all now that its backends are known.
    assert_eq!(
        second
            .sync(&desired(&[(a, &[1, 2]), (b, &[3, 4])]))
            .frontends_written,
        0
    );
}

#[test]
fn a_backend_shared_by_frontends_lives_until_the_last_one_lets_go() {
    let mut r = Reconciler::new(FakeMaps::default());
    let (a, b) = (frontend(10), frontend(11));
    r.sync(&desired(&[(a, &[1, 2]), (b, &[2, 3])]));
    assert_eq!(r.writer().backends.len(), 3);
    // b drops 2, a still uses it.
    r.sync(&desired(&[(a, &[1, 2]), (b, &[3])]));
    assert_eq!(r.writer().backends.len(), 3);
    // a goes away: 1 and 2 are unused now.
    let report = r.sync(&desired(&[(b, &[3])]));
    assert_eq!(report.frontends_deleted, 1);
    let left: Vec<IpAddr> = r
        .writer()
        .backends
        .values()
        .map(|b| weir_common::ip_of(&b.addr_be))
        .collect();
    assert_eq!(left, [IpAddr::from(Ipv4Addr::new(10, 0, 0, 3))]);
    // The same desired state again writes nothing (the frontend state is shared, not compared).
    let d = desired(&[(b, &[3])]);
    r.sync(&d);
    assert_eq!(r.sync(&d).frontends_written, 0);
}
