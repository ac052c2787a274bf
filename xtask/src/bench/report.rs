//! The results (serialised as `results.json`), the targets they are judged against, and the Markdown
//! report with its SVG charts.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::e2e::{E2eResults, Mode};
use super::forward::{self, ForwardResults};
use super::l7::{self, L7Results};
use super::maglev::{MaglevResults, PAPER_SIZE};
use super::packet::PacketResults;
use super::stats::Spread;
use super::svg::{Series, line_chart};

/// Everything one run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub schema: u32,
    pub profile: String,
    pub command: String,
    pub machine: Machine,
    pub elapsed_s: f64,
    pub maglev: Option<MaglevResults>,
    pub per_packet: Option<PacketResults>,
    pub end_to_end: Option<E2eResults>,
    pub l7: Option<L7Results>,
    /// NodePort forwarding rate (`--only forward`).
    pub forward: Option<ForwardResults>,
    pub targets: Vec<Target>,
    /// Experiments (or parts) that failed: the report says so instead of a figure.
    pub errors: Vec<String>,
    pub notes: Vec<String>,
    pub left_out: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_gb: f64,
    pub date_utc: String,
    pub iptables: String,
    pub nft: String,
    /// `git describe` of the workspace the bench was built from (`-dirty`: uncommitted changes).
    pub commit: String,
}

impl Machine {
    pub fn probe() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|r| r.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned());
        let mem_total_gb = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
        let out = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default()
        };
        Self {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            nproc: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            mem_total_gb,
            date_utc: out("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
            iptables: out("iptables-legacy", &["--version"]),
            nft: out("nft", &["--version"]),
            commit: out(
                "git",
                &[
                    "-C",
                    env!("CARGO_MANIFEST_DIR"),
                    "describe",
                    "--always",
                    "--dirty",
                ],
            ),
        }
    }
}

/// One target of the issue, judged.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    /// The goal, as text ("≤ 60 ns").
    pub goal: String,
    pub measured: String,
    /// `Some(true)` met, `Some(false)` missed, `None` not measured in this run (or report-only).
    pub met: Option<bool>,
    /// How far from the goal ("2.1× over", "with 35 % to spare").
    pub margin: String,
    /// Which figure it is judged on.
    pub basis: String,
}

pub(super) fn judge_max(
    name: &str,
    goal: &str,
    value: Option<f64>,
    limit: f64,
    unit: &str,
    basis: &str,
) -> Target {
    let (measured, met, margin) = match value {
        Some(v) if v.is_finite() => (
            if unit == "×" {
                format!("{}×", num(v))
            } else {
                format!("{} {unit}", num(v))
            },
            Some(v <= limit),
            if v <= limit {
                format!("{:.0} % under", (1.0 - v / limit) * 100.0)
            } else {
                format!("{:.2}× the limit", v / limit)
            },
        ),
        _ => ("not measured".to_owned(), None, String::new()),
    };
    Target {
        name: name.to_owned(),
        goal: goal.to_owned(),
        measured,
        met,
        margin,
        basis: basis.to_owned(),
    }
}

pub(super) fn judge_min(
    name: &str,
    goal: &str,
    value: Option<f64>,
    limit: f64,
    basis: &str,
) -> Target {
    let (measured, met, margin) = match value {
        Some(v) if v.is_finite() => (
            format!("{v:.2}×"),
            Some(v >= limit),
            if v >= limit {
                format!("{:.0} % above", (v / limit - 1.0) * 100.0)
            } else {
                format!("{:.0} % short", (1.0 - v / limit) * 100.0)
            },
        ),
        _ => ("not measured".to_owned(), None, String::new()),
    };
    Target {
        name: name.to_owned(),
        goal: goal.to_owned(),
        measured,
        met,
        margin,
        basis: basis.to_owned(),
    }
}

/// A number with sensible precision.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn net(r: &PacketResults, n: usize, path: &str, method: &str) -> Option<Spread> {
    r.points
        .iter()
        .find(|p| p.services == n)?
        .paths
        .iter()
        .find(|p| p.path == path && p.method == method && p.valid)?
        .net_ns
}

