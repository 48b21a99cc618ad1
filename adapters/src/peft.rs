//! PEFT-format LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! The files are the ones Hugging Face PEFT writes for a `LoraConfig` on a
//! `LlamaForCausalLM` (task `CAUSAL_LM`), so an adapter saved here loads unchanged in PEFT
//! (`PeftModel.from_pretrained`) and in mistral.rs 0.8.1 (`mistralrs_quant::LoraConfig` reads
//! `r`, `lora_alpha` and `target_modules` as a list; its tensors are looked up as
//! `base_model.model.<module prefix>.lora_A.weight` / `lora_B.weight`).
//!
//! Tensors are named `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`;
//! `lora_A` is `[r, in_features]`, `lora_B` is `[out_features, r]`, and the weight update is
//! `scale * B A` with `scale = lora_alpha / r`. In memory every tensor is `f32` on the CPU; files
//! in `f32`, `f16` or `bf16` are read (and converted), files are always written in `f32`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};

/// File name of the adapter's configuration inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter's weights inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Largest `adapter_config.json` read (a config is a few hundred bytes).
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;
/// Largest `adapter_model.safetensors` read: 2^30 `f32` parameters (the default
/// [`crate::validate::Limits`]) plus room for the header.
pub const MAX_WEIGHTS_FILE_BYTES: u64 = (1 << 32) + (1 << 27);
/// Prefix PEFT puts in front of the base model's parameter names.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The `adapter_config.json` of a PEFT LoRA adapter.
///
/// Fields leaf does not model are kept in [`PeftConfig::extra`] and written back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    /// Always `"LORA"`.
    pub peft_type: String,
    /// LoRA rank r.
    pub r: usize,
    /// LoRA alpha; the update is scaled by `lora_alpha / r`. Written as an integer when it is
    /// one, as PEFT writes it.
    #[serde(serialize_with = "serialize_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the LoRA input during training (0 at inference).
    #[serde(default)]
    pub lora_dropout: f64,
    /// Short names of the adapted modules (`q_proj`, ..., `down_proj`), as a list.
    pub target_modules: Vec<String>,
    /// The base model the adapter was trained on (a hub id or a path).
    #[serde(default)]
    pub base_model_name_or_path: String,
    /// Bias handling; only `"none"` is supported.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// `"CAUSAL_LM"`.
    #[serde(default = "default_task_type")]
    pub task_type: String,
    /// Whether the base weights are stored transposed (`Conv1D`); must be `false` for Llama.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// PEFT's flag for adapters saved for inference.
    #[serde(default = "default_true")]
    pub inference_mode: bool,
    /// How PEFT initialises new LoRA weights (`true`, `"gaussian"`, ...); informative only.
    #[serde(default = "default_init")]
    pub init_lora_weights: serde_json::Value,
    /// Extra modules saved in full; leaf supports none (`null`).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Layer indices the adapter is limited to; `null` means every layer.
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
    /// Name of the layers container PEFT matches `layers_to_transform` against.
    #[serde(default)]
    pub layers_pattern: Option<serde_json::Value>,
    /// Per-module rank overrides; leaf supports none (`{}`).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    /// Per-module alpha overrides; leaf supports none (`{}`).
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    /// Rank-stabilised LoRA (scale `alpha / sqrt(r)`); mistral.rs does not support it.
    #[serde(default)]
    pub use_rslora: bool,
    /// Weight-decomposed LoRA; mistral.rs does not support it.
    #[serde(default)]
    pub use_dora: bool,
    /// The base model's revision, if any.
    #[serde(default)]
    pub revision: Option<String>,
    /// Any other fields found in the file, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn serialize_alpha<S: serde::Serializer>(
    alpha: &f64,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    if alpha.is_finite() && alpha.fract() == 0.0 && alpha.abs() < 9.0e15 {
        s.serialize_i64(*alpha as i64)
    } else {
        s.serialize_f64(*alpha)
    }
}

