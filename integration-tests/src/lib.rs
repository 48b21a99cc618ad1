//! Shared helpers of the end-to-end tests: a tiny Llama speech LM written to a temporary
//! directory (no download), random PEFT adapters for it, and a server on top.
//!
//! The model is the trainable decoder of `leaf-adapters` initialised at random (2 layers,
//! d = 64, GQA 4/2 heads) with the speech tokenizer of `leaf-plugin` (byte-level BPE without
//! merges, chat tokens and 16 unit tokens). The LM head is scaled up so the next-token
//! distributions are peaked rather than near uniform, which makes log-prob comparisons
//! discriminating.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use leaf_adapters::model::{checkpoint, LlamaModel, ModelOptions, Trainable};
use leaf_adapters::peft::{LoraAdapter, PeftConfig};
use leaf_adapters::store::{AdapterStore, VersionId};
use leaf_adapters::LlamaConfig;
use leaf_plugin::harvest::{RewardSource, SealedGroup};
use leaf_plugin::serving::{LeafServer, ServerConfig};
use leaf_plugin::speech::SpeechTokenizer;

/// The file name of SmolLM2-135M-Instruct's GGUF in the cache of `scripts/fetch-smollm2.sh`.
pub const SMOLLM2_GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where `scripts/fetch-smollm2.sh` keeps its files: `$LEAF_SMOLLM2_CACHE`, else
/// `~/.cache/leaf/smollm2`.
pub fn smollm2_cache_dir() -> Result<PathBuf> {
    Ok(match std::env::var_os("LEAF_SMOLLM2_CACHE") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".cache/leaf/smollm2"),
    })
}

/// The SmolLM2 GGUF file when it is already on this machine (`$LEAF_SMOLLM2_GGUF`, else the
/// script's cache), without fetching anything; otherwise why not.
pub fn smollm2_gguf_present() -> std::result::Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("LEAF_SMOLLM2_GGUF") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("LEAF_SMOLLM2_GGUF={} is not a file", p.display()))
        };
    }
    let file = smollm2_cache_dir()
        .map_err(|e| e.to_string())?
        .join(SMOLLM2_GGUF_NAME);
    if file.is_file() {
        Ok(file)
    } else {
        Err(format!(
            "{} is missing (fetch it with scripts/fetch-smollm2.sh, or set LEAF_SMOLLM2_GGUF)",
            file.display()
        ))
    }
}

/// Factor applied to the random LM head (peaked next-token distributions).
pub const HEAD_SCALE: f64 = 60.0;
/// LoRA rank of the test adapters.
pub const RANK: usize = 4;
/// LoRA alpha of the test adapters.
pub const ALPHA: f64 = 8.0;

/// A tiny model directory that lives as long as this value.
pub struct TinyModel {
    /// Holds the temporary directory.
    pub tmp: tempfile::TempDir,
    /// The model directory.
    pub dir: PathBuf,
    /// Its tokenizer.
    pub tokenizer: SpeechTokenizer,
    /// Its config.
    pub config: LlamaConfig,
}

/// Writes the tiny model (deterministic in `seed`): d = 64, inner 128.
pub fn tiny_model(seed: u64) -> Result<TinyModel> {
    tiny_model_sized(seed, 64, 128)
}

