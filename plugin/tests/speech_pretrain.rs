//! `leaf pretrain` end to end at a tiny size: the directory it writes, that our trainer reloads
//! it, that the same seed gives byte-identical weights, and that evaluation (library and
//! `leaf eval`) returns sane figures.

use std::path::{Path, PathBuf};

use leaf_adapters::model::{LlamaModel, ModelOptions, Trainable};
use leaf_adapters::LlamaConfig;
use leaf_plugin::speech::eval::{evaluate, Decoding, EvalConfig};
use leaf_plugin::speech::pretrain::{
    load_encoder, pretrain, Holdout, ModelShape, PretrainConfig, PretrainReport, ProgressEvent,
    ADAPTER_DIR, MODEL_CARD_FILE, MODEL_INFO_FILE,
};
use leaf_plugin::speech::tasks::link_recordings;
use leaf_plugin::speech::tasks::{Corpus, Split, TaskFamily};

fn fsdd_dir() -> PathBuf {
    leaf_plugin::speech::pretrain::default_data_dir().unwrap_or_else(|e| panic!("{e}"))
}

/// A small recordings folder (two speakers, takes 0-7) made of links into FSDD: `--data` works
/// with any folder of FSDD-named files, and the test stays fast.
fn small_data(root: &Path) -> PathBuf {
    link_recordings(
        &fsdd_dir(),
        &root.join("recordings"),
        &["george", "jackson"],
        0..8,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn tiny_config(seed: u64) -> PretrainConfig {
    PretrainConfig {
        steps: 4,
        max_seconds: 0.0,
        batch_size: 4,
        seed,
        shape: ModelShape {
            layers: 1,
            hidden: 32,
            heads: 2,
            kv_heads: 1,
            intermediate: 64,
            max_positions: 1024,
        },
        units: 16,
        kmeans_iters: 5,
        eval_samples: 3,
        // Take 5 is kept for the traffic; pretraining sees takes 6-7.
        traffic_takes: 1,
        ..PretrainConfig::default()
    }
}

#[test]
fn tiny_pretrain_writes_a_loadable_deterministic_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_data(tmp.path());
    let a = tmp.path().join("a");
    let mut events = Vec::new();
    let report = pretrain(&tiny_config(7), &data, &a, &mut |e| events.push(e.clone())).unwrap();

    // Progress: stages, a start, one event per step in order.
    assert!(events.contains(&ProgressEvent::Start {
        steps: 4,
        max_seconds: 0.0
    }));
    let steps: Vec<usize> = events
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::Step { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);

    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "units.json",
        MODEL_CARD_FILE,
        MODEL_INFO_FILE,
    ] {
        assert!(a.join(f).is_file(), "{f} missing");
    }
    // The report on disk is the one returned.
    let on_disk = PretrainReport::load(&a).unwrap();
    assert_eq!(on_disk.steps, 4);
    assert_eq!(on_disk.stopped_by, "steps");
    assert_eq!(on_disk.holdout_speaker.as_deref(), Some("jackson"));
    assert_eq!(on_disk.train_speakers, vec!["george".to_string()]);
    // George's takes 5-7 of ten digits.
    // george (jackson is held out), takes 6-7 (take 5 is kept for the traffic), ten digits.
    assert_eq!(on_disk.train_clips, 20);
    assert!(report.first_loss.is_finite() && report.final_loss.is_finite());
    assert!(report.tokens > report.answer_tokens && report.answer_tokens > 0);
    let eval = report.eval.as_ref().unwrap();
    assert_eq!(eval.in_speaker.speakers, vec!["george".to_string()]);
    assert_eq!(
        eval.holdout.as_ref().unwrap().speakers,
        vec!["jackson".to_string()]
    );
    // Three examples of each of the six families.
    assert_eq!(eval.in_speaker.examples, 18);
    let card = std::fs::read_to_string(a.join(MODEL_CARD_FILE)).unwrap();
    assert!(card.contains("held-out speaker") && card.contains("jackson"));
    assert!(card.contains("Recognition exact match"));

    // Our trainer loads it back, with the config we asked for and the tokenizer's vocabulary.
    let model = LlamaModel::load(
        &a,
        &ModelOptions {
            trainable: Trainable::Nothing,
            ..ModelOptions::default()
        },
    )
    .unwrap();
    let cfg = LlamaConfig::from_path(&a).unwrap();
    let encoder = load_encoder(&a).unwrap();
    assert_eq!(cfg.hidden_size, 32);
    assert_eq!(cfg.num_key_value_heads, Some(1));
    assert_eq!(cfg.vocab_size, encoder.tokenizer().vocab_size());
    assert_eq!(cfg.eos_token_id, Some(encoder.tokenizer().ids().eos));
    assert_eq!(model.config(), &cfg);

    // Same seed, same bytes; another seed, other bytes.
    let b = tmp.path().join("b");
    pretrain(&tiny_config(7), &data, &b, &mut |_| {}).unwrap();
    let wa = std::fs::read(a.join("model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("model.safetensors")).unwrap();
    assert!(wa == wb, "same seed gave different weights");
    assert_eq!(
        std::fs::read(a.join("units.json")).unwrap(),
        std::fs::read(b.join("units.json")).unwrap()
    );
    let c = tmp.path().join("c");
    pretrain(&tiny_config(8), &data, &c, &mut |_| {}).unwrap();
    assert!(wa != std::fs::read(c.join("model.safetensors")).unwrap());

    // Evaluation through the library: counts and ranges.
    let mut corpus = Corpus::open(&data).unwrap();
    corpus.preload().unwrap();
    let config = EvalConfig {
        families: vec![TaskFamily::Asr, TaskFamily::Sqa],
        samples: 5,
        holdout_speaker: Some("jackson".into()),
        ..EvalConfig::default()
    };
    let r = evaluate(&model, &encoder, &corpus, &config).unwrap();
    assert_eq!(r.split, Split::Test);
    assert_eq!(r.in_speaker.examples, 10);
    assert_eq!(
        r.in_speaker.tasks.keys().collect::<Vec<_>>(),
        ["asr", "sqa"]
    );
    for g in [&r.in_speaker, r.holdout.as_ref().unwrap()] {
        for s in g.tasks.values() {
            assert_eq!(s.examples, 5);
            assert!((0.0..=1.0).contains(&s.exact_match));
            assert!((0.0..=100.0).contains(&s.bleu) && (0.0..=100.0).contains(&s.chrf));
            assert!(s.wer >= 0.0);
        }
    }
    // Greedy evaluation is deterministic; sampling with a seed is too.
    assert_eq!(
        evaluate(&model, &encoder, &corpus, &config)
            .unwrap()
            .in_speaker,
        r.in_speaker
    );
    let sampled = EvalConfig {
        decoding: Decoding::Sample {
            temperature: 1.0,
            top_p: 0.9,
        },
        ..config.clone()
    };
    assert_eq!(
        evaluate(&model, &encoder, &corpus, &sampled)
            .unwrap()
            .in_speaker,
        evaluate(&model, &encoder, &corpus, &sampled)
            .unwrap()
            .in_speaker
    );
    // A speaker the recordings do not have is a clear error.
    let bad = EvalConfig {
        holdout_speaker: Some("nobody".into()),
        ..config
    };
    let e = evaluate(&model, &encoder, &corpus, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nobody"), "{e}");

    // Every training take (5-7) kept for the traffic: nothing left to pretrain on, said so.
    let cfg = PretrainConfig {
        traffic_takes: 3,
        ..tiny_config(0)
    };
    let e = pretrain(&cfg, &data, &tmp.path().join("m3"), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("no training takes (8+)"), "{e}");

    // `leaf eval` prints one JSON object with the same figures, and --answers writes every
    // example with its answer.
    let answers = tmp.path().join("answers.jsonl");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leaf"))
        .args(["eval", "--model"])
        .arg(&a)
        .arg("--answers")
        .arg(&answers)
        .args([
            "--task",
            "asr",
            "--samples",
            "4",
            "--holdout-speaker",
            "jackson",
        ])
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.trim().lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["in_speaker"]["tasks"]["asr"]["examples"], 4);
    assert_eq!(v["holdout"]["tasks"]["asr"]["examples"], 4);
    assert_eq!(v["decoding"]["mode"], "greedy");
    let em = v["in_speaker"]["tasks"]["asr"]["exact_match"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&em));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&answers)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 8, "4 in-speaker and 4 held-out answers");
    let inside: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["group"] == "in_speaker")
        .collect();
    assert_eq!(inside.len(), 4);
    assert!(lines
        .iter()
        .filter(|l| l["group"] == "holdout")
        .all(|l| l["example"]["speaker"] == "jackson" && l["family"] == "asr"));
    for l in &lines {
        let same = l["hypothesis"].as_str().unwrap().trim() == l["reference"].as_str().unwrap();
        assert!(!same || l["exact"] == true, "{l}");
    }
    let exact = inside.iter().filter(|l| l["exact"] == true).count();
    assert!(
        (exact as f64 / 4.0 - em).abs() < 1e-9,
        "{exact} of 4 against {em}"
    );
}

