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
use leaf_adapters::{peft, LlamaConfig};
use mistralrs_core::{
    AdapterPaths, DeviceMapSetting, LocalModelPaths, LoraAdapterPaths, ModelDType, ModelPaths,
    NormalLoaderBuilder, NormalLoaderType, NormalSpecificConfig, Pipeline,
};

use super::ServeError;
use crate::speech::tokenizer::{validate_tokenizer_config, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};

/// A validated Hugging Face Llama model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    dir: PathBuf,
    config: LlamaConfig,
    tokenizer: Arc<tokenizers::Tokenizer>,
    stop_ids: Vec<u32>,
}

fn model_err(path: &Path, reason: impl Into<String>) -> ServeError {
    ServeError::Model {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl ModelDir {
    /// Checks `dir`: `config.json` (a supported Llama config), `model.safetensors`,
    /// `tokenizer.json` and a `tokenizer_config.json` whose bos/eos tokens are in the vocabulary
    /// and whose chat template uses `<|im_end|>`.
    pub fn open(dir: &Path) -> Result<Self, ServeError> {
        let dir = dir
            .canonicalize()
            .map_err(|e| model_err(dir, format!("cannot resolve: {e}")))?;
        let config = LlamaConfig::from_path(&dir).map_err(|e| model_err(&dir, e.to_string()))?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(model_err(&dir, "model.safetensors is missing"));
        }
        let tok_path = dir.join(TOKENIZER_FILE);
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| model_err(&tok_path, format!("cannot parse: {e}")))?;
        let cfg_path = dir.join(TOKENIZER_CONFIG_FILE);
        let cfg_text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| model_err(&cfg_path, format!("cannot read: {e}")))?;
        validate_tokenizer_config(&cfg_text, &tokenizer)
            .map_err(|e| model_err(&cfg_path, e.to_string()))?;
        let doc: serde_json::Value =
            serde_json::from_str(&cfg_text).map_err(|e| model_err(&cfg_path, e.to_string()))?;
        let token_of = |key: &str| -> Option<String> {
            match doc.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let mut stop_ids = Vec::new();
        for tok in [token_of("eos_token"), Some("<|im_end|>".to_string())]
            .into_iter()
            .flatten()
        {
            if let Some(id) = tokenizer.token_to_id(&tok) {
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
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
            tokenizer: Arc::new(tokenizer),
            stop_ids,
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

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<tokenizers::Tokenizer> {
        &self.tokenizer
    }

    /// The ids that end generation (`eos_token`, then `<|im_end|>` when present).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
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

/// A loaded pipeline, ready for `add_model`.
pub type SharedPipeline = Arc<tokio::sync::Mutex<dyn Pipeline>>;

/// Loads the base model plus `adapter_dir` (a validated PEFT directory) on a brand-new thread
/// with the thread-local LoRA list cleared before and after. Blocks the calling thread; call it
/// from `spawn_blocking` (or use [`load_pipeline_async`]).
pub fn load_pipeline(
    model: &ModelDir,
    adapter_dir: Option<&Path>,
) -> Result<SharedPipeline, ServeError> {
    let model = model.clone();
    let adapter_dir = adapter_dir.map(Path::to_path_buf);
    let handle = std::thread::Builder::new()
        .name("leaf-load".into())
        .spawn(move || {
            mistralrs_quant::clear_applied_loras();
            let result = load_on_this_thread(&model, adapter_dir.as_deref());
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

/// [`load_pipeline`] from async code (runs on the blocking pool, which only waits for the
/// fresh loader thread).
pub async fn load_pipeline_async(
    model: &ModelDir,
    adapter_dir: Option<&Path>,
) -> Result<SharedPipeline, ServeError> {
    let model = model.clone();
    let adapter_dir = adapter_dir.map(Path::to_path_buf);
    tokio::task::spawn_blocking(move || load_pipeline(&model, adapter_dir.as_deref()))
        .await
        .map_err(|e| ServeError::Load(format!("the loader task failed: {e}")))?
}

fn load_on_this_thread(
    model: &ModelDir,
    adapter_dir: Option<&Path>,
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
        .build(Some(NormalLoaderType::Llama))
        .map_err(load_err)?;
    let paths: Box<dyn ModelPaths> = Box::new(LocalModelPaths {
        tokenizer_filename: dir.join(TOKENIZER_FILE),
        config_filename: dir.join("config.json"),
        template_filename: Some(dir.join(TOKENIZER_CONFIG_FILE)),
        filenames: vec![dir.join("model.safetensors")],
        adapter_paths,
        gen_conf: None,
        preprocessor_config: None,
        processor_config: None,
        chat_template_json_filename: None,
    });
    let pipeline = loader
        .load_model_from_path(
            &paths,
            &ModelDType::F32,
            &Device::Cpu,
            true,
            DeviceMapSetting::dummy(),
            None,
            None,
        )
        .map_err(load_err)?;
    Ok(pipeline)
}
