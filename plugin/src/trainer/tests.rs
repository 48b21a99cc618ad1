//! Behaviour of [`Trainer::step`] on a tiny model.

use candle_core::{DType, Device, Tensor};
use leaf_adapters::model::{Batch, LlamaModel, LoraOptions, ModelOptions, Trainable};
use leaf_adapters::LlamaConfig;

use super::*;

/// A two-layer model small enough for unit tests (also [`super::generate`]'s).
pub(super) fn tiny() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "hidden_size": 16,
        "intermediate_size": 32,
        "vocab_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }))
    .unwrap()
}

fn config(lr: f64) -> TrainConfig {
    TrainConfig {
        learning_rate: lr,
        warmup_fraction: 0.0,
        total_steps: 100,
        micro_batch_size: 4,
        lora: LoraOptions {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            seed: 1,
            ..LoraOptions::default()
        },
        ..TrainConfig::default()
    }
}

fn trainer_with(cfg: TrainConfig, dtype: DType) -> Trainer {
    let options = ModelOptions {
        dtype,
        device: Device::Cpu,
        trainable: Trainable::Lora(cfg.lora.clone()),
        frozen_matmul: true,
    };
    let model = LlamaModel::random(&tiny(), 42, &options).unwrap();
    Trainer::new(model, cfg).unwrap()
}

fn sample(prompt: &[u32], completion: &[u32], adv: &[f64]) -> TrainSample {
    TrainSample {
        prompt: prompt.to_vec(),
        completion: completion.to_vec(),
        advantages: adv.to_vec(),
        behaviour_logprobs: vec![],
        behaviour_version: String::new(),
        demonstration: false,
    }
}