/// Writes a 2-layer model of width `hidden` and MLP width `intermediate`.
pub fn tiny_model_sized(seed: u64, hidden: usize, intermediate: usize) -> Result<TinyModel> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("model");
    std::fs::create_dir_all(&dir)?;
    let tokenizer = SpeechTokenizer::build(&[], 16)?;
    tokenizer.save(&dir)?;
    let ids = *tokenizer.ids();
    let config = LlamaConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        hidden_act: "silu".into(),
        hidden_size: hidden,
        intermediate_size: intermediate,
        vocab_size: tokenizer.vocab_size(),
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
        bos_token_id: Some(ids.bos),
        eos_token_id: Some(ids.eos),
        rope_scaling: None,
        model_type: "llama".into(),
        torch_dtype: "float32".into(),
        ..LlamaConfig::default()
    };
    let model = LlamaModel::random(
        &config,
        seed,
        &ModelOptions {
            trainable: Trainable::Nothing,
            ..ModelOptions::default()
        },
    )?;
    let tensors = model
        .base_tensors()
        .into_iter()
        .map(|(n, t)| {
            if n == "lm_head.weight" {
                Ok((n, (t * HEAD_SCALE)?))
            } else {
                Ok((n, t))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    checkpoint::save_dir(&dir, &config, tensors)?;
    Ok(TinyModel {
        tmp,
        dir,
        tokenizer,
        config,
    })
}

/// A small deterministic generator (the tests need no RNG crate).
fn lcg(state: &mut u64) -> f32 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Bytes of the model's weights (f32).
pub fn weight_bytes(config: &LlamaConfig) -> usize {
    let per_layer: usize = leaf_adapters::config::ALL_TARGETS
        .iter()
        .filter_map(|m| config.module_shape(m))
        .map(|(o, i)| o * i)
        .sum();
    4 * (2 * config.vocab_size * config.hidden_size + config.num_hidden_layers * per_layer)
}

/// A rank-4 adapter on every projection with random `A` and `B` (deterministic in `seed`,
/// entries of `B` in [-scale, scale]).
pub fn random_adapter(config: &LlamaConfig, seed: u64, scale: f32) -> Result<LoraAdapter> {
    let targets = leaf_adapters::config::ALL_TARGETS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut adapter =
        LoraAdapter::init(PeftConfig::new(RANK, ALPHA, targets, "tiny"), config, seed)?;
    let mut state = seed ^ 0x5DEECE66D;
    let names: Vec<String> = adapter.tensors.keys().cloned().collect();
    for name in names {
        if name.contains("lora_B") {
            let t = &adapter.tensors[&name];
            let n = t.elem_count();
            let values: Vec<f32> = (0..n).map(|_| lcg(&mut state) * scale).collect();
            let b = Tensor::from_vec(values, t.dims(), &Device::Cpu)?;
            adapter.tensors.insert(name, b);
        }
    }
    Ok(adapter)
}

/// A store in `m`'s temporary directory (`store/`) holding one [`random_adapter`] per seed
/// (entries of `B` in [-scale, scale]), and a server config that serves from it. With `promote`
/// the first version is the store's current one, which the server then starts on.
pub fn store_with_adapters(
    m: &TinyModel,
    seeds: &[u64],
    scale: f32,
    promote: bool,
) -> Result<(AdapterStore, Vec<VersionId>, ServerConfig)> {
    let store_dir = m.tmp.path().join("store");
    let store = AdapterStore::open(&store_dir)?;
    let ids = seeds
        .iter()
        .map(|&seed| {
            Ok(store.publish(&random_adapter(&m.config, seed, scale)?, Default::default())?)
        })
        .collect::<Result<Vec<_>>>()?;
    if let (true, Some(first)) = (promote, ids.first()) {
        store.promote(first)?;
    }
    let mut cfg = ServerConfig::new(&m.dir);
    cfg.store_dir = Some(store_dir);
    Ok((store, ids, cfg))
}

/// The trainable model with `adapter` loaded (LoRA options matching [`random_adapter`]).
pub fn trainer_model(dir: &Path, adapter: Option<&LoraAdapter>) -> Result<LlamaModel> {
    let lora = leaf_adapters::model::LoraOptions {
        rank: RANK,
        alpha: ALPHA,
        dropout: 0.0,
        ..Default::default()
    };
    let mut model = LlamaModel::load(
        dir,
        &ModelOptions {
            dtype: DType::F32,
            trainable: Trainable::Lora(lora),
            ..ModelOptions::default()
        },
    )?;
    if let Some(a) = adapter {
        model.load_adapter(a)?;
    }
    Ok(model)
}

/// Starts a server on `config` with `reward`.
pub async fn start(
    config: ServerConfig,
    reward: Arc<dyn RewardSource>,
) -> Result<(Arc<LeafServer>, crossbeam_channel::Receiver<SealedGroup>)> {
    LeafServer::start(config, reward)
        .await
        .context("starting the server")
}

/// Waits (on a blocking thread) for the next sealed group, up to `secs` seconds.
pub async fn next_group(
    rx: &crossbeam_channel::Receiver<SealedGroup>,
    secs: u64,
) -> Option<SealedGroup> {
    let rx = rx.clone();
    tokio::task::spawn_blocking(move || rx.recv_timeout(std::time::Duration::from_secs(secs)).ok())
        .await
        .ok()
        .flatten()
}

/// A one-message user request sampled at temperature 1, top-p 1 with a fixed seed.
pub fn ask(text: &str, max_tokens: usize, seed: u64) -> leaf_plugin::serving::ChatRequest {
    leaf_plugin::serving::ChatRequest {
        messages: vec![leaf_plugin::serving::Message::text("user", text)],
        max_tokens: Some(max_tokens),
        temperature: Some(1.0),
        top_p: Some(1.0),
        seed: Some(seed),
        ..Default::default()
    }
}

/// The small LoRA update the tests train with: rank 4, alpha 8, no dropout, at
/// `learning_rate` over a schedule of `total_steps`.
pub fn small_lora_train(learning_rate: f64, total_steps: u64) -> leaf_plugin::trainer::TrainConfig {
    leaf_plugin::trainer::TrainConfig {
        learning_rate,
        total_steps,
        lora: leaf_adapters::model::LoraOptions {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            ..leaf_adapters::model::LoraOptions::default()
        },
        ..leaf_plugin::trainer::TrainConfig::default()
    }
}

/// Rewards the share of even ids in the completion: varies within a group, so the advantages
/// (and the update) are not zero.
#[derive(Debug, Clone, Copy, Default)]
pub struct EvenIds;

#[async_trait::async_trait]
impl RewardSource for EvenIds {
    fn name(&self) -> &str {
        "even-ids"
    }

    async fn score(&self, ctx: leaf_plugin::harvest::RewardContext<'_>) -> Option<f64> {
        let n = ctx.completion_ids.len().max(1) as f64;
        Some(ctx.completion_ids.iter().filter(|&&t| t % 2 == 0).count() as f64 / n)
    }
}

/// Resident set size of this process in bytes, from `/proc/self/status` (`VmRSS`; Linux,
/// `None` elsewhere).
pub fn rss_bytes() -> Option<u64> {
    let kib: u64 = proc_status_field("VmRSS:")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Number of threads of this process, from `/proc/self/status` (Linux; `None` elsewhere).
pub fn thread_count() -> Option<u64> {
    proc_status_field("Threads:")?.trim().parse().ok()
}

fn proc_status_field(name: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::to_string)
}

/// The parts of a plain mistral.rs request that the bare-engine tests and benches vary.
pub struct BareRequest {
    /// The prompt (chat messages, text or token ids).
    pub messages: mistralrs_core::RequestMessage,
    /// mistral.rs's own sampling settings.
    pub params: mistralrs_core::SamplingParams,
    /// Logits processors (a tap or an observer), if any.
    pub processors: Option<Vec<Arc<dyn mistralrs_core::CustomLogitsProcessor>>>,
    /// Whether mistral.rs should return its (log10) log-probs.
    pub return_logprobs: bool,
    /// The engine to send it to (`None`: the default engine).
    pub model_id: Option<String>,
}

impl BareRequest {
    /// The request: not streamed, no tools, no constraint, no suffix, answering on `response`.
    pub fn build(
        self,
        id: usize,
        response: tokio::sync::mpsc::Sender<mistralrs_core::Response>,
    ) -> mistralrs_core::NormalRequest {
        mistralrs_core::NormalRequest {
            messages: self.messages,
            sampling_params: self.params,
            response,
            return_logprobs: self.return_logprobs,
            is_streaming: false,
            id,
            constraint: mistralrs_core::Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: self.processors,
            return_raw_logits: false,
            web_search_options: None,
            model_id: self.model_id,
            truncate_sequence: false,
        }
    }
}
