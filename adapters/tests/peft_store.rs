//! PEFT format, validation, the versioned store (with fault injection) and merging.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use candle_core::{DType, Device, Tensor};
use leaf_adapters::config::{LlamaConfig, ALL_TARGETS};
use leaf_adapters::merge::{delta, merge_into, merge_model_dir};
use leaf_adapters::peft::{
    tensor_name, LoraAdapter, LoraPart, PeftConfig, CONFIG_FILE, MAX_CONFIG_FILE_BYTES,
    WEIGHTS_FILE,
};
use leaf_adapters::store::{AdapterStore, FailPoint, Fault, VersionId, VersionMeta, LOCK_FILE};
use leaf_adapters::validate::{inspect, validate, Limits};
use leaf_adapters::Error;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------
// Helpers

/// d = 32, 4 heads of 8 with 2 KV heads (GQA), MLP 48, 2 layers.
fn tiny_base() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "hidden_size": 32,
        "intermediate_size": 48,
        "vocab_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }))
    .unwrap()
}

fn targets(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn random_tensor(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A valid adapter with random non-zero A and B on `mods`.
fn random_adapter(
    base: &LlamaConfig,
    r: usize,
    alpha: f64,
    mods: &[&str],
    seed: u64,
) -> LoraAdapter {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ad = LoraAdapter::new(
        PeftConfig::new(r, alpha, targets(mods), "tiny-llama"),
        BTreeMap::new(),
    );
    for layer in 0..base.num_hidden_layers {
        for m in mods {
            let (o, i) = base.module_shape(m).unwrap();
            ad.insert(layer, m, LoraPart::A, random_tensor(&mut rng, &[r, i], 0.5))
                .unwrap();
            ad.insert(layer, m, LoraPart::B, random_tensor(&mut rng, &[o, r], 0.5))
                .unwrap();
        }
    }
    ad
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn assert_same_adapter(a: &LoraAdapter, b: &LoraAdapter) {
    assert_eq!(a.config, b.config);
    assert_eq!(
        a.tensors.keys().collect::<Vec<_>>(),
        b.tensors.keys().collect::<Vec<_>>()
    );
    for (name, t) in &a.tensors {
        let u = &b.tensors[name];
        assert_eq!(t.dims(), u.dims(), "{name}");
        assert_eq!(bits(t), bits(u), "{name}");
    }
}

fn tensor_err_name(e: &Error) -> Option<&str> {
    match e {
        Error::Tensor { tensor, .. } => Some(tensor.as_str()),
        _ => None,
    }
}

/// Writes a safetensors file with raw tensors of any dtype.
fn write_raw_safetensors(path: &Path, tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                *n,
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// PEFT format

#[test]
fn round_trip_is_bit_exact() {
    let base = tiny_base();
    let mut ad = random_adapter(&base, 4, 8.0, &ALL_TARGETS, 1);
    // Awkward values survive too.
    let special = Tensor::from_vec(
        vec![
            f32::MIN_POSITIVE,
            -0.0,
            1e-45,
            f32::MAX,
            -f32::MAX,
            0.1,
            1.0 / 3.0,
            -7.25,
        ],
        (4, 2),
        &Device::Cpu,
    )
    .unwrap();
    let a = ad.get(0, "q_proj", LoraPart::A).unwrap().clone();
    let a = a.slice_assign(&[0..4, 0..2], &special).unwrap();
    ad.insert(0, "q_proj", LoraPart::A, a).unwrap();

    let dir = tempfile::tempdir().unwrap();
    ad.save(dir.path()).unwrap();
    let back = LoraAdapter::load(dir.path()).unwrap();
    assert_same_adapter(&ad, &back);
    assert_eq!(ad.version_id().unwrap(), back.version_id().unwrap());

    // Saving the loaded adapter again gives the same bytes.
    let dir2 = tempfile::tempdir().unwrap();
    back.save(dir2.path()).unwrap();
    for f in [CONFIG_FILE, WEIGHTS_FILE] {
        assert_eq!(
            std::fs::read(dir.path().join(f)).unwrap(),
            std::fs::read(dir2.path().join(f)).unwrap(),
            "{f}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn round_trip_any_values(r in 1usize..6, alpha in 0.5f64..64.0, seed in any::<u64>(),
                             raw in proptest::collection::vec(any::<u32>(), 8)) {
        let base = tiny_base();
        let mut ad = random_adapter(&base, r, alpha, &["v_proj", "down_proj"], seed);
        // Arbitrary finite bit patterns in one tensor.
        let vals: Vec<f32> = raw.iter().map(|b| f32::from_bits(*b)).map(|v| if v.is_finite() { v } else { 0.5 }).collect();
        let (o, _) = base.module_shape("v_proj").unwrap();
        let mut b = ad.get(1, "v_proj", LoraPart::B).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n = b.len();
        for (i, v) in vals.iter().enumerate() { b[i % n] = *v; }
        ad.insert(1, "v_proj", LoraPart::B, Tensor::from_vec(b, (o, r), &Device::Cpu).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        ad.save(dir.path()).unwrap();
        let back = LoraAdapter::load(dir.path()).unwrap();
        prop_assert_eq!(&ad.config, &back.config);
        for (name, t) in &ad.tensors {
            prop_assert_eq!(bits(t), bits(&back.tensors[name]));
        }
        prop_assert_eq!(ad.version_id().unwrap(), back.version_id().unwrap());
    }
}

#[test]
fn files_have_peft_layout() {
    let base = tiny_base();
    let ad = random_adapter(&base, 2, 16.0, &["q_proj", "up_proj"], 3);
    let dir = tempfile::tempdir().unwrap();
    ad.save(dir.path()).unwrap();

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 2);
    assert_eq!(
        cfg["lora_alpha"], 16,
        "integral alpha is written as PEFT writes it"
    );
    assert!(cfg["lora_alpha"].is_i64());
    assert_eq!(cfg["lora_dropout"], 0.0);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "up_proj"])
    );
    assert_eq!(cfg["base_model_name_or_path"], "tiny-llama");
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["fan_in_fan_out"], false);
    assert_eq!(cfg["use_rslora"], false);
    assert_eq!(cfg["use_dora"], false);
    assert!(cfg["modules_to_save"].is_null());
    assert!(cfg["layers_to_transform"].is_null());

    // What mistral.rs 0.8.1 deserialises (mistralrs_quant::LoraConfig).
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct MistralRsLoraConfig {
        #[serde(rename = "r")]
        rank: usize,
        #[serde(rename = "lora_alpha")]
        alpha: f64,
        target_modules: HashSet<String>,
    }
    let m: MistralRsLoraConfig = serde_json::from_value(cfg).unwrap();
    assert_eq!((m.rank, m.alpha), (2, 16.0));
    // mistral.rs joins target_modules into a regex matched against the module prefix.
    assert!(m.target_modules.contains("q_proj") && m.target_modules.contains("up_proj"));

    let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        header
            .metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut expected = Vec::new();
    for l in 0..2 {
        expected.push(format!(
            "base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight"
        ));
        expected.push(format!(
            "base_model.model.model.layers.{l}.self_attn.q_proj.lora_B.weight"
        ));
        expected.push(format!(
            "base_model.model.model.layers.{l}.mlp.up_proj.lora_A.weight"
        ));
        expected.push(format!(
            "base_model.model.model.layers.{l}.mlp.up_proj.lora_B.weight"
        ));
    }
    expected.sort();
    assert_eq!(names, expected);
    let a = st
        .tensor("base_model.model.model.layers.1.mlp.up_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.dtype(), safetensors::Dtype::F32);
    assert_eq!(a.shape(), &[2, 32]);
    let b = st
        .tensor("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b.shape(), &[48, 2]);
}

#[test]
fn reads_a_config_written_by_peft() {
    // adapter_config.json as PEFT 0.13 writes it (extra keys, integral alpha).
    let text = r#"{
      "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
      "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
      "layer_replication": null, "layers_pattern": null, "layers_to_transform": null,
      "loftq_config": {}, "lora_alpha": 32, "lora_dropout": 0.05, "megatron_config": null,
      "megatron_core": "megatron.core", "modules_to_save": null, "peft_type": "LORA", "r": 16,
      "rank_pattern": {}, "revision": null, "target_modules": ["v_proj", "q_proj"],
      "task_type": "CAUSAL_LM", "use_dora": false, "use_rslora": false
    }"#;
    let cfg = PeftConfig::from_json(text, Path::new("adapter_config.json")).unwrap();
    assert_eq!(cfg.r, 16);
    assert_eq!(cfg.lora_alpha, 32.0);
    assert_eq!(cfg.scale(), 2.0);
    assert_eq!(cfg.lora_dropout, 0.05);
    assert_eq!(cfg.target_modules, targets(&["v_proj", "q_proj"]));
    assert_eq!(cfg.extra["megatron_core"], "megatron.core");
    assert!(cfg.extra.contains_key("loftq_config"));
    // Unknown keys are written back.
    let again: serde_json::Value = serde_json::from_str(&cfg.to_json_pretty().unwrap()).unwrap();
    let orig: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(again, orig);
}

#[test]
fn half_precision_files_load_as_f32() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = PeftConfig::new(1, 2.0, targets(&["q_proj"]), "m");
    std::fs::write(dir.path().join(CONFIG_FILE), cfg.to_json_pretty().unwrap()).unwrap();
    let vals = [0.5f32, -1.25, 3.0, 0.099975586];
    let f16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let na = tensor_name(0, "q_proj", LoraPart::A);
    let nb = tensor_name(0, "q_proj", LoraPart::B);
    write_raw_safetensors(
        &dir.path().join(WEIGHTS_FILE),
        &[
            (&na, safetensors::Dtype::F16, vec![1, 4], f16),
            (&nb, safetensors::Dtype::BF16, vec![4, 1], bf16),
        ],
    );
    let ad = LoraAdapter::load(dir.path()).unwrap();
    let a = ad.get(0, "q_proj", LoraPart::A).unwrap();
    let b = ad.get(0, "q_proj", LoraPart::B).unwrap();
    assert_eq!(a.dtype(), DType::F32);
    assert_eq!(b.dims(), &[4, 1]);
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, v) in vals.iter().enumerate() {
        assert_eq!(a[i], half::f16::from_f32(*v).to_f32());
        assert_eq!(b[i], half::bf16::from_f32(*v).to_f32());
    }
    assert_eq!(a[0], 0.5);
    assert_eq!(b[1], -1.25);
}

