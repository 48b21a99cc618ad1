//! The trainable decoder's families, checked against each other without an engine: Phi-3's
//! fused projections equal Llama's split ones, Qwen2 with zero biases equals Llama and its
//! biases matter, Mistral refuses sequences beyond its window, Llama 3 RoPE scaling changes
//! only what it should, and LoRA on fused projections trains and round-trips through PEFT.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use leaf_adapters::config::{RopeScaling, PHI3_TARGETS};
use leaf_adapters::model::{Batch, LlamaModel, LoraOptions, ModelOptions, Pass, Trainable};
use leaf_adapters::{Family, LlamaConfig};

fn config(family: Family) -> LlamaConfig {
    LlamaConfig {
        architectures: vec![family.architecture().into()],
        model_type: family.model_type().into(),
        hidden_size: 32,
        intermediate_size: 48,
        vocab_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        max_position_embeddings: 64,
        ..LlamaConfig::default()
    }
}

fn opts(trainable: Trainable) -> ModelOptions {
    ModelOptions {
        dtype: DType::F64,
        device: Device::Cpu,
        trainable,
        frozen_matmul: true,
    }
}

fn input() -> Tensor {
    Tensor::new(&[[3u32, 17, 5, 39, 0, 22, 8]], &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// A Llama model's weights with q/k/v and gate/up fused into Phi-3's tensors.
fn fuse(llama: &LlamaModel) -> HashMap<String, Tensor> {
    let mut w: HashMap<String, Tensor> = llama.base_tensors().into_iter().collect();
    for i in 0..llama.config().num_hidden_layers {
        let take = |w: &mut HashMap<String, Tensor>, part: &str| {
            w.remove(&format!("model.layers.{i}.{part}.weight"))
                .unwrap()
        };
        let q = take(&mut w, "self_attn.q_proj");
        let k = take(&mut w, "self_attn.k_proj");
        let v = take(&mut w, "self_attn.v_proj");
        let g = take(&mut w, "mlp.gate_proj");
        let u = take(&mut w, "mlp.up_proj");
        w.insert(
            format!("model.layers.{i}.self_attn.qkv_proj.weight"),
            Tensor::cat(&[q, k, v], 0).unwrap(),
        );
        w.insert(
            format!("model.layers.{i}.mlp.gate_up_proj.weight"),
            Tensor::cat(&[g, u], 0).unwrap(),
        );
    }
    w
}

#[test]
fn phi3_fused_projections_equal_llamas_split_ones() {
    let llama = LlamaModel::random(&config(Family::Llama), 1, &opts(Trainable::Nothing)).unwrap();
    let phi3 = LlamaModel::from_tensors(
        config(Family::Phi3),
        fuse(&llama),
        &opts(Trainable::Nothing),
    )
    .unwrap();
    let a = llama.forward(&input(), &Pass::BASE).unwrap();
    let b = phi3.forward(&input(), &Pass::BASE).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-12, "{}", max_abs_diff(&a, &b));
    // Its base tensors are the fused ones, under Phi-3's names.
    let names: Vec<String> = phi3.base_tensors().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"model.layers.1.self_attn.qkv_proj.weight".to_string()));
    assert!(!names.iter().any(|n| n.contains("q_proj.weight")));
}

