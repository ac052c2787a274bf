//! The baselines' rule sets, written the way kube-proxy's proxiers write them, and the real tools that
//! load them (`iptables-restore`, `nft -f`) run inside a network namespace with a time cap.
//!
//! iptables mode (pkg/proxy/iptables): `KUBE-SERVICES` holds one rule per ClusterIP:port jumping to a
//! `KUBE-SVC-<hash>` chain, which marks traffic from outside the cluster CIDR for masquerade and picks an
//! endpoint with `-m statistic --mode random --probability 1/(n-i)`; each `KUBE-SEP-<hash>` chain marks
//! hairpin traffic and DNATs. `KUBE-POSTROUTING` masquerades marked packets. A sync is one
//! `iptables-restore --noflush --counters` whose chains are declared (and so flushed) and refilled.
//!
//! nftables mode (pkg/proxy/nftables): table `ip kube-proxy`; the `services` chain looks the packet up in
//! the `service-ips` verdict map keyed by `ipv4_addr . inet_proto . inet_service`; a per-service chain
//! marks for masquerade and picks an endpoint with `numgen random mod n vmap { i : goto endpoint-… }`;
//! endpoint chains DNAT. Filter-hook chains check ClusterIPs and services without endpoints.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::scenario::{CLUSTER_CIDR, SERVICE_CIDR, SERVICE_PORT, ServiceDef, TARGET_PORT};

/// Which iptables binary: kube-proxy's iptables mode runs on either kernel API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IptBackend {
    /// `iptables-legacy-restore`: the x_tables kernel API.
    Legacy,
    /// `iptables-nft-restore`: the same rules translated to nf_tables (with xt compat matches).
    Nft,
}

impl IptBackend {
    fn restore_binary(self) -> &'static str {
        match self {
            IptBackend::Legacy => "iptables-legacy-restore",
            IptBackend::Nft => "iptables-nft-restore",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            IptBackend::Legacy => "x_tables, loaded with iptables-legacy-restore",
            IptBackend::Nft => "nf_tables, loaded with iptables-nft-restore",
        }
    }
}

/// FNV-1a over `data` from `basis`.
fn fnv1a(basis: u64, data: &[u8]) -> u64 {
    data.iter().fold(basis, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `len` (≤ 25) base32 characters of a 128-bit hash of `s`: names as long as kube-proxy's (which takes
/// them from a SHA-256; any stable hash serves for a benchmark).
pub fn hash_name(s: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let a = fnv1a(0xcbf2_9ce4_8422_2325, s.as_bytes());
    let b = fnv1a(0x8422_2325_cbf2_9ce4, s.as_bytes());
    let bits = (u128::from(a) << 64) | u128::from(b);
    (0..len.min(25))
        .map(|i| char::from(ALPHABET[((bits >> (i * 5)) & 31) as usize]))
        .collect()
}

fn svc_chain(d: &ServiceDef) -> String {
    format!(
        "KUBE-SVC-{}",
        hash_name(&format!("{}tcp", d.port_name()), 16)
    )
}

fn sep_chain(d: &ServiceDef, ep: std::net::Ipv4Addr) -> String {
    format!(
        "KUBE-SEP-{}",
        hash_name(&format!("{}tcp{ep}:{TARGET_PORT}", d.port_name()), 16)
    )
}

/// The filter table kube-proxy keeps (all services have endpoints here, so its service chains are empty).
fn iptables_filter(out: &mut String) {
    out.push_str(
        "*filter\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-EXTERNAL-SERVICES - [0:0]\n\
         :KUBE-FORWARD - [0:0]\n\
         :KUBE-PROXY-FIREWALL - [0:0]\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n",
    );
}

/// The fixed part of the nat table.
fn iptables_nat_head(out: &mut String) {
    out.push_str(
        "*nat\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n",
    );
}

fn iptables_nat_fixed_rules(out: &mut String) {
    out.push_str(
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
}

fn iptables_service_jump(out: &mut String, d: &ServiceDef) {
    let _ = writeln!(
        out,
        "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {}/32 --dport {SERVICE_PORT} -j {}",
        d.port_name(),
        d.vip,
        svc_chain(d)
    );
}

fn iptables_nodeports_last(out: &mut String) {
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
}

/// Chain declarations of one service (its KUBE-SVC and KUBE-SEP chains).
fn iptables_service_chains(out: &mut String, d: &ServiceDef) {
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(d));
    for ep in &d.endpoints {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(d, *ep));
    }
}

/// Rules of one service's KUBE-SVC and KUBE-SEP chains.
fn iptables_service_rules(out: &mut String, d: &ServiceDef) {
    let svc = svc_chain(d);
    let name = d.port_name();
    let _ = writeln!(
        out,
        "-A {svc} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {}/32 --dport {SERVICE_PORT} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        d.vip
    );
    let n = d.endpoints.len();
    for (i, ep) in d.endpoints.iter().enumerate() {
        let sep = sep_chain(d, *ep);
        if i + 1 < n {
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{name} -> {ep}:{TARGET_PORT}\" -m statistic --mode random --probability {:.10} -j {sep}",
                1.0 / (n - i) as f64
            );
        } else {
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{name} -> {ep}:{TARGET_PORT}\" -j {sep}"
            );
        }
    }
    for ep in &d.endpoints {
        let sep = sep_chain(d, *ep);
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {name} -s {ep}/32 -j KUBE-MARK-MASQ\n\
             -A {sep} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {ep}:{TARGET_PORT}"
        );
    }
}

