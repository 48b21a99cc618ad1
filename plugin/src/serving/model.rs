//! Loading the base model (and optionally one PEFT adapter) into a mistral.rs pipeline.
//!
//! Every load runs on a brand-new `std::thread` with `mistralrs_quant::clear_applied_loras()`
//! before and after: mistral.rs keeps the applied-LoRA list in a thread-local that is never
//! cleared, so a reused thread would merge an earlier adapter into a later load. The files the
//! loader would panic on (`tokenizer_config.json` with an `eos_token` outside the vocabulary, a
//! malformed template) are validated first, and a panic inside the loader is caught as an error,
//! so a bad version can never take the server down.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use leaf_adapters::validate::{validate, Limits, ValidationReport};
use leaf_adapters::{peft, Family, LlamaConfig};
use mistralrs_core::{
    AdapterPaths, DeviceMapSetting, LocalModelPaths, LoraAdapterPaths, ModelDType, ModelPaths,
    NormalLoaderBuilder, NormalLoaderType, NormalSpecificConfig, Pipeline,
};

use super::ServeError;
use crate::chat_format::{ChatFormat, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE};

/// The tokenizer file of a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The single weight file of an unsharded model directory.
const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded model directory.
const SHARD_INDEX_FILE: &str = "model.safetensors.index.json";

/// A validated Hugging Face model directory of a supported family (Llama, Qwen2, Mistral,
/// Phi-3) with its own chat format.
#[derive(Debug, Clone)]
pub struct ModelDir {
    dir: PathBuf,
    config: LlamaConfig,
    weights: Vec<PathBuf>,
    tokenizer: Arc<tokenizers::Tokenizer>,
    chat_format: Arc<ChatFormat>,
}

fn model_err(path: &Path, reason: impl Into<String>) -> ServeError {
    ServeError::Model {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The weight files: `model.safetensors`, or every shard named by
/// `model.safetensors.index.json` (plain file names inside `dir`).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ServeError> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(SHARD_INDEX_FILE);
    if !index.is_file() {
        return Err(model_err(
            dir,
            format!("neither {WEIGHTS_FILE} nor {SHARD_INDEX_FILE} is present"),
        ));
    }
    let text = std::fs::read_to_string(&index)
        .map_err(|e| model_err(&index, format!("cannot read: {e}")))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| model_err(&index, e.to_string()))?;
    let map = doc
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| model_err(&index, "weight_map is missing"))?;
    let mut files: Vec<String> = Vec::new();
    for v in map.values() {
        let f = v
            .as_str()
            .ok_or_else(|| model_err(&index, "weight_map values must be file names"))?;
        if f.contains('/') || f.contains('\\') || f == ".." || f.is_empty() {
            return Err(model_err(
                &index,
                format!("shard {f:?} is not a plain file name"),
            ));
        }
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    files.sort();
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(model_err(missing, "shard named by the index is missing"));
    }
    if paths.is_empty() {
        return Err(model_err(&index, "weight_map is empty"));
    }
    Ok(paths)
}

impl ModelDir {
    /// Checks `dir`: `config.json` of a supported family, `model.safetensors` (or shards with
    /// `model.safetensors.index.json`), `tokenizer.json`, and a `tokenizer_config.json` with a
    /// chat template and stop tokens the vocabulary holds (plus `generation_config.json` when
    /// present), so that nothing the mistral.rs loader would panic on reaches it.
    pub fn open(dir: &Path) -> Result<Self, ServeError> {
        let dir = dir
            .canonicalize()
            .map_err(|e| model_err(dir, format!("cannot resolve: {e}")))?;
        let config = LlamaConfig::from_path(&dir).map_err(|e| model_err(&dir, e.to_string()))?;
        let weights = weight_files(&dir)?;
        let tok_path = dir.join(TOKENIZER_FILE);
        let tokenizer = Arc::new(
            tokenizers::Tokenizer::from_file(&tok_path)
                .map_err(|e| model_err(&tok_path, format!("cannot parse: {e}")))?,
        );
        let chat_format = ChatFormat::from_dir(&dir, tokenizer.clone())
            .map_err(|e| model_err(&dir, e.to_string()))?;
        if (tokenizer.get_vocab_size(true)) > config.vocab_size {
            return Err(model_err(
                &dir,
                format!(
                    "the tokenizer has {} ids but the model only {}",
                    tokenizer.get_vocab_size(true),
                    config.vocab_size
                ),
            ));
        }
        Ok(ModelDir {
            dir,
            config,
            weights,
            tokenizer,
            chat_format: Arc::new(chat_format),
        })
    }

