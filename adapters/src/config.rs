//! The base model's Hugging Face `config.json`: the decoder families leaf trains and mistral.rs
//! 0.8.1 serves.
//!
//! One struct, [`LlamaConfig`] (also named [`ModelConfig`]), holds the fields that shape the
//! weights of every supported [`Family`]; the family is read from `architectures` (or, when that
//! is absent, `model_type`):
//!
//! | family | `architectures` | what differs from Llama |
//! |---|---|---|
//! | [`Family::Llama`] | `LlamaForCausalLM` | RoPE scaling `llama3` / `linear`; tied or untied head |
//! | [`Family::Qwen2`] | `Qwen2ForCausalLM` | biases on `q_proj`, `k_proj`, `v_proj` |
//! | [`Family::Mistral`] | `MistralForCausalLM` | `sliding_window` (leaf refuses longer sequences), `head_dim` |
//! | [`Family::Phi3`] | `Phi3ForCausalLM` | fused `qkv_proj` and `gate_up_proj` |

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

/// A decoder family: how its weights are laid out and named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Family {
    /// `LlamaForCausalLM` (Llama 2 and 3, SmolLM, TinyLlama, ...).
    Llama,
    /// `Qwen2ForCausalLM`: Llama plus biases on the q/k/v projections.
    Qwen2,
    /// `MistralForCausalLM`: Llama with a sliding attention window.
    Mistral,
    /// `Phi3ForCausalLM`: fused `qkv_proj` and `gate_up_proj`.
    Phi3,
}

/// The LoRA-targetable projections of the Llama, Qwen2 and Mistral families, in PEFT's order.
pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The LoRA-targetable projections of Phi-3 (fused q/k/v and gate/up), in PEFT's order.
pub const PHI3_TARGETS: [&str; 4] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

/// Every projection name of any supported family.
pub const KNOWN_MODULES: [&str; 9] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
];

impl Family {
    /// Every supported family.
    pub const ALL: [Family; 4] = [Family::Llama, Family::Qwen2, Family::Mistral, Family::Phi3];