fn default_bias() -> String {
    "none".to_string()
}
fn default_task_type() -> String {
    "CAUSAL_LM".to_string()
}
fn default_true() -> bool {
    true
}
fn default_init() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

impl PeftConfig {
    /// A LoRA config with PEFT's defaults for everything but rank, alpha, targets and base.
    pub fn new(
        r: usize,
        lora_alpha: f64,
        target_modules: Vec<String>,
        base_model_name_or_path: impl Into<String>,
    ) -> Self {
        PeftConfig {
            peft_type: "LORA".to_string(),
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules,
            base_model_name_or_path: base_model_name_or_path.into(),
            bias: default_bias(),
            task_type: default_task_type(),
            fan_in_fan_out: false,
            inference_mode: true,
            init_lora_weights: default_init(),
            modules_to_save: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_rslora: false,
            use_dora: false,
            revision: None,
            extra: BTreeMap::new(),
        }
    }

    /// The LoRA scale `lora_alpha / r` (1 when `r` is 0, as mistral.rs does).
    pub fn scale(&self) -> f64 {
        if self.r == 0 {
            1.0
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Parses `adapter_config.json` text; `path` is only used in error messages.
    ///
    /// Checks that the file is a JSON object with `peft_type` `"LORA"` and `target_modules`
    /// given as a list before reading the other fields, so each mistake gets its own message.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::Adapter(format!("{}: expected a JSON object", path.display())))?;
        match obj.get("peft_type") {
            Some(serde_json::Value::String(t)) if t == "LORA" => {}
            Some(other) => {
                return Err(Error::Adapter(format!(
                    "{}: peft_type is {other}, only \"LORA\" is supported",
                    path.display()
                )))
            }
            None => {
                return Err(Error::Adapter(format!(
                    "{}: peft_type is missing",
                    path.display()
                )))
            }
        }
        match obj.get("target_modules") {
            Some(serde_json::Value::Array(_)) => {}
            Some(other) => {
                return Err(Error::Adapter(format!(
                    "{}: target_modules must be a list of module names (got {other})",
                    path.display()
                )))
            }
            None => {
                return Err(Error::Adapter(format!(
                    "{}: target_modules is missing",
                    path.display()
                )))
            }
        }
        serde_json::from_value(value).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            source: e,
        })
    }

    /// Pretty JSON as written to `adapter_config.json`.
    pub fn to_json_pretty(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::Adapter(format!("cannot serialise adapter config: {e}")))
    }

    /// Canonical JSON (object keys sorted at every level, no whitespace): what the version id hashes.
    pub fn canonical_json(&self) -> Result<String> {
        let value = serde_json::to_value(self)
            .map_err(|e| Error::Adapter(format!("cannot serialise adapter config: {e}")))?;
        let mut out = String::new();
        write_canonical(&value, &mut out);
        Ok(out)
    }
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String((*k).clone()).to_string());
                out.push(':');
                write_canonical(&map[k.as_str()], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Which of the two LoRA factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LoraPart {
    /// `lora_A`: `[r, in_features]`, the down-projection.
    A,
    /// `lora_B`: `[out_features, r]`, the up-projection (zero at initialisation).
    B,
}

impl LoraPart {
    /// `"lora_A"` or `"lora_B"`.
    pub fn as_str(self) -> &'static str {
        match self {
            LoraPart::A => "lora_A",
            LoraPart::B => "lora_B",
        }
    }
}

/// The PEFT tensor name of one LoRA factor:
/// `base_model.model.model.layers.{layer}.{self_attn|mlp}.{module}.lora_{A|B}.weight`.
///
/// `module` is a short name from [`crate::config::KNOWN_MODULES`]. For any other name the parent
/// segment is left out, giving a name that [`parse_tensor_name`] and validation reject.
pub fn tensor_name(layer: usize, module: &str, part: LoraPart) -> String {
    match LlamaConfig::module_parent(module) {
        Some(parent) => format!(
            "{PEFT_PREFIX}model.layers.{layer}.{parent}.{module}.{}.weight",
            part.as_str()
        ),
        None => format!(
            "{PEFT_PREFIX}model.layers.{layer}.{module}.{}.weight",
            part.as_str()
        ),
    }
}

