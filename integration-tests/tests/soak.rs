//! Soak of `leaf serve --online` over loopback: 8 clients, adapter swaps on a timer, the
//! online trainer running. Reports failed requests (must be 0), p50/p99 latency, RSS and thread
//! count over time, and writes the figures to
//! `$CARGO_TARGET_TMPDIR/soak-<name>-recycle<recycle_after_engines>.json`.
//!
//! The short version runs in CI (about 20 s, a swap every 2 s). The long one is ignored by
//! default: `cargo test --workspace --release --test soak -- --ignored` (10 minutes, a swap
//! every 30 s). `LEAF_SOAK_SECS`, `LEAF_SOAK_SWAP_SECS` and `LEAF_SOAK_RECYCLE` override the
//! duration, the swap interval and `recycle_after_engines` (0: never restart, which shows the
//! leak the restart bounds) of either.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leaf_adapters::model::LoraOptions;
use leaf_integration_tests::{store_with_adapters, tiny_model, ALPHA, RANK};
use leaf_plugin::online::OnlineConfig;
use leaf_plugin::trainer::TrainConfig;
use serde_json::{json, Value};
use support::{call, rss_and_threads, ServeProcess};

const CLIENTS: usize = 8;

#[derive(Default)]
struct Calls {
    latencies_ms: Vec<f64>,
    failed: Vec<String>,
}

