//! Cluster throughput in one run against a real `nats-server -js` (loopback); prints one JSON
//! object.
//!
//! * publish: synthetic sealed groups (4 members, 16 prompt ids, 16 completion ids each; the
//!   members' shares of even ids differ, so every group is informative and trains)
//!   through [`GroupPublisher`] until the stream acknowledged all of them: groups/s;
//! * transport: a second durable consumer fetching and acking them (no training): the
//!   stream's ceiling for a trainer, groups/s;
//! * trainer: `leaf train --cluster` ([`train_cluster`]) on the tiny test model (4 groups per
//!   update, a version published and a checkpoint saved every 8 updates) consuming the same
//!   groups: groups/s, and `leaf_cluster_lag_groups` (the backlog) before and after.
//!
//! The ratios (publish / trainer, transport / trainer) say how many replicas' worth of
//! groups one trainer keeps up with. `cargo bench --workspace --bench cluster` (env
//! `LEAF_BENCH_GROUPS`, default 2000; `LEAF_BENCH_TRAIN_GROUPS`, default 128).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use leaf_integration_tests::{small_lora_train, tiny_model};
use leaf_plugin::cluster::train::train_cluster;
use leaf_plugin::cluster::{
    Cluster, ClusterConfig, GroupPublisher, LocalNatsServer, StreamOptions, StreamSource,
};
use leaf_plugin::harvest::{HarvestedSample, SampleOrigin, SealedGroup};
use leaf_plugin::online::{TrainJobConfig, TrainerCheckpoint};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn group(i: usize, vocab: u32) -> SealedGroup {
    let members = (0..4)
        .map(|k| {
            let completion: Vec<u32> = (0..16)
                .map(|t| ((i * 7 + k * 3 + t * (k + 1)) as u32) % vocab)
                .collect();
            let reward = completion.iter().filter(|&&t| t % 2 == 0).count() as f64 / 16.0;
            (
                HarvestedSample {
                    request_id: format!("r{i}-{k}"),
                    prompt_key: format!("p{i}"),
                    prompt_ids: (0..16).map(|t| ((i + t) as u32) % vocab).collect(),
                    logprobs: vec![-1.0; completion.len()],
                    completion_ids: completion,
                    adapter_version: "base".into(),
                    engine_id: "policy@0".into(),
                    origin: SampleOrigin::User,
                    finish_reason: "length".into(),
                    started_unix_ms: 0,
                    finished_unix_ms: 0,
                    text: None,
                    reference: None,
                    reference_ids: None,
                    task: None,
                },
                reward,
            )
        })
        .collect();
    SealedGroup {
        id: format!("g{i}-p{i}"),
        prompt_key: format!("p{i}"),
        members,
        partial: false,
        sealed_unix_ms: 0,
    }
}

fn main() -> anyhow::Result<()> {
    let n = env("LEAF_BENCH_GROUPS", 2000);
    let n_train = env("LEAF_BENCH_TRAIN_GROUPS", 128).min(n);
    let m = tiny_model(41)?;
    let tmp = m.tmp.path().to_path_buf();
    let server = LocalNatsServer::start(&tmp.join("nats"))?;
    let url = server.url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let vocab = m.config.vocab_size as u32;
    let out = rt.block_on(async move {
        let mut cfg = ClusterConfig::new(&url);
        cfg.buffer = n.max(1);
        let cluster = Cluster::connect(cfg.clone(), "bench").await?;
        cluster.groups_consumer().await?; // the trainer's consumer sees every group
        let publisher = GroupPublisher::spawn(cluster.clone(), "bench", true);
        let groups: Vec<SealedGroup> = (0..n).map(|i| group(i, vocab)).collect();
        let t0 = Instant::now();
        for g in groups {
            publisher.offer(g);
        }
        while publisher.stats().published < n as u64 {
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(300), "publishing stalled: {:?}", publisher.stats());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let publish_s = t0.elapsed().as_secs_f64();

        // Transport only: another durable consumer, fetch + ack, no training.
        let mut tcfg = cfg.clone();
        tcfg.consumer = "bench-transport".into();
        let tcluster = Cluster::connect(tcfg, "bench-transport").await?;
        let mut source = StreamSource::open(&tcluster, Duration::from_millis(200)).await?;
        let t1 = Instant::now();
        let mut seen = 0usize;
        while seen < n {
            let batch = source.next_groups(64).await?;
            anyhow::ensure!(!batch.is_empty() || t1.elapsed() < Duration::from_secs(120), "transport stalled at {seen}");
            seen += batch.len();
            source.ack(batch).await?;
        }
        let transport_s = t1.elapsed().as_secs_f64();

        // The trainer, on the tiny model.
        let mut trainer_source = StreamSource::open(&cluster, Duration::from_millis(200)).await?;
        let lag_before = trainer_source.lag().await?;
        let state = tmp.join("trainer-state");
        let mut job = TrainJobConfig::new(&m.dir, &state);
        job.train = small_lora_train(1e-3, 100_000);
        job.groups_per_update = 4;
        job.publish_every = 8;
        let mut stream = StreamOptions::default();
        stream.fetch_wait_s = 0.2;
        let stop = Arc::new(AtomicBool::new(false));
        let t2 = Instant::now();
        let (job2, cfg2, stop2) = (job.clone(), cfg.clone(), stop.clone());
        let run = tokio::spawn(async move { train_cluster(&job2, cfg2, &stream, stop2).await });
        let applied = |state: &std::path::Path| {
            TrainerCheckpoint::in_store(state)
                .load()
                .ok()
                .flatten()
                .map(|p| p.groups_consumed)
                .unwrap_or(0)
        };
        while applied(&state) < n_train as u64 {
            anyhow::ensure!(t2.elapsed() < Duration::from_secs(600), "the trainer stalled");
            anyhow::ensure!(!run.is_finished(), "the trainer ended early");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let train_s = t2.elapsed().as_secs_f64();
        let trained = applied(&state);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let report = run.await??;
        let lag_after = trainer_source.lag().await?;
        drop(publisher);
        let rate = |k: f64, s: f64| k / s.max(1e-9);
        let publish = rate(n as f64, publish_s);
        let transport = rate(n as f64, transport_s);
        let train = rate(trained as f64, train_s);
        anyhow::Ok(serde_json::json!({
            "groups": n,
            "publish_groups_per_s": publish,
            "transport_groups_per_s": transport,
            "trainer_groups_per_s": train,
            "trainer_groups_measured": trained,
            "publish_over_trainer": publish / train,
            "transport_over_trainer": transport / train,
            "leaf_cluster_lag_groups_before_training": lag_before,
            "leaf_cluster_lag_groups_after": lag_after,
            "trainer_updates": report.updates,
            "trainer_groups_trained": report.groups_trained,
            "note": "loopback, tiny model (d=64, 2 layers), CPU; taken under load from other builds",
        }))
    })?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