/// The worst (largest) median over the N measured.
fn worst_net(r: &PacketResults, path: &str, method: &str) -> Option<(f64, usize)> {
    r.points
        .iter()
        .filter_map(|p| net(r, p.services, path, method).map(|s| (s.median, p.services)))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

fn e2e_ratio(e: &E2eResults, n: usize, metric: &str, base: Mode) -> Option<Spread> {
    e.points
        .iter()
        .find(|p| p.services == n)?
        .ratios
        .iter()
        .find(|r| r.metric == metric && r.baseline == Some(base))?
        .ratio
}

fn e2e_mode(e: &E2eResults, n: usize, mode: Mode, metric: &str) -> Option<Spread> {
    e.points
        .iter()
        .find(|p| p.services == n)?
        .modes
        .iter()
        .find(|m| m.mode == Some(mode))?
        .spread(metric)
}

/// Judges every target of the issue against what this run measured.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    let pp = r.per_packet.as_ref();
    let ct = pp.and_then(|p| worst_net(p, "conntrack_hit", "repeat"));
    t.push(judge_max(
        "Per packet above an empty program: conntrack hit",
        "≤ 60 ns",
        ct.map(|c| c.0),
        60.0,
        "ns",
        &ct.map_or(String::new(), |c| {
            format!(
                "worst median over N (at N = {}), repeat method",
                n_label(c.1)
            )
        }),
    ));
    let nf = pp.and_then(|p| worst_net(p, "new_flow_random_service", "single"));
    let hot = pp.and_then(|p| worst_net(p, "new_flow_one_service", "single"));
    let mut target = judge_max(
        "Per packet above an empty program: new flow",
        "≤ 150 ns",
        nf.map(|c| c.0),
        150.0,
        "ns",
        &nf.map_or(String::new(), |c| {
            format!(
                "worst median over N (at N = {}), new flow to a random service",
                n_label(c.1)
            )
        }),
    );
    if let Some((h, _)) = hot {
        target.measured += &format!(" (one service, cache-hot: {} ns)", num(h));
    }
    t.push(target);
    let ratio_of = |path: &str, method: &str| {
        pp.and_then(|p| {
            let max_n = p.points.iter().map(|x| x.services).max()?;
            let hi = net(p, max_n, path, method)?;
            let lo = net(p, 1, path, method)?;
            (max_n > 1).then_some((hi.median / lo.median, max_n))
        })
    };
    let scale = ratio_of("new_flow_random_service", "single");
    let mut target = judge_max(
        "Per-packet cost at 100k services vs 1 service",
        "≤ 1.1×",
        scale.map(|s| s.0),
        1.1,
        "×",
        &scale.map_or(String::new(), |s| {
            format!(
                "new flow (random service), N = {} vs N = 1{}",
                n_label(s.1),
                if s.1 < 100_000 {
                    " (100k not in this run)"
                } else {
                    ""
                }
            )
        }),
    );
    let others: Vec<String> = [
        ("new_flow_one_service", "single", "one service"),
        ("conntrack_hit", "repeat", "conntrack hit"),
        ("reverse_nat", "repeat", "reverse NAT"),
    ]
    .iter()
    .filter_map(|(path, method, label)| {
        ratio_of(path, method).map(|(r, _)| format!("{label} {r:.2}×"))
    })
    .collect();
    if !others.is_empty() {
        target.measured += &format!(" ({})", others.join(", "));
    }
    t.push(target);
    let e2e = r.end_to_end.as_ref();
    let top_n = e2e.and_then(|e| e.points.iter().map(|p| p.services).max());
    let basis_n = |n: Option<usize>| {
        n.map_or(String::new(), |n| {
            format!(
                "paired per repetition at N = {}{}",
                n_label(n),
                if n < 10_000 {
                    " (10k not in this run)"
                } else {
                    ""
                }
            )
        })
    };
    let ratio = |m: &str, b: Mode| e2e.zip(top_n).and_then(|(e, n)| e2e_ratio(e, n, m, b));
    t.push(judge_min(
        "ClusterIP new connections/s vs nftables at 10k services",
        "≥ 1.2×",
        ratio("conn_per_s", Mode::Nftables).map(|s| s.median),
        1.2,
        &basis_n(top_n),
    ));
    t.push(judge_min(
        "ClusterIP new connections/s vs iptables at 10k services",
        "≥ 1.5×",
        ratio("conn_per_s", Mode::Iptables).map(|s| s.median),
        1.5,
        &basis_n(top_n),
    ));
    let p99 = e2e.zip(top_n).and_then(|(e, n)| {
        let hi = e2e_mode(e, n, Mode::Weir, "req_p99_us")?;
        let lo = e2e_mode(e, 1, Mode::Weir, "req_p99_us")?;
        (n > 1).then_some(hi.median / lo.median)
    });
    t.push(judge_max(
        "Request p99 at 10k services vs at 1 (Weir)",
        "≤ 1.1×",
        p99,
        1.1,
        "×",
        &top_n.map_or(String::new(), |n| {
            format!(
                "persistent connections, N = {} vs N = 1, measured minutes apart (see the notes on \
                 p99 here)",
                n_label(n)
            )
        }),
    ));
    let change = e2e.and_then(|e| e.slice_change.as_ref());
    t.push(judge_max(
        "EndpointSlice change → serving p99 at 10k (end to end, config dir)",
        "≤ 5 ms",
        change.map(|c| c.serve_p99_ms),
        5.0,
        "ms",
        &change.map_or(String::new(), |c| {
            format!(
                "file rewritten → new endpoint answers, {} changes at N = {}",
                c.changes, c.services
            )
        }),
    ));
    let inproc = pp.and_then(|p| p.slice_change.as_ref());
    t.push(judge_max(
        "EndpointSlice change → serving p99 at 10k (agent's programming path)",
        "≤ 5 ms",
        inproc.map(|c| c.serve_p99_us / 1e3),
        5.0,
        "ms",
        &inproc.map_or(String::new(), |c| {
            format!(
                "DesiredCache + Reconciler + first translated new flow, in-process, {} changes at N = {}",
                c.changes, c.services
            )
        }),
    ));
    let ctrl = |f: &dyn Fn(&super::e2e::ControlPoint) -> Option<f64>| {
        e2e.zip(top_n).and_then(|(e, n)| {
            e.points
                .iter()
                .find(|p| p.services == n)
                .and_then(|p| f(&p.control))
        })
    };
    let shape = e2e.map_or(String::new(), |e| {
        format!(
            "{} services × {} endpoints",
            top_n.unwrap_or(0),
            e.endpoints_per_service
        )
    });
    t.push(judge_max(
        "10k services × 10 endpoints programmed from nothing (agent's first sync)",
        "≤ 1 s",
        ctrl(&|c| c.weir_first_sync_ms.map(|s| s.median / 1e3)),
        1.0,
        "s",
        &format!("`took_us` of the first `synced` line, {shape}"),
    ));
    t.push(judge_max(
        "10k services × 10 endpoints programmed from nothing (agent start → /healthz 200)",
        "≤ 1 s",
        ctrl(&|c| c.weir_start_to_healthy_s.map(|s| s.median)),
        1.0,
        "s",
        &format!("process start, eBPF load, YAML parse, sync, attach; {shape}"),
    ));
    let mg = r.maglev.as_ref().and_then(|m| {
        m.builds
            .iter()
            .find(|b| b.backends == 1000 && b.size_kind == "paper")
    });
    t.push(judge_max(
        "Maglev table of 65,537 slots for 1,000 backends",
        "≤ 2 ms",
        mg.and_then(|b| b.build_ms.map(|s| s.median)),
        2.0,
        "ms",
        "`weir_agent::maglev::build`, median over repetitions",
    ));
    t.push(judge_max(
        "Agent RSS at 10k services",
        "≤ 50 MB",
        ctrl(&|c| c.agent_rss_mb),
        50.0,
        "MB",
        &format!("VmRSS after healthy, {shape}"),
    ));
    let mem = ctrl(&|c| c.agent_maps.as_ref().map(|m| m.total_bytes as f64 / 1e6));
    let per = e2e.zip(top_n).and_then(|(e, n)| per_service_bytes(e, n));
    t.push(Target {
        name: "eBPF map memory, total and per service".to_owned(),
        goal: "report".to_owned(),
        measured: match (mem, per) {
            (Some(m), Some(p)) => format!("{m:.1} MB total, {:.1} KB per service", p / 1024.0),
            (Some(m), None) => format!("{m:.1} MB total"),
            _ => "not measured".to_owned(),
        },
        met: None,
        margin: String::new(),
        basis: format!("memlock of the agent's maps and Maglev tables, {shape}"),
    });
    t.extend(l7::targets(r.l7.as_ref()));
    t.extend(forward::targets(r.forward.as_ref()));
    t
}