/// The Hugging Face name of the base weight a LoRA pair adapts:
/// `model.layers.{layer}.{self_attn|mlp}.{module}.weight` (`None` for an unknown module).
pub fn base_weight_name(layer: usize, module: &str) -> Option<String> {
    LlamaConfig::module_parent(module)
        .map(|parent| format!("model.layers.{layer}.{parent}.{module}.weight"))
}

/// Splits a PEFT tensor name into `(layer, module, part)`; `None` unless it has exactly the
/// shape [`tensor_name`] produces for a module in [`crate::config::KNOWN_MODULES`].
pub fn parse_tensor_name(name: &str) -> Option<(usize, String, LoraPart)> {
    let rest = name
        .strip_prefix(PEFT_PREFIX)?
        .strip_prefix("model.layers.")?;
    let rest = rest.strip_suffix(".weight")?;
    let mut parts = rest.split('.');
    let layer_str = parts.next()?;
    let parent = parts.next()?;
    let module = parts.next()?;
    let part = match parts.next()? {
        "lora_A" => LoraPart::A,
        "lora_B" => LoraPart::B,
        _ => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    if layer_str.is_empty() || !layer_str.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if layer_str.len() > 1 && layer_str.starts_with('0') {
        return None;
    }
    let layer: usize = layer_str.parse().ok()?;
    if LlamaConfig::module_parent(module)? != parent {
        return None;
    }
    Some((layer, module.to_string(), part))
}

/// A LoRA adapter in memory: its PEFT config and its tensors by PEFT name.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// The `adapter_config.json` contents.
    pub config: PeftConfig,
    /// Tensors by full PEFT name; `f32` on the CPU (`A`: `[r, in]`, `B`: `[out, r]`).
    pub tensors: BTreeMap<String, Tensor>,
}

impl LoraAdapter {
    /// An adapter from parts (no checks: run [`crate::validate::validate`] before serving it).
    pub fn new(config: PeftConfig, tensors: BTreeMap<String, Tensor>) -> Self {
        LoraAdapter { config, tensors }
    }