    /// The Hugging Face model class, e.g. `LlamaForCausalLM`.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// The Hugging Face `model_type`, e.g. `llama`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Mistral => "mistral",
            Family::Phi3 => "phi3",
        }
    }

    /// Reads the family from `architectures` (its first entry) or, when that is empty,
    /// `model_type`; the error lists what is supported.
    pub fn detect(architectures: &[String], model_type: &str) -> std::result::Result<Self, String> {
        let supported = || {
            Family::ALL
                .iter()
                .map(|f| f.architecture())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(arch) = architectures.first() {
            let family = Family::ALL
                .into_iter()
                .find(|f| f.architecture() == arch)
                .ok_or_else(|| {
                    format!(
                        "architecture {arch:?} is not supported (supported: {})",
                        supported()
                    )
                })?;
            if !model_type.is_empty() && model_type != family.model_type() {
                return Err(format!(
                    "architecture {arch} does not match model_type {model_type:?} (expected {:?})",
                    family.model_type()
                ));
            }
            return Ok(family);
        }
        Family::ALL
            .into_iter()
            .find(|f| f.model_type() == model_type)
            .ok_or_else(|| {
                format!(
                    "model_type {model_type:?} is not supported (supported: {})",
                    Family::ALL
                        .iter()
                        .map(|f| f.model_type())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    /// The LoRA-targetable projections of this family, in the order PEFT lists them (the names
    /// mistral.rs's LoRA loading and Hugging Face PEFT use).
    pub fn lora_targets(self) -> &'static [&'static str] {
        match self {
            Family::Phi3 => &PHI3_TARGETS,
            _ => &ALL_TARGETS,
        }
    }

    /// Whether `q_proj`, `k_proj` and `v_proj` carry a bias.
    pub fn qkv_bias(self) -> bool {
        self == Family::Qwen2
    }

    /// Whether q/k/v and gate/up are fused into `qkv_proj` and `gate_up_proj`.
    pub fn fused(self) -> bool {
        self == Family::Phi3
    }

    /// Maps target names to this family's: a name the family has is kept; a Llama name that a
    /// fused Phi-3 projection contains becomes that projection (`q_proj` -> `qkv_proj`,
    /// `up_proj` -> `gate_up_proj`) and the reverse (`qkv_proj` -> `q_proj`, `k_proj`,
    /// `v_proj`). The result is deduplicated, in [`Family::lora_targets`] order. An unknown name
    /// is an error.
    pub fn resolve_targets(self, targets: &[String]) -> std::result::Result<Vec<String>, String> {
        let mut wanted = Vec::new();
        for t in targets {
            let mapped: &[&str] = match (self.fused(), t.as_str()) {
                (_, m) if self.lora_targets().contains(&m) => &[],
                (true, "q_proj" | "k_proj" | "v_proj") => &["qkv_proj"],
                (true, "gate_proj" | "up_proj") => &["gate_up_proj"],
                (false, "qkv_proj") => &["q_proj", "k_proj", "v_proj"],
                (false, "gate_up_proj") => &["gate_proj", "up_proj"],
                (_, other) => {
                    return Err(format!(
                    "LoRA target module {other:?} does not exist in a {} model (its modules: {})",
                    self.model_type(),
                    self.lora_targets().join(", ")
                ))
                }
            };
            if mapped.is_empty() {
                wanted.push(t.as_str());
            } else {
                wanted.extend_from_slice(mapped);
            }
        }
        Ok(self
            .lora_targets()
            .iter()
            .filter(|m| wanted.contains(m))
            .map(|m| m.to_string())
            .collect())
    }
}

/// `rope_scaling` of a Llama config (what mistral.rs 0.8.1's Llama supports).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `llama3`, `linear` or `default`.
    #[serde(alias = "type")]
    pub rope_type: String,
    /// Scaling factor (`llama3`, `linear`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// `llama3`: wavelengths above `original_max_position_embeddings / low_freq_factor` are
    /// divided by `factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    /// `llama3`: wavelengths below `original_max_position_embeddings / high_freq_factor` are
    /// kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    /// `llama3`: the context length the model was pretrained with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

/// Fields of a Hugging Face decoder `config.json` that shape the weights (see the module docs
/// for the families). Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Model classes, e.g. `["LlamaForCausalLM"]`; empty means "use `model_type`".
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Activation of the MLP; only `silu` (SwiGLU) is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Model width d.
    pub hidden_size: usize,
    /// Inner width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA); defaults to the number of query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head (Mistral); defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Longest sequence the model was built for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Phi-3: the pretraining context length (mistral.rs requires it in a Phi-3 config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// Attention window of Mistral, Qwen2 and Phi-3; leaf refuses longer sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Whether the LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id.
    #[serde(default, deserialize_with = "first_id")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id (the first one when the file lists several; the full stop set is the
    /// chat format's, from `generation_config.json`).
    #[serde(default, deserialize_with = "first_id")]
    pub eos_token_id: Option<u32>,
    /// RoPE scaling (Llama: `llama3` or `linear`).
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Llama's `attention_bias` (only `false` is supported).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attention_bias: bool,
    /// Phi-3's `partial_rotary_factor` (only 1 is supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// `llama`, `qwen2`, `mistral` or `phi3`; empty means "use `architectures`".
    #[serde(default)]
    pub model_type: String,
    /// Weight dtype as saved, e.g. `"float32"`.
    #[serde(default = "default_dtype")]
    pub torch_dtype: String,
}

/// The config of any supported family (the same struct as [`LlamaConfig`]).
pub type ModelConfig = LlamaConfig;

impl Default for LlamaConfig {
    /// A 1-layer Llama of width 64 (a starting point for struct-update syntax).
    fn default() -> Self {
        LlamaConfig {
            architectures: vec![Family::Llama.architecture().to_string()],
            hidden_act: default_act(),
            hidden_size: 64,
            intermediate_size: 128,
            vocab_size: 256,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            num_key_value_heads: None,
            head_dim: None,
            rms_norm_eps: default_eps(),
            rope_theta: default_theta(),
            max_position_embeddings: default_max_pos(),
            original_max_position_embeddings: None,
            sliding_window: None,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
            rope_scaling: None,
            attention_bias: false,
            partial_rotary_factor: None,
            model_type: Family::Llama.model_type().to_string(),
            torch_dtype: default_dtype(),
        }
    }
}

/// An id, or the first of a list of ids (Llama 3 lists several `eos_token_id`s).
fn first_id<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => None,
        Some(OneOrMany::One(id)) => Some(id),
        Some(OneOrMany::Many(ids)) => ids.first().copied(),
    })
}