/// Marginal map memory per service between N = 1 and N (bytes).
fn per_service_bytes(e: &E2eResults, n: usize) -> Option<f64> {
    let total = |n: usize| {
        e.points
            .iter()
            .find(|p| p.services == n)?
            .control
            .agent_maps
            .as_ref()
            .map(|m| m.total_bytes as f64)
    };
    if n <= 1 {
        return None;
    }
    Some((total(n)? - total(1)?) / (n - 1) as f64)
}

fn n_label(n: usize) -> String {
    match n {
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

fn cell(s: Option<Spread>, digits: usize) -> String {
    s.map_or_else(|| "–".to_owned(), |s| s.fmt(digits))
}

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}

/// Writes `results.json`, `REPORT.md` and the charts into `dir`.
pub fn write(dir: &Path, r: &Results) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let json = serde_json::to_string_pretty(r)?;
    std::fs::write(dir.join("results.json"), json)?;
    let mut charts = Vec::new();
    for (file, svg) in charts_of(r) {
        std::fs::write(dir.join(&file), svg)?;
        charts.push(file);
    }
    std::fs::write(dir.join("REPORT.md"), markdown(r, &charts))?;
    Ok(())
}

fn charts_of(r: &Results) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(p) = &r.per_packet {
        let series: Vec<Series> = [
            ("conntrack_hit", "repeat", "conntrack hit"),
            (
                "new_flow_random_service",
                "single",
                "new flow (random service)",
            ),
            ("new_flow_one_service", "single", "new flow (one service)"),
            ("reverse_nat", "repeat", "reverse NAT"),
            ("not_ours", "repeat", "not ours"),
        ]
        .iter()
        .map(|(path, method, name)| Series {
            name: (*name).to_owned(),
            points: p
                .points
                .iter()
                .filter_map(|pt| {
                    net(p, pt.services, path, method)
                        .map(|s| (pt.services as f64, s.median, s.min, s.max))
                })
                .collect(),
        })
        .collect();
        out.push((
            "per-packet.svg".to_owned(),
            line_chart(
                "Weir per-packet cost above an empty TC program",
                "services programmed (N)",
                "ns per packet",
                &series,
                true,
                false,
            ),
        ));
    }
    if let Some(e) = &r.end_to_end {
        for (file, metric, title, unit) in [
            (
                "e2e-conn-rate.svg",
                "conn_per_s",
                "New ClusterIP connections per second (one client)",
                "connections/s",
            ),
            (
                "e2e-request-p99.svg",
                "req_p99_us",
                "Request p99 on persistent connections",
                "µs",
            ),
        ] {
            let series: Vec<Series> = Mode::ALL
                .iter()
                .map(|m| Series {
                    name: m.label().to_owned(),
                    points: e
                        .points
                        .iter()
                        .filter_map(|pt| {
                            e2e_mode(e, pt.services, *m, metric)
                                .map(|s| (pt.services as f64, s.median, s.min, s.max))
                        })
                        .collect(),
                })
                .collect();
            out.push((
                file.to_owned(),
                line_chart(title, "services (N)", unit, &series, true, false),
            ));
        }
        let pick =
            |f: &dyn Fn(&super::e2e::ControlPoint) -> Option<Spread>| -> Vec<(f64, f64, f64, f64)> {
                e.points
                    .iter()
                    .filter_map(|p| {
                        f(&p.control).map(|s| (p.services as f64, s.median, s.min, s.max))
                    })
                    .collect()
            };
        let one = |v: Option<f64>| {
            v.map(|v| Spread {
                median: v,
                min: v,
                max: v,
                n: 1,
            })
        };
        let series = vec![
            Series {
                name: "Weir first sync".into(),
                points: pick(&|c| c.weir_first_sync_ms.map(|s| scale(s, 1e-3))),
            },
            Series {
                name: "Weir start→healthy".into(),
                points: pick(&|c| c.weir_start_to_healthy_s),
            },
            Series {
                name: "iptables-legacy-restore".into(),
                points: pick(&|c| one(c.iptables_load_s)),
            },
            Series {
                name: "nft -f".into(),
                points: pick(&|c| one(c.nftables_load_s)),
            },
            Series {
                name: "iptables-nft-restore".into(),
                points: pick(&|c| one(c.iptables_nft_load_s)),
            },
        ];
        out.push((
            "control-plane.svg".to_owned(),
            line_chart(
                "Programming N services × E endpoints from nothing",
                "services (N)",
                "seconds (log)",
                &series,
                true,
                true,
            ),
        ));
    }
    out
}

