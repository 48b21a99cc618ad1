//! A trainer that dies: restarted with backoff, then reported down, and the groups it can no
//! longer take counted as `trainer_down` drops. One test (its own binary): the metrics
//! recorder is process-wide.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use leaf_integration_tests::{small_lora_train, start, tiny_model, EvenIds};
use leaf_plugin::harvest::{AssemblerConfig, TrainerState};
use leaf_plugin::online::{
    FaultHook, FaultPoint, OnlineConfig, OnlineTrainer, RestartPolicy, TrainerOptions,
};
use leaf_plugin::serving::{ChatRequest, GroupPolicy, LeafServer, Message, ServerConfig};

fn ask(n: u64) -> ChatRequest {
    ChatRequest {
        messages: vec![Message::text("user", &format!("Say {n}."))],
        max_tokens: Some(6),
        temperature: Some(1.0),
        seed: Some(n),
        ..ChatRequest::default()
    }
}

fn online_config(max_restarts: u32) -> OnlineConfig {
    let mut restart = RestartPolicy::default();
    restart.max_restarts = max_restarts;
    restart.backoff_initial_s = 0.05;
    restart.backoff_max_s = 0.2;
    OnlineConfig {
        train: small_lora_train(1e-2, 10),
        groups_per_update: 1,
        publish_every: 1,
        restart,
        ..OnlineConfig::default()
    }
}

async fn start_server(
    seed: u64,
) -> anyhow::Result<(
    leaf_integration_tests::TinyModel,
    Arc<LeafServer>,
    crossbeam_channel::Receiver<leaf_plugin::harvest::SealedGroup>,
)> {
    let m = tiny_model(seed)?;
    let mut cfg = ServerConfig::new(&m.dir);
    cfg.store_dir = Some(m.tmp.path().join("store"));
    cfg.assembler = AssemblerConfig {
        group_size: 3,
        ..AssemblerConfig::default()
    };
    cfg.group_policy = GroupPolicy {
        fork_fraction: 1.0,
        ..GroupPolicy::default()
    };
    let (server, rx) = start(cfg, Arc::new(EvenIds)).await?;
    Ok((m, server, rx))
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_trainer_restarts_or_goes_down_and_is_reported() -> anyhow::Result<()> {
    let metrics = leaf_plugin::serving::http::install_metrics().expect("the recorder");

    // 1. The first update panics once: the trainer restarts and then trains.
    let (_m, server, rx) = start_server(31).await?;
    let calls = Arc::new(AtomicU64::new(0));
    let c2 = calls.clone();
    let hook: FaultHook = Arc::new(move |p: FaultPoint| {
        if c2.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("injected trainer panic at {p:?}");
        }
        Ok(())
    });
    let mut options = TrainerOptions::default();
    options.fault_hook = Some(hook);
    let online = OnlineTrainer::spawn_with(
        server.clone(),
        rx,
        online_config(3),
        tokio::runtime::Handle::current(),
        options,
    )?;
    let live = online.liveness().clone();
    assert_eq!(live.state(), TrainerState::Up);
    // Traffic until the restarted trainer has made an update (the first group died with the
    // first learner).
    let mut n = 0;
    while (live.status().restarts == 0 || server.status().updates_done == 0) && n < 100 {
        server.chat(ask(n)).await?;
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = live.status();
    assert_eq!(st.state, TrainerState::Up, "{st:?}");
    assert!(st.ready);
    assert_eq!(st.restarts, 1, "{st:?}");
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("injected trainer panic")),
        "{st:?}"
    );
    assert!(
        st.promotes_unchecked,
        "no gate data: promoted unchecked, and said so"
    );
    let lost = server
        .assembler()
        .stats()
        .dropped_trainer_down
        .load(Ordering::Relaxed);
    assert_eq!(lost, 1, "the batch that died with the trainer is counted");
    let report = tokio::task::spawn_blocking(move || online.shutdown()).await??;
    assert_eq!(report.restarts, 1);
    assert!(report.updates >= 1);
    assert_eq!(live.state(), TrainerState::Stopped);

    // 2. Every update panics: after max_restarts the trainer is down for good.
    let (_m2, server, rx) = start_server(32).await?;
    let hook: FaultHook = Arc::new(|_p: FaultPoint| panic!("injected: always"));
    let mut options = TrainerOptions::default();
    options.fault_hook = Some(hook);
    let online = OnlineTrainer::spawn_with(
        server.clone(),
        rx,
        online_config(1),
        tokio::runtime::Handle::current(),
        options,
    )?;
    let live = online.liveness().clone();
    let mut n = 100;
    while live.state() != TrainerState::Down && n < 200 {
        server.chat(ask(n)).await?;
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = server.status().trainer;
    assert_eq!(st, live.status(), "the server's status reports the trainer");
    assert_eq!(st.state, TrainerState::Down, "{st:?}");
    assert!(!st.ready);
    assert_eq!(st.restarts, 1);
    let down_before = server
        .assembler()
        .stats()
        .dropped_trainer_down
        .load(Ordering::Relaxed);
    let full_before = server
        .assembler()
        .stats()
        .dropped_queue_full
        .load(Ordering::Relaxed);
    // Groups sealed now cannot reach the trainer: trainer_down, not queue_full.
    let sealed_before = server.status().groups_sealed;
    for i in 0..3 {
        server.chat(ask(300 + i)).await?;
    }
    let stats = server.assembler().stats().clone();
    wait_for("trainer_down drops", || {
        stats.dropped_trainer_down.load(Ordering::Relaxed) >= down_before + 3
    })
    .await;
    assert_eq!(
        stats.dropped_queue_full.load(Ordering::Relaxed),
        full_before
    );
    assert_eq!(server.status().groups_sealed, sealed_before);
    let status = server.status();
    assert!(
        status.groups_dropped_trainer_down >= down_before + 3,
        "{status:?}"
    );
    assert!(status.groups_dropped >= status.groups_dropped_trainer_down);
    let json = serde_json::to_value(&status)?;
    assert_eq!(json["trainer"]["state"], "down", "{json}");
    assert_eq!(json["trainer"]["ready"], false, "{json}");
    let text = metrics.render();
    assert!(text.contains("leaf_trainer_up 0"), "{text}");
    assert!(text.contains("reason=\"trainer_down\""), "{text}");
    // Serving goes on.
    server.chat(ask(400)).await?;
    let e = tokio::task::spawn_blocking(move || online.shutdown())
        .await?
        .unwrap_err();
    assert!(e.to_string().contains("down"), "{e}");
    Ok(())
}
