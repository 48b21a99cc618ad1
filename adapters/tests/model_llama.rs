//! The trainable decoder: Hugging Face Llama semantics (checked against a plain-loop reference),
//! checkpoints, LoRA, log-probs with padding, gradients, PEFT adapters.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use leaf_adapters::model::{Batch, LlamaModel, LoraOptions, ModelOptions, Pass, Trainable};
use leaf_adapters::peft::{tensor_name, LoraAdapter, LoraPart};
use leaf_adapters::{Error, LlamaConfig};

const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn tiny(tie: bool) -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "hidden_size": 16,
        "intermediate_size": 24,
        "vocab_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tie,
    }))
    .unwrap()
}

fn lora(rank: usize, dropout: f64) -> LoraOptions {
    LoraOptions {
        rank,
        alpha: 2.0 * rank as f64,
        dropout,
        seed: 3,
        ..LoraOptions::default()
    }
}

fn options(dtype: DType, trainable: Trainable) -> ModelOptions {
    ModelOptions {
        dtype,
        device: Device::Cpu,
        trainable,
        frozen_matmul: true,
    }
}

fn lcg_vec(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Gives every LoRA B random values so the adapter changes the model.
fn randomise_b(model: &LlamaModel, seed: u64) {
    for layer in 0..model.config().num_hidden_layers {
        for (j, m) in TARGETS.iter().enumerate() {
            if let Some((_, b)) = model.lora_pair(layer, m) {
                let v = lcg_vec(b.elem_count(), seed + (layer * 7 + j) as u64, 0.2);
                let t = Tensor::from_vec(v, b.dims(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(b.dtype())
                    .unwrap();
                b.set(&t).unwrap();
            }
        }
    }
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

// ---------------------------------------------------------------- plain-loop reference

struct Mat {
    rows: usize,
    cols: usize,
    v: Vec<f64>,
}

impl Mat {
    fn from(t: &Tensor) -> Mat {
        let (rows, cols) = t.dims2().unwrap();
        Mat {
            rows,
            cols,
            v: flat(t),
        }
    }
    fn apply(&self, x: &[f64]) -> Vec<f64> {
        (0..self.rows)
            .map(|o| {
                (0..self.cols)
                    .map(|i| self.v[o * self.cols + i] * x[i])
                    .sum()
            })
            .collect()
    }
}

/// HF `LlamaForCausalLM.forward` written out with loops, weights merged as W + scale B A.
fn naive_logits(model: &LlamaModel, tokens: &[u32], with_lora: bool) -> Vec<Vec<f64>> {
    let cfg = model.config();
    let d = cfg.hidden_size;
    let heads = cfg.num_attention_heads;
    let kv = cfg.num_kv_heads();
    let hd = d / heads;
    let eps = cfg.rms_norm_eps;
    let w: HashMap<String, Tensor> = model.base_tensors().into_iter().collect();
    let scale = model.lora_options().map(|l| l.scale()).unwrap_or(0.0);
    let proj = |layer: usize, m: &str| -> Mat {
        let parent = if ["q_proj", "k_proj", "v_proj", "o_proj"].contains(&m) {
            "self_attn"
        } else {
            "mlp"
        };
        let mut base = Mat::from(&w[&format!("model.layers.{layer}.{parent}.{m}.weight")]);
        if with_lora {
            if let Some((a, b)) = model.lora_pair(layer, m) {
                let a = Mat::from(a.as_tensor());
                let b = Mat::from(b.as_tensor());
                for o in 0..base.rows {
                    for i in 0..base.cols {
                        let ba: f64 = (0..a.rows)
                            .map(|r| b.v[o * b.cols + r] * a.v[r * a.cols + i])
                            .sum();
                        base.v[o * base.cols + i] += scale * ba;
                    }
                }
            }
        }
        base
    };
    let rms = |x: &[f64], wt: &[f64]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + eps).sqrt();
        x.iter().zip(wt).map(|(v, g)| v * r * g).collect()
    };
    let rope = |x: &[f64], pos: usize| -> Vec<f64> {
        let half = hd / 2;
        let mut out = x.to_vec();
        for m in 0..half {
            let freq = 1.0 / cfg.rope_theta.powf((2 * m) as f64 / hd as f64);
            let (s, c) = (pos as f64 * freq).sin_cos();
            out[m] = x[m] * c - x[m + half] * s;
            out[m + half] = x[m + half] * c + x[m] * s;
        }
        out
    };
    let embed = Mat::from(&w["model.embed_tokens.weight"]);
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| embed.v[t as usize * d..(t as usize + 1) * d].to_vec())
        .collect();
    for layer in 0..cfg.num_hidden_layers {
        let n1 = flat(&w[&format!("model.layers.{layer}.input_layernorm.weight")]);
        let n2 = flat(&w[&format!("model.layers.{layer}.post_attention_layernorm.weight")]);
        let (wq, wk, wv, wo) = (
            proj(layer, "q_proj"),
            proj(layer, "k_proj"),
            proj(layer, "v_proj"),
            proj(layer, "o_proj"),
        );
        let (wg, wu, wd) = (
            proj(layer, "gate_proj"),
            proj(layer, "up_proj"),
            proj(layer, "down_proj"),
        );
        let h: Vec<Vec<f64>> = xs.iter().map(|x| rms(x, &n1)).collect();
        let q: Vec<Vec<f64>> = h.iter().map(|x| wq.apply(x)).collect();
        let k: Vec<Vec<f64>> = h.iter().map(|x| wk.apply(x)).collect();
        let v: Vec<Vec<f64>> = h.iter().map(|x| wv.apply(x)).collect();
        let mut new_xs = Vec::new();
        for i in 0..tokens.len() {
            let mut ctx = vec![0.0; d];
            for head in 0..heads {
                let kvh = head / (heads / kv);
                let qi = rope(&q[i][head * hd..(head + 1) * hd], i);
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kj = rope(&k[j][kvh * hd..(kvh + 1) * hd], j);
                        qi.iter().zip(&kj).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for j in 0..=i {
                    for c in 0..hd {
                        ctx[head * hd + c] += e[j] / z * v[j][kvh * hd + c];
                    }
                }
            }
            let attn = wo.apply(&ctx);
            let x1: Vec<f64> = xs[i].iter().zip(&attn).map(|(a, b)| a + b).collect();
            let h2 = rms(&x1, &n2);
            let g = wg.apply(&h2);
            let u = wu.apply(&h2);
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = wd.apply(&act);
            new_xs.push(x1.iter().zip(&down).map(|(a, b)| a + b).collect());
        }
        xs = new_xs;
    }
    let norm = flat(&w["model.norm.weight"]);
    let head = match w.get("lm_head.weight") {
        Some(t) => Mat::from(t),
        None => embed,
    };
    xs.iter().map(|x| head.apply(&rms(x, &norm))).collect()
}

// ---------------------------------------------------------------- tests

#[test]
fn forward_matches_the_plain_loop_reference() {
    for tie in [false, true] {
        let model = LlamaModel::random(
            &tiny(tie),
            7,
            &options(DType::F64, Trainable::Lora(lora(4, 0.0))),
        )
        .unwrap();
        randomise_b(&model, 11);
        let tokens = [3u32, 17, 5, 31, 0, 9];
        let ids = Tensor::new(&[tokens], &Device::Cpu).unwrap();
        for with_lora in [false, true] {
            let pass = if with_lora { Pass::POLICY } else { Pass::BASE };
            let logits = model.forward(&ids, &pass).unwrap();
            assert_eq!(logits.dims(), &[1, 6, 32]);
            let got: Vec<Vec<f64>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
            let want = naive_logits(&model, &tokens, with_lora);
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!(
                    (g - w).abs() < 1e-5,
                    "tie={tie} lora={with_lora}: {g} vs {w}"
                );
            }
        }
    }
}