fn scale(s: Spread, k: f64) -> Spread {
    Spread {
        median: s.median * k,
        min: s.min * k,
        max: s.max * k,
        n: s.n,
    }
}

const PATH_ROWS: [(&str, &str, &str); 9] = [
    ("conntrack_hit", "repeat", "conntrack hit (forward DNAT)"),
    ("conntrack_hit", "single", "conntrack hit (forward DNAT)"),
    (
        "new_flow_random_service",
        "single",
        "new flow, random service of N",
    ),
    ("new_flow_one_service", "single", "new flow, one service"),
    ("reverse_nat", "repeat", "reverse NAT (backend reply)"),
    ("reverse_nat", "single", "reverse NAT (backend reply)"),
    ("not_ours", "repeat", "not ours (no service)"),
    ("not_ours", "single", "not ours (no service)"),
    (
        "new_flow_naive_repeat",
        "repeat",
        "new flow with `repeat` (counter-check demonstration)",
    ),
];

pub fn markdown(r: &Results, charts: &[String]) -> String {
    let mut md = String::new();
    let m = &r.machine;
    let _ = writeln!(
        md,
        "# Weir benchmark: Weir vs kube-proxy (iptables, nftables)\n"
    );
    let _ = writeln!(
        md,
        "Generated by `{}` ({} profile) in {:.0} s on {}.\n",
        r.command, r.profile, r.elapsed_s, m.date_utc
    );
    let _ = writeln!(md, "| machine | |\n|---|---|");
    let _ = writeln!(md, "| kernel (`uname -r`) | {} |", m.kernel);
    let _ = writeln!(md, "| CPUs (nproc) | {} |", m.nproc);
    let _ = writeln!(md, "| CPU model | {} |", m.cpu_model);
    let _ = writeln!(md, "| memory | {:.1} GiB |", m.mem_total_gb);
    let _ = writeln!(md, "| iptables | {} |", m.iptables);
    let _ = writeln!(md, "| nftables | {} |", m.nft);
    let _ = writeln!(md, "| date (UTC) | {} |", m.date_utc);
    let _ = writeln!(md, "| Weir commit | {} |\n", m.commit);
    let _ = writeln!(
        md,
        "The machine is shared with other builds and tests (2 vCPUs): every figure is a median over \
         repetitions with its min–max spread in parentheses, the modes being compared alternate within \
         each repetition, and ratios are taken per repetition before they are summarised.\n"
    );
    if !r.errors.is_empty() {
        let _ = writeln!(
            md,
            "**Errors in this run** (the affected figures are missing):\n"
        );
        for e in &r.errors {
            let _ = writeln!(md, "- {}", e.replace('\n', " "));
        }
        md.push('\n');
    }

    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(
        md,
        "| target | goal | measured | verdict | margin | judged on |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for t in &r.targets {
        let verdict = match t.met {
            Some(true) => "**met**",
            Some(false) => "**missed**",
            None => "–",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {verdict} | {} | {} |",
            t.name, t.goal, t.measured, t.margin, t.basis
        );
    }
    md.push('\n');

    if let Some(p) = &r.per_packet {
        per_packet_section(&mut md, p, charts);
    }
    if let Some(e) = &r.end_to_end {
        e2e_section(&mut md, e, charts);
        control_section(&mut md, e, r.per_packet.as_ref(), charts);
    }
    if let Some(mg) = &r.maglev {
        maglev_section(&mut md, mg);
    }
    if let Some(l) = &r.l7 {
        l7::section(&mut md, l);
    }
    if let Some(f) = &r.forward {
        forward::section(&mut md, f);
    }
    if !r.notes.is_empty() {
        let _ = writeln!(md, "## Notes\n");
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
        md.push('\n');
    }
    let _ = writeln!(md, "## Not measured\n");
    for l in &r.left_out {
        let _ = writeln!(md, "- {l}");
    }
    let _ = writeln!(
        md,
        "\nRaw numbers (every repetition, counters, caps): [`results.json`](results.json)."
    );
    md
}

