//! The base model's Hugging Face `config.json` (the `LlamaForCausalLM` subset leaf uses).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Fields of a Hugging Face Llama-family `config.json` that shape the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Model classes, `["LlamaForCausalLM"]`.
    #[serde(default = "default_architectures")]
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
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Longest sequence the model was built for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// RoPE scaling; leaf supports none (`null`).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// `"llama"`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Weight dtype as saved, e.g. `"float32"`.
    #[serde(default = "default_dtype")]
    pub torch_dtype: String,
}

fn default_architectures() -> Vec<String> {
    vec!["LlamaForCausalLM".to_string()]
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
fn default_model_type() -> String {
    "llama".to_string()
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

    /// Writes `config.json` (pretty-printed) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let file = dir.join("config.json");
        let text = serde_json::to_string_pretty(self).expect("config serialises");
        std::fs::write(&file, text).map_err(|e| Error::io(&file, e))
    }

    /// Checks the shape arithmetic; returns the reason on failure.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?} is not supported (only silu)",
                self.hidden_act
            ));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("rope_scaling is not supported".into());
        }
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head dimension {} must be even for RoPE",
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
        Ok(())
    }

    /// Number of key/value heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// `(out_features, in_features)` of a LoRA-targetable module, by its short name
    /// (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`).
    pub fn module_shape(&self, module: &str) -> Option<(usize, usize)> {
        let d = self.hidden_size;
        let kv = self.num_kv_heads() * self.head_dim();
        let i = self.intermediate_size;
        Some(match module {
            "q_proj" | "o_proj" => (d, d),
            "k_proj" | "v_proj" => (kv, d),
            "gate_proj" | "up_proj" => (i, d),
            "down_proj" => (d, i),
            _ => return None,
        })
    }

    /// The submodule path of a LoRA target inside a layer (`self_attn` or `mlp`).
    pub fn module_parent(module: &str) -> Option<&'static str> {
        match module {
            "q_proj" | "k_proj" | "v_proj" | "o_proj" => Some("self_attn"),
            "gate_proj" | "up_proj" | "down_proj" => Some("mlp"),
            _ => None,
        }
    }
}

/// Every module a LoRA adapter may target, in the order PEFT lists them.
pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