    /// The directory (canonical).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The base model's config.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The model's family.
    pub fn family(&self) -> Family {
        self.config.family()
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<tokenizers::Tokenizer> {
        &self.tokenizer
    }

    /// The model's chat format: template, stop tokens, prompt ids as the engine computes them.
    pub fn chat_format(&self) -> &Arc<ChatFormat> {
        &self.chat_format
    }

    /// The ids that end generation, as mistral.rs computes them (`eos_token` first).
    pub fn stop_ids(&self) -> &[u32] {
        self.chat_format.stop_ids()
    }

    /// Checks a PEFT adapter directory against this base model (see
    /// [`leaf_adapters::validate`]).
    pub fn validate_adapter(
        &self,
        adapter_dir: &Path,
        limits: &Limits,
    ) -> Result<ValidationReport, ServeError> {
        let adapter = peft::LoraAdapter::load(adapter_dir).map_err(ServeError::Adapter)?;
        validate(&adapter, &self.config, limits).map_err(ServeError::Adapter)
    }
}

/// mistral.rs's loader for a family.
fn loader_type(family: Family) -> NormalLoaderType {
    match family {
        Family::Qwen2 => NormalLoaderType::Qwen2,
        Family::Mistral => NormalLoaderType::Mistral,
        Family::Phi3 => NormalLoaderType::Phi3,
        _ => NormalLoaderType::Llama,
    }
}

/// A loaded pipeline, ready for `add_model`.
pub type SharedPipeline = Arc<tokio::sync::Mutex<dyn Pipeline>>;

/// [`load_pipeline_on`] the CPU.
pub fn load_pipeline(
    model: &ModelDir,
    adapter_dir: Option<&Path>,
) -> Result<SharedPipeline, ServeError> {
    load_pipeline_on(model, adapter_dir, &Device::Cpu)
}

/// Loads the base model plus `adapter_dir` (a validated PEFT directory) onto `device` (every
/// layer there, in f32), on a brand-new thread with the thread-local LoRA list cleared before
/// and after. Blocks the calling thread; call it from `spawn_blocking` (or use
/// [`load_pipeline_async`]). `device` comes from
/// [`ComputeDevice::open`](crate::device::ComputeDevice::open).
pub fn load_pipeline_on(
    model: &ModelDir,
    adapter_dir: Option<&Path>,
    device: &Device,
) -> Result<SharedPipeline, ServeError> {
    let model = model.clone();
    let adapter_dir = adapter_dir.map(Path::to_path_buf);
    let device = device.clone();
    let handle = std::thread::Builder::new()
        .name("leaf-load".into())
        .spawn(move || {
            mistralrs_quant::clear_applied_loras();
            let result = load_on_this_thread(&model, adapter_dir.as_deref(), &device);
            mistralrs_quant::clear_applied_loras();
            result
        })
        .map_err(|e| ServeError::Load(format!("cannot spawn the loader thread: {e}")))?;
    match handle.join() {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(ServeError::Load(format!("the loader panicked: {msg}")))
        }
    }
}

/// [`load_pipeline_on`] from async code (runs on the blocking pool, which only waits for the
/// fresh loader thread).
pub async fn load_pipeline_async(
    model: &ModelDir,
    adapter_dir: Option<&Path>,
    device: &Device,
) -> Result<SharedPipeline, ServeError> {
    let model = model.clone();
    let adapter_dir = adapter_dir.map(Path::to_path_buf);
    let device = device.clone();
    tokio::task::spawn_blocking(move || load_pipeline_on(&model, adapter_dir.as_deref(), &device))
        .await
        .map_err(|e| ServeError::Load(format!("the loader task failed: {e}")))?
}

fn load_on_this_thread(
    model: &ModelDir,
    adapter_dir: Option<&Path>,
    device: &Device,
) -> Result<SharedPipeline, ServeError> {
    let dir = model.dir();
    let load_err = |e: anyhow::Error| ServeError::Load(format!("{}: {e:#}", dir.display()));
    let mut builder = NormalLoaderBuilder::new(
        NormalSpecificConfig::default(),
        None,
        None,
        Some(dir.to_string_lossy().into_owned()),
        false,
        None,
    );
    let adapter_paths = match adapter_dir {
        None => AdapterPaths::None,
        Some(a) => {
            let cfg_path = a.join(peft::CONFIG_FILE);
            let text = std::fs::read_to_string(&cfg_path)
                .map_err(|e| ServeError::Load(format!("{}: {e}", cfg_path.display())))?;
            let lora_config: mistralrs_quant::LoraConfig = serde_json::from_str(&text)
                .map_err(|e| ServeError::Load(format!("{}: {e}", cfg_path.display())))?;
            builder = builder.with_lora(vec![a.to_string_lossy().into_owned()]);
            AdapterPaths::Lora(vec![LoraAdapterPaths {
                lora_config,
                adapter_path: a.join(peft::WEIGHTS_FILE),
            }])
        }
    };
    let loader = builder
        .build(Some(loader_type(model.family())))
        .map_err(load_err)?;
    let paths: Box<dyn ModelPaths> = Box::new(LocalModelPaths {
        tokenizer_filename: dir.join(TOKENIZER_FILE),
        config_filename: dir.join("config.json"),
        template_filename: Some(dir.join(TOKENIZER_CONFIG_FILE)),
        filenames: model.weights.clone(),
        adapter_paths,
        gen_conf: Some(dir.join(GENERATION_CONFIG_FILE)).filter(|p| p.is_file()),
        preprocessor_config: None,
        processor_config: None,
        chat_template_json_filename: None,
    });
    let pipeline = loader
        .load_model_from_path(
            &paths,
            &ModelDType::F32,
            device,
            true,
            // No layer map: every layer on `device`.
            DeviceMapSetting::dummy(),
            None,
            None,
        )
        .map_err(load_err)?;
    Ok(pipeline)
}