#[test]
fn unsupported_dtype_is_rejected_naming_the_tensor() {
    for (dtype, width) in [
        (safetensors::Dtype::I32, 4),
        (safetensors::Dtype::F64, 8),
        (safetensors::Dtype::U8, 1),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = PeftConfig::new(1, 2.0, targets(&["q_proj"]), "m");
        std::fs::write(dir.path().join(CONFIG_FILE), cfg.to_json_pretty().unwrap()).unwrap();
        let name = tensor_name(0, "q_proj", LoraPart::A);
        write_raw_safetensors(
            &dir.path().join(WEIGHTS_FILE),
            &[(&name, dtype, vec![1, 4], vec![0u8; 4 * width])],
        );
        let e = LoraAdapter::load(dir.path()).unwrap_err();
        assert_eq!(tensor_err_name(&e), Some(name.as_str()), "{dtype:?}: {e}");
        assert!(e.to_string().contains("unsupported dtype"), "{e}");
    }
}

#[test]
fn version_id_is_a_content_hash() {
    let base = tiny_base();
    let ad = random_adapter(&base, 2, 4.0, &["q_proj", "v_proj"], 9);
    let id = ad.version_id().unwrap();
    assert_eq!(id.len(), 64);
    assert!(id
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    // Deterministic, and independent of how the adapter was assembled.
    let mut rebuilt = LoraAdapter::new(ad.config.clone(), BTreeMap::new());
    for (n, t) in ad.tensors.iter().rev() {
        rebuilt.tensors.insert(n.clone(), t.clone());
    }
    assert_eq!(rebuilt.version_id().unwrap(), id);

    // One bit of one value changes it.
    let mut flipped = ad.clone();
    let name = tensor_name(1, "v_proj", LoraPart::B);
    let t = &flipped.tensors[&name];
    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[3] = f32::from_bits(v[3].to_bits() ^ 1);
    let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
    flipped.tensors.insert(name, t);
    assert_ne!(flipped.version_id().unwrap(), id);

    // So does the config.
    let mut other = ad.clone();
    other.config.lora_alpha = 5.0;
    assert_ne!(other.version_id().unwrap(), id);

    // And the shape, for the same bytes.
    let mut reshaped = ad.clone();
    let name = tensor_name(0, "q_proj", LoraPart::A);
    let t = reshaped.tensors[&name].reshape((1, 64)).unwrap();
    reshaped.tensors.insert(name, t);
    assert_ne!(reshaped.version_id().unwrap(), id);
}

#[test]
fn init_matches_peft_initialisation() {
    let base = tiny_base();
    let cfg = PeftConfig::new(4, 8.0, targets(&ALL_TARGETS), "m");
    let ad = LoraAdapter::init(cfg.clone(), &base, 7).unwrap();
    assert_eq!(ad.tensors.len(), 2 * 7 * 2);
    let report = validate(&ad, &base, &Limits::default()).unwrap();
    // Hand count: per layer r * (in + out) summed over modules:
    // q 4*(32+32) + k 4*(32+16) + v 4*(32+16) + o 4*(32+32) + gate 4*(32+48) + up 4*(32+48)
    // + down 4*(48+32) = 256 + 192 + 192 + 256 + 320 + 320 + 320 = 1856; two layers.
    assert_eq!(report.num_parameters, 3712);
    assert_eq!(ad.num_parameters(), 3712);
    for (name, t) in &ad.tensors {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if name.contains("lora_B") {
            assert!(v.iter().all(|x| *x == 0.0), "{name}");
        } else {
            let fan_in = t.dims()[1] as f32;
            let bound = 1.0 / fan_in.sqrt();
            assert!(v.iter().all(|x| x.abs() <= bound), "{name}");
            assert!(v.iter().any(|x| *x != 0.0), "{name}");
        }
    }
    assert_eq!(
        LoraAdapter::init(cfg.clone(), &base, 7)
            .unwrap()
            .version_id()
            .unwrap(),
        ad.version_id().unwrap()
    );
    assert_ne!(
        LoraAdapter::init(cfg, &base, 8)
            .unwrap()
            .version_id()
            .unwrap(),
        ad.version_id().unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Validation

#[test]
fn valid_adapter_report() {
    let base = tiny_base();
    let ad = random_adapter(&base, 3, 6.0, &["k_proj", "down_proj"], 2);
    let r = validate(&ad, &base, &Limits::default()).unwrap();
    assert_eq!(r.rank, 3);
    assert_eq!(r.alpha, 6.0);
    assert_eq!(r.scale, 2.0);
    assert_eq!(r.targets, targets(&["k_proj", "down_proj"]));
    assert_eq!(r.layers, vec![0, 1]);
    assert_eq!(r.num_tensors, 8);
    // k: 3*(32+16) = 144, down: 3*(48+32) = 240, per layer; two layers.
    assert_eq!(r.num_parameters, 2 * (144 + 240));
    assert_eq!(r.version_id, ad.version_id().unwrap());
    assert_eq!(inspect(&ad, &Limits::default()).unwrap(), r);
}

fn expect_tensor_error(ad: &LoraAdapter, base: &LlamaConfig, name: &str, needle: &str) {
    let e = validate(ad, base, &Limits::default()).unwrap_err();
    assert_eq!(tensor_err_name(&e), Some(name), "{e}");
    assert!(e.to_string().contains(needle), "{e:?} lacks {needle:?}");
}

fn expect_adapter_error(ad: &LoraAdapter, base: &LlamaConfig, limits: &Limits, needle: &str) {
    let e = validate(ad, base, limits).unwrap_err();
    assert!(matches!(e, Error::Adapter(_)), "{e:?}");
    assert!(e.to_string().contains(needle), "{e} lacks {needle:?}");
}

#[test]
fn wrong_shapes_are_rejected() {
    let base = tiny_base();
    let good = random_adapter(&base, 2, 4.0, &["q_proj", "gate_proj"], 4);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for (layer, module, part, shape) in [
        (0, "q_proj", LoraPart::A, vec![3, 32]),       // rank
        (1, "q_proj", LoraPart::A, vec![2, 31]),       // in_features
        (0, "gate_proj", LoraPart::B, vec![32, 2]),    // out_features of q, not gate
        (1, "gate_proj", LoraPart::B, vec![2, 48]),    // transposed
        (0, "gate_proj", LoraPart::A, vec![2, 32, 1]), // rank 3 tensor
    ] {
        let mut bad = good.clone();
        bad.insert(layer, module, part, random_tensor(&mut rng, &shape, 1.0))
            .unwrap();
        expect_tensor_error(&bad, &base, &tensor_name(layer, module, part), "shape");
        assert!(inspect(&bad, &Limits::default()).is_err(), "{shape:?}");
    }
}

#[test]
fn non_finite_values_are_rejected() {
    let base = tiny_base();
    let good = random_adapter(&base, 2, 4.0, &["o_proj"], 5);
    for bad_value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut bad = good.clone();
        let name = tensor_name(1, "o_proj", LoraPart::B);
        let t = &bad.tensors[&name];
        let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[17] = bad_value;
        let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        bad.tensors.insert(name.clone(), t);
        expect_tensor_error(&bad, &base, &name, "non-finite");
        let e = inspect(&bad, &Limits::default()).unwrap_err();
        assert_eq!(tensor_err_name(&e), Some(name.as_str()));
    }
}

#[test]
fn limits_are_enforced() {
    let base = tiny_base();
    let ad = random_adapter(&base, 8, 16.0, &["q_proj"], 6);
    // q: 8 * (32 + 32) = 512 per layer, 1024 in all.
    assert_eq!(ad.num_parameters(), 1024);
    let ok = Limits {
        max_rank: 8,
        max_parameters: 1024,
    };
    validate(&ad, &base, &ok).unwrap();
    expect_adapter_error(
        &ad,
        &base,
        &Limits {
            max_rank: 7,
            max_parameters: 1 << 20,
        },
        "rank 8 exceeds the limit 7",
    );
    expect_adapter_error(
        &ad,
        &base,
        &Limits {
            max_rank: 64,
            max_parameters: 1023,
        },
        "1024 parameters exceed the limit 1023",
    );
}

#[test]
fn unknown_and_missing_tensors_are_rejected() {
    let base = tiny_base();
    let good = random_adapter(&base, 2, 4.0, &["q_proj", "v_proj"], 7);
    let mut rng = ChaCha8Rng::seed_from_u64(1);

    // A tensor name PEFT would not write.
    let mut bad = good.clone();
    let name = "base_model.model.lm_head.lora_A.weight".to_string();
    bad.tensors
        .insert(name.clone(), random_tensor(&mut rng, &[2, 32], 1.0));
    expect_tensor_error(&bad, &base, &name, "unknown tensor name");

    // A known module that the config does not target.
    let mut bad = good.clone();
    bad.insert(
        0,
        "k_proj",
        LoraPart::A,
        random_tensor(&mut rng, &[2, 32], 1.0),
    )
    .unwrap();
    expect_tensor_error(
        &bad,
        &base,
        &tensor_name(0, "k_proj", LoraPart::A),
        "not in target_modules",
    );

    // A layer the base model does not have.
    let mut bad = good.clone();
    bad.insert(
        2,
        "q_proj",
        LoraPart::A,
        random_tensor(&mut rng, &[2, 32], 1.0),
    )
    .unwrap();
    expect_tensor_error(
        &bad,
        &base,
        &tensor_name(2, "q_proj", LoraPart::A),
        "layer 2 does not exist",
    );

    // A missing factor.
    let mut bad = good.clone();
    let name = tensor_name(1, "v_proj", LoraPart::B);
    bad.tensors.remove(&name);
    expect_tensor_error(&bad, &base, &name, "missing");
    let e = inspect(&bad, &Limits::default()).unwrap_err();
    assert_eq!(tensor_err_name(&e), Some(name.as_str()));

    // A targeted module absent from a whole layer.
    let mut bad = good.clone();
    bad.tensors.remove(&tensor_name(0, "q_proj", LoraPart::A));
    bad.tensors.remove(&tensor_name(0, "q_proj", LoraPart::B));
    expect_tensor_error(
        &bad,
        &base,
        &tensor_name(0, "q_proj", LoraPart::A),
        "missing",
    );

    // A tensor held in the wrong dtype.
    let mut bad = good.clone();
    let name = tensor_name(0, "v_proj", LoraPart::A);
    let t = bad.tensors[&name].to_dtype(DType::F64).unwrap();
    bad.tensors.insert(name.clone(), t);
    expect_tensor_error(&bad, &base, &name, "dtype");

    // An empty adapter with targets.
    let empty = LoraAdapter::new(good.config.clone(), BTreeMap::new());
    expect_tensor_error(
        &empty,
        &base,
        &tensor_name(0, "q_proj", LoraPart::A),
        "missing",
    );
    assert!(matches!(
        inspect(&empty, &Limits::default()).unwrap_err(),
        Error::Adapter(_)
    ));
}

#[test]
fn unsupported_configs_are_rejected() {
    let base = tiny_base();
    let good = random_adapter(&base, 2, 4.0, &["q_proj"], 8);
    let lim = Limits::default();
    type Edit = Box<dyn Fn(&mut PeftConfig)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|c| c.target_modules.push("lm_head".into())),
            "unknown target module",
        ),
        (
            Box::new(|c| c.target_modules.push("q_proj".into())),
            "listed twice",
        ),
        (
            Box::new(|c| c.target_modules.clear()),
            "target_modules is empty",
        ),
        (Box::new(|c| c.bias = "all".into()), "bias"),
        (Box::new(|c| c.use_dora = true), "use_dora"),
        (Box::new(|c| c.use_rslora = true), "use_rslora"),
        (Box::new(|c| c.fan_in_fan_out = true), "fan_in_fan_out"),
        (Box::new(|c| c.task_type = "SEQ_CLS".into()), "task_type"),
        (Box::new(|c| c.lora_alpha = f64::NAN), "lora_alpha"),
        (Box::new(|c| c.lora_alpha = 0.0), "lora_alpha"),
        (Box::new(|c| c.lora_dropout = 1.0), "lora_dropout"),
        (Box::new(|c| c.r = 0), "rank r must be positive"),
        (Box::new(|c| c.peft_type = "IA3".into()), "peft_type"),
        (
            Box::new(|c| {
                c.rank_pattern.insert("q_proj".into(), serde_json::json!(4));
            }),
            "rank_pattern",
        ),
        (
            Box::new(|c| c.modules_to_save = Some(vec!["lm_head".into()])),
            "modules_to_save",
        ),
        (
            Box::new(|c| c.layers_to_transform = Some(vec![0])),
            "layers_to_transform",
        ),
    ];
    for (edit, needle) in cases {
        let mut bad = good.clone();
        edit(&mut bad.config);
        expect_adapter_error(&bad, &base, &lim, needle);
    }
    // layers_to_transform listing every layer is fine.
    let mut ok = good.clone();
    ok.config.layers_to_transform = Some(vec![1, 0]);
    validate(&ok, &base, &lim).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Corrupt files

