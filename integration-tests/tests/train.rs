//! `leaf train`: offline training from logged groups, through the learner that
//! `leaf serve --online` uses; and that learner's promotion gate.

use std::path::{Path, PathBuf};

use leaf_adapters::store::AdapterStore;
use leaf_integration_tests::{small_lora_train, tiny_model};
use leaf_plugin::online::checkpoint::{TrainerCheckpoint, STATE_FILE};
use leaf_plugin::online::train::{train_offline, OfflineTrainConfig};
use leaf_plugin::online::{
    CheckOutcome, GroupReceipt, HeldOutCheck, HeldOutScore, Learner, LearnerConfig, PromotionGate,
    RollbackReason, SourcedGroup, StoreSink, UpdateOutcome,
};
use leaf_plugin::rollout::Rollout;
use leaf_plugin::serving::BASE_VERSION;
use leaf_plugin::trainer::TrainConfig;

/// The example groups shipped in `examples/data/`.
fn example_groups() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/train_groups.jsonl")
}

fn train_config() -> TrainConfig {
    small_lora_train(1e-2, 10)
}

fn config(model: &Path, groups: &Path, store: &Path) -> OfflineTrainConfig {
    let mut c = OfflineTrainConfig::new(model, groups, store);
    c.job.train = train_config();
    c
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[test]
fn trains_publishes_every_version_and_resumes_after_the_acked_line() -> anyhow::Result<()> {
    let m = tiny_model(21)?;
    let store_dir = m.tmp.path().join("store");
    let groups = m.tmp.path().join("groups.jsonl");
    std::fs::copy(example_groups(), &groups)?;
    let total = lines(&groups);
    assert!(total >= 4, "the example file holds {total} groups");

    // A first session stops after two updates.
    let mut c = config(&m.dir, &groups, &store_dir);
    c.job.max_updates = Some(2);
    let first = train_offline(&c)?;
    eprintln!("first session {first:?}");
    assert_eq!(first.updates, 2);
    assert!(!first.exhausted);
    assert_eq!(first.published.len(), 2, "one version per update");
    let store = AdapterStore::open(&store_dir)?;
    assert_eq!(
        store.current()?.map(|v| v.to_string()).as_deref(),
        Some(first.final_version.as_str())
    );
    assert_eq!(store.list()?.len(), 2);
    let ckpt = TrainerCheckpoint::in_store(&store_dir);
    let state = ckpt.load()?.expect("a checkpoint");
    assert_eq!(state.version, first.final_version);
    assert_eq!(state.updates, 2);

    // The second session resumes after the last acked line and reads the rest once.
    c.job.max_updates = None;
    let second = train_offline(&c)?;
    eprintln!("second session {second:?}");
    assert!(second.exhausted);
    assert_eq!(
        first.groups_consumed + second.groups_consumed,
        total as u64,
        "every group consumed exactly once over both sessions"
    );
    assert_eq!(second.groups_duplicate, 0);
    let state = ckpt.load()?.expect("a checkpoint");
    assert_eq!(state.groups_consumed, total as u64);
    assert_eq!(state.sessions, 2);
    assert_eq!(state.updates, first.updates + second.updates);
    assert_eq!(
        store.current()?.map(|v| v.to_string()).as_deref(),
        Some(second.final_version.as_str())
    );
    // The published adapter moved away from the zero update it started from.
    let adapter = store.get(&leaf_adapters::store::VersionId::parse(
        &second.final_version,
    )?)?;
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

    // A third session finds nothing new.
    let third = train_offline(&c)?;
    assert_eq!(third.groups_consumed, 0);
    assert_eq!(third.updates, 0);

    // Acks lost in a crash (the cursor is gone, the checkpoint remembers the groups): the
    // redelivered groups are acked again, never trained on twice.
    std::fs::remove_file(ckpt.cursor_file("jsonl"))?;
    let redelivered = train_offline(&c)?;
    assert_eq!(redelivered.groups_duplicate, total as u64);
    assert_eq!(redelivered.updates, 0);
    assert!(ckpt.dir().join(STATE_FILE).is_file());

    // A different estimator does not silently continue this checkpoint.
    let mut grpo = c.clone();
    grpo.job.estimator = leaf_plugin::advantage::EstimatorConfig::Grpo;
    let e = train_offline(&grpo).unwrap_err().to_string();
    assert!(e.contains("estimator"), "{e}");
    Ok(())
}

#[test]
fn a_malformed_line_is_an_error_naming_line_and_field_unless_skipped() -> anyhow::Result<()> {
    let m = tiny_model(22)?;
    let store_dir = m.tmp.path().join("store");
    let text = std::fs::read_to_string(example_groups())?;
    let mut rows: Vec<String> = text.lines().map(str::to_string).collect();
    rows.insert(
        2,
        r#"{"group_id": "bad", "prompt_ids": [1, 2], "rollouts": [{"tokens": [3, 4], "logprobs": [-0.1], "reward": 1.0}]}"#
            .into(),
    );
    rows.insert(4, r#"{"group_id": "worse", "prompt_ids": [1]"#.into());
    let groups = m.tmp.path().join("groups.jsonl");
    std::fs::write(&groups, rows.join("\n"))?;
    let mut c = config(&m.dir, &groups, &store_dir);
    c.job.groups_per_update = 1;
    let e = train_offline(&c).unwrap_err().to_string();
    assert!(e.contains("line 3"), "{e}");
    assert!(e.contains("rollouts[0].logprobs"), "{e}");
    // Nothing after the bad line was trained on, and its group is not acked.
    let state = TrainerCheckpoint::in_store(&store_dir).load()?;
    assert!(
        state.as_ref().is_none_or(|s| s.groups_consumed <= 2),
        "{state:?}"
    );

    c.skip_malformed = true;
    let r = train_offline(&c)?;
    assert_eq!(r.groups_invalid, 2, "{r:?}");
    assert!(r.exhausted);
    Ok(())
}

/// A held-out check that answers scripted rewards.
struct Scripted(Vec<f64>);

impl HeldOutCheck for Scripted {
    fn evaluate(
        &mut self,
        _model: &leaf_adapters::model::LlamaModel,
    ) -> leaf_plugin::Result<HeldOutScore> {
        Ok(HeldOutScore {
            reward: self.0.remove(0),
            ..HeldOutScore::default()
        })
    }

    fn describe(&self) -> String {
        "scripted".into()
    }
}

fn group(id: &str) -> SourcedGroup {
    SourcedGroup {
        id: id.into(),
        prompt_ids: vec![40, 41, 42],
        rollouts: vec![
            Rollout::new(vec![50, 51], vec![-0.5, -0.7], 1.0),
            Rollout::new(vec![52], vec![-1.2], 0.0),
            Rollout::new(vec![50, 53, 54], vec![-0.5, -2.0, -0.1], 0.5),
        ],
        adapter_version: None,
        reference_ids: None,
        receipt: GroupReceipt::none(),
    }
}

#[test]
fn the_gate_rolls_back_a_regression_and_a_nan_loss_and_promotes_the_rest() -> anyhow::Result<()> {
    let m = tiny_model(23)?;
    let store = AdapterStore::open(&m.tmp.path().join("store"))?;
    let mut sink = StoreSink::new(store);
    // Baseline 0.5; the first candidate falls to 0.2 (more than 0.1 below), the second
    // holds 0.45 (within 0.1).
    let gate = PromotionGate::new(Box::new(Scripted(vec![0.5, 0.2, 0.45])), 0.1, None);
    let mut cfg = LearnerConfig::new(Default::default(), train_config(), 1);
    cfg.fault_nan_update = Some(3);
    let mut learner = Learner::new(&m.dir, cfg, gate, &sink, BASE_VERSION)?;
    assert_eq!(learner.measure_baseline()?.map(|s| s.reward), Some(0.5));

    let prepared = learner.prepare(&[group("a")]);
    assert!(matches!(
        learner.update(&prepared, 3, &sink)?,
        UpdateOutcome::Applied(_)
    ));
    assert!(learner.check_due());
    match learner.check(&mut sink, true)? {
        CheckOutcome::RolledBack {
            reason:
                RollbackReason::Regression {
                    reward,
                    good_reward,
                    ..
                },
            ..
        } => assert_eq!((reward, good_reward), (0.2, 0.5)),
        other => panic!("expected a regression rollback, got {other:?}"),
    }
    assert_eq!(learner.good_version(), BASE_VERSION);
    assert_eq!(learner.rollbacks(), 1);
    assert!(sink.store().list()?.is_empty(), "nothing was published");

    let prepared = learner.prepare(&[group("b")]);
    learner.update(&prepared, 6, &sink)?;
    let version = match learner.check(&mut sink, true)? {
        CheckOutcome::Published {
            version, promoted, ..
        } => {
            assert!(promoted);
            version
        }
        other => panic!("expected a promotion, got {other:?}"),
    };
    assert_eq!(learner.good_version(), version);
    assert_eq!(learner.gate().good_reward(), Some(0.45));
    assert_eq!(
        sink.store().current()?.map(|v| v.to_string()),
        Some(version.clone())
    );

    // Update 3's loss is injected as NaN: rolled back at once to the promoted version.
    let prepared = learner.prepare(&[group("c")]);
    match learner.update(&prepared, 9, &sink)? {
        UpdateOutcome::RolledBack {
            reason: RollbackReason::NanLoss { update, .. },
            ..
        } => assert_eq!(update, 3),
        other => panic!("expected a NaN rollback, got {other:?}"),
    }
    assert_eq!(learner.good_version(), version);
    assert_eq!(learner.trainer().policy_version(), Some(version.as_str()));
    assert!(!learner.check_due());
    Ok(())
}

/// A source that delivers scripted batches of the example groups, a group possibly twice (a
/// broker's redelivery after its ack deadline), and records every ack with the checkpoint's
/// `groups_consumed` at that moment.
struct Redelivering {
    script: std::collections::VecDeque<Vec<usize>>,
    groups: Vec<SourcedGroup>,
    deliveries: std::collections::HashMap<usize, u32>,
    checkpoint: TrainerCheckpoint,
    acks: Vec<(Vec<String>, u64)>,
}

#[async_trait::async_trait]
impl leaf_plugin::online::GroupSource for Redelivering {
    async fn next_groups(&mut self, _max: usize) -> leaf_plugin::Result<Vec<SourcedGroup>> {
        let Some(batch) = self.script.pop_front() else {
            return Ok(Vec::new());
        };
        Ok(batch
            .into_iter()
            .map(|i| {
                let n = self.deliveries.entry(i).or_default();
                *n += 1;
                let g = &self.groups[i];
                SourcedGroup {
                    id: g.id.clone(),
                    prompt_ids: g.prompt_ids.clone(),
                    rollouts: g.rollouts.clone(),
                    adapter_version: g.adapter_version.clone(),
                    reference_ids: g.reference_ids.clone(),
                    receipt: GroupReceipt::new(format!("{}#{n}", g.id)),
                }
            })
            .collect())
    }

    async fn ack(&mut self, receipts: Vec<GroupReceipt>) -> leaf_plugin::Result<()> {
        let names = receipts
            .into_iter()
            .map(|r| r.downcast::<String>().expect("our receipt"))
            .collect();
        let consumed = self
            .checkpoint
            .load()?
            .map(|s| s.groups_consumed)
            .unwrap_or(0);
        self.acks.push((names, consumed));
        Ok(())
    }

    fn describe(&self) -> String {
        "scripted".into()
    }
}

#[tokio::test]
async fn a_redelivery_before_the_checkpoint_is_acked_with_it_not_before() -> anyhow::Result<()> {
    let m = tiny_model(23)?;
    let store_dir = m.tmp.path().join("store");
    let mut job = leaf_plugin::online::TrainJobConfig::new(&m.dir, &store_dir);
    job.train = train_config();
    job.groups_per_update = 2;
    let sink = StoreSink::new(AdapterStore::open(&store_dir)?);
    let mut opened = leaf_plugin::online::open_job(&job, &sink, BASE_VERSION)?;
    let mut file = leaf_plugin::online::JsonlGroupSource::open(
        &example_groups(),
        leaf_plugin::online::JsonlSourceOptions::default(),
    )?;
    use leaf_plugin::online::GroupSource;
    let groups = file.next_groups(4).await?;
    assert_eq!(groups.len(), 4);
    let mut source = Redelivering {
        // g0; g0 again while it waits for its batch; g1 completes the batch; later g0 a third
        // time (after its checkpoint: a duplicate acked at once); g2, g3.
        script: [vec![0], vec![0], vec![1], vec![0, 2], vec![3]].into(),
        groups,
        deliveries: Default::default(),
        checkpoint: opened.checkpoint.clone(),
        acks: Vec::new(),
    };
    let mut sink = sink;
    let report = opened.train(&mut sink, &mut source, &job.options()).await?;
    eprintln!("{report:?}\nacks {:?}", source.acks);
    assert_eq!(report.groups_consumed, 4, "{report:?}");
    assert_eq!(report.groups_duplicate, 2, "{report:?}");
    let id = |i: usize, n: u32| format!("{}#{n}", source.groups[i].id);
    // The first ack comes after the checkpoint of the first batch, and holds both deliveries
    // of g0.
    let (first, consumed) = &source.acks[0];
    assert_eq!(
        *consumed, 2,
        "acked before the checkpoint: {:?}",
        source.acks
    );
    let mut first = first.clone();
    first.sort();
    let mut want = vec![id(0, 1), id(0, 2), id(1, 1)];
    want.sort();
    assert_eq!(first, want);
    // The third delivery is acked at once as an old duplicate; every delivery is acked once.
    let all: Vec<&String> = source.acks.iter().flat_map(|(a, _)| a).collect();
    assert_eq!(all.len(), 6, "{:?}", source.acks);
    assert!(all.contains(&&id(0, 3)));
    Ok(())
}