#[test]
fn logprobs_with_padding_equal_single_sequence_log_softmax() {
    let model = LlamaModel::random(
        &tiny(false),
        1,
        &options(DType::F64, Trainable::Lora(lora(4, 0.0))),
    )
    .unwrap();
    randomise_b(&model, 5);
    let seqs: Vec<(Vec<u32>, Vec<u32>)> = vec![
        (vec![1, 2, 3], vec![4, 5]),
        (vec![7], vec![8, 9, 10, 11, 12]),
        (vec![20, 21, 22, 23, 24, 25], vec![26]),
    ];
    let pairs: Vec<(&[u32], &[u32])> = seqs
        .iter()
        .map(|(p, c)| (p.as_slice(), c.as_slice()))
        .collect();
    let batch = Batch::new(&pairs, &Device::Cpu).unwrap();
    assert_eq!(batch.max_completion(), 5);
    assert_eq!(batch.num_tokens(), 8);
    let lp: Vec<Vec<f64>> = model.logprobs(&batch, true).unwrap().to_vec2().unwrap();
    let mask: Vec<Vec<f64>> = batch.mask(DType::F64).unwrap().to_vec2().unwrap();
    for (i, (p, c)) in seqs.iter().enumerate() {
        let full: Vec<u32> = p.iter().chain(c).copied().collect();
        let logits = naive_logits(&model, &full, true);
        for (j, &tok) in c.iter().enumerate() {
            let row = &logits[p.len() - 1 + j];
            let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
            let want = row[tok as usize] - lse;
            assert!(
                (lp[i][j] - want).abs() < 1e-5,
                "seq {i} token {j}: {} vs {want}",
                lp[i][j]
            );
            assert_eq!(mask[i][j], 1.0);
        }
        for j in c.len()..5 {
            assert_eq!((lp[i][j], mask[i][j]), (0.0, 0.0));
        }
    }
}