fn saved(ad: &LoraAdapter) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ad.save(dir.path()).unwrap();
    dir
}

#[test]
fn truncated_or_garbled_weights_are_errors() {
    let base = tiny_base();
    let ad = random_adapter(&base, 2, 4.0, &["q_proj", "k_proj"], 10);
    let dir = saved(&ad);
    let path = dir.path().join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for cut in [
        0,
        4,
        8,
        9,
        8 + header_len / 2,
        8 + header_len,
        bytes.len() - 1,
    ] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let e = LoraAdapter::load(dir.path()).unwrap_err();
        assert!(matches!(e, Error::Adapter(_)), "cut {cut}: {e:?}");
        assert!(
            e.to_string().contains("not a valid safetensors file"),
            "{e}"
        );
    }
    // Absurd header length.
    let mut evil = bytes.clone();
    evil[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &evil).unwrap();
    assert!(LoraAdapter::load(dir.path()).is_err());
    // Header that is not JSON.
    let mut evil = bytes.clone();
    evil[8] = b'#';
    std::fs::write(&path, &evil).unwrap();
    assert!(LoraAdapter::load(dir.path()).is_err());
    // Missing file.
    std::fs::remove_file(&path).unwrap();
    let e = LoraAdapter::load(dir.path()).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Random damage to either file never panics: load fails, or it succeeds and validation
    /// decides.
    #[test]
    fn random_damage_never_panics(cut_frac in 0.0f64..1.0, flips in proptest::collection::vec((any::<u16>(), any::<u8>()), 0..6),
                                  which in 0usize..2) {
        let base = tiny_base();
        let ad = random_adapter(&base, 2, 4.0, &["q_proj"], 11);
        let dir = saved(&ad);
        let path = dir.path().join(if which == 0 { WEIGHTS_FILE } else { CONFIG_FILE });
        let mut bytes = std::fs::read(&path).unwrap();
        let cut = ((bytes.len() as f64) * cut_frac) as usize;
        if cut_frac > 0.5 {
            for (pos, val) in &flips {
                let i = *pos as usize % bytes.len();
                bytes[i] ^= val | 1;
            }
        } else {
            bytes.truncate(cut);
        }
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(loaded) = LoraAdapter::load(dir.path()) {
            let _ = validate(&loaded, &base, &Limits::default());
        }
    }
}

