//! The online trainer against a real engine: sealed groups -> updates -> publish -> hot-swap.

use std::sync::Arc;
use std::time::Duration;

use leaf_adapters::store::AdapterStore;
use leaf_integration_tests::{small_lora_train, start, tiny_model, EvenIds};
use leaf_plugin::harvest::{AssemblerConfig, ReferenceReward, SealedGroup};
use leaf_plugin::online::{
    training_group_policy, OnlineConfig, OnlineTrainer, ShutdownMode, SupervisedReference,
};
use leaf_plugin::reward::{Metric, RewardOptions};
use leaf_plugin::serving::{ChatRequest, GroupPolicy, Message, ServerConfig, BASE_VERSION};

fn ask(text: &str, reference: &str, seed: u64) -> ChatRequest {
    ChatRequest {
        messages: vec![Message::text("user", text)],
        max_tokens: Some(8),
        temperature: Some(1.0),
        top_p: Some(0.9),
        seed: Some(seed),
        reference: Some(reference.into()),
        ..ChatRequest::default()
    }
}

fn server_config(m: &leaf_integration_tests::TinyModel) -> ServerConfig {
    let mut cfg = ServerConfig::new(&m.dir);
    cfg.store_dir = Some(m.tmp.path().join("store"));
    cfg.assembler = AssemblerConfig {
        group_size: 4,
        ..AssemblerConfig::default()
    };
    cfg.group_policy = GroupPolicy {
        fork_fraction: 1.0,
        ..GroupPolicy::default()
    };
    cfg
}