fn test_batch() -> Batch {
    let a: (&[u32], &[u32]) = (&[1, 2, 3, 4], &[5, 6, 7]);
    let b: (&[u32], &[u32]) = (&[9, 8], &[7, 6, 5, 4, 3]);
    Batch::new(&[a, b], &Device::Cpu).unwrap()
}

#[test]
fn zero_b_policy_equals_base_exactly_and_kl_is_zero() {
    let model = LlamaModel::random(
        &tiny(false),
        2,
        &options(DType::F32, Trainable::Lora(lora(8, 0.1))),
    )
    .unwrap();
    let batch = test_batch();
    let policy = model.logprobs(&batch, true).unwrap();
    let base = model.logprobs(&batch, false).unwrap();
    assert_eq!(
        flat(&policy),
        flat(&base),
        "B = 0 must give the base model bit for bit"
    );
    // Dropout only touches the LoRA input, so a training pass is still exact.
    let train = model.logprobs_with(&batch, &Pass::train(9)).unwrap();
    assert_eq!(flat(&train), flat(&base));
    // k3 KL of identical log-probs: exp(0) - 0 - 1 = 0 everywhere.
    let d = (&base - &policy).unwrap();
    let kl = ((d.exp().unwrap() - &d).unwrap() - 1.0).unwrap();
    assert!(flat(&kl).iter().all(|v| *v == 0.0));
    // An inference-only model and the plain-matmul variant agree too.
    let plain = LlamaModel::random(
        &tiny(false),
        2,
        &ModelOptions {
            frozen_matmul: false,
            ..options(DType::F32, Trainable::Nothing)
        },
    )
    .unwrap();
    assert_eq!(flat(&plain.logprobs(&batch, true).unwrap()), flat(&base));
}

#[test]
fn nonzero_b_changes_the_policy_only() {
    let model = LlamaModel::random(
        &tiny(false),
        2,
        &options(DType::F32, Trainable::Lora(lora(8, 0.0))),
    )
    .unwrap();
    let batch = test_batch();
    let base_before = flat(&model.logprobs(&batch, false).unwrap());
    randomise_b(&model, 1);
    assert_eq!(flat(&model.logprobs(&batch, false).unwrap()), base_before);
    assert_ne!(flat(&model.logprobs(&batch, true).unwrap()), base_before);
    model.reset_lora().unwrap();
    assert_eq!(flat(&model.logprobs(&batch, true).unwrap()), base_before);
}

#[test]
fn dropout_is_deterministic_per_seed_and_off_in_evaluation() {
    let model = LlamaModel::random(
        &tiny(false),
        4,
        &options(DType::F32, Trainable::Lora(lora(4, 0.5))),
    )
    .unwrap();
    randomise_b(&model, 2);
    let batch = test_batch();
    let a = flat(&model.logprobs_with(&batch, &Pass::train(1)).unwrap());
    let b = flat(&model.logprobs_with(&batch, &Pass::train(1)).unwrap());
    let c = flat(&model.logprobs_with(&batch, &Pass::train(2)).unwrap());
    let eval = flat(&model.logprobs(&batch, true).unwrap());
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, eval);
    assert_eq!(eval, flat(&model.logprobs(&batch, true).unwrap()));
}