fn per_packet_section(md: &mut String, p: &PacketResults, charts: &[String]) {
    let _ = writeln!(md, "## 1. Per-packet cost (BPF_PROG_TEST_RUN)\n");
    let _ = writeln!(
        md,
        "`weir_pod_ingress` loaded from the agent's own object (`Datapath::load`, private bpffs) with N \
         services programmed by the agent's `DesiredCache` + `Reconciler` ({} endpoint per service, so \
         100k services fit in memory), minus a two-instruction empty TC program (`r0 = 0; exit`, loaded \
         with `bpf(BPF_PROG_LOAD)`) measured in the same repetition. Program: {} bytes JITed, {} \
         instructions verified.\n",
        p.endpoints_per_service,
        p.program.jited_bytes,
        p.program
            .verified_insns
            .map_or("?".to_owned(), |v| v.to_string())
    );
    let _ = writeln!(
        md,
        "- **repeat**: one syscall, `repeat` = {} runs on one skb. Every run after the first sees the \
         previous run's output, so the translating paths are measured as a ping-pong: the bench adds a \
         conntrack entry for the translated tuple that translates it back (plus a backend entry naming \
         the ClusterIP so the hit is valid); every run is then a real conntrack hit + rewrite.\n\
         - **single**: `repeat` = 1, {} syscalls per repetition, each packet with its own 5-tuple (the \
         only valid way for new flows); the kernel's per-run time then includes one clock read, which the \
         empty program's single-shot time includes too.\n\
         - Before each N every service sees one flow (its per-CPU counter entry is created once, as on a \
         live node), then conntrack is emptied. \"Random service\" picks the destination uniformly among \
         the N services for each packet (cold cache lines and Maglev tables); \"one service\" always uses \
         the same one.\n\
         - **Counter check**: for every measurement the `WEIR_STATS` counter of the path must grow by \
         exactly the number of runs, and no other counter may move; otherwise the row is INVALID and \
         has no figure. The last row applies `repeat` naively to new flows to show the check at work.\n",
        p.repeat, p.single_shots
    );
    let ns: Vec<usize> = p.points.iter().map(|x| x.services).collect();
    let _ = write!(
        md,
        "Nanoseconds per packet above the empty program, {} repetitions:\n\n| path | method |",
        p.reps
    );
    for n in &ns {
        let _ = write!(md, " N = {} |", n_label(*n));
    }
    if ns.len() > 1 {
        let _ = write!(md, " N = {} / N = 1 |", n_label(*ns.last().unwrap_or(&1)));
    }
    let _ = write!(md, " counters |\n|---|---|");
    for _ in 0..ns.len() + usize::from(ns.len() > 1) {
        md.push_str("---|");
    }
    md.push_str("---|\n");
    for (path, method, label) in PATH_ROWS {
        let rows: Vec<_> = p
            .points
            .iter()
            .map(|pt| {
                pt.paths
                    .iter()
                    .find(|x| x.path == path && x.method == method)
            })
            .collect();
        if rows.iter().all(Option::is_none) {
            continue;
        }
        let _ = write!(md, "| {label} | {method} |");
        for row in &rows {
            let text = match row {
                Some(x) if x.valid => cell(x.net_ns, 1),
                Some(_) => "INVALID".to_owned(),
                None => "–".to_owned(),
            };
            let _ = write!(md, " {text} |");
        }
        if ns.len() > 1 {
            let first = net(p, ns[0], path, method);
            let last = net(p, *ns.last().unwrap_or(&1), path, method);
            let text = first.zip(last).map_or("–".to_owned(), |(a, b)| {
                format!("{:.2}×", b.median / a.median)
            });
            let _ = write!(md, " {text} |");
        }
        let all_valid = rows.iter().flatten().all(|x| x.valid);
        let counters = if all_valid {
            "= runs ✓".to_owned()
        } else {
            rows.iter()
                .flatten()
                .find(|x| !x.valid)
                .map_or(String::new(), |x| x.note.clone())
        };
        let _ = writeln!(md, " {counters} |");
    }
    md.push('\n');
    let _ = writeln!(md, "Raw per-run times (Weir, empty) at each N, ns:\n");
    let _ = writeln!(
        md,
        "| N | conntrack hit repeat | empty repeat | new flow (random) single | empty single | sync to this N | bench RSS growth | map memory |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for pt in &p.points {
        let find = |path: &str, method: &str| {
            pt.paths
                .iter()
                .find(|x| x.path == path && x.method == method)
        };
        let ct = find("conntrack_hit", "repeat");
        let nf = find("new_flow_random_service", "single");
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.1} ms (+{}) | {} MB | {} MB ({} tables, {} MB) |",
            n_label(pt.services),
            cell(ct.and_then(|x| x.weir_ns), 1),
            cell(ct.and_then(|x| x.empty_ns), 1),
            cell(nf.and_then(|x| x.weir_ns), 1),
            cell(nf.and_then(|x| x.empty_ns), 1),
            pt.sync_ms,
            pt.added,
            pt.rss_growth_mb
                .map_or("–".to_owned(), |v| format!("{v:.1}")),
            mb(pt.map_memory.total_bytes),
            pt.map_memory.tables,
            mb(pt.map_memory.tables_bytes)
        );
    }
    md.push('\n');
    for why in &p.skipped {
        let _ = writeln!(md, "Not measured: {why}.\n");
    }
    if charts.iter().any(|c| c == "per-packet.svg") {
        let _ = writeln!(md, "![per-packet cost versus N](per-packet.svg)\n");
    }
}