/// Whether `server` serves a version other than the base within `polls` polls 50 ms apart.
async fn serves_a_new_version(server: &leaf_plugin::serving::LeafServer, polls: u32) -> bool {
    for _ in 0..polls {
        if server.current_version() != BASE_VERSION {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn online_config(groups_per_update: usize, shutdown: ShutdownMode) -> OnlineConfig {
    OnlineConfig {
        train: small_lora_train(1e-2, 10),
        groups_per_update,
        publish_every: 1,
        shutdown,
        ..OnlineConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_trainer_updates_publishes_and_swaps() -> anyhow::Result<()> {
    let m = tiny_model(8)?;
    let reward = Arc::new(EvenIds);
    let (server, rx) = start(server_config(&m), reward).await?;
    let online = OnlineTrainer::spawn(
        server.clone(),
        rx,
        online_config(1, ShutdownMode::Finish),
        tokio::runtime::Handle::current(),
    )?;
    server.chat(ask("Say three.", "three", 1)).await?;
    let swapped = serves_a_new_version(&server, 600).await;
    if !swapped {
        let status = server.status();
        let report = tokio::task::spawn_blocking(move || online.shutdown()).await??;
        panic!("no version was published and swapped in: {status:?}; {report:?}");
    }
    let v1 = server.current_version();
    let st = server.status();
    assert!(st.updates_done >= 1);
    assert_eq!(st.previous_version.as_deref(), Some(BASE_VERSION));
    // A second prompt: held or queued at shutdown, finished by it.
    server.chat(ask("Say five.", "five", 2)).await?;
    let report = tokio::task::spawn_blocking(move || online.shutdown()).await??;
    eprintln!("online report {report:?}");
    assert!(report.updates >= 1);
    assert!(report.published.contains(&v1));
    assert!(
        report.last_loss.is_some_and(|l| l != 0.0),
        "the update did nothing"
    );
    // The published adapter moved away from the zero update it started from.
    let store0 = AdapterStore::open(&m.tmp.path().join("store"))?;
    let adapter = store0.get(&leaf_adapters::store::VersionId::parse(&v1)?)?;
    let b_norm: f64 = adapter
        .tensors
        .iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .map(|(_, t)| {
            t.sqr()
                .and_then(|x| x.sum_all())
                .and_then(|x| x.to_scalar::<f32>())
                .unwrap_or(0.0) as f64
        })
        .sum();
    assert!(b_norm > 0.0, "lora_B is still zero");
    let store = AdapterStore::open(&m.tmp.path().join("store"))?;
    let current = store.current()?.expect("a current version").to_string();
    assert_eq!(current, server.current_version());
    let reply = server.chat(ask("Again.", "x", 3)).await?;
    assert_eq!(reply.adapter_version, current);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persist_shutdown_writes_held_groups() -> anyhow::Result<()> {
    let m = tiny_model(9)?;
    let reward = Arc::new(ReferenceReward::new(Metric::Chrf, RewardOptions::default()));
    let (server, rx) = start(server_config(&m), reward).await?;
    let path = m.tmp.path().join("held.jsonl");
    let online = OnlineTrainer::spawn(
        server.clone(),
        rx,
        online_config(100, ShutdownMode::Persist(path.clone())),
        tokio::runtime::Handle::current(),
    )?;
    server.chat(ask("Say one.", "one", 4)).await?;
    for _ in 0..600 {
        if server.status().groups_sealed >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.status().groups_sealed, 1);
    let report = tokio::task::spawn_blocking(move || online.shutdown()).await??;
    assert_eq!(report.updates, 0);
    assert_eq!(report.groups_persisted, 1);
    assert!(report.published.is_empty());
    let text = std::fs::read_to_string(&path)?;
    let groups: Vec<SealedGroup> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].members.len(), 4);
    assert_eq!(server.current_version(), BASE_VERSION);
    Ok(())
}

/// `leaf serve --online` with `{}` as its config: the default group policy of online training
/// and the default `OnlineConfig`. Four clients send unique prompts (no prompt repeats, as
/// with live audio); the server's own extra samples form the groups, and a new version is
/// published and served while the traffic goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_online_settings_learn_from_unique_prompts() -> anyhow::Result<()> {
    let m = tiny_model(10)?;
    let mut cfg = ServerConfig::new(&m.dir);
    cfg.store_dir = Some(m.tmp.path().join("store"));
    cfg.group_policy = training_group_policy();
    let (server, rx) = start(cfg, Arc::new(EvenIds)).await?;
    let online = OnlineTrainer::spawn(
        server.clone(),
        rx,
        OnlineConfig::default(),
        tokio::runtime::Handle::current(),
    )?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4u64 {
        let (server, stop) = (server.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut failed = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && n < 5_000 {
                let prompt = format!("Client {c} asks question {n}.");
                if server.chat(ask(&prompt, "x", 1000 * c + n)).await.is_err() {
                    failed += 1;
                }
                n += 1;
            }
            (n, failed)
        }));
    }
    let served_new = serves_a_new_version(&server, 1200).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut sent = 0;
    for c in clients {
        let (n, failed) = c.await?;
        assert_eq!(failed, 0, "client requests failed");
        sent += n;
    }
    let status = server.status();
    let report = tokio::task::spawn_blocking(move || online.shutdown()).await??;
    eprintln!("{sent} requests; status {status:?}; report {report:?}");
    assert!(
        served_new,
        "no new version within 60 s of steady traffic: {status:?}; {report:?}"
    );
    assert!(status.groups_sealed >= 10, "{status:?}");
    assert!(status.forks_fired >= 10, "{status:?}");
    assert!(report.updates >= 10);
    assert!(!report.published.is_empty());
    let last = report.last_update.expect("diagnostics of the last update");
    assert!(last.batch.informative_group_share > 0.0);
    assert!(last.entropy > 0.0 && last.ratio_max >= last.ratio_mean);
    // Requests beyond the background budget were not forked (counted), and their one-member
    // groups were dropped once their joining window closed, long before the 120 s timeout.
    assert!(status.forks_skipped_budget > 0, "{status:?}");
    let mut dropped = status.groups_dropped;
    for _ in 0..200 {
        if dropped > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        dropped = server.status().groups_dropped;
    }
    assert!(dropped > 0, "unforked one-member groups are still held");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervised_objective_learns_from_labelled_requests_nobody_forked() -> anyhow::Result<()>
{
    let m = tiny_model(11)?;
    let mut cfg = server_config(&m);
    cfg.assembler.reference_ids = true;
    cfg.group_policy = GroupPolicy {
        fork_fraction: 0.0,
        labelled_singles: true,
        ..GroupPolicy::default()
    };
    let reward = Arc::new(ReferenceReward::new(Metric::Chrf, RewardOptions::default()));
    let (server, rx) = start(cfg, reward).await?;
    let online = OnlineTrainer::spawn(
        server.clone(),
        rx,
        OnlineConfig {
            supervised: Some(SupervisedReference {
                singles_per_update: 2,
                ..SupervisedReference::default()
            }),
            // Compared groups would close a batch at 4; none come, singles close it at 2.
            ..online_config(4, ShutdownMode::Finish)
        },
        tokio::runtime::Handle::current(),
    )?;
    // Unique prompts, each asked once: without labelled singles they would wait to coalesce
    // and be dropped; here each is sealed at once as a group of one.
    for i in 0..2u64 {
        server
            .chat(ask(&format!("Say three, take {i}."), "three", 20 + i))
            .await?;
    }
    let swapped = serves_a_new_version(&server, 600).await;
    let status = server.status();
    let report = tokio::task::spawn_blocking(move || online.shutdown()).await??;
    eprintln!("status {status:?}; report {report:?}");
    assert!(swapped, "no version from labelled singles: {report:?}");
    assert_eq!(status.forks_fired, 0, "{status:?}");
    assert_eq!(status.groups_sealed, 2, "{status:?}");
    assert_eq!(report.references_supervised, 2);
    // Nothing was compared: the update came from the references alone.
    assert_eq!((report.groups_trained, report.groups_uninformative), (0, 0));
    assert!(report.updates >= 1);
    let last = report.last_update.expect("diagnostics of the update");
    assert_eq!(last.batch.supervised, 2);
    // The surrogate of a demonstration is -weight per token on the first pass; its gradient
    // is the log-likelihood's.
    assert!(last.loss.is_finite() && last.grad_norm > 0.0, "{last:?}");
    Ok(())
}
