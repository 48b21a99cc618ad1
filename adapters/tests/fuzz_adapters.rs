//! Fuzzing (proptest, sized for CI) of what the adapter store reads from disk: mutated and
//! random `adapter_model.safetensors` bytes and `adapter_config.json` texts go through
//! `LoraAdapter::load` and `validate`. The property is the absence of panics: every input is
//! either accepted (and then a valid adapter) or refused with an error.
//!
//! The number of inputs tried per target is the `cases` of its `ProptestConfig` (the README
//! reports them).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use leaf_adapters::config::LlamaConfig;
use leaf_adapters::peft::{LoraAdapter, LoraPart, PeftConfig, CONFIG_FILE, WEIGHTS_FILE};
use leaf_adapters::validate::{validate, Limits};
use proptest::prelude::*;

/// Inputs per fuzz target.
const CASES: u32 = 1500;

/// d = 32, 4 heads of 8 with 2 KV heads, MLP 48, 2 layers.
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

/// A valid rank-2 adapter on q_proj and v_proj with deterministic values.
fn valid_adapter(base: &LlamaConfig) -> LoraAdapter {
    let mods = ["q_proj", "v_proj"];
    let r = 2;
    let mut ad = LoraAdapter::new(
        PeftConfig::new(r, 4.0, mods.iter().map(|s| s.to_string()).collect(), "tiny"),
        BTreeMap::new(),
    );
    for layer in 0..base.num_hidden_layers {
        for m in mods {
            let (o, i) = base.module_shape(m).unwrap();
            let a: Vec<f32> = (0..r * i).map(|k| (k % 7) as f32 * 0.1 - 0.3).collect();
            let b: Vec<f32> = (0..o * r).map(|k| (k % 5) as f32 * 0.05 - 0.1).collect();
            ad.insert(
                layer,
                m,
                LoraPart::A,
                Tensor::from_vec(a, (r, i), &Device::Cpu).unwrap(),
            )
            .unwrap();
            ad.insert(
                layer,
                m,
                LoraPart::B,
                Tensor::from_vec(b, (o, r), &Device::Cpu).unwrap(),
            )
            .unwrap();
        }
    }
    ad
}

/// The files of a valid adapter: (config JSON, safetensors bytes).
fn valid_files() -> (String, Vec<u8>) {
    let ad = valid_adapter(&tiny_base());
    (
        ad.config.to_json_pretty().unwrap(),
        ad.safetensors_bytes().unwrap(),
    )
}

/// One edit of a byte string: overwrite, insert, delete, or truncate.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        1 => any::<usize>().prop_map(Edit::Remove),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ]
}

/// Applies `edits` to `bytes`. Positions are taken modulo the length; when `head` is set, the
/// first edits land in the first `head` bytes (where the safetensors header lives).
fn mutate(mut bytes: Vec<u8>, edits: &[Edit], head: usize) -> Vec<u8> {
    for (n, e) in edits.iter().enumerate() {
        let len = bytes.len().max(1);
        let span = if n % 2 == 0 && head > 0 {
            head.min(len)
        } else {
            len
        };
        match *e {
            Edit::Set(i, b) => {
                if !bytes.is_empty() {
                    let i = i % span.min(bytes.len());
                    bytes[i] = b;
                }
            }
            Edit::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
            Edit::Remove(i) => {
                if !bytes.is_empty() {
                    let i = i % bytes.len();
                    bytes.remove(i);
                }
            }
            Edit::Truncate(i) => bytes.truncate(i % (bytes.len() + 1)),
        }
    }
    bytes
}

/// Writes both files into a fresh directory and loads and validates them. Never panics (that
/// is the property); returns whether the adapter was accepted.
fn load_and_validate(config: &[u8], weights: &[u8]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(CONFIG_FILE), config).unwrap();
    std::fs::write(dir.path().join(WEIGHTS_FILE), weights).unwrap();
    match LoraAdapter::load(dir.path()) {
        Ok(ad) => {
            let accepted = validate(&ad, &tiny_base(), &Limits::default()).is_ok();
            if accepted {
                // An accepted adapter round-trips through the writer.
                ad.safetensors_bytes().unwrap();
            }
            accepted
        }
        Err(e) => {
            // Errors name what was wrong.
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

#[test]
fn the_unmutated_files_are_accepted() {
    let (config, weights) = valid_files();
    assert!(load_and_validate(config.as_bytes(), &weights));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    /// Mutated safetensors bytes (header-biased edits) with a valid config.
    #[test]
    fn mutated_safetensors_never_panic(edits in proptest::collection::vec(edit(), 1..6)) {
        let (config, weights) = valid_files();
        let head = 8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
        let bytes = mutate(weights, &edits, head);
        load_and_validate(config.as_bytes(), &bytes);
    }

    /// Random bytes as the safetensors file.
    #[test]
    fn random_safetensors_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let (config, _) = valid_files();
        load_and_validate(config.as_bytes(), &bytes);
    }

    /// Mutated `adapter_config.json` texts with valid weights.
    #[test]
    fn mutated_config_never_panics(edits in proptest::collection::vec(edit(), 1..6)) {
        let (config, weights) = valid_files();
        let bytes = mutate(config.into_bytes(), &edits, 0);
        load_and_validate(&bytes, &weights);
    }

    /// Configs whose fields hold values of the right JSON type but hostile contents.
    #[test]
    fn hostile_config_values_never_panic(
        r in prop_oneof![Just(0i64), Just(-1), Just(1 << 40), 1i64..64],
        alpha in prop_oneof![Just(f64::MAX), Just(-1.0), Just(0.0), -10.0f64..100.0],
        targets in proptest::collection::vec(
            prop_oneof![Just("q_proj".to_string()), Just("v_proj".to_string()), Just("".to_string()), "[a-z_]{1,12}"],
            0..4,
        ),
        layers in proptest::option::of(proptest::collection::vec(0usize..8, 0..4)),
        rslora in any::<bool>(),
        dora in any::<bool>(),
    ) {
        let (_, weights) = valid_files();
        let config = serde_json::json!({
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "target_modules": targets,
            "layers_to_transform": layers,
            "use_rslora": rslora,
            "use_dora": dora,
            "base_model_name_or_path": "tiny",
        });
        load_and_validate(config.to_string().as_bytes(), &weights);
    }
}