fn e2e_section(md: &mut String, e: &E2eResults, charts: &[String]) {
    let _ = writeln!(md, "## 2. End to end through a ClusterIP\n");
    let _ = writeln!(
        md,
        "Three identical network-namespace labs per N (the harness's `Lab`: a node namespace, two \
         backend pods holding the {} endpoint addresses as extra /32s, a client pod), one per mode, \
         measured in alternation ({} repetitions, the first mode rotating). Weir: the agent runs in the \
         node namespace. kube-proxy's iptables mode ({}) and nftables mode: its rules loaded with the real tools in the \
         node namespace, no agent, so pod traffic to a ClusterIP is DNATed by the node's netfilter in \
         PREROUTING and routed to the backend's veth (no SNAT: the client is inside the cluster CIDR). \
         The client dials {} probe services spread evenly over the N (in iptables mode they sit on average \
         halfway down KUBE-SERVICES, as a random service would); the other services have fake endpoints. \
                  The backend servers are one poll loop per pod and the client is one thread, all pinned to one \
         CPU (the last), so a round measures the CPU work per connection or request, both ends and the \
         datapath between them included.\n",
        e.endpoints_per_service, e.reps, e.iptables_backend, e.probe_services
    );
    let _ = writeln!(
        md,
        "- new connections/s: connect, one request line, reply, close (RST), for {:.1} s per round;\n\
         - request latency: {} request/reply round trips per round on persistent connections (one per \
         probe service).\n",
        e.conn_seconds, e.requests_per_round
    );
    let _ = writeln!(
        md,
        "| N | mode | new conn/s | conn p50 µs | conn p99 µs | request p50 µs | request p99 µs | failures |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for pt in &e.points {
        for m in &pt.modes {
            let label = m.mode.map_or("?", Mode::label);
            if let Some(err) = &m.error {
                let _ = writeln!(
                    md,
                    "| {} | {label} | not measured: {} | | | | | |",
                    n_label(pt.services),
                    err.replace('\n', " ").replace('|', "/")
                );
                continue;
            }
            let _ = writeln!(
                md,
                "| {} | {label} | {} | {} | {} | {} | {} | {} |",
                n_label(pt.services),
                cell(m.spread("conn_per_s"), 0),
                cell(m.spread("conn_p50_us"), 0),
                cell(m.spread("conn_p99_us"), 0),
                cell(m.spread("req_p50_us"), 0),
                cell(m.spread("req_p99_us"), 0),
                m.failures
            );
        }
    }
    md.push('\n');
    let _ = writeln!(
        md,
        "Weir / baseline, paired per repetition (conn/s: higher is better for Weir; latencies: lower):\n"
    );
    let _ = writeln!(
        md,
        "| N | conn/s vs iptables | conn/s vs nftables | request p99 vs iptables | request p99 vs nftables | conn p99 vs iptables | conn p99 vs nftables |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for pt in &e.points {
        let r = |metric: &str, base: Mode| {
            pt.ratios
                .iter()
                .find(|x| x.metric == metric && x.baseline == Some(base))
                .and_then(|x| x.ratio)
                .map_or("–".to_owned(), |s| format!("{}×", s.fmt(2)))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            n_label(pt.services),
            r("conn_per_s", Mode::Iptables),
            r("conn_per_s", Mode::Nftables),
            r("req_p99_us", Mode::Iptables),
            r("req_p99_us", Mode::Nftables),
            r("conn_p99_us", Mode::Iptables),
            r("conn_p99_us", Mode::Nftables)
        );
    }
    md.push('\n');
    for (file, alt) in [
        ("e2e-conn-rate.svg", "new connections per second versus N"),
        ("e2e-request-p99.svg", "request p99 versus N"),
    ] {
        if charts.iter().any(|c| c == file) {
            let _ = writeln!(md, "![{alt}]({file})\n");
        }
    }
}