fn env_secs(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn soak(name: &str, secs: f64, swap_every: f64, recycle_after: u64) -> anyhow::Result<()> {
    let m = tiny_model(11)?;
    let (store, ids, served) = store_with_adapters(&m, &[1, 2], 0.05, true)?;
    let (a, b) = (ids[0].clone(), ids[1].clone());
    drop(store);
    let store_dir = served.store_dir.clone().expect("the store's folder");
    let online = m.tmp.path().join("online.json");
    // The trainer's LoRA shape must match the published adapters (rank 4, alpha 8).
    let online_cfg = OnlineConfig {
        train: TrainConfig {
            learning_rate: 1e-3,
            lora: LoraOptions {
                rank: RANK,
                alpha: ALPHA,
                dropout: 0.0,
                ..LoraOptions::default()
            },
            ..TrainConfig::default()
        },
        publish_every: 4,
        ..OnlineConfig::default()
    };
    std::fs::write(&online, serde_json::to_string(&online_cfg)?)?;
    let server_config = m.tmp.path().join("server.json");
    std::fs::write(
        &server_config,
        json!({"recycle_after_engines": recycle_after}).to_string(),
    )?;
    let log = m.tmp.path().join("serve.log");
    let server = ServeProcess::start(
        &m.dir,
        &[
            "--store",
            store_dir.to_str().unwrap(),
            "--online",
            online.to_str().unwrap(),
            "--trust-client-references",
            "--config",
            server_config.to_str().unwrap(),
        ],
        &[],
        &log,
    );
    let addr = server.addr;
    let pid = server.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(Mutex::new(Calls::default()));
    let t0 = Instant::now();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (stop, calls) = (stop.clone(), calls.clone());
        clients.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let n = (c as u64 * 7 + i) % 10;
                let body = json!({
                    "messages": [{"role": "user", "content": format!("What is {n} plus one?")}],
                    "max_tokens": 8,
                    "leaf": {"reference": format!("{}", n + 1)},
                })
                .to_string();
                let t = Instant::now();
                let r = call(addr, "POST", "/v1/chat/completions", &body);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let mut g = calls.lock().unwrap();
                match r {
                    Ok((200, _)) => g.latencies_ms.push(ms),
                    Ok((s, b)) => g.failed.push(format!("{s}: {b}")),
                    Err(e) => g.failed.push(format!("io: {e}")),
                }
                i += 1;
            }
        }));
    }
    // The swapper: promote a and b in turn.
    let swaps = {
        let stop = stop.clone();
        let (a, b) = (a.to_string(), b.to_string());
        std::thread::spawn(move || {
            let mut done: Vec<(f64, u16, String)> = Vec::new();
            let mut k = 0usize;
            let mut next = Instant::now() + Duration::from_secs_f64(swap_every);
            while !stop.load(Ordering::SeqCst) {
                if Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                next += Duration::from_secs_f64(swap_every);
                let v = if k.is_multiple_of(2) { &b } else { &a };
                k += 1;
                let body = json!({ "version": v }).to_string();
                let (status, text) = call(addr, "POST", "/v1/adapters/promote", &body)
                    .unwrap_or((0, "io error".into()));
                done.push((t0.elapsed().as_secs_f64(), status, text));
            }
            done
        })
    };
    // The sampler: RSS and threads once a second.
    let mut samples: Vec<Value> = Vec::new();
    let deadline = t0 + Duration::from_secs_f64(secs);
    while Instant::now() < deadline {
        if let Some((rss, threads)) = rss_and_threads(pid) {
            let n_ok = calls.lock().unwrap().latencies_ms.len();
            samples.push(json!({
                "t_s": t0.elapsed().as_secs_f64(),
                "rss_mib": rss,
                "threads": threads,
                "requests_ok": n_ok,
            }));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("client thread");
    }
    let swaps = swaps.join().expect("swapper thread");
    let (_, status) = call(addr, "GET", "/v1/leaf/status", "")?;
    let status: Value = serde_json::from_str(&status)?;
    let end = rss_and_threads(pid);
    let exit = server.stop();

    let calls = Arc::try_unwrap(calls).ok().unwrap().into_inner()?;
    let mut lat = calls.latencies_ms.clone();
    lat.sort_by(f64::total_cmp);
    let swaps_ok = swaps.iter().filter(|s| s.1 == 200).count();
    let max_of = |k: &str| {
        samples
            .iter()
            .filter_map(|v| v[k].as_f64())
            .fold(f64::NAN, f64::max)
    };
    let first = samples.first().cloned().unwrap_or_default();
    let last = samples.last().cloned().unwrap_or_default();
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let per_swap = |k: &str| {
        if swaps_ok > 0 {
            (f(&last, k) - f(&first, k)) / swaps_ok as f64
        } else {
            f64::NAN
        }
    };
    let report = json!({
        "name": name,
        "seconds": secs,
        "swap_every_s": swap_every,
        "recycle_after_engines": recycle_after,
        "clients": CLIENTS,
        "requests_ok": lat.len(),
        "requests_failed": calls.failed.len(),
        "failures": calls.failed.iter().take(20).collect::<Vec<_>>(),
        "latency_ms": {
            "p50": percentile(&lat, 0.5),
            "p99": percentile(&lat, 0.99),
            "max": lat.last().copied().unwrap_or(f64::NAN),
        },
        "swaps_requested": swaps.len(),
        "swaps_ok": swaps_ok,
        "swap_failures": swaps.iter().filter(|s| s.1 != 200).map(|s| format!("{:.1}s {}: {}", s.0, s.1, s.2)).take(20).collect::<Vec<_>>(),
        "rss_mib": {"first": f(&first, "rss_mib"), "last": f(&last, "rss_mib"), "max": max_of("rss_mib"), "per_swap": per_swap("rss_mib")},
        "threads": {"first": f(&first, "threads"), "last": f(&last, "threads"), "max": max_of("threads"), "per_swap": per_swap("threads")},
        "restarts": status["restarts"],
        "end": end.map(|(r, t)| json!({"rss_mib": r, "threads": t})),
        "server_status": status,
        "exit": exit.map(|e| e.to_string()),
        "samples": samples,
    });
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("soak-{name}-recycle{recycle_after}.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    eprintln!(
        "soak {name}: {} ok, {} failed, p50 {:.1} ms, p99 {:.1} ms, {} of {} swaps ok, \
         RSS {:.1} -> {:.1} MiB (max {:.1}), threads {} -> {} (max {}), {} restarts; figures in {}",
        lat.len(),
        calls.failed.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        swaps_ok,
        swaps.len(),
        f(&first, "rss_mib"),
        f(&last, "rss_mib"),
        max_of("rss_mib"),
        f(&first, "threads"),
        f(&last, "threads"),
        max_of("threads"),
        status["restarts"],
        out.display()
    );
    assert!(
        calls.failed.is_empty(),
        "{} requests failed, first: {:?}; server log:\n{}",
        calls.failed.len(),
        calls.failed.first(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(!lat.is_empty(), "no request succeeded");
    assert!(
        swaps_ok * 2 >= swaps.len() && swaps_ok > 0,
        "only {swaps_ok} of {} swaps succeeded: {:?}",
        swaps.len(),
        report["swap_failures"]
    );
    // A clean exit; or SIGINT's default action, when it landed while the process was
    // replacing its image (a restart) and no handler was installed yet.
    assert!(
        exit.is_some_and(|e| e.success() || e.signal() == Some(2)),
        "leaf serve did not exit cleanly: {exit:?}"
    );
    // The leak is bounded: past `recycle_after` engines the process restarts in place, so the
    // thread count never exceeds its start by much more than that.
    if recycle_after > 0 && swaps_ok as u64 > recycle_after {
        assert!(
            status["restarts"].as_u64().unwrap_or(0) >= 1,
            "{swaps_ok} swaps and no restart"
        );
    }
    if recycle_after > 0 {
        let grown = max_of("threads") - f(&first, "threads");
        assert!(
            grown <= recycle_after as f64 + 16.0,
            "threads grew by {grown} with recycle_after_engines {recycle_after}"
        );
    }
    Ok(())
}

#[test]
fn soak_short() -> anyhow::Result<()> {
    soak(
        "short",
        env_secs("LEAF_SOAK_SECS", 20.0),
        env_secs("LEAF_SOAK_SWAP_SECS", 2.0),
        env_secs("LEAF_SOAK_RECYCLE", 4.0) as u64,
    )
}

#[test]
#[ignore = "10 minutes; run with --ignored"]
fn soak_long() -> anyhow::Result<()> {
    soak(
        "long",
        env_secs("LEAF_SOAK_SECS", 600.0),
        env_secs("LEAF_SOAK_SWAP_SECS", 30.0),
        env_secs("LEAF_SOAK_RECYCLE", 8.0) as u64,
    )
}