/// Policy log-prob of `completion` after `prompt`, one value per token.
fn logprobs(model: &LlamaModel, prompt: &[u32], completion: &[u32]) -> Vec<f64> {
    let batch = Batch::new(&[(prompt, completion)], &Device::Cpu).unwrap();
    let lp = model.logprobs(&batch, true).unwrap();
    lp.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn values(model: &LlamaModel) -> Vec<(String, Vec<f64>)> {
    model
        .trainable_vars()
        .into_iter()
        .map(|(n, v)| {
            let x = v.as_tensor().to_dtype(DType::F64).unwrap();
            (n, x.flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect()
}

#[test]
fn update_raises_positive_and_lowers_negative_advantage_tokens() {
    let mut t = trainer_with(config(1e-2), DType::F32);
    let prompt = [1u32, 2, 3];
    let good = [5u32, 6];
    let bad = [7u32, 8];
    let before_good = logprobs(t.model(), &prompt, &good);
    let before_bad = logprobs(t.model(), &prompt, &bad);
    let batch = vec![
        sample(&prompt, &good, &[1.0, 1.0]),
        sample(&prompt, &bad, &[-1.0, -1.0]),
    ];
    for _ in 0..5 {
        t.step(&batch).unwrap();
    }
    let after_good = logprobs(t.model(), &prompt, &good);
    let after_bad = logprobs(t.model(), &prompt, &bad);
    for j in 0..2 {
        assert!(
            after_good[j] > before_good[j] + 1e-3,
            "good token {j}: {} -> {}",
            before_good[j],
            after_good[j]
        );
        assert!(
            after_bad[j] < before_bad[j] - 1e-3,
            "bad token {j}: {} -> {}",
            before_bad[j],
            after_bad[j]
        );
    }
    // The reference (LoRA off) did not move.
    let batch = Batch::new(&[(&prompt[..], &good[..])], &Device::Cpu).unwrap();
    let reference: Vec<f64> = t
        .model()
        .logprobs(&batch, false)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let fresh = trainer_with(config(1e-2), DType::F32);
    assert_eq!(reference, logprobs(fresh.model(), &prompt, &good));
}

#[test]
fn entropy_and_importance_ratios_are_hand_computable() {
    let mut t = trainer_with(config(1e-3), DType::F64);
    let (p1, c1) = ([1u32, 2], [3u32, 4, 5]);
    let (p2, c2) = ([6u32], [7u32]);
    let lp1 = logprobs(t.model(), &p1, &c1);
    let lp2 = logprobs(t.model(), &p2, &c2);
    // Sample 1 was served by this very policy (ratio 1); sample 2 by a policy that gave its
    // token ln-prob 0.5 lower (ratio e^0.5); a third sample has no behaviour log-probs.
    let mut s1 = sample(&p1, &c1, &[1.0, 1.0, -1.0]);
    s1.behaviour_logprobs = lp1.clone();
    let mut s2 = sample(&p2, &c2, &[2.0]);
    s2.behaviour_logprobs = vec![lp2[0] - 0.5];
    let s3 = sample(&p2, &c2, &[0.5]);
    let stats = t.step(&[s1, s2, s3]).unwrap();
    let surprisal = -(lp1.iter().sum::<f64>() + 2.0 * lp2[0]) / 5.0;
    assert!((stats.entropy - surprisal).abs() < 1e-9, "{stats:?}");
    let ratio_mean = (3.0 + 0.5f64.exp()) / 4.0;
    assert!((stats.ratio_mean - ratio_mean).abs() < 1e-9, "{stats:?}");
    assert!((stats.ratio_max - 0.5f64.exp()).abs() < 1e-9, "{stats:?}");
}

#[test]
fn first_step_statistics_are_hand_computable() {
    // B = 0: ratio 1, new = ref, so kl = 0 and pg = -mean over sequences of mean advantage.
    let mut t = trainer_with(config(1e-3), DType::F64);
    let stats = t
        .step(&[
            sample(&[1, 2], &[3, 4, 5], &[1.0, 1.0, -1.0]),
            sample(&[6], &[7], &[2.0]),
        ])
        .unwrap();
    assert!(
        (stats.pg_loss - (-(1.0 / 3.0 + 2.0) / 2.0)).abs() < 1e-12,
        "{stats:?}"
    );
    assert_eq!(stats.kl, 0.0);
    assert!((stats.loss - stats.pg_loss).abs() < 1e-15);
    assert_eq!(stats.clip_fraction, 0.0);
    assert_eq!((stats.sequences, stats.tokens, stats.step), (2, 4, 0));
    assert_eq!(stats.learning_rate, 1e-3);
    assert!(stats.grad_norm > 0.0);
    assert_eq!(t.steps(), 1);
}

#[test]
fn negative_advantages_are_scaled_by_the_negative_weight() {
    // Same batch as above with negative_weight 0.25: the -1 token counts a quarter.
    let mut t = trainer_with(
        TrainConfig {
            negative_weight: 0.25,
            ..config(1e-3)
        },
        DType::F64,
    );
    let stats = t
        .step(&[
            sample(&[1, 2], &[3, 4, 5], &[1.0, 1.0, -1.0]),
            sample(&[6], &[7], &[2.0]),
        ])
        .unwrap();
    let expect = -((1.0 + 1.0 - 0.25) / 3.0 + 2.0) / 2.0;
    assert!((stats.pg_loss - expect).abs() < 1e-12, "{stats:?}");
}

#[test]
fn with_negative_weight_zero_a_batch_of_losers_changes_nothing() {
    // Positive-sample reinforcement: only answers above their baseline pull; with the KL
    // term off, a batch whose advantages are all negative leaves every LoRA value as it was,
    // while the spec's weight (1) moves them.
    let losers = [
        sample(&[1, 2], &[5, 6], &[-1.0, -0.5]),
        sample(&[6], &[7], &[-2.0]),
    ];
    for (weight, moves) in [(0.0, false), (1.0, true)] {
        let mut t = trainer_with(
            TrainConfig {
                negative_weight: weight,
                kl_beta: 0.0,
                ..config(1e-2)
            },
            DType::F64,
        );
        let before = values(t.model());
        let stats = t.step(&losers).unwrap();
        assert_eq!(stats.pg_loss == 0.0, !moves, "{stats:?}");
        assert_eq!(values(t.model()) != before, moves, "weight {weight}");
    }
}

#[test]
fn every_lora_tensor_moves_and_gets_a_gradient_after_one_step() {
    let mut t = trainer_with(config(1e-2), DType::F64);
    let batch = vec![
        sample(&[1, 2, 3], &[4, 5, 6], &[1.0, -0.5, 0.3]),
        sample(&[9], &[10, 11], &[-1.0, 2.0]),
    ];
    let v0 = values(t.model());
    t.step(&batch).unwrap();
    let v1 = values(t.model());
    for ((name, a), (_, b)) in v0.iter().zip(&v1) {
        // Step 1: dL/dA = 0 because B = 0, so only the B tensors move.
        assert_eq!(a != b, name.contains("lora_B"), "{name}");
    }
    // Now B != 0: every LoRA tensor receives a non-zero gradient.
    let model = t.model();
    let pairs: Vec<(&[u32], &[u32])> = batch
        .iter()
        .map(|s| (&s.prompt[..], &s.completion[..]))
        .collect();
    let b = Batch::new(&pairs, &Device::Cpu).unwrap();
    let grads = model
        .logprobs(&b, true)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in model.trainable_vars() {
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(g.iter().any(|x| *x != 0.0), "{name}: zero gradient");
    }
    t.step(&batch).unwrap();
    for ((name, a), (_, b)) in v1.iter().zip(&values(t.model())) {
        assert_ne!(a, b, "{name} did not move in step 2");
    }
    // After updates the policy differs from the reference: KL > 0.
    let stats = t.step(&batch).unwrap();
    assert!(stats.kl > 0.0);
}

#[test]
fn lora_plus_scales_the_b_matrices_step_only() {
    // Step 1 moves only B (A's gradient is zero while B = 0), each element by lr * ratio
    // (Adam's first step has unit size), so the largest B entry measures the B learning rate.
    let batch = vec![sample(&[1, 2, 3], &[4, 5, 6], &[1.0, -0.5, 0.3])];
    let largest_b = |ratio: f64| {
        let mut t = trainer_with(
            TrainConfig {
                lora_plus_ratio: ratio,
                ..config(1e-2)
            },
            DType::F64,
        );
        t.step(&batch).unwrap();
        values(t.model())
            .into_iter()
            .filter(|(n, _)| n.contains("lora_B"))
            .flat_map(|(_, v)| v)
            .fold(0.0f64, |m, x| m.max(x.abs()))
    };
    let (plain, plus) = (largest_b(1.0), largest_b(16.0));
    assert!((plain - 1e-2).abs() < 1e-6, "{plain}");
    assert!((plus - 16e-2).abs() < 1e-5, "{plus}");
    let err = Trainer::new(
        LlamaModel::random(
            &tiny(),
            42,
            &ModelOptions {
                dtype: DType::F32,
                device: Device::Cpu,
                trainable: Trainable::Lora(config(1e-2).lora),
                frozen_matmul: true,
            },
        )
        .unwrap(),
        TrainConfig {
            lora_plus_ratio: 0.0,
            ..config(1e-2)
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("lora_plus_ratio"), "{err}");
}

#[test]
fn micro_batching_and_sample_order_do_not_change_the_update() {
    let batch = vec![
        sample(&[1, 2, 3], &[4, 5, 6], &[1.0, -0.5, 0.3]),
        sample(&[9], &[10, 11], &[-1.0, 2.0]),
        sample(&[12, 13], &[14], &[0.7]),
        // A demonstration: cut alone (no KL, no reference pass) or with sampled rows.
        TrainSample {
            demonstration: true,
            ..sample(&[2, 7], &[8, 3, 1], &[1.0, 1.0, 1.0])
        },
    ];
    let reversed: Vec<TrainSample> = batch.iter().rev().cloned().collect();
    for aggregation in [LossAggregation::SequenceMean, LossAggregation::TokenMean] {
        let mut results = Vec::new();
        for (mb, batch) in [(1, &batch), (2, &batch), (4, &batch), (3, &reversed)] {
            let mut t = trainer_with(
                TrainConfig {
                    micro_batch_size: mb,
                    loss_aggregation: aggregation,
                    ..config(1e-2)
                },
                DType::F64,
            );
            let s1 = t.step(batch).unwrap();
            let s2 = t.step(batch).unwrap();
            results.push((s1, s2, values(t.model())));
        }
        same_updates(&results);
    }
}

/// The KL term counts only what the policy sampled: on demonstrations alone the update does not
/// depend on `kl_beta` and the reported KL is 0; on sampled rows it does.
#[test]
fn demonstrations_carry_no_kl_term() {
    let rows = [
        sample(&[1, 2, 3], &[4, 5, 6], &[1.0, 1.0, 1.0]),
        sample(&[9], &[10, 11], &[1.0, 1.0]),
    ];
    let demonstrations: Vec<TrainSample> = rows
        .iter()
        .map(|s| TrainSample {
            demonstration: true,
            ..s.clone()
        })
        .collect();
    let after = |batch: &[TrainSample], kl_beta: f64| {
        let mut t = trainer_with(
            TrainConfig {
                kl_beta,
                ..config(1e-2)
            },
            DType::F64,
        );
        t.step(batch).unwrap();
        let second = t.step(batch).unwrap();
        (second.kl, values(t.model()))
    };
    let (kl0, w0) = after(&demonstrations, 0.0);
    let (kl1, w1) = after(&demonstrations, 1.0);
    assert_eq!((kl0, kl1), (0.0, 0.0));
    assert_eq!(w0, w1, "the KL weight changed an update of demonstrations");
    let (kl0, w0) = after(&rows, 0.0);
    let (kl1, w1) = after(&rows, 1.0);
    assert!(kl0 > 0.0 && kl1 > 0.0);
    assert_ne!(
        w0, w1,
        "the KL weight must change an update of sampled rows"
    );
}

type StepsAndWeights = (StepStats, StepStats, Vec<(String, Vec<f64>)>);

fn same_updates(results: &[StepsAndWeights]) {
    for r in &results[1..] {
        assert!((r.0.loss - results[0].0.loss).abs() < 1e-12);
        assert!((r.1.loss - results[0].1.loss).abs() < 1e-10);
        assert!((r.1.grad_norm - results[0].1.grad_norm).abs() < 1e-10);
        for ((n, a), (_, b)) in r.2.iter().zip(&results[0].2) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-10, "{n}");
            }
        }
    }
}

#[test]
fn token_mean_weighs_sequences_by_their_length() {
    // First pass: ratio 1 and the adapter is still zero (policy = reference, KL 0), so each
    // token's term is -A_t. Sequence mean: mean(-0.8/3, -1/2, -0.7) = -0.48889; token mean:
    // -(0.8 + 1 + 0.7) / 6 = -0.41667.
    let batch = vec![
        sample(&[1, 2, 3], &[4, 5, 6], &[1.0, -0.5, 0.3]),
        sample(&[9], &[10, 11], &[-1.0, 2.0]),
        sample(&[12, 13], &[14], &[0.7]),
    ];
    let loss = |aggregation| {
        let mut t = trainer_with(
            TrainConfig {
                loss_aggregation: aggregation,
                ..config(1e-2)
            },
            DType::F64,
        );
        t.step(&batch).unwrap()
    };
    let seq = loss(LossAggregation::SequenceMean);
    let tok = loss(LossAggregation::TokenMean);
    let want_seq = -(0.8 / 3.0 + 0.5 + 0.7) / 3.0;
    assert!((seq.loss - want_seq).abs() < 1e-12, "{}", seq.loss);
    assert!((tok.loss - -2.5 / 6.0).abs() < 1e-12, "{}", tok.loss);
    // The diagnostics stay sequence means whatever the objective.
    assert!((tok.pg_loss - want_seq).abs() < 1e-12);
    assert_eq!(tok.kl, 0.0);
    assert!(seq.grad_norm > 0.0 && (seq.grad_norm - tok.grad_norm).abs() > 1e-9);
    // Names round-trip.
    for a in [LossAggregation::SequenceMean, LossAggregation::TokenMean] {
        assert_eq!(a.name().parse::<LossAggregation>().unwrap(), a);
    }
    assert!("tokens"
        .parse::<LossAggregation>()
        .unwrap_err()
        .contains("tokens"));
}

#[test]
fn truncated_importance_weights_apply_to_stale_samples_only() {
    let mut t = trainer_with(config(1e-3), DType::F64);
    t.set_policy_version("v1");
    let prompt = [1u32, 2];
    let completion = [3u32, 4];
    let old = logprobs(t.model(), &prompt, &completion);
    let stale = |shift: f64| TrainSample {
        behaviour_logprobs: old.iter().map(|l| l - shift).collect(),
        behaviour_version: "v0".into(),
        demonstration: false,
        ..sample(&prompt, &completion, &[1.0, 1.0])
    };
    // Weight exp(ln 3) = 3 is capped at 2; exp(ln 1.5) = 1.5 is kept; the current-version
    // sample gets weight 1 even though its behaviour log-probs are far off.
    let current = TrainSample {
        behaviour_logprobs: vec![-20.0, -20.0],
        behaviour_version: "v1".into(),
        demonstration: false,
        ..sample(&prompt, &completion, &[1.0, 1.0])
    };
    let stats = t
        .step(&[stale(3f64.ln()), stale(1.5f64.ln()), current])
        .unwrap();
    assert_eq!(stats.tis_sequences, 2);
    assert!((stats.tis_mean_weight - (2.0 + 2.0 + 1.5 + 1.5) / 4.0).abs() < 1e-9);
    assert!((stats.tis_capped_fraction - 0.5).abs() < 1e-12);
    // pg = -mean(w A): (-2 - 1.5 - 1) / 3.
    assert!(
        (stats.pg_loss - (-(2.0 + 1.5 + 1.0) / 3.0)).abs() < 1e-9,
        "{stats:?}"
    );

    // TIS off: every weight is 1.
    let mut off = trainer_with(
        TrainConfig {
            tis: TisConfig {
                mode: TisMode::Off,
                cap: 2.0,
            },
            ..config(1e-3)
        },
        DType::F64,
    );
    off.set_policy_version("v1");
    let stats = off.step(&[stale(3f64.ln())]).unwrap();
    assert_eq!(stats.tis_sequences, 0);
    assert!((stats.pg_loss + 1.0).abs() < 1e-12);
}

#[test]
fn invalid_samples_are_rejected_with_their_index() {
    let mut t = trainer_with(
        TrainConfig {
            tis: TisConfig {
                mode: TisMode::Always,
                cap: 2.0,
            },
            ..config(1e-3)
        },
        DType::F32,
    );
    let ok = TrainSample {
        behaviour_logprobs: vec![-1.0],
        ..sample(&[1], &[2], &[1.0])
    };
    let cases = vec![
        (
            TrainSample {
                prompt: vec![],
                ..ok.clone()
            },
            "prompt",
        ),
        (
            TrainSample {
                advantages: vec![1.0, 2.0],
                ..ok.clone()
            },
            "advantages",
        ),
        (
            TrainSample {
                advantages: vec![f64::NAN],
                ..ok.clone()
            },
            "advantage",
        ),
        (
            TrainSample {
                completion: vec![24],
                ..ok.clone()
            },
            "vocabulary",
        ),
        (
            TrainSample {
                behaviour_logprobs: vec![],
                ..ok.clone()
            },
            "behaviour",
        ),
        (
            TrainSample {
                behaviour_logprobs: vec![0.5],
                ..ok.clone()
            },
            "behaviour",
        ),
    ];
    for (bad, word) in cases {
        match t.step(&[ok.clone(), bad]) {
            Err(TrainError::Sample { index, reason }) => {
                assert_eq!(index, 1);
                assert!(reason.contains(word), "{reason} should mention {word}");
            }
            other => panic!("expected a sample error, got {other:?}"),
        }
    }
    assert_eq!(t.steps(), 0, "rejected batches do not advance the schedule");
}

#[test]
fn empty_completions_are_skipped() {
    let mut t = trainer_with(config(1e-3), DType::F32);
    let stats = t
        .step(&[sample(&[1], &[], &[]), sample(&[1], &[2, 3], &[1.0, 1.0])])
        .unwrap();
    assert_eq!(
        (stats.skipped_empty, stats.sequences, stats.tokens),
        (1, 1, 2)
    );
    assert!(matches!(
        t.step(&[sample(&[1], &[], &[])]),
        Err(TrainError::EmptyBatch)
    ));
}

#[test]
fn non_finite_loss_is_an_error_and_no_update_is_applied() {
    let mut t = trainer_with(config(1e-2), DType::F32);
    let (_, b) = t.model().lora_pair(0, "q_proj").unwrap();
    let nan = Tensor::full(f32::NAN, b.dims(), &Device::Cpu).unwrap();
    b.set(&nan).unwrap();
    let before = values(t.model());
    let err = t.step(&[sample(&[1, 2], &[3], &[1.0])]).unwrap_err();
    assert!(matches!(err, TrainError::NonFinite { .. }), "{err}");
    let after = values(t.model());
    for ((n, a), (_, b)) in before.iter().zip(&after) {
        let same = a
            .iter()
            .zip(b)
            .all(|(x, y)| x == y || (x.is_nan() && y.is_nan()));
        assert!(same, "{n} changed");
    }
    assert_eq!(t.steps(), 0);
}

#[test]
fn gradient_clipping_is_reported() {
    let mut t = trainer_with(
        TrainConfig {
            max_grad_norm: 1e-9,
            ..config(1e-3)
        },
        DType::F32,
    );
    let s = t.step(&[sample(&[1, 2], &[3, 4], &[1.0, -1.0])]).unwrap();
    assert!(s.grad_clipped && s.grad_norm > 1e-9);
    let mut t = trainer_with(
        TrainConfig {
            max_grad_norm: 0.0,
            ..config(1e-3)
        },
        DType::F32,
    );
    let s = t.step(&[sample(&[1, 2], &[3, 4], &[1.0, -1.0])]).unwrap();
    assert!(!s.grad_clipped);
}

/// A trainer whose LM head is 50 times the random initialisation, so logits span several nats
/// and the policy can move far.
fn sharp_trainer(cfg: TrainConfig) -> Trainer {
    let options = ModelOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        trainable: Trainable::Lora(cfg.lora.clone()),
        frozen_matmul: true,
    };
    let tensors = LlamaModel::random(&tiny(), 42, &options)
        .unwrap()
        .base_tensors()
        .into_iter()
        .map(|(n, t)| {
            let t = if n == "lm_head.weight" {
                (t * 50.0).unwrap()
            } else {
                t
            };
            (n, t)
        })
        .collect();
    let model = LlamaModel::from_tensors(tiny(), tensors, &options).unwrap();
    Trainer::new(model, cfg).unwrap()
}

#[test]
fn several_epochs_take_one_adam_step_each_and_can_clip() {
    let mut t = sharp_trainer(TrainConfig {
        epochs: 3,
        ..config(0.05)
    });
    let batch = vec![
        sample(&[1, 2], &[3, 4, 5], &[1.0, 1.0, 1.0]),
        sample(&[6], &[7, 8], &[-1.0, -1.0]),
    ];
    t.step(&batch).unwrap();
    t.step(&batch).unwrap();
    // With a huge learning rate the policy leaves the trust region within one call.
    let s = t.step(&batch).unwrap();
    assert!(s.clip_fraction > 0.0, "{s:?}");
    assert_eq!(t.steps(), 3);
}

#[test]
fn the_model_must_carry_the_configured_lora() {
    let cfg = config(1e-3);
    let other = LlamaModel::random(
        &tiny(),
        1,
        &ModelOptions {
            trainable: Trainable::Lora(LoraOptions {
                rank: 2,
                ..cfg.lora.clone()
            }),
            ..ModelOptions::default()
        },
    )
    .unwrap();
    assert!(
        matches!(Trainer::new(other, cfg.clone()), Err(TrainError::Config(m)) if m.contains("lora"))
    );
    let full = LlamaModel::random(
        &tiny(),
        1,
        &ModelOptions {
            trainable: Trainable::Full,
            ..ModelOptions::default()
        },
    )
    .unwrap();
    assert!(matches!(
        Trainer::new(full, cfg),
        Err(TrainError::Config(_))
    ));
}

#[test]
fn schedule_advances_once_per_call() {
    let mut t = trainer_with(
        TrainConfig {
            warmup_fraction: 0.1,
            total_steps: 20,
            ..config(1e-3)
        },
        DType::F32,
    );
    let lrs: Vec<f64> = (0..4)
        .map(|_| t.step(&[sample(&[1], &[2], &[1.0])]).unwrap().learning_rate)
        .collect();
    // Two warm-up steps (10 % of 20), then the cosine from the peak.
    assert!((lrs[0] - 0.5e-3).abs() < 1e-15);
    assert!((lrs[1] - 1e-3).abs() < 1e-15);
    assert!((lrs[2] - 1e-3).abs() < 1e-15);
    assert!(lrs[3] < 1e-3);
    assert_eq!(
        t.next_learning_rate(),
        CosineSchedule::new(1e-3, 20, 0.1, 0.1).lr(4)
    );
}

#[test]
fn a_restored_checkpoint_continues_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    let prompt = [1u32, 2, 3];
    let batch = vec![
        sample(&prompt, &[5, 6], &[1.0, 1.0]),
        sample(&prompt, &[7, 8], &[-1.0, -1.0]),
    ];
    let mut a = trainer_with(config(1e-2), DType::F32);
    for _ in 0..3 {
        a.step(&batch).unwrap();
    }
    a.save_state(&path, "v3").unwrap();
    assert_eq!(Trainer::state_version(&path).unwrap(), "v3");
    let adapter = a.model().export_adapter("tiny").unwrap();

    // A fresh trainer with the published weights and the saved optimizer state...
    let mut b = trainer_with(config(1e-2), DType::F32);
    b.model_mut().load_adapter(&adapter).unwrap();
    b.load_state(&path, "v3").unwrap();
    assert_eq!(b.steps(), 3);
    assert_eq!(b.next_learning_rate(), a.next_learning_rate());
    // ... takes exactly the step the original takes; without the state it would not.
    let mut c = trainer_with(config(1e-2), DType::F32);
    c.model_mut().load_adapter(&adapter).unwrap();
    a.step(&batch).unwrap();
    b.step(&batch).unwrap();
    c.step(&batch).unwrap();
    assert_eq!(values(a.model()), values(b.model()));
    assert_ne!(values(a.model()), values(c.model()));
}

#[test]
fn a_mismatched_checkpoint_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    let mut a = trainer_with(config(1e-2), DType::F32);
    a.step(&[sample(&[1, 2], &[5, 6], &[1.0, -1.0])]).unwrap();
    a.save_state(&path, "v1").unwrap();

    let mut b = trainer_with(config(1e-2), DType::F32);
    let err = b.load_state(&path, "v2").unwrap_err().to_string();
    assert!(
        err.contains("belongs to adapter version v1, not v2"),
        "{err}"
    );
    assert_eq!(b.steps(), 0);

    // Another LoRA rank: the moments do not fit.
    let mut cfg = config(1e-2);
    cfg.lora.rank = 2;
    let mut other = trainer_with(cfg, DType::F32);
    let err = other.load_state(&path, "v1").unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");
    assert_eq!(other.steps(), 0);

    // A corrupt file.
    std::fs::write(&path, b"not a safetensors file").unwrap();
    let err = b.load_state(&path, "v1").unwrap_err().to_string();
    assert!(err.contains("unreadable"), "{err}");
    let missing = dir.path().join("absent.safetensors");
    assert!(b.load_state(&missing, "v1").is_err());
}
