//! Smoke test of `cargo xtask bench`: the smallest case (N = 1, a repetition or two) through every
//! experiment's code path, so the bench cannot rot. Asserts the report's sections and that the figures are
//! sane, above all that every per-packet measurement's counters matched its runs.
//!
//! Needs root (eBPF, network namespaces), iptables-legacy, nft and nginx, and a built agent
//! (`target/release/weir-agent`, or `$WEIR_AGENT_BIN`), like the integration tests in `tests/`.

use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::bench::{Options, Profile};

fn num(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} is not a number in {v:#}"))
}

#[test]
fn smoke_run_covers_every_experiment() {
    let out = std::env::temp_dir().join(format!("weir-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let started = Instant::now();
    let results = xtask::bench::run(&Options {
        profile: Profile::Smoke,
        out_dir: out.clone(),
        only: None,
    })
    .expect("the smoke bench runs");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the smoke bench took {:?}",
        started.elapsed()
    );
    assert!(
        results.errors.is_empty(),
        "experiments failed: {:#?}",
        results.errors
    );

    let report = std::fs::read_to_string(out.join("REPORT.md")).expect("REPORT.md");
    for section in [
        "## Targets",
        "## 1. Per-packet cost (BPF_PROG_TEST_RUN)",
        "## 2. End to end through a ClusterIP",
        "## 3. Control plane",
        "### Memory",
        "### EndpointSlice change → serving",
        "## 4. Maglev tables",
        "## 5. L7: weighted HTTPRoute vs nginx",
        "## 6. NodePort forwarding rate (XDP live frames)",
        "## Not measured",
        "uname -r",
    ] {
        assert!(report.contains(section), "REPORT.md lacks {section:?}");
    }
    for chart in [
        "per-packet.svg",
        "e2e-conn-rate.svg",
        "e2e-request-p99.svg",
        "control-plane.svg",
    ] {
        let svg = std::fs::read_to_string(out.join(chart)).expect(chart);
        assert!(
            svg.starts_with("<svg") && svg.contains("<polyline"),
            "{chart}"
        );
    }
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("results.json")).expect("results.json"),
    )
    .expect("results.json parses");
    assert_eq!(json["profile"], "smoke");
    assert!(json["machine"]["nproc"].as_u64().unwrap_or(0) >= 1);
    assert!(!json["machine"]["kernel"].as_str().unwrap_or("").is_empty());

    // Per packet: every path measured, every counter check passed, except the deliberate naive one.
    let point = &json["per_packet"]["points"][0];
    assert_eq!(point["services"], 1);
    let paths = point["paths"].as_array().expect("paths");
    assert_eq!(paths.len(), 9, "{paths:#?}");
    for p in paths {
        let runs = p["runs_per_rep"].as_u64().expect("runs_per_rep");
        let counted: Vec<u64> = p["counted"]
            .as_array()
            .expect("counted")
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        assert!(!counted.is_empty());
        if p["path"] == "new_flow_naive_repeat" {
            assert_eq!(p["valid"], false, "the naive repeat must be caught: {p:#}");
            assert!(counted.iter().all(|c| *c < runs));
            continue;
        }
        assert_eq!(p["valid"], true, "{p:#}");
        assert!(counted.iter().all(|c| *c == runs), "{p:#}");
        let net = num(p, "/net_ns/median");
        let weir = num(p, "/weir_ns/median");
        assert!(
            weir > 0.0 && weir < 100_000.0 && net > -50.0 && net < weir,
            "{p:#}"
        );
    }
    let memory = num(point, "/map_memory/total_bytes");
    assert!(memory > 0.0);
    let change = &json["per_packet"]["slice_change"];
    assert_eq!(change["failures"], 0);
    assert!(num(change, "/serve_p50_us") > 0.0);

    // End to end: three modes served connections at N = 1.
    let e2e = &json["end_to_end"]["points"][0];
    let modes = e2e["modes"].as_array().expect("modes");
    assert_eq!(modes.len(), 3);
    for m in modes {
        assert!(m["error"].is_null(), "{m:#}");
        assert!(num(m, "/conn_per_s/0") > 100.0, "{m:#}");
        assert!(num(m, "/req_p50_us/0") > 0.0, "{m:#}");
    }
    assert!(
        e2e["ratios"]
            .as_array()
            .expect("ratios")
            .iter()
            .all(|r| r["ratio"]["median"].as_f64().is_some_and(|x| x > 0.0)),
        "{e2e:#}"
    );

    // Control plane.
    let control = &e2e["control"];
    assert!(num(control, "/weir_start_to_healthy_s/median") > 0.0);
    assert!(num(control, "/weir_first_sync_ms/median") > 0.0);
    assert!(num(control, "/iptables_load_s") > 0.0);
    assert!(num(control, "/nftables_load_s") > 0.0);
    assert!(num(control, "/agent_rss_mb") > 1.0);
    assert!(num(control, "/agent_maps/tables") >= 1.0);
    let change = &json["end_to_end"]["slice_change"];
    assert_eq!(change["failures"], 0, "{change:#}");
    assert!(num(change, "/serve_p50_ms") > 0.0);
    let syncs = json["end_to_end"]["baseline_syncs"]
        .as_array()
        .expect("baseline syncs");
    assert_eq!(syncs.len(), 4);
    for s in syncs {
        assert!(s["error"].is_null(), "{s:#}");
        assert!(num(s, "/seconds/median") > 0.0, "{s:#}");
        assert_eq!(s["serving_ok"], s["serving_checked"], "{s:#}");
    }

    // Maglev.
    let builds = json["maglev"]["builds"].as_array().expect("builds");
    assert!(!builds.is_empty());
    for b in builds {
        assert_eq!(b["balanced"], true, "{b:#}");
        assert!(num(b, "/build_ms/median") > 0.0);
    }

    // L7: both proxies served through the 90/10 split, on persistent and fresh connections.
    let kinds = json["l7"]["kinds"].as_array().expect("L7 kinds");
    assert_eq!(kinds.len(), 2, "{kinds:#?}");
    for k in kinds {
        for p in k["proxies"].as_array().expect("proxies") {
            assert_eq!(p["errors"], 0, "{p:#}");
            assert!(num(p, "/rps/0") > 10.0, "{p:#}");
            assert!(num(p, "/p99_us/0") > 0.0, "{p:#}");
        }
        assert!(num(k, "/ratios/0/ratio/median") > 0.0, "{k:#}");
    }

    // Forwarding: every mode forwarded the frames it was given, and Weir's fast path sent exactly
    // what arrived at the far end, all of it (nothing passed to the stack).
    let fwd = &json["forward"]["points"][0];
    assert_eq!(fwd["services"], 1);
    let modes = fwd["modes"].as_array().expect("forward modes");
    assert_eq!(modes.len(), 4, "{modes:#?}");
    for m in modes {
        assert!(m["error"].is_null(), "{m:#}");
        let generated = num(m, "/generated/0");
        let delivered = num(m, "/delivered/0");
        assert!(generated >= 4096.0, "{m:#}");
        assert!(
            delivered >= 0.9 * generated && delivered <= generated,
            "{m:#}"
        );
        assert!(num(m, "/pps/median") > 1000.0, "{m:#}");
        if m["mode"] == "weir_xdp" {
            assert_eq!(m["counted_forwarded"][0], m["delivered"][0], "{m:#}");
            assert_eq!(m["counted_passed"][0], 0, "{m:#}");
            assert_eq!(delivered, generated, "{m:#}");
        }
    }
    assert!(
        num(fwd, "/ratios/0/ratio/median") > 0.0,
        "Weir / empty XDP_TX: {fwd:#}"
    );

    let targets = json["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 20);
    // The L7 run gives each of the issue's L7 targets a verdict.
    for t in targets
        .iter()
        .filter(|t| t["name"].as_str().is_some_and(|n| n.starts_with("L7 ")))
    {
        assert!(t["met"].is_boolean(), "{t:#}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