#[test]
fn bad_configs_are_errors() {
    let base = tiny_base();
    let ad = random_adapter(&base, 2, 4.0, &["q_proj"], 12);
    let dir = saved(&ad);
    let path = dir.path().join(CONFIG_FILE);
    let cases: [(&str, &str); 8] = [
        ("{\"peft_type\": \"LORA\", \"r\": 2,", "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        (
            r#"{"peft_type": "PREFIX_TUNING", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#,
            "only \"LORA\"",
        ),
        (
            r#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#,
            "peft_type is missing",
        ),
        (
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": "q_proj|v_proj"}"#,
            "must be a list",
        ),
        (
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4}"#,
            "target_modules is missing",
        ),
        (
            r#"{"peft_type": "LORA", "r": -2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#,
            "malformed JSON",
        ),
        (
            r#"{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}"#,
            "lora_alpha",
        ),
    ];
    for (text, needle) in cases {
        std::fs::write(&path, text).unwrap();
        let e = LoraAdapter::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains(needle), "{text}: {e}");
        assert!(matches!(e, Error::Json { .. } | Error::Adapter(_)), "{e:?}");
    }
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        LoraAdapter::load(dir.path()).unwrap_err(),
        Error::Io { .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// Store

fn meta(step: u64, parent: Option<&VersionId>) -> VersionMeta {
    VersionMeta {
        parent: parent.cloned(),
        step: Some(step),
        notes: serde_json::Map::new(),
    }
}

fn tmp_entries(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

#[test]
fn publish_get_list_idempotent() {
    let base = tiny_base();
    let dir = tempfile::tempdir().unwrap();
    let store = AdapterStore::open(dir.path()).unwrap();
    assert!(store.list().unwrap().is_empty());
    assert_eq!(store.current().unwrap(), None);

    let a1 = random_adapter(&base, 2, 4.0, &["q_proj", "v_proj"], 20);
    let id = store.publish(&a1, meta(10, None)).unwrap();
    assert_eq!(id.as_str(), a1.version_id().unwrap());
    assert_same_adapter(&store.get(&id).unwrap(), &a1);
    let vdir = store.path(&id).unwrap();
    assert!(vdir.join(CONFIG_FILE).is_file() && vdir.join(WEIGHTS_FILE).is_file());
    // The version directory is a plain PEFT adapter directory.
    assert_same_adapter(&LoraAdapter::load(&vdir).unwrap(), &a1);

    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);
    assert_eq!(listed[0].meta.step, Some(10));
    assert_eq!(listed[0].rank, 2);
    assert_eq!(listed[0].num_parameters, a1.num_parameters());
    assert!(!listed[0].is_current);
    let created = listed[0].created_unix_ms;
    assert!(created > 1_600_000_000_000);

    // Publishing the same content again is a no-op that returns the same id.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let again = store.publish(&a1, meta(99, None)).unwrap();
    assert_eq!(again, id);
    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].created_unix_ms, created);
    assert_eq!(listed[0].meta.step, Some(10));

    let a2 = random_adapter(&base, 2, 4.0, &["q_proj", "v_proj"], 21);
    let id2 = store.publish(&a2, meta(11, Some(&id))).unwrap();
    assert_ne!(id2, id);
    let info = store.info(&id2).unwrap();
    assert_eq!(info.meta.parent, Some(id.clone()));
    assert_eq!(store.resolve(&id2.as_str()[..10]).unwrap(), id2);
    assert!(tmp_entries(dir.path()).is_empty());
}