fn control_section(md: &mut String, e: &E2eResults, p: Option<&PacketResults>, charts: &[String]) {
    let _ = writeln!(md, "## 3. Control plane\n");
    let _ = writeln!(
        md,
        "### Programming N services × {} endpoints from nothing\n",
        e.endpoints_per_service
    );
    let _ = writeln!(
        md,
        "Weir: the agent started on a config dir holding the N Services and EndpointSlices with empty \
         pinned maps (start → `/healthz` 200 polled every 10 ms; the first `synced` line's `took_us`, \
         i.e. DesiredCache + Reconciler writing every map;          `weir_sync_proxy_rules_duration_seconds`). kube-proxy: one \
         `iptables-restore --noflush --counters` / `nft -f` of its full rule set into an empty \
         namespace (a load that reaches its cap is killed and shown as `> cap`).\n"
    );
    let _ = writeln!(
        md,
        "| N | Weir start → healthy s | Weir first sync ms | sync metric mean ms | iptables-legacy-restore s | nft -f s | iptables-nft-restore s | first sync / iptables | first sync / nftables |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for pt in &e.points {
        let c = &pt.control;
        let load = |v: Option<f64>, cap: &str| {
            v.map_or_else(
                || format!("> {:.0} (cap)", c.caps_s.get(cap).copied().unwrap_or(0.0)),
                |v| format!("{v:.3}"),
            )
        };
        let ratio = |b: Option<f64>| {
            c.weir_first_sync_ms
                .zip(b)
                .map_or("–".to_owned(), |(w, b)| {
                    format!("{:.3}×", w.median / 1e3 / b)
                })
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            n_label(pt.services),
            cell(c.weir_start_to_healthy_s, 3),
            cell(c.weir_first_sync_ms, 1),
            c.weir_sync_metric_mean_s
                .map_or("–".to_owned(), |s| format!("{:.1}", s * 1e3)),
            load(c.iptables_load_s, "iptables"),
            load(c.nftables_load_s, "nftables"),
            load(c.iptables_nft_load_s, "iptables-nft"),
            ratio(c.iptables_load_s),
            ratio(c.nftables_load_s)
        );
    }
    md.push('\n');
    if charts.iter().any(|c| c == "control-plane.svg") {
        let _ = writeln!(md, "![programming time versus N](control-plane.svg)\n");
    }
    let _ = writeln!(md, "### Memory\n");
    let _ = writeln!(
        md,
        "Agent RSS from `/proc/<pid>/status` once healthy; eBPF map memory is the kernel's `memlock` \
         from `/proc/<pid>/fdinfo` of every map fd the agent holds. The hash maps and the Maglev arena \
         are preallocated at their capacity (`--max-services`, `--max-backends`, `--maglev-slots` sized \
         for N plus room for 64 tables being swapped), so most of it is there at N = 1; \"tables MB\" is \
         the part of the arena the tables occupy (whole 1 KB chunks), included in the total.\n"
    );
    let _ = writeln!(
        md,
        "| N | agent RSS MB | of which anon / file / shmem | peak RSS MB | map fds MB | Maglev tables | tables MB | total MB | tables per service KB | marginal per service KB |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for pt in &e.points {
        let c = &pt.control;
        let Some(m) = &c.agent_maps else {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | – | – | – | – | – | – |",
                n_label(pt.services),
                c.agent_rss_mb.map_or("–".into(), |v| format!("{v:.1}")),
                rss_parts(c),
                c.agent_peak_rss_mb
                    .map_or("–".into(), |v| format!("{v:.1}"))
            );
            continue;
        };
        let marginal = per_service_bytes(e, pt.services)
            .map_or("–".to_owned(), |b| format!("{:.1}", b / 1024.0));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} |",
            n_label(pt.services),
            c.agent_rss_mb.map_or("–".into(), |v| format!("{v:.1}")),
            rss_parts(c),
            c.agent_peak_rss_mb
                .map_or("–".into(), |v| format!("{v:.1}")),
            mb(m.fd_maps_bytes),
            m.tables,
            mb(m.tables_bytes),
            mb(m.total_bytes),
            m.tables_bytes as f64 / m.tables.max(1) as f64 / 1024.0,
            marginal
        );
    }
    md.push('\n');

    let _ = writeln!(md, "### EndpointSlice change → serving\n");
    if let Some(c) = &e.slice_change {
        let _ = writeln!(
            md,
            "End to end at N = {}: {} times, the changed service's own YAML file is rewritten \
             (atomically) with a single new endpoint, then the client opens new connections until one \
             is answered by it. This path includes the standalone source's 100 ms debounce and its \
             re-reading of every config file on a change, and the agent's `--min-sync-period` (100 ms).\n",
            c.services, c.changes
        );
        let _ = writeln!(md, "| measure | p50 | p99 | max |\n|---|---|---|---|");
        let _ = writeln!(
            md,
            "| file rewritten → new endpoint answers (ms) | {:.1} | {:.1} | {:.1} |",
            c.serve_p50_ms, c.serve_p99_ms, c.serve_max_ms
        );
        let _ = writeln!(
            md,
            "| the sync it caused, `took_us` (ms) | {:.2} | {:.2} | |",
            c.sync_p50_ms, c.sync_p99_ms
        );
        let _ = writeln!(
            md,
            "| `weir_network_programming_duration_seconds` (bucket bound, s) | ≤ {} | ≤ {} | mean {} |",
            c.programming_p50_le_s.map_or("–".into(), |v| v.to_string()),
            c.programming_p99_le_s.map_or("–".into(), |v| v.to_string()),
            c.programming_mean_s
                .map_or("–".into(), |v| format!("{v:.3}"))
        );
        if c.failures > 0 {
            let _ = writeln!(md, "\n{} changes were not served within 20 s.", c.failures);
        }
        md.push('\n');
    }
    if let Some(c) = p.and_then(|p| p.slice_change.as_ref()) {
        let _ = writeln!(
            md,
            "The agent's programming path alone, in this process at N = {} ({} changes, each replacing one \
             of the {} endpoints of one service): `DesiredCache::update` + `Reconciler::sync`, then new \
             flows through BPF_PROG_TEST_RUN until one is translated to the new endpoint.\n",
            c.services, c.changes, c.endpoints_of_changed
        );
        let _ = writeln!(md, "| measure | p50 | p99 | max |\n|---|---|---|---|");
        let _ = writeln!(
            md,
            "| change → new endpoint serving (µs) | {:.0} | {:.0} | {:.0} |",
            c.serve_p50_us, c.serve_p99_us, c.serve_max_us
        );
        let _ = writeln!(
            md,
            "| sync alone (µs) | {} | {:.0} | |",
            c.sync_us.map_or("–".into(), |s| format!("{:.0}", s.median)),
            c.sync_p99_us
        );
        for (what, s) in [
            (
                "one Maglev table inserted into `WEIR_MAGLEV` (one syscall, ms)",
                c.table_insert_ms,
            ),
            (
                "one Maglev table deleted from `WEIR_MAGLEV` (one syscall, ms)",
                c.table_delete_ms,
            ),
        ] {
            if let Some(s) = s {
                let _ = writeln!(md, "| {what} | {:.2} (median) | | {:.2} |", s.median, s.max);
            }
        }
        let _ = writeln!(
            md,
            "\nEvery frontend whose backends change gets a new table, written into free chunks of the \
             Maglev arena and switched in by one update of its `WEIR_SERVICES` entry: no syscall waits \
             for the kernel here.\n"
        );
    }
    if !e.baseline_syncs.is_empty() {
        let _ = writeln!(
            md,
            "kube-proxy after the same kind of change (the changed service moved to a new endpoint), in \
             the iptables and nftables labs: a full sync (every chain rewritten: what `iptables-restore` \
             / `nft -f` costs at this N) and the partial sync each proxier does when one service changed \
             (iptables: KUBE-SERVICES in full plus that service's chains; nftables: that service's \
             chains). After each sync a new connection is checked to reach the new endpoint.\n"
        );
        let _ = writeln!(
            md,
            "| tool | sync | N | seconds | runs at cap | serving after | note |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for s in &e.baseline_syncs {
            let secs = match (&s.error, s.seconds, s.timed_out) {
                (Some(err), _, _) => format!("error: {}", err.replace('\n', " ").replace('|', "/")),
                (None, None, t) if t > 0 => format!("> {:.0} (cap)", s.cap_s),
                (None, sp, _) => cell(sp, 3),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {secs} | {} | {} | {} |",
                s.tool,
                s.kind,
                n_label(s.services),
                s.timed_out,
                if s.serving_checked == 0 {
                    "–".to_owned()
                } else {
                    format!("{}/{}", s.serving_ok, s.serving_checked)
                },
                s.note.as_deref().unwrap_or("")
            );
        }
        md.push('\n');
    }
}

