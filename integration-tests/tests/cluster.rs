//! Scale-out over NATS JetStream, against a real `nats-server -js` on a free loopback port
//! (Debian's `nats-server`; `apt-get install -y nats-server`): two in-process replicas, one
//! trainer in a child process (this test binary re-run as `trainer_child`), and the server.
//!
//! Every wait is bounded; a test that cannot reach its state fails with what it saw.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use leaf_integration_tests::{
    random_adapter, small_lora_train, start, tiny_model, tiny_model_sized, EvenIds, TinyModel,
};
use leaf_plugin::cluster::{ClusterConfig, LocalNatsServer, Replica, StreamOptions, VersionBoard};
use leaf_plugin::harvest::AssemblerConfig;
use leaf_plugin::online::checkpoint::CheckpointState;
use leaf_plugin::online::{TrainJobConfig, TrainerCheckpoint};
use leaf_plugin::serving::{
    ChatRequest, GroupPolicy, LeafServer, Message, ServerConfig, BASE_VERSION,
};
use serde::{Deserialize, Serialize};

/// Environment variable that turns `trainer_child` into the trainer process.
const CHILD_ENV: &str = "LEAF_CLUSTER_TEST_TRAINER";

/// Longest any single wait in these tests may take.
const WAIT: Duration = Duration::from_secs(90);

fn ask(text: &str, seed: u64) -> ChatRequest {
    ChatRequest {
        messages: vec![Message::text("user", text)],
        max_tokens: Some(8),
        // Hot sampling: the tiny model's peaked distributions otherwise give a group four
        // equal answers (equal rewards, nothing to learn).
        temperature: Some(2.5),
        top_p: Some(1.0),
        seed: Some(seed),
        reference: Some("x".into()),
        ..ChatRequest::default()
    }
}

/// A NATS server, or a failure that names the install command.
fn nats(dir: &Path) -> LocalNatsServer {
    match LocalNatsServer::start(&dir.join("nats")) {
        Ok(s) => s,
        Err(e) => panic!("these tests need a real nats-server: {e}"),
    }
}

fn cluster_config(url: &str) -> ClusterConfig {
    let mut c = ClusterConfig::new(url);
    c.ack_wait_s = 2.0;
    c.publish_timeout_s = 1.0;
    c
}

/// One serving replica with its own store under `dir`.
struct TestReplica {
    server: Arc<LeafServer>,
    replica: Replica,
}

async fn replica(m: &TinyModel, dir: &Path, cluster: ClusterConfig) -> anyhow::Result<TestReplica> {
    let mut cfg = ServerConfig::new(&m.dir);
    cfg.store_dir = Some(dir.join("store"));
    cfg.assembler = AssemblerConfig {
        group_size: 4,
        seal_timeout_s: 3.0,
        ..AssemblerConfig::default()
    };
    cfg.group_policy = GroupPolicy {
        fork_fraction: 1.0,
        ..GroupPolicy::default()
    };
    let (server, rx) = start(cfg, Arc::new(EvenIds)).await?;
    let replica =
        Replica::start_with_timeout(server.clone(), rx, cluster, Duration::from_secs(20)).await?;
    Ok(TestReplica { server, replica })
}