/// Largest absolute difference between two safetensors files' tensors of the same names.
fn max_weight_diff(a: &Path, b: &Path) -> f64 {
    let dev = candle_core::Device::Cpu;
    let ta = candle_core::safetensors::load(a.join("model.safetensors"), &dev).unwrap();
    let tb = candle_core::safetensors::load(b.join("model.safetensors"), &dev).unwrap();
    assert_eq!(ta.len(), tb.len());
    ta.iter()
        .map(|(name, x)| {
            let y = &tb[name];
            let d = (x - y).unwrap().abs().unwrap().flatten_all().unwrap();
            d.max(0).unwrap().to_scalar::<f32>().unwrap() as f64
        })
        .fold(0.0, f64::max)
}

#[test]
fn continuing_on_the_traffic_takes_starts_from_the_given_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_data(tmp.path());
    let a = tmp.path().join("a");
    let base = PretrainConfig {
        eval_samples: 0,
        ..tiny_config(7)
    };
    pretrain(&base, &data, &a, &mut |_| {}).unwrap();

    // At a vanishing learning rate the continued model is the one it started from, and it
    // keeps that model's codebook; it trains on the traffic's take (5) only.
    let still = PretrainConfig {
        init_from: Some(a.clone()),
        train_on_traffic: true,
        lr: 1e-12,
        steps: 2,
        ..base.clone()
    };
    let c = tmp.path().join("c");
    let report = pretrain(&still, &data, &c, &mut |_| {}).unwrap();
    assert_eq!(report.train_clips, 10, "george's take 5, ten digits");
    assert!(
        max_weight_diff(&a, &c) < 1e-6,
        "{}",
        max_weight_diff(&a, &c)
    );
    assert_eq!(
        std::fs::read(a.join("units.json")).unwrap(),
        std::fs::read(c.join("units.json")).unwrap()
    );
    let card = std::fs::read_to_string(c.join(MODEL_CARD_FILE)).unwrap();
    assert!(card.contains("continued from") && card.contains("takes 5-5, the traffic's"));
    let on_disk = PretrainReport::load(&c).unwrap();
    assert_eq!(on_disk.config.init_from.as_deref(), Some(a.as_path()));
    assert!(on_disk.config.train_on_traffic);

    // At the usual rate it learns: the weights move.
    let d = tmp.path().join("d");
    let moving = PretrainConfig {
        lr: 2e-3,
        ..still.clone()
    };
    pretrain(&moving, &data, &d, &mut |_| {}).unwrap();
    assert!(max_weight_diff(&a, &d) > 1e-4);

    // As a LoRA adapter: the model directory keeps the starting weights, the adapter moved.
    let l = tmp.path().join("l");
    let lora = PretrainConfig {
        adapter_rank: Some(4),
        ..moving.clone()
    };
    pretrain(&lora, &data, &l, &mut |_| {}).unwrap();
    assert_eq!(max_weight_diff(&a, &l), 0.0);
    let adapter = leaf_adapters::peft::LoraAdapter::load(&l.join(ADAPTER_DIR)).unwrap();
    assert_eq!(adapter.config.r, 4);
    let moved = adapter
        .tensors
        .iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .all(|(_, t)| {
            t.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        });
    assert!(moved, "every lora_B left zero");
    let card = std::fs::read_to_string(l.join(MODEL_CARD_FILE)).unwrap();
    assert!(card.contains("rank-4 LoRA adapter"), "{card}");

    // What cannot be continued is named.
    let err = |cfg: &PretrainConfig, out: &str| {
        pretrain(cfg, &data, &tmp.path().join(out), &mut |_| {})
            .unwrap_err()
            .to_string()
    };
    let e = err(
        &PretrainConfig {
            units: 8,
            ..still.clone()
        },
        "e1",
    );
    assert!(e.contains("codebook has 16 units, this run has 8"), "{e}");
    let mut wider = still.clone();
    wider.shape.hidden = 64;
    wider.shape.intermediate = 128;
    let e = err(&wider, "e2");
    assert!(
        e.contains("init_from") && e.contains("d = 32") && e.contains("d = 64"),
        "{e}"
    );
    let e = err(
        &PretrainConfig {
            init_from: Some(tmp.path().join("no-such-model")),
            ..still.clone()
        },
        "e3",
    );
    assert!(e.contains("no-such-model"), "{e}");
    let e = err(
        &PretrainConfig {
            traffic_takes: 0,
            ..still.clone()
        },
        "e4",
    );
    assert!(e.contains("train_on_traffic needs traffic_takes"), "{e}");
    let e = err(
        &PretrainConfig {
            adapter_rank: Some(4),
            init_from: None,
            ..base.clone()
        },
        "e5",
    );
    assert!(e.contains("adapter_rank needs init_from"), "{e}");
    let e = err(
        &PretrainConfig {
            adapter_rank: Some(0),
            ..still.clone()
        },
        "e6",
    );
    assert!(e.contains("adapter_rank must be positive"), "{e}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-recordings");
    let e = pretrain(
        &tiny_config(0),
        &missing,
        &tmp.path().join("m"),
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no-such-recordings"), "{e}");

    let full = tmp.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("x"), b"x").unwrap();
    let data = small_data(tmp.path());
    let e = pretrain(&tiny_config(0), &data, &full, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty"), "{e}");

    let cfg = PretrainConfig {
        holdout: Holdout::Speaker("nobody".into()),
        ..tiny_config(0)
    };
    let e = pretrain(&cfg, &data, &tmp.path().join("m2"), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("nobody"), "{e}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leaf"))
        .args(["eval", "--model"])
        .arg(tmp.path().join("no-model"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-model"), "{err}");
}