fn rss_parts(c: &super::e2e::ControlPoint) -> String {
    let part = |k: &str| {
        c.agent_rss_parts_mb
            .get(k)
            .map_or("–".to_owned(), |v| format!("{v:.1}"))
    };
    format!(
        "{} / {} / {}",
        part("RssAnon"),
        part("RssFile"),
        part("RssShmem")
    )
}

fn maglev_section(md: &mut String, m: &MaglevResults) {
    let _ = writeln!(md, "## 4. Maglev tables\n");
    let _ = writeln!(
        md,
        "`weir_agent::maglev::build` at the agent's size (`table_size(n)`: the smallest prime ≥ {} × \
         2^⌈log2 n⌉), at the paper's {PAPER_SIZE} slots, and at the largest size the code produces \
         (`table_size(65,536)`, the default `--max-backends`: {} slots). Kernel memory per table: what \
         it occupies in the Maglev arena, 4 bytes a slot in whole chunks of 256 slots.\n",
        m.slots_per_backend, m.largest_size
    );
    let _ = writeln!(
        md,
        "| backends | size | slots | build ms | memory per service (table) | balanced |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for b in &m.builds {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} KB{} | {} |",
            b.backends,
            b.size_kind,
            b.slots,
            cell(b.build_ms, 3),
            num(b.table_bytes as f64 / 1024.0),
            if b.table_bytes_measured {
                ""
            } else {
                " (computed)"
            },
            if b.balanced { "yes" } else { "NO" }
        );
    }
    md.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_limits_both_ways() {
        let t = judge_max("x", "≤ 60 ns", Some(30.0), 60.0, "ns", "");
        assert_eq!(t.met, Some(true));
        assert_eq!(t.margin, "50 % under");
        let t = judge_max("x", "≤ 60 ns", Some(120.0), 60.0, "ns", "");
        assert_eq!((t.met, t.margin.as_str()), (Some(false), "2.00× the limit"));
        assert_eq!(judge_max("x", "", None, 1.0, "", "").met, None);
        let t = judge_min("x", "≥ 1.5×", Some(1.2), 1.5, "");
        assert_eq!((t.met, t.margin.as_str()), (Some(false), "20 % short"));
    }

    #[test]
    fn empty_results_render() {
        let r = Results::default();
        let md = markdown(&r, &[]);
        assert!(md.contains("## Targets"));
        assert_eq!(targets(&r).len(), 20);
        assert!(targets(&r).iter().all(|t| t.met.is_none()));
    }
}