/// Declares (and so flushes) chains about to be deleted: `-X` needs them empty, which is how kube-proxy
/// writes them.
fn declare(out: &mut String, chains: &[String]) {
    for chain in chains {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
}

/// A full sync: every chain declared and refilled, `stale` chains deleted (input for
/// `iptables-restore --noflush --counters`).
pub fn iptables_full(defs: &[ServiceDef], stale: &[String]) -> String {
    let mut out = String::with_capacity(defs.len() * (400 + 300 * defs[0].endpoints.len()));
    iptables_filter(&mut out);
    iptables_nat_head(&mut out);
    for d in defs {
        iptables_service_chains(&mut out, d);
    }
    declare(&mut out, stale);
    iptables_nat_fixed_rules(&mut out);
    for d in defs {
        iptables_service_jump(&mut out, d);
    }
    iptables_nodeports_last(&mut out);
    for d in defs {
        iptables_service_rules(&mut out, d);
    }
    for chain in stale {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

/// What kube-proxy (1.28+) writes when one service's endpoints changed: the top-level chains in full
/// (KUBE-SERVICES lists every service), the changed service's chains, and the removal of chains that
/// went stale.
pub fn iptables_partial(defs: &[ServiceDef], changed: &ServiceDef, stale: &[String]) -> String {
    let mut out = String::new();
    iptables_filter(&mut out);
    iptables_nat_head(&mut out);
    iptables_service_chains(&mut out, changed);
    declare(&mut out, stale);
    iptables_nat_fixed_rules(&mut out);
    for d in defs {
        iptables_service_jump(&mut out, d);
    }
    iptables_nodeports_last(&mut out);
    iptables_service_rules(&mut out, changed);
    for chain in stale {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

/// The KUBE-SEP chains of `old` that `new` no longer has.
pub fn iptables_stale_chains(old: &ServiceDef, new: &ServiceDef) -> Vec<String> {
    old.endpoints
        .iter()
        .filter(|ep| !new.endpoints.contains(ep))
        .map(|ep| sep_chain(old, *ep))
        .collect()
}

/// The jumps from the built-in chains, which kube-proxy ensures once with `iptables -I` (outside the
/// restore): input for `iptables-restore --noflush`.
pub fn iptables_jumps() -> String {
    "*filter\n\
     -I INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
     -I INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
     -I INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
     -I FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
     -I FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
     -I FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -I FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
     -I OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
     -I OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     COMMIT\n\
     *nat\n\
     -I PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -I OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -I POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
     COMMIT\n"
        .to_owned()
}

const NFT_TABLE: &str = "ip kube-proxy";

fn nft_service_chain(d: &ServiceDef) -> String {
    let base = format!(
        "{}/{}/tcp/{}",
        super::scenario::NAMESPACE,
        d.name,
        super::scenario::PORT_NAME
    );
    format!("service-{}-{base}", hash_name(&base, 8))
}

fn nft_endpoint_chain(d: &ServiceDef, ep: std::net::Ipv4Addr) -> String {
    let base = format!(
        "{}/{}/tcp/{}__{ep}/{TARGET_PORT}",
        super::scenario::NAMESPACE,
        d.name,
        super::scenario::PORT_NAME
    );
    format!("endpoint-{}-{base}", hash_name(&base, 8))
}

/// Table, base chains, maps and sets, with their fixed rules (flushed and rewritten on a full sync).
fn nft_base(out: &mut String) {
    let t = NFT_TABLE;
    let _ = writeln!(
        out,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}"
    );
    for (chain, hook) in [
        ("mark-for-masquerade", ""),
        ("masquerading", ""),
        ("services", ""),
        ("service-endpoints-check", ""),
        ("nodeport-endpoints-check", ""),
        ("firewall-check", ""),
        ("cluster-ips-check", ""),
        (
            "filter-prerouting",
            "{ type filter hook prerouting priority -110 ; }",
        ),
        (
            "filter-forward",
            "{ type filter hook forward priority -110 ; }",
        ),
        ("filter-input", "{ type filter hook input priority -110 ; }"),
        (
            "filter-output",
            "{ type filter hook output priority -110 ; }",
        ),
        (
            "filter-output-post-dnat",
            "{ type filter hook output priority -90 ; }",
        ),
        (
            "nat-prerouting",
            "{ type nat hook prerouting priority -100 ; }",
        ),
        ("nat-output", "{ type nat hook output priority -100 ; }"),
        (
            "nat-postrouting",
            "{ type nat hook postrouting priority 100 ; }",
        ),
    ] {
        let _ = writeln!(out, "add chain {t} {chain} {hook}");
        let _ = writeln!(out, "flush chain {t} {chain}");
    }
    for (kind, name, spec) in [
        (
            "set",
            "cluster-ips",
            "type ipv4_addr ; comment \"Active ClusterIPs\" ;",
        ),
        (
            "set",
            "nodeport-ips",
            "type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ;",
        ),
        (
            "map",
            "service-ips",
            "type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ;",
        ),
        (
            "map",
            "service-nodeports",
            "type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ;",
        ),
        (
            "map",
            "no-endpoint-services",
            "type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ;",
        ),
        (
            "map",
            "no-endpoint-nodeports",
            "type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ;",
        ),
        (
            "map",
            "firewall-ips",
            "type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ;",
        ),
    ] {
        let _ = writeln!(out, "add {kind} {t} {name} {{ {spec} }}");
        let _ = writeln!(out, "flush {kind} {t} {name}");
    }
    let rules = [
        ("mark-for-masquerade", "mark set mark or 0x4000".to_owned()),
        ("masquerading", "mark and 0x4000 == 0 return".to_owned()),
        ("masquerading", "mark set mark xor 0x4000".to_owned()),
        ("masquerading", "masquerade fully-random".to_owned()),
        (
            "services",
            "ip daddr . meta l4proto . th dport vmap @service-ips".to_owned(),
        ),
        (
            "services",
            "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
                .to_owned(),
        ),
        (
            "service-endpoints-check",
            "ip daddr . meta l4proto . th dport vmap @no-endpoint-services".to_owned(),
        ),
        (
            "nodeport-endpoints-check",
            "ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports".to_owned(),
        ),
        (
            "firewall-check",
            "ip daddr . meta l4proto . th dport vmap @firewall-ips".to_owned(),
        ),
        (
            "cluster-ips-check",
            "ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
                .to_owned(),
        ),
        (
            "cluster-ips-check",
            format!(
                "ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
            ),
        ),
        ("filter-prerouting", "ct state new jump firewall-check".to_owned()),
        (
            "filter-forward",
            "ct state new jump service-endpoints-check".to_owned(),
        ),
        ("filter-forward", "ct state new jump cluster-ips-check".to_owned()),
        (
            "filter-input",
            "ct state new jump nodeport-endpoints-check".to_owned(),
        ),
        (
            "filter-input",
            "ct state new jump service-endpoints-check".to_owned(),
        ),
        (
            "filter-output",
            "ct state new jump service-endpoints-check".to_owned(),
        ),
        ("filter-output", "ct state new jump firewall-check".to_owned()),
        (
            "filter-output-post-dnat",
            "ct state new jump cluster-ips-check".to_owned(),
        ),
        ("nat-prerouting", "jump services".to_owned()),
        ("nat-output", "jump services".to_owned()),
        ("nat-postrouting", "jump masquerading".to_owned()),
    ];
    for (chain, rule) in rules {
        let _ = writeln!(out, "add rule {t} {chain} {rule}");
    }
}

/// One service's chains (created, flushed, refilled) and its map elements. Every chain is added before
/// the rule that jumps to it: `nft -f` resolves a `goto` when it reads it.
fn nft_service(out: &mut String, d: &ServiceDef, elements: bool) {
    let t = NFT_TABLE;
    let svc = nft_service_chain(d);
    let endpoints: Vec<String> = d
        .endpoints
        .iter()
        .map(|ep| nft_endpoint_chain(d, *ep))
        .collect();
    for chain in std::iter::once(&svc).chain(&endpoints) {
        let _ = writeln!(out, "add chain {t} {chain}");
        let _ = writeln!(out, "flush chain {t} {chain}");
    }
    for (ep, chain) in d.endpoints.iter().zip(&endpoints) {
        let _ = writeln!(
            out,
            "add rule {t} {chain} ip saddr {ep} jump mark-for-masquerade"
        );
        let _ = writeln!(
            out,
            "add rule {t} {chain} meta l4proto tcp dnat to {ep}:{TARGET_PORT}"
        );
    }
    let _ = writeln!(
        out,
        "add rule {t} {svc} ip daddr {} tcp dport {SERVICE_PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        d.vip
    );
    let vmap: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(i, chain)| format!("{i} : goto {chain}"))
        .collect();
    let _ = writeln!(
        out,
        "add rule {t} {svc} numgen random mod {} vmap {{ {} }}",
        d.endpoints.len(),
        vmap.join(" , ")
    );
    if elements {
        let _ = writeln!(out, "add element {t} cluster-ips {{ {} }}", d.vip);
        let _ = writeln!(
            out,
            "add element {t} service-ips {{ {} . tcp . {SERVICE_PORT} : goto {svc} }}",
            d.vip
        );
    }
}

/// A full sync of the nftables proxier: base objects, every service chain flushed and refilled, every
/// map element re-added, stale chains deleted (input for `nft -f`).
pub fn nft_full(defs: &[ServiceDef], stale: &[String]) -> String {
    let mut out = String::with_capacity(defs.len() * (600 + 350 * defs[0].endpoints.len()));
    nft_base(&mut out);
    for d in defs {
        nft_service(&mut out, d, true);
    }
    delete_chains(&mut out, stale);
    out
}

/// The nftables proxier's partial sync for one service whose endpoints changed: its chains rewritten,
/// stale endpoint chains deleted; the maps are untouched (the ClusterIP did not change).
pub fn nft_partial(changed: &ServiceDef, stale: &[String]) -> String {
    let mut out = String::new();
    nft_service(&mut out, changed, false);
    delete_chains(&mut out, stale);
    out
}

/// The endpoint chains of `old` that `new` no longer has.
pub fn nft_stale_chains(old: &ServiceDef, new: &ServiceDef) -> Vec<String> {
    old.endpoints
        .iter()
        .filter(|ep| !new.endpoints.contains(ep))
        .map(|ep| nft_endpoint_chain(old, *ep))
        .collect()
}

/// Stale chains are emptied, then deleted (after the rules that jumped to them were flushed).
fn delete_chains(out: &mut String, chains: &[String]) {
    for chain in chains {
        let _ = writeln!(out, "flush chain {NFT_TABLE} {chain}");
        let _ = writeln!(out, "delete chain {NFT_TABLE} {chain}");
    }
}

/// kube-proxy's rules for `d` as a NodePort Service (externalTrafficPolicy Cluster) on `node_port`, added
/// to a loaded full rule set (input for `iptables-restore --noflush`; KUBE-NODEPORTS is flushed by every
/// full sync, so this goes in after each): the KUBE-NODEPORTS rule jumps to the service's KUBE-EXT
/// chain, which marks for masquerade and goes on to its KUBE-SVC chain.
pub fn iptables_nodeport(d: &ServiceDef, node_port: u16) -> String {
    let ext = format!(
        "KUBE-EXT-{}",
        hash_name(&format!("{}tcp", d.port_name()), 16)
    );
    let name = d.port_name();
    format!(
        "*nat\n\
         :{ext} - [0:0]\n\
         -A KUBE-NODEPORTS -m comment --comment {name} -m tcp -p tcp --dport {node_port} -j {ext}\n\
         -A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n\
         -A {ext} -j {}\n\
         COMMIT\n",
        svc_chain(d)
    )
}

/// The nftables proxier's objects for `d` as a NodePort Service on `node_port` answering on `node_ip`,
/// added to a loaded full rule set (input for `nft -f`; a full sync flushes the maps, so this goes in
/// after each): an `external-…` chain marking for masquerade and going to the service chain, the
/// `service-nodeports` element that leads there, and the node IP in `nodeport-ips`.
pub fn nft_nodeport(d: &ServiceDef, node_port: u16, node_ip: std::net::Ipv4Addr) -> String {
    let t = NFT_TABLE;
    let base = format!(
        "{}/{}/tcp/{}",
        super::scenario::NAMESPACE,
        d.name,
        super::scenario::PORT_NAME
    );
    let ext = format!("external-{}-{base}", hash_name(&base, 8));
    let svc = nft_service_chain(d);
    format!(
        "add chain {t} {ext}\n\
         flush chain {t} {ext}\n\
         add rule {t} {ext} jump mark-for-masquerade\n\
         add rule {t} {ext} goto {svc}\n\
         add element {t} nodeport-ips {{ {node_ip} }}\n\
         add element {t} service-nodeports {{ tcp . {node_port} : goto {ext} }}\n"
    )
}

/// How a rule load ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    Done(Duration),
    /// Still running at the cap; it was killed.
    TimedOut(Duration),
}

impl Load {
    pub fn seconds(self) -> Option<f64> {
        match self {
            Load::Done(d) => Some(d.as_secs_f64()),
            Load::TimedOut(_) => None,
        }
    }
}

/// Runs `ip netns exec <netns> <argv>` with `input` on stdin and returns how long it took; kills it at
/// `cap`. Fails if it exits non-zero.
pub fn timed_load(netns: &str, argv: &[&str], input: &str, cap: Duration) -> anyhow::Result<Load> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns])
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let line = format!("ip netns exec {netns} {}", argv.join(" "));
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawn `{line}`"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    // Fed from a thread: a tool that reads as it works would otherwise hold us in the write, past the
    // cap. A tool that fails early (or is killed at the cap) closes its stdin and ends the write.
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
        wait_capped(&mut child, &line, started, cap)
    })
}