/// Polls `f` every 50 ms until it is true or [`WAIT`] passes; false then.
async fn until(mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < WAIT {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// What the trainer child runs on (passed as JSON in [`CHILD_ENV`]).
#[derive(Debug, Serialize, Deserialize)]
struct ChildSpec {
    url: String,
    model: PathBuf,
    state: PathBuf,
    idle_exit_s: f64,
}

/// The trainer's job: `leaf train --cluster` with a small fast update, a version per update.
fn job(model: &Path, state: &Path) -> TrainJobConfig {
    let mut job = TrainJobConfig::new(model, state);
    job.train = small_lora_train(1e-2, 1000);
    job.groups_per_update = 1;
    job.publish_every = 1;
    job
}

/// The trainer process: this test binary re-run with [`CHILD_ENV`] set. Without it, a no-op.
#[test]
#[ignore = "the trainer process of the cluster tests; they start it themselves"]
fn trainer_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let spec: ChildSpec = serde_json::from_str(&spec).expect("child spec");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let report = rt
        .block_on(async {
            let stop = Arc::new(AtomicBool::new(false));
            let mut stream = StreamOptions::default();
            stream.fetch_wait_s = 0.2;
            stream.idle_exit_s = Some(spec.idle_exit_s);
            leaf_plugin::cluster::train::train_cluster(
                &job(&spec.model, &spec.state),
                cluster_config(&spec.url),
                &stream,
                stop,
            )
            .await
        })
        .expect("the trainer failed");
    println!("trainer report {}", serde_json::to_string(&report).unwrap());
}

/// The trainer process; killed (SIGKILL) and reaped when dropped.
struct TrainerProcess(Child);

impl Drop for TrainerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_trainer(spec: &ChildSpec) -> TrainerProcess {
    TrainerProcess(
        Command::new(std::env::current_exe().expect("test binary"))
            .args(["trainer_child", "--exact", "--ignored", "--nocapture"])
            .env(CHILD_ENV, serde_json::to_string(spec).unwrap())
            .spawn()
            .expect("starting the trainer child"),
    )
}

/// The trainer's last saved checkpoint record (a fresh one before the first save).
fn committed(state: &Path) -> CheckpointState {
    let mut last = None;
    for _ in 0..20 {
        match TrainerCheckpoint::in_store(state).load() {
            Ok(Some(p)) => return p,
            Ok(None) => {
                return CheckpointState {
                    version: BASE_VERSION.into(),
                    updates: 0,
                    groups_consumed: 0,
                    recent_groups: Default::default(),
                    good_reward: None,
                    estimator: String::new(),
                    base_model: PathBuf::new(),
                    sessions: 0,
                }
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("unreadable trainer state: {last:?}")
}

/// Every group of `r`'s traffic is sealed and handed to the stream.
fn all_published(server: &LeafServer, r: &Replica) -> bool {
    let st = server.status();
    let p = r.publisher_stats();
    st.open_groups == 0 && p.offered == st.groups_sealed && p.buffered == 0
}

/// Messages in the groups stream (deduplicated by the server).
async fn stream_messages(url: &str) -> anyhow::Result<u64> {
    let c = leaf_plugin::cluster::Cluster::connect(cluster_config(url), "test").await?;
    let mut s = c.groups_stream().await?;
    Ok(s.info().await?.state.messages)
}

/// Watches `current` and records, for each revision, how long until both replicas dealt
/// with it (a replica that skipped straight to a newer revision dealt with it too).
async fn settle_times(
    board: VersionBoard,
    replicas: [Arc<Replica>; 2],
    stop: Arc<AtomicBool>,
) -> Vec<(u64, String, f64)> {
    let mut out = Vec::new();
    let mut pending: Vec<(u64, String, Instant)> = Vec::new();
    let mut last_rev = 0;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) || !pending.is_empty() {
        if let Ok(Some((rec, rev))) = board.current().await {
            if rev > last_rev {
                last_rev = rev;
                pending.push((rev, rec.version, Instant::now()));
            }
        }
        let handled = replicas
            .iter()
            .map(|r| r.follower_status().handled_revision)
            .min()
            .unwrap_or(0);
        pending.retain(|(rev, v, t)| {
            if handled >= *rev {
                out.push((*rev, v.clone(), t.elapsed().as_secs_f64()));
                false
            } else if t.elapsed() > WAIT {
                out.push((*rev, v.clone(), f64::INFINITY));
                false
            } else {
                true
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_follow_one_trainer_that_survives_kill_9() -> anyhow::Result<()> {
    let m = tiny_model(31)?;
    let tmp = m.tmp.path().to_path_buf();
    let mut server = nats(&tmp);
    let url = server.url();
    let a = replica(&m, &tmp.join("a"), cluster_config(&url)).await?;
    let b = replica(&m, &tmp.join("b"), cluster_config(&url)).await?;
    let ra = Arc::new(a.replica);
    let rb = Arc::new(b.replica);
    let board = VersionBoard::open(ra.cluster()).await?;
    let stop_watch = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(settle_times(
        board.clone(),
        [ra.clone(), rb.clone()],
        stop_watch.clone(),
    ));

    let spec = ChildSpec {
        url: url.clone(),
        model: m.dir.clone(),
        state: tmp.join("trainer-state"),
        idle_exit_s: 120.0,
    };
    let mut trainer = spawn_trainer(&spec);

    // Traffic to both replicas.
    for i in 0..6u64 {
        a.server.chat(ask(&format!("Say {i}."), 2 * i)).await?;
        b.server
            .chat(ask(&format!("Count to {i}."), 2 * i + 1))
            .await?;
    }
    // The trainer promotes versions; both replicas follow.
    assert!(
        until(|| {
            let c = committed(&spec.state);
            c.updates >= 2 && c.version != BASE_VERSION
        })
        .await,
        "no versions were published: {:?}",
        committed(&spec.state)
    );

    // kill -9 mid-stream: more traffic, then kill once the trainer has taken some of it.
    let before = committed(&spec.state).groups_consumed;
    let (sa, sb) = (a.server.clone(), b.server.clone());
    let wave = tokio::spawn(async move {
        for i in 0..8u64 {
            sa.chat(ask(&format!("Add {i}."), 100 + 2 * i)).await?;
            sb.chat(ask(&format!("Take {i}."), 101 + 2 * i)).await?;
        }
        anyhow::Ok(())
    });
    assert!(
        until(|| committed(&spec.state).groups_consumed > before).await,
        "the trainer applied nothing of the second wave"
    );
    trainer.0.kill()?; // SIGKILL, while the wave is still arriving
    trainer.0.wait()?;
    let at_kill = committed(&spec.state).groups_consumed;
    eprintln!("killed the trainer after {at_kill} groups");
    wave.await??;

    // The publishers have handed everything to the stream.
    assert!(
        until(|| all_published(&a.server, &ra) && all_published(&b.server, &rb)).await,
        "groups still buffered: {:?} {:?}",
        ra.publisher_stats(),
        rb.publisher_stats()
    );
    let published = ra.publisher_stats().published + rb.publisher_stats().published;
    let in_stream = stream_messages(&url).await?;
    assert_eq!(
        in_stream, published,
        "the stream holds each published group once"
    );

    // Restart: it drains the stream and exits when idle.
    let spec = ChildSpec {
        idle_exit_s: 6.0,
        ..spec
    };
    let mut trainer = spawn_trainer(&spec);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = trainer.0.try_wait()? {
            break s;
        }
        if t0.elapsed() > WAIT {
            panic!(
                "the restarted trainer did not finish: {:?}",
                committed(&spec.state)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "the restarted trainer failed: {status}");
    let progress = committed(&spec.state);
    let distinct: HashSet<&String> = progress.recent_groups.iter().collect();
    assert_eq!(
        progress.groups_consumed, in_stream,
        "groups consumed == groups published (none lost)"
    );
    assert_eq!(
        distinct.len() as u64,
        progress.groups_consumed,
        "no group consumed twice"
    );
    assert!(progress.updates >= 1);

    // Every promotion reached both replicas within 5 s, and they end on the same version.
    stop_watch.store(true, std::sync::atomic::Ordering::SeqCst);
    let settles = watcher.await?;
    eprintln!("settle times (revision, version, seconds): {settles:?}");
    assert!(settles.len() >= 2, "{settles:?}");
    for (rev, v, s) in &settles {
        assert!(
            *s <= 5.0,
            "revision {rev} ({v}) took {s} s to reach both replicas"
        );
    }
    let (current, _) = board.current().await?.expect("a current version");
    assert_ne!(current.version, BASE_VERSION);
    assert_eq!(a.server.current_version(), current.version);
    assert_eq!(b.server.current_version(), current.version);
    let reply = b.server.chat(ask("Again.", 999)).await?;
    assert_eq!(reply.adapter_version, current.version);
    server.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_keep_serving_without_nats_and_resume_publishing() -> anyhow::Result<()> {
    let metrics = leaf_plugin::serving::http::install_metrics();
    let m = tiny_model(32)?;
    let tmp = m.tmp.path().to_path_buf();
    let mut server = nats(&tmp);
    let mut cfg = cluster_config(&server.url());
    cfg.buffer = 2;
    let a = replica(&m, &tmp.join("a"), cfg).await?;
    a.server.chat(ask("Say one.", 1)).await?;
    assert!(
        until(|| a.replica.publisher_stats().published == 1).await,
        "{:?}",
        a.replica.publisher_stats()
    );

    server.stop();
    for i in 0..12u64 {
        let t = Instant::now();
        let reply = a.server.chat(ask(&format!("Say {i}."), 10 + i)).await?;
        assert!(!reply.adapter_version.is_empty());
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "serving waited on NATS"
        );
    }
    let sealed = |s: &LeafServer| {
        let st = s.status();
        (st.open_groups == 0).then_some(st.groups_sealed)
    };
    assert!(
        until(|| sealed(&a.server) == Some(a.replica.publisher_stats().offered)).await,
        "{:?} {:?}",
        a.server.status(),
        a.replica.publisher_stats()
    );
    let down = a.replica.publisher_stats();
    eprintln!("while NATS was down: {down:?}");
    let while_down = down.offered - 1;
    assert!(
        while_down >= 6,
        "too few groups sealed to test the bound: {down:?}"
    );
    assert_eq!(down.published, 1, "{down:?}");
    assert!(
        down.dropped >= while_down - 4,
        "a 2-group buffer (plus one 2-group batch) drops the rest: {down:?}"
    );
    assert!(down.buffered <= 4, "{down:?}");
    if let Some(h) = &metrics {
        let text = h.render();
        assert!(
            text.lines()
                .any(|l| l.starts_with("leaf_groups_dropped_total{reason=\"cluster\"}")),
            "no cluster drop counter in:\n{text}"
        );
    }

    server.restart()?;
    a.server.chat(ask("Say three.", 99)).await?;
    assert!(
        until(|| all_published(&a.server, &a.replica)
            && a.replica.publisher_stats().offered > down.offered)
        .await,
        "publishing did not resume: {:?}",
        a.replica.publisher_stats()
    );
    let up = a.replica.publisher_stats();
    eprintln!("after the restart: {up:?}");
    assert_eq!(up.published + up.dropped, up.offered, "{up:?}");
    assert!(up.published > down.published + 1, "{up:?}");
    assert_eq!(stream_messages(&server.url()).await?, up.published);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_converge_through_the_key_and_bad_ones_are_refused() -> anyhow::Result<()> {
    let m = tiny_model(33)?;
    let tmp = m.tmp.path().to_path_buf();
    let server = nats(&tmp);
    let url = server.url();
    let a = replica(&m, &tmp.join("a"), cluster_config(&url)).await?;
    let b = replica(&m, &tmp.join("b"), cluster_config(&url)).await?;
    let board = VersionBoard::open(a.replica.cluster()).await?;
    let v1 = board.upload(&random_adapter(&m.config, 1, 0.05)?).await?;
    let v2 = board.upload(&random_adapter(&m.config, 2, 0.05)?).await?;

    // Promote through replica a's admin control: both replicas follow.
    let control = a.replica.control();
    let answer = control.promote(&v1).await?;
    assert_eq!(answer["serving"], v1, "{answer}");
    assert!(
        until(|| b.server.current_version() == v1).await,
        "b did not follow"
    );

    // A version that does not fit the model: the admin path refuses it before moving the key.
    let other = tiny_model_sized(34, 32, 64)?;
    let bad = board
        .upload(&random_adapter(&other.config, 3, 0.05)?)
        .await?;
    let e = control.promote(&bad).await.expect_err("a misfit adapter");
    eprintln!("refused: {e}");
    assert_eq!(board.current().await?.expect("current").0.version, v1);
    // Moved by someone else (no pre-check): each replica stays on its last good version and
    // says why.
    let (_, rev) = board.promote(&bad, "test").await?;
    assert!(
        until(|| a.replica.follower_status().handled_revision >= rev
            && b.replica.follower_status().handled_revision >= rev)
        .await
    );
    for r in [&a, &b] {
        let st = r.replica.follower_status();
        assert_eq!(r.server.current_version(), v1, "{st:?}");
        let failed = st.failed.expect("the failure is reported");
        assert_eq!(failed.version, bad);
        assert!(st.failures >= 1);
    }
    assert!(control.status()["follower"]["failed"]["reason"].is_string());

    // Rollback moves the key back; a version promoted while replica b is down is what b
    // comes up on.
    control.rollback().await?;
    assert_eq!(board.current().await?.expect("current").0.version, v1);
    let b_dir = tmp.join("b");
    b.server.shutdown(Duration::from_secs(5)).await;
    drop(b);
    board.promote(&v2, "test").await?;
    assert!(until(|| a.server.current_version() == v2).await);
    let b = replica(&m, &b_dir, cluster_config(&url)).await?;
    assert_eq!(
        b.server.current_version(),
        v2,
        "b came up on the newer version"
    );
    drop(server);
    Ok(())
}