#[test]
fn finite_difference_gradient_check_of_every_lora_tensor() {
    let model = LlamaModel::random(
        &tiny(false),
        5,
        &options(DType::F64, Trainable::Lora(lora(3, 0.0))),
    )
    .unwrap();
    randomise_b(&model, 8);
    let batch = test_batch();
    let probe = Tensor::from_vec(lcg_vec(2 * 5, 77, 1.0), (2, 5), &Device::Cpu).unwrap();
    let loss = |m: &LlamaModel| -> Tensor {
        m.logprobs(&batch, true)
            .unwrap()
            .mul(&probe)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss(&model).backward().unwrap();
    let vars = model.trainable_vars();
    assert_eq!(vars.len(), 2 * 7 * 2, "A and B for 7 modules in 2 layers");
    let h = 1e-5;
    for (k, (name, var)) in vars.iter().enumerate() {
        let g = flat(
            grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient")),
        );
        assert!(g.iter().any(|v| *v != 0.0), "{name}: gradient is all zero");
        let base = flat(var.as_tensor());
        // Three entries per tensor, spread over it.
        for e in [0, base.len() / 2 + k % 3, base.len() - 1] {
            let set = |delta: f64| {
                let mut v = base.clone();
                v[e] += delta;
                var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&model).to_scalar::<f64>().unwrap()
            };
            let fd = (set(h) - set(-h)) / (2.0 * h);
            set(0.0);
            assert!(
                (fd - g[e]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "{name}[{e}]: finite difference {fd}, autograd {}",
                g[e]
            );
        }
    }
}

#[test]
fn with_zero_b_only_b_gets_a_gradient() {
    // At initialisation dL/dA = scale * B^T (...) = 0 and dL/dB != 0: the reason the trainer
    // test checks every tensor again after one step.
    let model = LlamaModel::random(
        &tiny(false),
        6,
        &options(DType::F64, Trainable::Lora(lora(2, 0.0))),
    )
    .unwrap();
    let batch = test_batch();
    let grads = model
        .logprobs(&batch, true)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in model.trainable_vars() {
        let g = flat(grads.get(var.as_tensor()).unwrap());
        let nonzero = g.iter().any(|v| *v != 0.0);
        assert_eq!(nonzero, name.contains("lora_B"), "{name}");
    }
}

#[test]
fn frozen_and_plain_matmul_models_agree_in_values_and_lora_gradients() {
    // The frozen path runs each LoRA projection as one fused graph node (with the dropout mask
    // computed on the fly); the plain path composes candle ops with a stored mask.
    for dropout in [0.0, 0.3] {
        let mk = |frozen| {
            let m = LlamaModel::random(
                &tiny(true),
                8,
                &ModelOptions {
                    frozen_matmul: frozen,
                    ..options(DType::F32, Trainable::Lora(lora(4, dropout)))
                },
            )
            .unwrap();
            randomise_b(&m, 3);
            m
        };
        let (f, p) = (mk(true), mk(false));
        let batch = test_batch();
        let pass = Pass::train(5);
        let lf = f.logprobs_with(&batch, &pass).unwrap();
        let lp = p.logprobs_with(&batch, &pass).unwrap();
        assert_eq!(flat(&lf), flat(&lp), "dropout {dropout}");
        let gf = lf.sum_all().unwrap().backward().unwrap();
        let gp = lp.sum_all().unwrap().backward().unwrap();
        for ((n, vf), (_, vp)) in f.trainable_vars().iter().zip(p.trainable_vars().iter()) {
            let a = flat(gf.get(vf.as_tensor()).unwrap());
            let b = flat(gp.get(vp.as_tensor()).unwrap());
            assert!(a.iter().any(|v| *v != 0.0), "{n}: zero gradient");
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                    "{n} (dropout {dropout}): {x} vs {y}"
                );
            }
        }
    }
}

#[test]
fn full_mode_trains_every_base_weight() {
    let model = LlamaModel::random(&tiny(true), 9, &options(DType::F64, Trainable::Full)).unwrap();
    let vars = model.trainable_vars();
    // embed + 2 * (2 norms + 7 projections) + final norm; tied, so no lm_head.
    assert_eq!(vars.len(), 1 + 2 * 9 + 1);
    assert!(model.lora_pair(0, "q_proj").is_none());
    let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
    let grads = model
        .forward(&ids, &Pass::BASE)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in &vars {
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "{name} gets no gradient"
        );
    }
}