#[test]
fn unknown_versions_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = AdapterStore::open(dir.path()).unwrap();
    let ghost = VersionId::parse(&"ab".repeat(32)).unwrap();
    assert!(matches!(store.get(&ghost), Err(Error::UnknownVersion(_))));
    assert!(matches!(store.path(&ghost), Err(Error::UnknownVersion(_))));
    assert!(matches!(store.info(&ghost), Err(Error::UnknownVersion(_))));
    assert!(matches!(
        store.promote(&ghost),
        Err(Error::UnknownVersion(_))
    ));
    assert!(matches!(
        store.resolve("abab"),
        Err(Error::UnknownVersion(_))
    ));
    assert!(matches!(store.rollback(), Err(Error::NoRollbackTarget)));
    for bad in ["../etc", "ABAB", "", &"g".repeat(64), &"a".repeat(63)] {
        assert!(VersionId::parse(bad).is_err(), "{bad}");
    }
    assert!(store.resolve("../x").is_err());
}

#[test]
fn promote_and_rollback() {
    let base = tiny_base();
    let dir = tempfile::tempdir().unwrap();
    let store = AdapterStore::open(dir.path()).unwrap();
    let ids: Vec<VersionId> = (0..3)
        .map(|i| {
            store
                .publish(
                    &random_adapter(&base, 2, 4.0, &["q_proj"], 30 + i),
                    meta(i, None),
                )
                .unwrap()
        })
        .collect();
    for id in &ids {
        store.promote(id).unwrap();
        assert_eq!(store.current().unwrap().as_ref(), Some(id));
    }
    // Promoting the current version changes nothing.
    store.promote(&ids[2]).unwrap();
    assert_eq!(
        store.record().unwrap().previous,
        vec![ids[0].clone(), ids[1].clone()]
    );
    let listed = store.list().unwrap();
    assert_eq!(
        listed
            .iter()
            .filter(|v| v.is_current)
            .map(|v| &v.id)
            .collect::<Vec<_>>(),
        vec![&ids[2]]
    );

    // A reopened store sees the same state.
    let store = AdapterStore::open(dir.path()).unwrap();
    assert_eq!(store.current().unwrap(), Some(ids[2].clone()));
    assert_eq!(store.rollback().unwrap(), ids[1]);
    assert_eq!(store.current().unwrap(), Some(ids[1].clone()));
    assert_eq!(store.rollback().unwrap(), ids[0]);
    assert!(matches!(store.rollback(), Err(Error::NoRollbackTarget)));
    assert_eq!(store.current().unwrap(), Some(ids[0].clone()));
    // Promote after rollback: the rolled-back-from version is gone from history.
    store.promote(&ids[2]).unwrap();
    assert_eq!(store.rollback().unwrap(), ids[0]);
}

#[test]
fn retention_keeps_newest_current_and_rollback_target() {
    let base = tiny_base();
    let dir = tempfile::tempdir().unwrap();
    let store = AdapterStore::open(dir.path()).unwrap();
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            store
                .publish(
                    &random_adapter(&base, 1, 2.0, &["o_proj"], 40 + i),
                    meta(i, None),
                )
                .unwrap(),
        );
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    // History: 0 -> 1 (current 1, rollback target 0).
    store.promote(&ids[0]).unwrap();
    store.promote(&ids[1]).unwrap();
    let deleted = store.retain(2).unwrap();
    let mut expect_deleted = vec![ids[2].clone(), ids[3].clone()];
    expect_deleted.sort();
    let mut deleted_sorted = deleted.clone();
    deleted_sorted.sort();
    assert_eq!(deleted_sorted, expect_deleted);
    let left: Vec<VersionId> = store.list().unwrap().into_iter().map(|v| v.id).collect();
    assert_eq!(
        left,
        vec![
            ids[0].clone(),
            ids[1].clone(),
            ids[4].clone(),
            ids[5].clone()
        ]
    );
    for id in &left {
        store.get(id).unwrap();
    }
    assert!(matches!(store.get(&ids[2]), Err(Error::UnknownVersion(_))));
    assert_eq!(store.rollback().unwrap(), ids[0]);

    // retain(0) keeps only the current version (no rollback target left).
    let deleted = store.retain(0).unwrap();
    assert_eq!(deleted.len(), 3);
    let left: Vec<VersionId> = store.list().unwrap().into_iter().map(|v| v.id).collect();
    assert_eq!(left, vec![ids[0].clone()]);
    assert_eq!(store.current().unwrap(), Some(ids[0].clone()));
    assert!(store.retain(0).unwrap().is_empty());
    assert!(tmp_entries(dir.path()).is_empty());
}

#[test]
fn corrupt_version_and_record_are_detected() {
    let base = tiny_base();
    let dir = tempfile::tempdir().unwrap();
    let store = AdapterStore::open(dir.path()).unwrap();
    let ad = random_adapter(&base, 2, 4.0, &["q_proj"], 50);
    let id = store.publish(&ad, meta(0, None)).unwrap();
    let wpath = store.path(&id).unwrap().join(WEIGHTS_FILE);
    let mut bytes = std::fs::read(&wpath).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x40;
    std::fs::write(&wpath, &bytes).unwrap();
    let e = store.get(&id).unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    // A damaged version never becomes current, by promotion or by rollback.
    assert!(store
        .promote(&id)
        .unwrap_err()
        .to_string()
        .contains("corrupt"));
    assert_eq!(store.current().unwrap(), None);
    let other = store
        .publish(
            &random_adapter(&base, 2, 4.0, &["q_proj"], 51),
            meta(1, None),
        )
        .unwrap();
    let good = store
        .publish(
            &random_adapter(&base, 2, 4.0, &["q_proj"], 52),
            meta(2, None),
        )
        .unwrap();
    store.promote(&other).unwrap();
    store.promote(&good).unwrap();
    let wpath = store.path(&other).unwrap().join(WEIGHTS_FILE);
    let mut bytes = std::fs::read(&wpath).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x01;
    std::fs::write(&wpath, &bytes).unwrap();
    assert!(store
        .rollback()
        .unwrap_err()
        .to_string()
        .contains("corrupt"));
    assert_eq!(store.current().unwrap(), Some(good));

    std::fs::write(dir.path().join("current.json"), "{not json").unwrap();
    assert!(matches!(
        AdapterStore::open(dir.path()).unwrap_err(),
        Error::Json { .. }
    ));
}

/// Makes `path` (a file or a directory) look `age` old.
fn age_entry(path: &Path, age: Duration) {
    let t = SystemTime::now() - age;
    std::fs::File::open(path).unwrap().set_modified(t).unwrap();
}

/// Holds the store's writers' lock through a descriptor of its own, as another process would.
fn hold_store_lock(root: &Path) -> std::fs::File {
    use std::os::unix::io::AsRawFd as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(root.join(LOCK_FILE))
        .unwrap();
    // SAFETY: flock on a descriptor `f` keeps open.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    f
}