    /// A freshly initialised adapter for `base`, as PEFT initialises one: every `lora_A` drawn
    /// uniformly from `[-1/sqrt(in), 1/sqrt(in)]` (Kaiming-uniform with `a = sqrt(5)`), every
    /// `lora_B` zero, so the adapted model starts equal to the base model. Deterministic in `seed`.
    pub fn init(config: PeftConfig, base: &LlamaConfig, seed: u64) -> Result<Self> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        let layers: Vec<usize> = match &config.layers_to_transform {
            Some(list) => list.clone(),
            None => (0..base.num_hidden_layers).collect(),
        };
        for &layer in &layers {
            for module in &config.target_modules {
                let (out_f, in_f) = base
                    .module_shape(module)
                    .ok_or_else(|| Error::Adapter(format!("unknown target module {module:?}")))?;
                let bound = 1.0 / (in_f as f64).sqrt();
                let a: Vec<f32> = (0..config.r * in_f)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Tensor::from_vec(a, (config.r, in_f), &Device::Cpu)?;
                let b = Tensor::zeros((out_f, config.r), DType::F32, &Device::Cpu)?;
                tensors.insert(tensor_name(layer, module, LoraPart::A), a);
                tensors.insert(tensor_name(layer, module, LoraPart::B), b);
            }
        }
        Ok(LoraAdapter { config, tensors })
    }

    /// Reads `adapter_config.json` and `adapter_model.safetensors` from `dir`.
    ///
    /// `f32`, `f16` and `bf16` tensors are read and stored as `f32`; any other dtype, a
    /// truncated or malformed file, or a config that is not a LoRA config is an error. Both
    /// files must be regular files (not symbolic links, FIFOs or devices) no larger than
    /// [`MAX_CONFIG_FILE_BYTES`] and [`MAX_WEIGHTS_FILE_BYTES`]; this is checked before any
    /// byte is read ([`read_regular_file`]).
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let text = read_regular_file(&config_path, MAX_CONFIG_FILE_BYTES)?;
        let text = String::from_utf8(text).map_err(|e| {
            Error::io(
                &config_path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?;
        let config = PeftConfig::from_json(&text, &config_path)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let bytes = read_regular_file(&weights_path, MAX_WEIGHTS_FILE_BYTES)?;
        let tensors = read_safetensors(&bytes, &weights_path)?;
        Ok(LoraAdapter { config, tensors })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (`f32`) into `dir`
    /// (created if missing), fsyncing both files and the directory.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let config_path = dir.join(CONFIG_FILE);
        write_synced(&config_path, self.config.to_json_pretty()?.as_bytes())?;
        let weights_path = dir.join(WEIGHTS_FILE);
        write_synced(&weights_path, &self.safetensors_bytes()?)?;
        sync_dir(dir)
    }

    /// The `adapter_model.safetensors` bytes (`f32` tensors, metadata `{"format": "pt"}`).
    pub fn safetensors_bytes(&self) -> Result<Vec<u8>> {
        let mut raw: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(self.tensors.len());
        for (name, t) in &self.tensors {
            raw.push((name.clone(), t.dims().to_vec(), f32_bytes(name, t)?));
        }
        let mut views = Vec::with_capacity(raw.len());
        for (name, shape, data) in &raw {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)?;
            views.push((name.as_str(), view));
        }
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        Ok(safetensors::serialize(views, Some(metadata))?)
    }

    /// The content hash that names this adapter version: SHA-256, in hex, over the canonical
    /// config JSON and every tensor (name, dtype, shape, little-endian bytes) in name order.
    pub fn version_id(&self) -> Result<String> {
        let mut h = Sha256::new();
        h.update(b"leaf-lora-v1\0");
        let cfg = self.config.canonical_json()?;
        h.update((cfg.len() as u64).to_le_bytes());
        h.update(cfg.as_bytes());
        h.update((self.tensors.len() as u64).to_le_bytes());
        for (name, t) in &self.tensors {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update(b"F32");
            h.update((t.dims().len() as u64).to_le_bytes());
            for &d in t.dims() {
                h.update((d as u64).to_le_bytes());
            }
            let data = f32_bytes(name, t)?;
            h.update((data.len() as u64).to_le_bytes());
            h.update(&data);
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Total number of LoRA parameters (elements of every tensor).
    pub fn num_parameters(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
    }

    /// The factor `part` of `module` in `layer`, if the adapter has it.
    pub fn get(&self, layer: usize, module: &str, part: LoraPart) -> Option<&Tensor> {
        self.tensors.get(&tensor_name(layer, module, part))
    }

    /// Sets the factor `part` of `module` in `layer` (converted to `f32` on the CPU).
    pub fn insert(&mut self, layer: usize, module: &str, part: LoraPart, t: Tensor) -> Result<()> {
        let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        self.tensors.insert(tensor_name(layer, module, part), t);
        Ok(())
    }

    /// Layer indices that hold at least one recognised LoRA tensor, ascending.
    pub fn layers(&self) -> Vec<usize> {
        let mut layers: Vec<usize> = self
            .tensors
            .keys()
            .filter_map(|n| parse_tensor_name(n).map(|(l, _, _)| l))
            .collect();
        layers.sort_unstable();
        layers.dedup();
        layers
    }
}

/// The little-endian bytes of an `f32` tensor; any other dtype is an error naming the tensor.
fn f32_bytes(name: &str, t: &Tensor) -> Result<Vec<u8>> {
    if t.dtype() != DType::F32 {
        return Err(Error::tensor(
            name,
            format!("held as {:?}, expected f32", t.dtype()),
        ));
    }
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// Parses safetensors bytes into `f32` CPU tensors (f32, f16 and bf16 accepted).
fn read_safetensors(bytes: &[u8], path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        Error::Adapter(format!(
            "{}: not a valid safetensors file: {e}",
            path.display()
        ))
    })?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.iter() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            safetensors::Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::tensor(
                    name,
                    format!("unsupported dtype {other:?} (expected F32, F16 or BF16)"),
                ))
            }
        };
        let shape = view.shape().to_vec();
        if shape.iter().product::<usize>() != values.len() {
            return Err(Error::tensor(
                name,
                format!("shape {shape:?} does not match {} values", values.len()),
            ));
        }
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
        tensors.insert(name.to_string(), t);
    }
    Ok(tensors)
}