#[test]
fn random_init_is_deterministic_and_seed_dependent() {
    let o = options(DType::F32, Trainable::Lora(lora(4, 0.0)));
    let a = LlamaModel::random(&tiny(false), 1, &o).unwrap();
    let b = LlamaModel::random(&tiny(false), 1, &o).unwrap();
    let c = LlamaModel::random(&tiny(false), 2, &o).unwrap();
    for (((n, x), (_, y)), (_, z)) in a
        .base_tensors()
        .iter()
        .zip(b.base_tensors())
        .zip(c.base_tensors())
    {
        assert_eq!(flat(x), flat(&y), "{n}");
        if !n.contains("norm") {
            assert_ne!(flat(x), flat(&z), "{n}");
        }
    }
    let (la, _) = a.lora_pair(1, "down_proj").unwrap();
    let (lb, _) = b.lora_pair(1, "down_proj").unwrap();
    assert_eq!(flat(la.as_tensor()), flat(lb.as_tensor()));
    // Kaiming-uniform bound 1/sqrt(in) with in = intermediate = 24.
    assert!(flat(la.as_tensor())
        .iter()
        .all(|v| v.abs() <= 1.0 / 24f64.sqrt()));
}

#[test]
fn save_then_load_round_trips_with_hf_names() {
    for tie in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let o = options(DType::F32, Trainable::Nothing);
        let model = LlamaModel::random(&tiny(tie), 3, &o).unwrap();
        model.save(dir.path()).unwrap();
        let names: Vec<String> =
            candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
                .unwrap()
                .into_keys()
                .collect();
        assert!(names.contains(&"model.layers.1.mlp.down_proj.weight".to_string()));
        assert!(names.contains(&"model.layers.0.post_attention_layernorm.weight".to_string()));
        assert_eq!(names.contains(&"lm_head.weight".to_string()), !tie);
        assert_eq!(names.len(), 1 + 2 * 9 + 1 + usize::from(!tie));
        let cfg = LlamaConfig::from_path(dir.path()).unwrap();
        assert_eq!(cfg, tiny(tie).normalized());
        let loaded = LlamaModel::load(dir.path(), &o).unwrap();
        let batch = test_batch();
        assert_eq!(
            flat(&loaded.logprobs(&batch, false).unwrap()),
            flat(&model.logprobs(&batch, false).unwrap())
        );
    }
}