#[test]
fn only_stale_temporaries_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    AdapterStore::open(dir.path()).unwrap();
    // Another process's work in progress: fresh, so `open` (e.g. `leaf adapter list`) keeps it.
    let fresh = dir.path().join(".tmp-publish-1-2-3");
    std::fs::create_dir(&fresh).unwrap();
    std::fs::write(fresh.join(CONFIG_FILE), "{").unwrap();
    std::fs::write(dir.path().join(".tmp-current-1-2-3"), "{").unwrap();
    std::fs::write(dir.path().join("keep.txt"), "x").unwrap();
    let store = AdapterStore::open(dir.path()).unwrap();
    assert_eq!(tmp_entries(dir.path()).len(), 2);
    assert!(store.list().unwrap().is_empty());
    drop(store);
    // Stale entries go, but not while a writer holds the store.
    let hour = Duration::from_secs(3600);
    age_entry(&fresh, hour);
    age_entry(&dir.path().join(".tmp-current-1-2-3"), hour);
    let lock = hold_store_lock(dir.path());
    AdapterStore::open(dir.path()).unwrap();
    assert_eq!(tmp_entries(dir.path()).len(), 2);
    drop(lock);
    AdapterStore::open(dir.path()).unwrap();
    assert!(tmp_entries(dir.path()).is_empty());
    assert!(dir.path().join("keep.txt").is_file());
    // A recovery open with age zero removes fresh entries too.
    std::fs::write(dir.path().join(".tmp-current-4-5-6"), "{").unwrap();
    AdapterStore::open_with_stale_age(dir.path(), Duration::ZERO).unwrap();
    assert!(tmp_entries(dir.path()).is_empty());
}

#[test]
fn writers_wait_for_another_processs_lock() {
    let base = tiny_base();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(AdapterStore::open(dir.path()).unwrap());
    let adapter = random_adapter(&base, 1, 2.0, &["v_proj"], 90);
    let lock = hold_store_lock(dir.path());
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            let r = store.publish(&adapter, meta(1, None));
            tx.send(()).unwrap();
            r
        })
    };
    // Readers are not blocked; the writer is, until the lock goes.
    assert!(store.list().unwrap().is_empty());
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    assert!(store.list().unwrap().is_empty());
    drop(lock);
    rx.recv_timeout(Duration::from_secs(30))
        .expect("publish finished");
    let id = writer.join().unwrap().unwrap();
    assert_eq!(store.list().unwrap()[0].id, id);
}