fn wait_capped(
    child: &mut std::process::Child,
    line: &str,
    started: Instant,
    cap: Duration,
) -> anyhow::Result<Load> {
    loop {
        if let Some(status) = child.try_wait()? {
            let took = started.elapsed();
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                let err: String = err.lines().take(5).collect::<Vec<_>>().join("\n");
                bail!("`{line}` failed ({status}): {err}");
            }
            return Ok(Load::Done(took));
        }
        if started.elapsed() > cap {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Load::TimedOut(cap));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `iptables-restore --noflush --counters` of `input` in `netns`.
pub fn iptables_restore(
    netns: &str,
    backend: IptBackend,
    input: &str,
    cap: Duration,
) -> anyhow::Result<Load> {
    timed_load(
        netns,
        &[backend.restore_binary(), "--noflush", "--counters"],
        input,
        cap,
    )
}

/// `nft -f -` of `input` in `netns`.
pub fn nft_apply(netns: &str, input: &str, cap: Duration) -> anyhow::Result<Load> {
    timed_load(netns, &["nft", "-f", "-"], input, cap)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn def(i: usize, eps: &[[u8; 4]]) -> ServiceDef {
        ServiceDef::new(i, eps.iter().map(|e| Ipv4Addr::from(*e)).collect())
    }

    #[test]
    fn names_are_stable_and_kube_proxy_shaped() {
        let d = def(1, &[[10, 0, 1, 1]]);
        assert_eq!(svc_chain(&d), svc_chain(&d.clone()));
        assert_eq!(svc_chain(&d).len(), "KUBE-SVC-".len() + 16);
        assert_ne!(svc_chain(&d), svc_chain(&def(2, &[[10, 0, 1, 1]])));
        assert!(
            nft_endpoint_chain(&d, Ipv4Addr::new(10, 0, 1, 1))
                .ends_with("-bench/svc-1/tcp/http__10.0.1.1/8080")
        );
    }

    #[test]
    fn iptables_rules_balance_with_decreasing_probabilities() {
        let d = def(0, &[[10, 0, 1, 1], [10, 0, 1, 2], [10, 0, 1, 3]]);
        let text = iptables_full(std::slice::from_ref(&d), &[]);
        assert!(text.starts_with("*filter\n"));
        assert!(
            text.contains("-m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-")
        );
        assert!(
            text.contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-")
        );
        assert!(text.contains("-j DNAT --to-destination 10.0.1.3:8080"));
        assert!(text.contains("-d 10.96.0.1/32 --dport 80 -j KUBE-SVC-"));
        assert_eq!(text.matches("COMMIT\n").count(), 2);
        // The nodeports rule comes after every service rule.
        let last_service = text
            .rfind("-A KUBE-SERVICES -m comment --comment \"bench/")
            .unwrap();
        let nodeports = text.find("--dst-type LOCAL").unwrap();
        assert!(nodeports > last_service);
    }

    #[test]
    fn nft_rules_use_the_verdict_map_and_numgen() {
        let d = def(0, &[[10, 0, 1, 1], [10, 0, 1, 2]]);
        let text = nft_full(std::slice::from_ref(&d), &[]);
        assert!(text.contains("ip daddr . meta l4proto . th dport vmap @service-ips"));
        assert!(text.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        assert!(text.contains(
            "add element ip kube-proxy service-ips { 10.96.0.1 . tcp . 80 : goto service-"
        ));
        assert!(text.contains("meta l4proto tcp dnat to 10.0.1.2:8080"));
        let new = def(0, &[[10, 0, 1, 1], [10, 0, 1, 9]]);
        let stale = nft_stale_chains(&d, &new);
        assert_eq!(stale.len(), 1);
        assert!(nft_partial(&new, &stale).contains("delete chain ip kube-proxy endpoint-"));
        assert_eq!(iptables_stale_chains(&d, &new).len(), 1);
    }
}