#[test]
fn bad_checkpoints_are_rejected_naming_the_tensor() {
    let model =
        LlamaModel::random(&tiny(false), 3, &options(DType::F32, Trainable::Nothing)).unwrap();
    let mut tensors: HashMap<String, Tensor> = model.base_tensors().into_iter().collect();
    tensors.remove("model.layers.1.self_attn.k_proj.weight");
    match LlamaModel::from_tensors(tiny(false), tensors.clone(), &ModelOptions::default()) {
        Err(Error::Tensor { tensor, reason }) => {
            assert_eq!(tensor, "model.layers.1.self_attn.k_proj.weight");
            assert!(reason.contains("missing"));
        }
        other => panic!("expected a missing-tensor error, got {other:?}"),
    }
    tensors.insert(
        "model.layers.1.self_attn.k_proj.weight".into(),
        Tensor::zeros((16, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    match LlamaModel::from_tensors(tiny(false), tensors, &ModelOptions::default()) {
        Err(Error::Tensor { tensor, reason }) => {
            assert_eq!(tensor, "model.layers.1.self_attn.k_proj.weight");
            assert!(reason.contains("[8, 16]"), "{reason}");
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    let dir = tempfile::tempdir().unwrap();
    tiny(false).save(dir.path()).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), b"not safetensors").unwrap();
    assert!(LlamaModel::load(dir.path(), &ModelOptions::default()).is_err());
}

#[test]
fn bad_inputs_are_typed_errors() {
    let model = LlamaModel::random(
        &tiny(false),
        3,
        &options(DType::F32, Trainable::Lora(lora(2, 0.0))),
    )
    .unwrap();
    let out_of_vocab: (&[u32], &[u32]) = (&[1, 2], &[32]);
    let batch = Batch::new(&[out_of_vocab], &Device::Cpu).unwrap();
    assert!(matches!(model.logprobs(&batch, true), Err(Error::Model(m)) if m.contains("32")));
    let long = vec![1u32; 70];
    let too_long: (&[u32], &[u32]) = (&long, &[1]);
    let batch = Batch::new(&[too_long], &Device::Cpu).unwrap();
    assert!(
        matches!(model.logprobs(&batch, true), Err(Error::Model(m)) if m.contains("max_position_embeddings"))
    );
    let empty_prompt: (&[u32], &[u32]) = (&[], &[1]);
    assert!(matches!(
        Batch::new(&[empty_prompt], &Device::Cpu),
        Err(Error::Model(_))
    ));
    let empty_completion: (&[u32], &[u32]) = (&[1], &[]);
    assert!(matches!(
        Batch::new(&[empty_completion], &Device::Cpu),
        Err(Error::Model(_))
    ));
    assert!(Batch::new(&[], &Device::Cpu).is_err());
    let bad_lora = LoraOptions {
        target_modules: vec!["lm_head".into()],
        ..lora(2, 0.0)
    };
    assert!(matches!(
        LlamaModel::random(&tiny(false), 1, &options(DType::F32, Trainable::Lora(bad_lora))),
        Err(Error::Model(m)) if m.contains("lm_head")
    ));
}

#[test]
fn lora_on_a_subset_of_modules() {
    let l = LoraOptions {
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        ..lora(2, 0.0)
    };
    let model =
        LlamaModel::random(&tiny(false), 3, &options(DType::F32, Trainable::Lora(l))).unwrap();
    assert_eq!(model.trainable_vars().len(), 2 * 2 * 2);
    assert!(model.lora_pair(0, "q_proj").is_some());
    assert!(model.lora_pair(0, "k_proj").is_none());
}

#[test]
fn adapter_export_save_load_round_trip_is_bit_exact() {
    let o = options(DType::F32, Trainable::Lora(lora(4, 0.05)));
    let model = LlamaModel::random(&tiny(false), 3, &o).unwrap();
    randomise_b(&model, 4);
    let adapter = model.export_adapter("tiny-llama").unwrap();
    assert_eq!(adapter.config.r, 4);
    assert_eq!(adapter.config.lora_alpha, 8.0);
    assert_eq!(adapter.config.lora_dropout, 0.05);
    assert_eq!(adapter.config.base_model_name_or_path, "tiny-llama");
    assert_eq!(adapter.tensors.len(), 2 * 7 * 2);
    let a = &adapter.tensors[&tensor_name(1, "gate_proj", LoraPart::A)];
    let b = &adapter.tensors[&tensor_name(1, "gate_proj", LoraPart::B)];
    assert_eq!((a.dims(), b.dims()), (&[4usize, 16][..], &[24usize, 4][..]));

    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path()).unwrap();
    let read = LoraAdapter::load(dir.path()).unwrap();
    let mut fresh = LlamaModel::random(
        &tiny(false),
        3,
        &ModelOptions {
            trainable: Trainable::Lora(LoraOptions {
                seed: 99,
                ..lora(4, 0.05)
            }),
            ..o.clone()
        },
    )
    .unwrap();
    let batch = test_batch();
    assert_ne!(
        flat(&fresh.logprobs(&batch, true).unwrap()),
        flat(&model.logprobs(&batch, true).unwrap())
    );
    fresh.load_adapter(&read).unwrap();
    for ((n, x), (_, y)) in fresh
        .trainable_vars()
        .iter()
        .zip(model.trainable_vars().iter())
    {
        assert_eq!(flat(x.as_tensor()), flat(y.as_tensor()), "{n}");
    }
    assert_eq!(
        flat(&fresh.logprobs(&batch, true).unwrap()),
        flat(&model.logprobs(&batch, true).unwrap())
    );
    assert_eq!(
        read.version_id().unwrap(),
        fresh
            .export_adapter("tiny-llama")
            .unwrap()
            .version_id()
            .unwrap()
    );
}

#[test]
fn mismatched_adapters_are_rejected_and_change_nothing() {
    let o = options(DType::F32, Trainable::Lora(lora(4, 0.0)));
    let mut model = LlamaModel::random(&tiny(false), 3, &o).unwrap();
    let good = model.export_adapter("x").unwrap();
    let before: Vec<Vec<f64>> = model
        .trainable_vars()
        .iter()
        .map(|(_, v)| flat(v.as_tensor()))
        .collect();

    let other_rank = LlamaModel::random(
        &tiny(false),
        3,
        &options(DType::F32, Trainable::Lora(lora(2, 0.0))),
    )
    .unwrap()
    .export_adapter("x")
    .unwrap();
    assert!(
        matches!(model.load_adapter(&other_rank), Err(Error::Adapter(m)) if m.contains("rank"))
    );

    let name = tensor_name(0, "v_proj", LoraPart::B);
    let mut misshaped = good.clone();
    misshaped.tensors.insert(
        name.clone(),
        Tensor::zeros((7, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(
        matches!(model.load_adapter(&misshaped), Err(Error::Tensor { tensor, .. }) if tensor == name)
    );

    let mut nan = good.clone();
    let mut v = flat(&nan.tensors[&name]);
    v[3] = f64::NAN;
    nan.tensors.insert(
        name.clone(),
        Tensor::from_vec(v, (8, 4), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    );
    // Put a valid change first so a partial write would be visible.
    let first = tensor_name(0, "q_proj", LoraPart::B);
    nan.tensors.insert(
        first.clone(),
        Tensor::ones((16, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(
        matches!(model.load_adapter(&nan), Err(Error::Tensor { tensor, .. }) if tensor == name)
    );

    let mut missing = good.clone();
    missing.tensors.remove(&name);
    assert!(
        matches!(model.load_adapter(&missing), Err(Error::Tensor { tensor, .. }) if tensor == name)
    );

    let mut extra = good.clone();
    extra.tensors.insert(
        tensor_name(5, "q_proj", LoraPart::A),
        Tensor::zeros((4, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(matches!(
        model.load_adapter(&extra),
        Err(Error::Tensor { .. })
    ));

    let mut targets = good.clone();
    targets.config.target_modules.pop();
    assert!(matches!(
        model.load_adapter(&targets),
        Err(Error::Adapter(_))
    ));

    let after: Vec<Vec<f64>> = model
        .trainable_vars()
        .iter()
        .map(|(_, v)| flat(v.as_tensor()))
        .collect();
    assert_eq!(
        before, after,
        "a rejected adapter must not change the model"
    );
    let mut no_lora =
        LlamaModel::random(&tiny(false), 3, &options(DType::F32, Trainable::Nothing)).unwrap();
    assert!(no_lora.export_adapter("x").is_err());
    assert!(no_lora.load_adapter(&good).is_err());
}

#[test]
fn loaded_adapter_alpha_sets_the_scale() {
    let o = options(DType::F64, Trainable::Lora(lora(2, 0.0)));
    let model = LlamaModel::random(&tiny(false), 3, &o).unwrap();
    randomise_b(&model, 6);
    let mut adapter = model.export_adapter("x").unwrap();
    adapter.config.lora_alpha = 16.0;
    let mut other = LlamaModel::random(&tiny(false), 3, &o).unwrap();
    other.load_adapter(&adapter).unwrap();
    assert_eq!(other.lora_options().unwrap().alpha, 16.0);
    // Scale 8 instead of 4: the LoRA delta of the logits doubles.
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let base = model.forward(&ids, &Pass::BASE).unwrap();
    let d1 = (model.forward(&ids, &Pass::POLICY).unwrap() - &base).unwrap();
    let d2 = (other.forward(&ids, &Pass::POLICY).unwrap() - &base).unwrap();
    // Not exactly linear (the delta passes through nonlinearities), but strictly larger.
    let n1: f64 = flat(&d1).iter().map(|v| v * v).sum();
    let n2: f64 = flat(&d2).iter().map(|v| v * v).sum();
    assert!(n2 > 1.5 * n1, "{n2} vs {n1}");
}

#[test]
fn half_precision_models_give_f32_logprobs_close_to_f32() {
    let o32 = options(DType::F32, Trainable::Lora(lora(4, 0.0)));
    let m32 = LlamaModel::random(&tiny(false), 12, &o32).unwrap();
    let tensors: HashMap<String, Tensor> = m32.base_tensors().into_iter().collect();
    let batch = test_batch();
    let want = flat(&m32.logprobs(&batch, false).unwrap());
    // candle's CPU matmul has no bf16 kernel; f16 exercises the same upcasting path.
    let dtype = DType::F16;
    let m = LlamaModel::from_tensors(
        tiny(false),
        tensors,
        &options(dtype, Trainable::Lora(lora(4, 0.0))),
    )
    .unwrap();
    assert_eq!(m.logprob_dtype(), DType::F32);
    let lp = m.logprobs(&batch, true).unwrap();
    assert_eq!(lp.dtype(), DType::F32);
    for (a, b) in flat(&lp).iter().zip(&want) {
        assert!((a - b).abs() < 0.05, "{dtype:?}: {a} vs {b}");
    }
}

/// Generation with a [`KvCache`]: the prompts once, then one position per new token, gives the
/// logits of a whole-sequence forward pass at every step, for rows of different lengths in
/// one batch (right padding), with grouped-query attention and LoRA on, also after rows leave.
#[test]
fn prefill_and_decode_steps_equal_the_whole_sequence_forward() {
    for dtype in [DType::F32, DType::F64] {
        let model = LlamaModel::random(
            &tiny(false),
            5,
            &options(dtype, Trainable::Lora(lora(4, 0.0))),
        )
        .unwrap();
        randomise_b(&model, 13);
        let prompts: [&[u32]; 3] = [&[3, 17, 5, 31], &[9], &[0, 2, 4, 6, 8, 10, 12]];
        // Tokens fed after the prompts (fixed, so rows can be compared with forward).
        let fed: [[u32; 4]; 3] = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]];
        let t = prompts.iter().map(|p| p.len()).max().unwrap();
        let mut ids = vec![0u32; prompts.len() * t];
        for (r, p) in prompts.iter().enumerate() {
            ids[r * t..r * t + p.len()].copy_from_slice(p);
        }
        let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let input = Tensor::from_vec(ids, (3, t), &Device::Cpu).unwrap();
        let (mut logits, mut cache) = model.prefill(&input, &lens, 4, &Pass::POLICY).unwrap();
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
        let mut rows: Vec<usize> = vec![0, 1, 2];
        for step in 0..=fed[0].len() {
            // Row r's reference: forward over its prompt and the tokens fed so far.
            for (k, &r) in rows.iter().enumerate() {
                let seq: Vec<u32> = prompts[r].iter().chain(&fed[r][..step]).copied().collect();
                let whole = model
                    .forward(
                        &Tensor::new(seq.as_slice(), &Device::Cpu)
                            .unwrap()
                            .unsqueeze(0)
                            .unwrap(),
                        &Pass::POLICY,
                    )
                    .unwrap();
                let want = flat(&whole.get(0).unwrap().get(seq.len() - 1).unwrap());
                let got = flat(&logits.get(k).unwrap());
                let diff = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs())
                    .fold(0.0, f64::max);
                assert!(
                    diff < tol,
                    "{dtype:?} step {step} row {r}: max difference {diff}"
                );
            }
            if step == fed[0].len() {
                break;
            }
            if step == 2 {
                // The middle row stops; the others go on.
                cache.retain(&[0, 2]).unwrap();
                rows = vec![0, 2];
            }
            let tokens: Vec<u32> = rows.iter().map(|&r| fed[r][step]).collect();
            logits = model
                .decode_step(&mut cache, &tokens, &Pass::POLICY)
                .unwrap();
            assert_eq!(logits.dims(), &[rows.len(), 32]);
        }
        assert_eq!(cache.columns(), t + fed[0].len());
        assert_eq!(cache.positions(), vec![8, 11]);
    }
}

#[test]
fn bad_cache_use_is_a_typed_error() {
    let model = LlamaModel::random(
        &tiny(true),
        5,
        &options(DType::F32, Trainable::Lora(lora(4, 0.0))),
    )
    .unwrap();
    let input = Tensor::new(&[[3u32, 4, 0], [5, 6, 7]], &Device::Cpu).unwrap();
    // Lengths that do not fit the batch.
    for lens in [vec![2], vec![0, 3], vec![2, 4]] {
        let err = model.prefill(&input, &lens, 2, &Pass::BASE).unwrap_err();
        assert!(matches!(err, Error::Model(_)), "{lens:?}: {err}");
    }
    let (_, mut cache) = model.prefill(&input, &[2, 3], 1, &Pass::BASE).unwrap();
    // One token for two rows; a token outside the vocabulary.
    assert!(model
        .decode_step(&mut cache, &[1], &Pass::BASE)
        .unwrap_err()
        .to_string()
        .contains("1 tokens"));
    assert!(model
        .decode_step(&mut cache, &[1, 99], &Pass::BASE)
        .unwrap_err()
        .to_string()
        .contains("vocabulary"));
    // Rows out of range or out of order.
    assert!(cache.retain(&[2]).is_err());
    assert!(cache.retain(&[1, 0]).is_err());
    // The cache was made for one more position per row.
    model.decode_step(&mut cache, &[1, 2], &Pass::BASE).unwrap();
    let err = model
        .decode_step(&mut cache, &[1, 2], &Pass::BASE)
        .unwrap_err();
    assert!(err.to_string().contains("beyond"), "{err}");
    // The failed steps changed nothing.
    assert_eq!((cache.rows(), cache.columns()), (2, 4));
}