#[test]
fn version_ids_from_disk_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    for record in [
        r#"{"current": "../../etc"}"#,
        r#"{"current": null, "previous": ["ABC"]}"#,
    ] {
        std::fs::write(dir.path().join("current.json"), record).unwrap();
        let e = AdapterStore::open(dir.path()).unwrap_err();
        assert!(matches!(e, Error::Json { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("current.json") && msg.contains("not a version id"),
            "{msg}"
        );
    }
    // A current.json that is not a regular file is refused, not read.
    std::fs::remove_file(dir.path().join("current.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("current.json")).unwrap();
    let e = AdapterStore::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("symbolic link"), "{e}");
}

/// Loads `dir` on a thread; fails the test if that takes more than 20 s (a blocked read).
fn load_with_deadline(dir: &Path) -> Result<LoraAdapter, Error> {
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(LoraAdapter::load(&dir));
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("loading must not block")
}

#[test]
fn adapter_files_must_be_bounded_regular_files() {
    let base = tiny_base();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    random_adapter(&base, 1, 2.0, &["v_proj"], 91)
        .save(&good)
        .unwrap();
    let copy = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for f in [CONFIG_FILE, WEIGHTS_FILE] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        d
    };
    // Weights through a symbolic link to /dev/zero: refused before reading.
    let zero = copy("zero");
    std::fs::remove_file(zero.join(WEIGHTS_FILE)).unwrap();
    std::os::unix::fs::symlink("/dev/zero", zero.join(WEIGHTS_FILE)).unwrap();
    let e = load_with_deadline(&zero).unwrap_err().to_string();
    assert!(
        e.contains(WEIGHTS_FILE) && e.contains("symbolic link"),
        "{e}"
    );
    // Even a link to a good file is refused: files are opened without following links.
    let linked = copy("linked");
    std::fs::remove_file(linked.join(CONFIG_FILE)).unwrap();
    std::os::unix::fs::symlink(good.join(CONFIG_FILE), linked.join(CONFIG_FILE)).unwrap();
    let e = load_with_deadline(&linked).unwrap_err().to_string();
    assert!(e.contains("symbolic link"), "{e}");
    // A FIFO with no writer: refused at once instead of blocking.
    let fifo = copy("fifo");
    std::fs::remove_file(fifo.join(CONFIG_FILE)).unwrap();
    let c = std::ffi::CString::new(fifo.join(CONFIG_FILE).as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = load_with_deadline(&fifo).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    // An oversized config: refused by its size.
    let big = copy("big");
    std::fs::write(
        big.join(CONFIG_FILE),
        vec![b' '; (MAX_CONFIG_FILE_BYTES + 1) as usize],
    )
    .unwrap();
    let e = load_with_deadline(&big).unwrap_err().to_string();
    assert!(e.contains("more than the limit"), "{e}");
    // The original still loads.
    load_with_deadline(&good).unwrap();
}

/// Checks a store after a (simulated) crash: reopening (as a recovery, once the crashed writer
/// is gone) cleans temporaries, the current version is one of `allowed` and loads with the
/// expected content, and every listed version loads.
fn check_consistent(root: &Path, allowed: &[(&VersionId, &LoraAdapter)]) -> VersionId {
    let store = AdapterStore::open_with_stale_age(root, Duration::ZERO).unwrap();
    assert!(tmp_entries(root).is_empty(), "temporaries left after open");
    let cur = store.current().unwrap().expect("a current version");
    let (_, expected) = allowed
        .iter()
        .find(|(id, _)| **id == cur)
        .unwrap_or_else(|| panic!("current {cur} is neither the old nor the new version"));
    assert_same_adapter(&store.get(&cur).unwrap(), expected);
    for v in store.list().unwrap() {
        store.get(&v.id).unwrap();
    }
    cur
}

#[test]
fn crash_at_every_publish_and_promote_step_leaves_old_or_new() {
    let base = tiny_base();
    let old = random_adapter(&base, 2, 4.0, &["q_proj", "down_proj"], 60);
    let new = random_adapter(&base, 2, 4.0, &["q_proj", "down_proj"], 61);
    let old_id = VersionId::parse(&old.version_id().unwrap()).unwrap();
    let new_id = VersionId::parse(&new.version_id().unwrap()).unwrap();
    let points: Vec<FailPoint> = FailPoint::PUBLISH
        .iter()
        .chain(FailPoint::RECORD.iter())
        .copied()
        .collect();
    let mut saw_new_current = false;
    let mut saw_old_current = false;
    for point in points {
        for fault in [Fault::Error, Fault::Crash] {
            let dir = tempfile::tempdir().unwrap();
            {
                let store = AdapterStore::open(dir.path()).unwrap();
                store.publish(&old, meta(1, None)).unwrap();
                store.promote(&old_id).unwrap();
            }
            let mut store = AdapterStore::open(dir.path()).unwrap();
            store.set_fault_hook(Some(Arc::new(move |p| (p == point).then_some(fault))));
            // The trainer's sequence: publish, then promote.
            let outcome = store
                .publish(&new, meta(2, Some(&old_id)))
                .and_then(|id| store.promote(&id));
            assert!(outcome.is_err(), "{point:?}/{fault:?} was not injected");
            if fault == Fault::Error && FailPoint::PUBLISH[..6].contains(&point) {
                // A failed (not crashed) publish cleans up after itself at once.
                assert!(tmp_entries(dir.path()).is_empty(), "{point:?}");
            }
            drop(store);
            let cur = check_consistent(dir.path(), &[(&old_id, &old), (&new_id, &new)]);
            if cur == new_id {
                saw_new_current = true;
                // Rename done: rollback still reaches the old version.
                let store = AdapterStore::open(dir.path()).unwrap();
                assert_eq!(store.rollback().unwrap(), old_id, "{point:?}/{fault:?}");
            } else {
                saw_old_current = true;
            }
            // Recovery: the same publish + promote now succeeds.
            let store = AdapterStore::open(dir.path()).unwrap();
            let id = store.publish(&new, meta(2, Some(&old_id))).unwrap();
            store.promote(&id).unwrap();
            assert_eq!(check_consistent(dir.path(), &[(&new_id, &new)]), new_id);
        }
    }
    // Failing after the rename of current.json leaves the new version current.
    assert!(saw_new_current && saw_old_current);
}

#[test]
fn crash_during_rollback_and_retention_is_safe() {
    let base = tiny_base();
    let ads: Vec<LoraAdapter> = (0..4)
        .map(|i| random_adapter(&base, 1, 2.0, &["v_proj"], 70 + i))
        .collect();
    let ids: Vec<VersionId> = ads
        .iter()
        .map(|a| VersionId::parse(&a.version_id().unwrap()).unwrap())
        .collect();
    let setup = |root: &Path| {
        let store = AdapterStore::open(root).unwrap();
        for (i, a) in ads.iter().enumerate() {
            store.publish(a, meta(i as u64, None)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(3));
        }
        store.promote(&ids[1]).unwrap();
        store.promote(&ids[3]).unwrap();
    };
    for point in FailPoint::RECORD {
        for fault in [Fault::Error, Fault::Crash] {
            let dir = tempfile::tempdir().unwrap();
            setup(dir.path());
            let mut store = AdapterStore::open(dir.path()).unwrap();
            store.set_fault_hook(Some(Arc::new(move |p| (p == point).then_some(fault))));
            assert!(store.rollback().is_err());
            drop(store);
            check_consistent(dir.path(), &[(&ids[3], &ads[3]), (&ids[1], &ads[1])]);
        }
    }
    for fault in [Fault::Error, Fault::Crash] {
        let dir = tempfile::tempdir().unwrap();
        setup(dir.path());
        let mut store = AdapterStore::open(dir.path()).unwrap();
        store.set_fault_hook(Some(Arc::new(move |p| {
            (p == FailPoint::RetainRemove).then_some(fault)
        })));
        assert!(store.retain(0).is_err());
        drop(store);
        assert_eq!(check_consistent(dir.path(), &[(&ids[3], &ads[3])]), ids[3]);
        let store = AdapterStore::open(dir.path()).unwrap();
        assert_eq!(store.rollback().unwrap(), ids[1]);
    }
}

#[test]
fn concurrent_publishers_in_one_process() {
    let base = tiny_base();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(AdapterStore::open(dir.path()).unwrap());
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let store = Arc::clone(&store);
            let ad = random_adapter(&base, 1, 2.0, &["q_proj"], 80 + (i % 2));
            std::thread::spawn(move || {
                let id = store.publish(&ad, meta(i, None)).unwrap();
                store.promote(&id).unwrap();
                id
            })
        })
        .collect();
    let ids: HashSet<VersionId> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(store.list().unwrap().len(), 2);
    let cur = store.current().unwrap().unwrap();
    assert!(ids.contains(&cur));
    store.get(&cur).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Merge

fn random_base_weights(base: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".to_string(),
        random_tensor(&mut rng, &[base.vocab_size, base.hidden_size], 1.0),
    );
    for l in 0..base.num_hidden_layers {
        for m in ALL_TARGETS {
            let (o, i) = base.module_shape(m).unwrap();
            let parent = LlamaConfig::module_parent(m).unwrap();
            w.insert(
                format!("model.layers.{l}.{parent}.{m}.weight"),
                random_tensor(&mut rng, &[o, i], 0.3),
            );
        }
        w.insert(
            format!("model.layers.{l}.input_layernorm.weight"),
            Tensor::ones(base.hidden_size, DType::F32, &Device::Cpu).unwrap(),
        );
    }
    w
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn delta_matches_hand_computation() {
    // r = 1, alpha = 2 -> scale 2; B = [[2], [3]], A = [[1, 0, -1]] -> scale * B A.
    let mut ad = LoraAdapter::new(
        PeftConfig::new(1, 2.0, targets(&["q_proj"]), "m"),
        BTreeMap::new(),
    );
    ad.insert(
        0,
        "q_proj",
        LoraPart::A,
        Tensor::new(&[[1f32, 0., -1.]], &Device::Cpu).unwrap(),
    )
    .unwrap();
    ad.insert(
        0,
        "q_proj",
        LoraPart::B,
        Tensor::new(&[[2f32], [3.]], &Device::Cpu).unwrap(),
    )
    .unwrap();
    let d = delta(&ad, 0, "q_proj").unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(d, vec![vec![4.0, 0.0, -4.0], vec![6.0, 0.0, -6.0]]);

    let mut w = HashMap::from([(
        "model.layers.0.self_attn.q_proj.weight".to_string(),
        Tensor::new(&[[1f32, 1., 1.], [0., 0.5, 0.]], &Device::Cpu).unwrap(),
    )]);
    let rep = merge_into(&mut w, &ad).unwrap();
    assert_eq!(rep.scale, 2.0);
    assert_eq!(
        rep.merged,
        vec!["model.layers.0.self_attn.q_proj.weight".to_string()]
    );
    assert_eq!(
        w["model.layers.0.self_attn.q_proj.weight"]
            .to_vec2::<f32>()
            .unwrap(),
        vec![vec![5.0, 1.0, -3.0], vec![6.0, 0.5, -6.0]]
    );
}

#[test]
fn merged_forward_equals_unmerged_forward() {
    let base = tiny_base();
    let ad = random_adapter(&base, 4, 8.0, &ALL_TARGETS, 90);
    let original = random_base_weights(&base, 91);
    let mut merged = original.clone();
    let rep = merge_into(&mut merged, &ad).unwrap();
    assert_eq!(rep.merged.len(), 2 * 7);
    assert_eq!(
        bits(&merged["model.embed_tokens.weight"]),
        bits(&original["model.embed_tokens.weight"])
    );
    let scale = ad.config.scale();
    let mut rng = ChaCha8Rng::seed_from_u64(92);
    for l in 0..base.num_hidden_layers {
        for m in ALL_TARGETS {
            let (_, i) = base.module_shape(m).unwrap();
            let name = format!(
                "model.layers.{l}.{}.{m}.weight",
                LlamaConfig::module_parent(m).unwrap()
            );
            let x = random_tensor(&mut rng, &[5, i], 1.0);
            let w = &original[&name];
            let a = ad.get(l, m, LoraPart::A).unwrap();
            let b = ad.get(l, m, LoraPart::B).unwrap();
            let unmerged = (x.matmul(&w.t().unwrap()).unwrap()
                + (x.matmul(&a.t().unwrap())
                    .unwrap()
                    .matmul(&b.t().unwrap())
                    .unwrap()
                    * scale)
                    .unwrap())
            .unwrap();
            let fused = x.matmul(&merged[&name].t().unwrap()).unwrap();
            let diff = max_abs_diff(&unmerged, &fused);
            assert!(diff < 1e-5, "{name}: {diff}");
            // And the adapter does change the output.
            assert!(max_abs_diff(&fused, &x.matmul(&w.t().unwrap()).unwrap()) > 1e-3);
        }
    }
}

#[test]
fn merge_errors_name_the_weight_and_leave_weights_untouched() {
    let base = tiny_base();
    let ad = random_adapter(&base, 2, 4.0, &["q_proj", "up_proj"], 93);
    let mut w = random_base_weights(&base, 94);
    let snapshot: Vec<(String, Vec<u32>)> = {
        let mut v: Vec<_> = w.iter().map(|(k, t)| (k.clone(), bits(t))).collect();
        v.sort();
        v
    };
    w.remove("model.layers.1.mlp.up_proj.weight");
    let e = merge_into(&mut w, &ad).unwrap_err();
    assert_eq!(
        tensor_err_name(&e),
        Some("model.layers.1.mlp.up_proj.weight")
    );
    let mut after: Vec<(String, Vec<u32>)> = w.iter().map(|(k, t)| (k.clone(), bits(t))).collect();
    after.sort();
    let expected: Vec<_> = snapshot
        .into_iter()
        .filter(|(k, _)| k != "model.layers.1.mlp.up_proj.weight")
        .collect();
    assert_eq!(after, expected);

    let mut w = random_base_weights(&base, 94);
    w.insert(
        "model.layers.0.self_attn.q_proj.weight".into(),
        Tensor::zeros((16, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = merge_into(&mut w, &ad).unwrap_err();
    assert_eq!(
        tensor_err_name(&e),
        Some("model.layers.0.self_attn.q_proj.weight")
    );
    assert!(e.to_string().contains("shape"));
}

fn write_model_dir(dir: &Path, weights: &HashMap<String, Tensor>, dtype: safetensors::Dtype) {
    let mut raw: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (n, t) in weights {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bytes: Vec<u8> = match dtype {
            safetensors::Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            safetensors::Dtype::BF16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            _ => unreachable!(),
        };
        raw.push((n.clone(), t.dims().to_vec(), bytes));
    }
    let views: Vec<_> = raw
        .iter()
        .map(|(n, s, b)| {
            (
                n.as_str(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &dir.join("model.safetensors")).unwrap();
    tiny_base().save(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{\"version\": \"1.0\"}").unwrap();
}

#[test]
fn merge_model_dir_matches_in_memory_merge() {
    let base = tiny_base();
    let ad = random_adapter(&base, 3, 6.0, &["k_proj", "gate_proj", "down_proj"], 95);
    let weights = random_base_weights(&base, 96);
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write_model_dir(src.path(), &weights, safetensors::Dtype::F32);
    let rep = merge_model_dir(src.path(), &ad, out.path()).unwrap();
    assert_eq!(rep.merged.len(), 6);
    assert_eq!(rep.files, vec![out.path().join("model.safetensors")]);

    let mut expected = weights.clone();
    merge_into(&mut expected, &ad).unwrap();
    let bytes = std::fs::read(out.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), weights.len());
    for (name, t) in &expected {
        let view = st.tensor(name).unwrap();
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        assert_eq!(view.shape(), t.dims());
        let got: Vec<u32> = view
            .data()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(got, bits(t), "{name}");
    }
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(header.metadata().as_ref().unwrap()["format"], "pt");
    // Other files are copied, and the config still parses.
    assert_eq!(
        LlamaConfig::from_path(out.path()).unwrap(),
        base.normalized()
    );
    assert!(out.path().join("tokenizer.json").is_file());

    // Merging into the base directory itself is refused.
    assert!(merge_model_dir(src.path(), &ad, src.path()).is_err());
}

#[test]
fn merge_model_dir_bf16_and_errors() {
    let base = tiny_base();
    let ad = random_adapter(&base, 2, 2.0, &["v_proj"], 97);
    let weights = random_base_weights(&base, 98);
    let src = tempfile::tempdir().unwrap();
    write_model_dir(src.path(), &weights, safetensors::Dtype::BF16);
    let out = tempfile::tempdir().unwrap();
    merge_model_dir(src.path(), &ad, out.path()).unwrap();
    let bytes = std::fs::read(out.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let name = "model.layers.1.self_attn.v_proj.weight";
    let view = st.tensor(name).unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::BF16);
    let w_bf16: Vec<f32> = weights[name]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| half::bf16::from_f32(*x).to_f32())
        .collect();
    let d = delta(&ad, 1, "v_proj")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (k, c) in view.data().chunks_exact(2).enumerate() {
        let got = half::bf16::from_le_bytes([c[0], c[1]]);
        assert_eq!(got, half::bf16::from_f32(w_bf16[k] + d[k]), "{k}");
    }
    // Untouched weights are byte-identical.
    let src_bytes = std::fs::read(src.path().join("model.safetensors")).unwrap();
    let src_st = safetensors::SafeTensors::deserialize(&src_bytes).unwrap();
    assert_eq!(
        st.tensor("model.embed_tokens.weight").unwrap().data(),
        src_st.tensor("model.embed_tokens.weight").unwrap().data()
    );

    // A base model without a targeted weight.
    let mut partial = weights.clone();
    partial.remove("model.layers.0.self_attn.v_proj.weight");
    let src2 = tempfile::tempdir().unwrap();
    write_model_dir(src2.path(), &partial, safetensors::Dtype::F32);
    let e = merge_model_dir(src2.path(), &ad, tempfile::tempdir().unwrap().path()).unwrap_err();
    assert_eq!(
        tensor_err_name(&e),
        Some("model.layers.0.self_attn.v_proj.weight")
    );

    // A truncated base file.
    let src3 = tempfile::tempdir().unwrap();
    write_model_dir(src3.path(), &weights, safetensors::Dtype::F32);
    let p = src3.path().join("model.safetensors");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    let e = merge_model_dir(src3.path(), &ad, tempfile::tempdir().unwrap().path()).unwrap_err();
    assert!(
        e.to_string().contains("not a valid safetensors file"),
        "{e}"
    );
}

#[test]
fn merge_sharded_model() {
    let base = tiny_base();
    let ad = random_adapter(&base, 2, 4.0, &["q_proj", "down_proj"], 99);
    let weights = random_base_weights(&base, 100);
    let src = tempfile::tempdir().unwrap();
    // Layer 0 and embeddings in shard 1, layer 1 in shard 2.
    let mut map = serde_json::Map::new();
    for (shard, pred) in [
        (
            "model-00001-of-00002.safetensors",
            Box::new(|n: &str| !n.contains("layers.1.")) as Box<dyn Fn(&str) -> bool>,
        ),
        (
            "model-00002-of-00002.safetensors",
            Box::new(|n: &str| n.contains("layers.1.")),
        ),
    ] {
        let part: HashMap<String, Tensor> = weights
            .iter()
            .filter(|(n, _)| pred(n))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        for n in part.keys() {
            map.insert(n.clone(), serde_json::Value::String(shard.to_string()));
        }
        candle_core::safetensors::save(&part, src.path().join(shard)).unwrap();
    }
    std::fs::write(
        src.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let rep = merge_model_dir(src.path(), &ad, out.path()).unwrap();
    assert_eq!(rep.merged.len(), 4);
    assert_eq!(rep.files.len(), 2);
    assert!(out.path().join("model.safetensors.index.json").is_file());
    let mut expected = weights.clone();
    merge_into(&mut expected, &ad).unwrap();
    let mut got = HashMap::new();
    for f in &rep.files {
        got.extend(candle_core::safetensors::load(f, &Device::Cpu).unwrap());
    }
    assert_eq!(got.len(), expected.len());
    for (n, t) in &expected {
        assert_eq!(bits(&got[n]), bits(t), "{n}");
    }
}