fn default_act() -> String {
    "silu".to_string()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}
fn default_dtype() -> String {
    "float32".to_string()
}

impl LlamaConfig {
    /// Reads and checks `config.json` from a file or from a model directory holding one.
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let cfg: LlamaConfig = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: file.clone(),
            source: e,
        })?;
        cfg.check()
            .map_err(|reason| Error::BaseConfig { path: file, reason })?;
        Ok(cfg)
    }

    /// The config as written to disk: `architectures` and `model_type` filled in from the
    /// family, `num_key_value_heads` explicit, and Phi-3's `original_max_position_embeddings`
    /// present (mistral.rs requires these).
    pub fn normalized(&self) -> Self {
        let family = self.family();
        let mut c = self.clone();
        c.architectures = vec![family.architecture().to_string()];
        c.model_type = family.model_type().to_string();
        c.num_key_value_heads = Some(self.num_kv_heads());
        if family == Family::Phi3 && c.original_max_position_embeddings.is_none() {
            c.original_max_position_embeddings = Some(c.max_position_embeddings);
        }
        c
    }

    /// Writes `config.json` (pretty-printed, [`LlamaConfig::normalized`]) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let file = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.normalized()).expect("config serialises");
        std::fs::write(&file, text).map_err(|e| Error::io(&file, e))
    }

    /// The family, as [`Family::detect`] reads it; `Err` names what is unsupported.
    pub fn try_family(&self) -> std::result::Result<Family, String> {
        if self.architectures.is_empty() && self.model_type.is_empty() {
            return Ok(Family::Llama);
        }
        Family::detect(&self.architectures, &self.model_type)
    }

    /// The family of a checked config ([`LlamaConfig::check`] rejects the others; an unchecked
    /// unsupported config reads as Llama).
    pub fn family(&self) -> Family {
        self.try_family().unwrap_or(Family::Llama)
    }

    /// The LoRA-targetable projections of this model's family.
    pub fn lora_targets(&self) -> &'static [&'static str] {
        self.family().lora_targets()
    }

    /// Checks the family and the shape arithmetic; returns the reason on failure.
    pub fn check(&self) -> std::result::Result<(), String> {
        let family = self.try_family()?;
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?} is not supported (only silu)",
                self.hidden_act
            ));
        }
        if self.attention_bias {
            return Err("attention_bias = true is not supported".into());
        }
        if let Some(f) = self.partial_rotary_factor {
            if f != 1.0 {
                return Err(format!(
                    "partial_rotary_factor {f} is not supported (only 1)"
                ));
            }
        }
        if let Some(scaling) = &self.rope_scaling {
            self.check_rope_scaling(family, scaling)?;
        }
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if let Some(hd) = self.head_dim {
            let natural = self.hidden_size / self.num_attention_heads;
            if family != Family::Mistral && hd != natural {
                return Err(format!(
                    "head_dim {hd} differs from hidden_size / num_attention_heads = {natural}, \
                     which mistral.rs supports only for Mistral"
                ));
            }
        } else if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head dimension {} must be even and positive for RoPE",
                self.head_dim()
            ));
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            ));
        }
        if self.sliding_window == Some(0) {
            return Err("sliding_window must be positive".into());
        }
        Ok(())
    }

    fn check_rope_scaling(
        &self,
        family: Family,
        s: &RopeScaling,
    ) -> std::result::Result<(), String> {
        if s.rope_type == "default" {
            return Ok(());
        }
        if family != Family::Llama {
            return Err(format!(
                "rope_scaling {:?} is not supported for {} (only for Llama)",
                s.rope_type,
                family.model_type()
            ));
        }
        let positive = |name: &str, v: Option<f64>| match v {
            Some(x) if x.is_finite() && x > 0.0 => Ok(x),
            Some(x) => Err(format!("rope_scaling.{name} {x} must be positive")),
            None => Err(format!(
                "rope_scaling.{name} is required for rope_type {:?}",
                s.rope_type
            )),
        };
        match s.rope_type.as_str() {
            "linear" => {
                positive("factor", s.factor)?;
            }
            "llama3" => {
                positive("factor", s.factor)?;
                let low = positive("low_freq_factor", s.low_freq_factor)?;
                let high = positive("high_freq_factor", s.high_freq_factor)?;
                if high <= low {
                    return Err(format!(
                        "rope_scaling.high_freq_factor {high} must exceed low_freq_factor {low}"
                    ));
                }
                match s.original_max_position_embeddings {
                    Some(n) if n > 0 => {}
                    _ => {
                        return Err(
                            "rope_scaling.original_max_position_embeddings is required and must \
                             be positive for rope_type \"llama3\""
                                .into(),
                        )
                    }
                }
            }
            other => {
                return Err(format!(
                    "rope_scaling type {other:?} is not supported (llama3, linear, default)"
                ))
            }
        }
        Ok(())
    }

    /// Number of key/value heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// RoPE's inverse frequencies (`head_dim / 2` of them), computed in `f32` as mistral.rs
    /// 0.8.1 computes them, with Llama 3 or linear scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let hd = self.head_dim();
        let theta = self.rope_theta as f32;
        let base: Vec<f32> = (0..hd)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f32 / hd as f32))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return base;
        };
        match s.rope_type.as_str() {
            "linear" => {
                let factor = s.factor.unwrap_or(1.0) as f32;
                base.into_iter().map(|f| f / factor).collect()
            }
            "llama3" => {
                let factor = s.factor.unwrap_or(1.0) as f32;
                let low = s.low_freq_factor.unwrap_or(1.0) as f32;
                let high = s.high_freq_factor.unwrap_or(4.0) as f32;
                let orig = s
                    .original_max_position_embeddings
                    .unwrap_or(self.max_position_embeddings) as f32;
                let low_wavelen = orig / low;
                let high_wavelen = orig / high;
                base.into_iter()
                    .map(|freq| {
                        let wavelen = 2. * std::f32::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / factor
                        } else {
                            let smooth = (orig / wavelen - low) / (high - low);
                            (1. - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
            _ => base,
        }
    }

    /// `(out_features, in_features)` of a LoRA-targetable module of this model's family, by its
    /// short name (`q_proj`, ..., or Phi-3's `qkv_proj`, `gate_up_proj`); `None` for a module
    /// the family does not have.
    pub fn module_shape(&self, module: &str) -> Option<(usize, usize)> {
        if !self.lora_targets().contains(&module) {
            return None;
        }
        let d = self.hidden_size;
        let hd = self.head_dim();
        let q = self.num_attention_heads * hd;
        let kv = self.num_kv_heads() * hd;
        let i = self.intermediate_size;
        Some(match module {
            "q_proj" => (q, d),
            "o_proj" => (d, q),
            "k_proj" | "v_proj" => (kv, d),
            "qkv_proj" => (q + 2 * kv, d),
            "gate_proj" | "up_proj" => (i, d),
            "gate_up_proj" => (2 * i, d),
            "down_proj" => (d, i),
            _ => return None,
        })
    }

    /// The submodule path of a projection inside a layer (`self_attn` or `mlp`), for the
    /// projections of every supported family.
    pub fn module_parent(module: &str) -> Option<&'static str> {
        match module {
            "q_proj" | "k_proj" | "v_proj" | "o_proj" | "qkv_proj" => Some("self_attn"),
            "gate_proj" | "up_proj" | "down_proj" | "gate_up_proj" => Some("mlp"),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> LlamaConfig {
        serde_json::from_value(v).unwrap()
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "hidden_size": 16, "intermediate_size": 24, "vocab_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2
        })
    }

    #[test]
    fn family_dispatch_and_errors() {
        let mut v = base();
        assert_eq!(parse(v.clone()).family(), Family::Llama);
        for f in Family::ALL {
            v["architectures"] = serde_json::json!([f.architecture()]);
            assert_eq!(parse(v.clone()).try_family(), Ok(f));
        }
        let mut v = base();
        v["model_type"] = "qwen2".into();
        assert_eq!(parse(v.clone()).try_family(), Ok(Family::Qwen2));
        v["architectures"] = serde_json::json!(["GemmaForCausalLM"]);
        let err = parse(v.clone()).check().unwrap_err();
        assert!(
            err.contains("GemmaForCausalLM") && err.contains("Phi3ForCausalLM"),
            "{err}"
        );
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        let err = parse(v).check().unwrap_err();
        assert!(err.contains("does not match model_type"), "{err}");
    }

    #[test]
    fn eos_list_and_rope_scaling_parse() {
        let mut v = base();
        v["eos_token_id"] = serde_json::json!([7, 9]);
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        let c = parse(v.clone());
        assert_eq!(c.eos_token_id, Some(7));
        c.check().unwrap();
        v["rope_scaling"]["high_freq_factor"] = 0.5.into();
        assert!(parse(v.clone())
            .check()
            .unwrap_err()
            .contains("high_freq_factor"));
        v["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
        assert!(parse(v.clone()).check().unwrap_err().contains("yarn"));
        v["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 2.0});
        v["model_type"] = "qwen2".into();
        assert!(parse(v).check().unwrap_err().contains("only for Llama"));
    }

    #[test]
    fn llama3_frequencies_follow_the_three_bands() {
        let mut c = parse(base());
        c.hidden_size = 512;
        c.num_attention_heads = 4;
        c.num_key_value_heads = Some(4);
        c.rope_theta = 500_000.0;
        let plain = c.rope_inv_freq();
        c.rope_scaling = Some(RopeScaling {
            rope_type: "llama3".into(),
            factor: Some(8.0),
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(8192),
        });
        let scaled = c.rope_inv_freq();
        // Highest frequency kept, lowest divided by the factor, the middle in between.
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() <= plain[last] * 1e-6);
        assert!(scaled
            .iter()
            .zip(&plain)
            .all(|(s, p)| *s <= *p && *s >= p / 8.0 * (1.0 - 1e-6)));
        assert!(scaled
            .iter()
            .zip(&plain)
            .any(|(s, p)| *s < *p && *s > p / 8.0 * 1.0001));
    }

    #[test]
    fn phi3_shapes_and_target_resolution() {
        let mut v = base();
        v["architectures"] = serde_json::json!(["Phi3ForCausalLM"]);
        let c = parse(v);
        assert_eq!(c.module_shape("qkv_proj"), Some((16 + 2 * 8, 16)));
        assert_eq!(c.module_shape("gate_up_proj"), Some((48, 16)));
        assert_eq!(c.module_shape("q_proj"), None);
        let all: Vec<String> = ALL_TARGETS.iter().map(|s| s.to_string()).collect();
        assert_eq!(Family::Phi3.resolve_targets(&all).unwrap(), PHI3_TARGETS);
        assert_eq!(
            Family::Llama
                .resolve_targets(&["qkv_proj".to_string()])
                .unwrap(),
            ["q_proj", "k_proj", "v_proj"]
        );
        assert!(Family::Llama
            .resolve_targets(&["lm_head".to_string()])
            .is_err());
        let n = c.normalized();
        assert_eq!(n.model_type, "phi3");
        assert_eq!(n.original_max_position_embeddings, Some(2048));
    }

    #[test]
    fn mistral_head_dim_only_for_mistral() {
        let mut v = base();
        v["head_dim"] = 8.into();
        v["model_type"] = "mistral".into();
        let c = parse(v.clone());
        c.check().unwrap();
        assert_eq!(c.module_shape("q_proj"), Some((32, 16)));
        assert_eq!(c.module_shape("o_proj"), Some((16, 32)));
        v["model_type"] = "llama".into();
        assert!(parse(v).check().unwrap_err().contains("head_dim"));
    }
}