#[test]
fn phi3_lora_resolves_llama_names_trains_and_exports_fused_targets() {
    let lora = LoraOptions {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        seed: 1,
        ..LoraOptions::default()
    };
    let model = LlamaModel::random(&config(Family::Phi3), 2, &opts(Trainable::Lora(lora))).unwrap();
    assert_eq!(model.lora_options().unwrap().target_modules, PHI3_TARGETS);
    let (a, b) = model.lora_pair(0, "qkv_proj").unwrap();
    assert_eq!(a.dims(), [2, 32]);
    assert_eq!(b.dims(), [32 + 2 * 16, 2]);
    // A gradient reaches B of every fused projection through the narrows.
    let batch = Batch::new(&[(&[1u32, 2, 3][..], &[4u32, 5][..])], &Device::Cpu).unwrap();
    let loss = model.logprobs(&batch, true).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for m in PHI3_TARGETS {
        let (_, b) = model.lora_pair(1, m).unwrap();
        let g = grads.get(b.as_tensor()).expect("a gradient");
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(norm > 0.0, "{m}: zero gradient");
    }
    let adapter = model.export_adapter("phi3").unwrap();
    assert_eq!(adapter.config.target_modules, PHI3_TARGETS);
    assert!(adapter
        .tensors
        .contains_key("base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"));
    let mut again = LlamaModel::random(
        &config(Family::Phi3),
        2,
        &opts(Trainable::Lora(LoraOptions {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            seed: 9,
            target_modules: PHI3_TARGETS.iter().map(|s| s.to_string()).collect(),
        })),
    )
    .unwrap();
    again.load_adapter(&adapter).unwrap();
    // An unknown target for the family is a clear error.
    let bad = LoraOptions {
        target_modules: vec!["lm_head".into()],
        ..LoraOptions::default()
    };
    let err = LlamaModel::random(&config(Family::Phi3), 2, &opts(Trainable::Lora(bad)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("lm_head"), "{err}");
}

#[test]
fn qwen2_biases_are_loaded_and_matter() {
    let qwen = LlamaModel::random(&config(Family::Qwen2), 3, &opts(Trainable::Nothing)).unwrap();
    let mut w: HashMap<String, Tensor> = qwen.base_tensors().into_iter().collect();
    assert!(w.contains_key("model.layers.0.self_attn.k_proj.bias"));
    assert!(!w.contains_key("model.layers.0.self_attn.o_proj.bias"));
    // Zero biases: exactly the Llama model with the same weights.
    let zeroed: HashMap<String, Tensor> = w
        .iter()
        .map(|(n, t)| {
            let t = if n.ends_with(".bias") {
                t.zeros_like().unwrap()
            } else {
                t.clone()
            };
            (n.clone(), t)
        })
        .collect();
    let q0 = LlamaModel::from_tensors(
        config(Family::Qwen2),
        zeroed.clone(),
        &opts(Trainable::Nothing),
    )
    .unwrap();
    let llama =
        LlamaModel::from_tensors(config(Family::Llama), zeroed, &opts(Trainable::Nothing)).unwrap();
    let a = q0.forward(&input(), &Pass::BASE).unwrap();
    let b = llama.forward(&input(), &Pass::BASE).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-12);
    let c = qwen.forward(&input(), &Pass::BASE).unwrap();
    assert!(max_abs_diff(&a, &c) > 1e-6, "the biases changed nothing");
    // A missing bias names the tensor.
    w.remove("model.layers.1.self_attn.v_proj.bias");
    let err = LlamaModel::from_tensors(config(Family::Qwen2), w, &opts(Trainable::Nothing))
        .unwrap_err()
        .to_string();
    assert!(err.contains("v_proj.bias"), "{err}");
}

#[test]
fn mistral_window_and_head_dim() {
    let mut c = config(Family::Mistral);
    c.sliding_window = Some(5);
    c.head_dim = Some(16);
    let model = LlamaModel::random(&c, 4, &opts(Trainable::Nothing)).unwrap();
    assert_eq!(
        model.base_tensors()[1].1.dims(),
        [4 * 16, 32],
        "q_proj is heads x head_dim by hidden"
    );
    let short = Tensor::new(&[[1u32, 2, 3, 4, 5]], &Device::Cpu).unwrap();
    model.forward(&short, &Pass::BASE).unwrap();
    let err = model
        .forward(&input(), &Pass::BASE)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sliding attention window of 5"), "{err}");
}

#[test]
fn llama3_rope_scaling_changes_late_positions_only_through_rope() {
    let mut c = config(Family::Llama);
    c.rope_theta = 500_000.0;
    let plain = LlamaModel::random(&c, 5, &opts(Trainable::Nothing)).unwrap();
    c.rope_scaling = Some(RopeScaling {
        rope_type: "llama3".into(),
        factor: 8.0.into(),
        low_freq_factor: 1.0.into(),
        high_freq_factor: 4.0.into(),
        original_max_position_embeddings: 16.into(),
    });
    let scaled = LlamaModel::random(&c, 5, &opts(Trainable::Nothing)).unwrap();
    let a = plain.forward(&input(), &Pass::BASE).unwrap();
    let b = scaled.forward(&input(), &Pass::BASE).unwrap();
    // Position 0 has no rotation: identical; later positions differ.
    let first = max_abs_diff(
        &a.get(0).unwrap().get(0).unwrap(),
        &b.get(0).unwrap().get(0).unwrap(),
    );
    assert!(first < 1e-12, "{first}");
    assert!(max_abs_diff(&a, &b) > 1e-9);
    let _ = b.dim(D::Minus1).unwrap();
}

#[test]
fn unsupported_families_and_options_are_clear_errors() {
    let mut c = config(Family::Llama);
    c.architectures = vec!["GPT2LMHeadModel".into()];
    c.model_type = "gpt2".into();
    let err = LlamaModel::random(&c, 0, &opts(Trainable::Nothing))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("GPT2LMHeadModel") && err.contains("supported"),
        "{err}"
    );
    let mut c = config(Family::Qwen2);
    c.rope_scaling = Some(RopeScaling {
        rope_type: "yarn".into(),
        factor: 4.0.into(),
        low_freq_factor: None,
        high_freq_factor: None,
        original_max_position_embeddings: None,
    });
    let err = c.check().unwrap_err();
    assert!(err.contains("rope_scaling"), "{err}");
}