/// Reads a whole file that must be a regular file of at most `max_bytes`.
///
/// The file is opened without following a symbolic link in its last component and without
/// blocking (a FIFO would otherwise block the caller until a writer appears), then its type and
/// size are checked on the open descriptor, so `/dev/zero`, a FIFO or a huge file are refused
/// before anything is read.
pub fn read_regular_file(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let refuse = |why: String| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, why),
        )
    };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| match e.raw_os_error() {
        #[cfg(unix)]
        Some(libc::ELOOP) => refuse("is a symbolic link; only regular files are read".to_string()),
        _ => Error::io(path, e),
    })?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(refuse(format!(
            "is not a regular file ({:?}); only regular files are read",
            meta.file_type()
        )));
    }
    if meta.len() > max_bytes {
        return Err(refuse(format!(
            "is {} bytes, more than the limit of {max_bytes}",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow while it is read: never read past the limit.
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(refuse(format!("grew past the limit of {max_bytes} bytes")));
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` and fsyncs the file.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Fsyncs a directory so renames and new entries in it are durable (no-op off Unix).
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let f = File::open(dir).map_err(|e| Error::io(dir, e))?;
        f.sync_all().map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (i, m) in crate::config::KNOWN_MODULES.iter().enumerate() {
            for part in [LoraPart::A, LoraPart::B] {
                let n = tensor_name(i * 3, m, part);
                assert_eq!(parse_tensor_name(&n), Some((i * 3, m.to_string(), part)));
            }
        }
        assert_eq!(
            tensor_name(2, "q_proj", LoraPart::A),
            "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            tensor_name(0, "down_proj", LoraPart::B),
            "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
        );
    }

    #[test]
    fn bad_names_rejected() {
        for n in [
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.bias",
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.lm_head.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.x",
            &tensor_name(0, "lm_head", LoraPart::A),
        ] {
            assert_eq!(parse_tensor_name(n), None, "{n}");
        }
    }

    #[test]
    fn scale_is_alpha_over_r() {
        let c = PeftConfig::new(8, 16.0, vec!["q_proj".into()], "m");
        assert_eq!(c.scale(), 2.0);
        let c = PeftConfig::new(16, 8.0, vec!["q_proj".into()], "m");
        assert_eq!(c.scale(), 0.5);
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let mut c = PeftConfig::new(4, 8.0, vec!["v_proj".into(), "q_proj".into()], "m");
        c.extra.insert(
            "zzz".into(),
            serde_json::json!({"b": 1, "a": [2, {"y": 0, "x": 1}]}),
        );
        let s = c.canonical_json().unwrap();
        let keys: Vec<usize> = ["\"alpha_pattern\"", "\"bias\"", "\"r\"", "\"zzz\""]
            .iter()
            .map(|k| s.find(k).unwrap())
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{s}");
        assert!(s.contains("{\"a\":[2,{\"x\":1,\"y\":0}],\"b\":1}"), "{s}");
        // target_modules keep their order: they are a list.
        assert!(s.contains("[\"v_proj\",\"q_proj\"]"));
    }
}
