//! [`LeafServer`]: requests in, harvested samples out, versions swapped underneath.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use either::Either;
use indexmap::IndexMap;
use leaf_adapters::store::AdapterStore;
use leaf_adapters::validate::Limits;
use mistralrs_core::{
    AddModelConfig, ChatCompletionResponse, Constraint, DefaultSchedulerMethod, EngineConfig,
    MessageContent, MistralRs, MistralRsBuilder, NormalRequest, Request, RequestMessage, Response,
    SamplingParams, SchedulerConfig, TopLogprob,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::limits::RequestLimits;
use super::model::{load_pipeline_async, ModelDir, SharedPipeline};
use super::ServeError;
use crate::harvest::groups::Membership;
use crate::harvest::reward::RewardRange;
use crate::harvest::tap::now_unix_ms;
use crate::harvest::{
    prompt_key, AssemblerConfig, GroupAssembler, HarvestedSample, RewardContext, RewardSource,
    SampleOrigin, SamplingTap, SealedGroup, TapConfig, TapRecord,
};
use crate::speech::UnitEncoder;

/// The version label of the base model (no adapter).
pub const BASE_VERSION: &str = "base";

/// Sampling used when a request does not say (the spec's: temperature 1, top-p 0.9, 200 new
/// tokens).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingDefaults {
    /// Temperature.
    pub temperature: f64,
    /// Nucleus mass.
    pub top_p: f64,
    /// Most new tokens.
    pub max_tokens: usize,
}

impl Default for SamplingDefaults {
    fn default() -> Self {
        SamplingDefaults {
            temperature: 1.0,
            top_p: 0.9,
            max_tokens: 200,
        }
    }
}

/// The group policy: extra samples of live prompts, drawn in the background.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupPolicy {
    /// Fraction of client requests (in [0, 1]) for which K - 1 extra samples are drawn after
    /// the client's answer was sent. Default 0.
    pub fork_fraction: f64,
    /// Most extra samples generating at once, and most groups waiting for their extra samples
    /// (a client request whose group would exceed it is not forked; counted in
    /// `leaf_forks_skipped_total{reason="budget"}`). Default 2.
    pub background_concurrency: usize,
    /// Forks are skipped (and counted) while more client requests than this are in flight,
    /// so they only use spare capacity. Default 8.
    pub max_foreground_inflight: usize,
    /// Seed of the fork decisions and of the taps' seeds.
    pub seed: u64,
}

impl Default for GroupPolicy {
    fn default() -> Self {
        GroupPolicy {
            fork_fraction: 0.0,
            background_concurrency: 2,
            max_foreground_inflight: 8,
            seed: 0,
        }
    }
}

/// Everything [`LeafServer::start`] needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The base model directory.
    pub model_dir: PathBuf,
    /// The versioned adapter store; its current version is served at start.
    #[serde(default)]
    pub store_dir: Option<PathBuf>,
    /// A unit codebook (for audio prompts), as written by the speech front-end.
    #[serde(default)]
    pub unit_codebook: Option<PathBuf>,
    /// Most sequences the scheduler batches. Default 16.
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// Default sampling.
    #[serde(default)]
    pub sampling: SamplingDefaults,
    /// Group assembly.
    #[serde(default)]
    pub assembler: AssemblerConfig,
    /// Extra samples of live prompts.
    #[serde(default)]
    pub group_policy: GroupPolicy,
    /// Longest wait for a retired engine's in-flight requests, in seconds. Default 600.
    #[serde(default = "default_drain")]
    pub drain_timeout_s: f64,
    /// Most swaps in one process (each leaks one idle engine thread). Default 4096.
    #[serde(default = "default_max_swaps")]
    pub max_swaps: u64,
    /// Adapter size limits.
    #[serde(default)]
    pub limits: Limits,
    /// The rewards [`LeafServer::feedback`] accepts. Default [0, 1].
    #[serde(default)]
    pub feedback_reward_range: RewardRange,
    /// Caps the HTTP layer applies to chat requests (see [`super::limits`]).
    #[serde(default)]
    pub request_limits: RequestLimits,
}

fn default_batch() -> usize {
    16
}
fn default_drain() -> f64 {
    600.0
}
fn default_max_swaps() -> u64 {
    4096
}

impl ServerConfig {
    /// A configuration with every default for the model in `model_dir`.
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            model_dir: model_dir.into(),
            store_dir: None,
            unit_codebook: None,
            max_batch: default_batch(),
            sampling: SamplingDefaults::default(),
            assembler: AssemblerConfig::default(),
            group_policy: GroupPolicy::default(),
            drain_timeout_s: default_drain(),
            max_swaps: default_max_swaps(),
            limits: Limits::default(),
            feedback_reward_range: RewardRange::default(),
            request_limits: RequestLimits::default(),
        }
    }

    fn check(&self) -> Result<(), ServeError> {
        let bad = |m: String| Err(ServeError::Config(m));
        if self.max_batch == 0 {
            return bad("max_batch must be positive".into());
        }
        check_sampling(self.sampling.temperature, self.sampling.top_p)?;
        if self.sampling.max_tokens == 0 {
            return bad("sampling.max_tokens must be positive".into());
        }
        let p = &self.group_policy;
        if !(0.0..=1.0).contains(&p.fork_fraction) {
            return bad(format!(
                "group_policy.fork_fraction {} must be in [0, 1]",
                p.fork_fraction
            ));
        }
        if p.background_concurrency == 0 {
            return bad("group_policy.background_concurrency must be positive".into());
        }
        if !(self.drain_timeout_s.is_finite() && self.drain_timeout_s >= 0.0) {
            return bad(format!(
                "drain_timeout_s {} is invalid",
                self.drain_timeout_s
            ));
        }
        self.assembler.check()?;
        self.feedback_reward_range
            .check()
            .map_err(ServeError::Config)?;
        self.request_limits.check().map_err(ServeError::Config)?;
        if self.sampling.max_tokens > self.request_limits.max_tokens {
            return bad(format!(
                "sampling.max_tokens {} is above request_limits.max_tokens {}",
                self.sampling.max_tokens, self.request_limits.max_tokens
            ));
        }
        Ok(())
    }
}

fn check_sampling(temperature: f64, top_p: f64) -> Result<(), ServeError> {
    if !(temperature.is_finite() && (0.0..=100.0).contains(&temperature)) {
        return Err(ServeError::Request(format!(
            "temperature {temperature} must be in [0, 100]"
        )));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ServeError::Request(format!(
            "top_p {top_p} must be in (0, 1]"
        )));
    }
    Ok(())
}

/// One part of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Text.
    Text(String),
    /// Audio already turned into unit ids.
    Units(Vec<u32>),
    /// Audio as a WAV file; the front-end turns it into units (needs
    /// [`ServerConfig::unit_codebook`]).
    Wav(Vec<u8>),
}

/// One chat message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The parts, in order.
    pub content: Vec<Part>,
}

impl Message {
    /// A message with one text part.
    pub fn text(role: &str, text: &str) -> Self {
        Message {
            role: role.into(),
            content: vec![Part::Text(text.into())],
        }
    }
}

/// A chat request. `None` fields take the server's [`SamplingDefaults`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Most new tokens.
    pub max_tokens: Option<usize>,
    /// Temperature.
    pub temperature: Option<f64>,
    /// Nucleus mass.
    pub top_p: Option<f64>,
    /// Return the log-prob of each token (natural logs).
    pub logprobs: bool,
    /// Alternatives per position with `logprobs` (at most 20).
    pub top_logprobs: usize,
    /// Seed of the tap's RNG (random when `None`).
    pub seed: Option<u64>,
    /// A reference answer, for the reward.
    pub reference: Option<String>,
    /// A task name, kept with the sample.
    pub task: Option<String>,
}

/// The answer to a chat request.
#[derive(Debug, Clone)]
pub struct ChatReply {
    /// The request id (what feedback refers to); also the response's `id`.
    pub request_id: String,
    /// The adapter version that produced the answer.
    pub adapter_version: String,
    /// The engine that served it.
    pub engine_id: String,
    /// The OpenAI-style response; log-probs, when asked for, are natural logs of the
    /// distribution each token was drawn from.
    pub response: ChatCompletionResponse,
    /// The exact generated ids (special tokens included).
    pub completion_ids: Vec<u32>,
    /// Natural-log probability of each generated id under the distribution it was drawn
    /// from (temperature and top-p renormalised), in `f64`.
    pub logprobs: Vec<f64>,
    /// The prompt ids the model saw.
    pub prompt_ids: Vec<u32>,
}

/// What a swap did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SwapReport {
    /// The version served before.
    pub from_version: String,
    /// The version served now.
    pub to_version: String,
    /// The new engine's id.
    pub engine_id: String,
    /// Loading the pipeline, ms.
    pub load_ms: f64,
    /// Adding the engine, probing it and making it the default, ms.
    pub activate_ms: f64,
    /// Requests in flight on the old engine when the new one became the default.
    pub drained_requests: usize,
    /// Waiting for the old engine's in-flight requests, ms.
    pub drain_ms: f64,
    /// Removing the old engine and trimming the heap, ms.
    pub remove_ms: f64,
}

/// A snapshot of the server's counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerStatus {
    /// The version being served.
    pub current_version: String,
    /// The version served before the last swap.
    pub previous_version: Option<String>,
    /// The engine of the current version.
    pub engine_id: String,
    /// Requests accepted (client and fork).
    pub requests: u64,
    /// Requests that ended in an error.
    pub requests_failed: u64,
    /// Requests cancelled by their client.
    pub requests_cancelled: u64,
    /// Requests in flight.
    pub inflight: usize,
    /// Samples harvested into groups.
    pub rollouts_harvested: u64,
    /// Samples not harvested (cancelled, or the tap's record did not match the response).
    pub rollouts_skipped: u64,
    /// Groups sealed.
    pub groups_sealed: u64,
    /// Groups sealed partial.
    pub groups_sealed_partial: u64,
    /// Groups dropped (too small, queue full, capacity).
    pub groups_dropped: u64,
    /// Client requests whose group policy fired.
    pub forks_fired: u64,
    /// Client requests eligible for the group policy.
    pub fork_candidates: u64,
    /// Extra samples harvested.
    pub forks_usable: u64,
    /// Extra samples that failed or were skipped.
    pub forks_failed: u64,
    /// Client requests whose group policy did not fire because the background budget was
    /// spent (`background_concurrency` groups already waiting for their extra samples).
    #[serde(default)]
    pub forks_skipped_budget: u64,
    /// Groups open.
    pub open_groups: usize,
    /// Sealed groups waiting for the trainer.
    pub sealed_queue_depth: usize,
    /// Trainer updates done (reported by the online trainer).
    pub updates_done: u64,
    /// Swaps done.
    pub swaps: u64,
    /// Idle engine-logger threads leaked by mistral.rs (one per engine ever created).
    pub leaked_threads: u64,
}

#[derive(Debug)]
struct Slot {
    engine_id: String,
    version: String,
    inflight: Arc<AtomicUsize>,
}

/// Decrements an engine's in-flight count when dropped.
struct InflightGuard(Arc<AtomicUsize>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Cancels a tap when the client's future is dropped before the answer arrived.
struct CancelOnDrop {
    tap: Arc<SamplingTap>,
    done: bool,
    cancelled: Arc<AtomicU64>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.done {
            self.tap.cancel();
            self.cancelled.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("leaf_requests_cancelled_total").increment(1);
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    failed: AtomicU64,
    cancelled: Arc<AtomicU64>,
    skipped: AtomicU64,
    fork_candidates: AtomicU64,
    forks_fired: AtomicU64,
    forks_usable: AtomicU64,
    forks_failed: AtomicU64,
    forks_skipped_budget: AtomicU64,
    updates: AtomicU64,
    swaps: AtomicU64,
    engines_created: AtomicU64,
}

/// What happens with a finished request's sample.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// A client request: coalesce, or reserve a fork group.
    User,
    /// An extra sample of reserved group `.0`.
    Fork(u64),
    /// Not harvested (probes).
    None,
}

/// What the drain task hands back.
struct Finished {
    response: Response,
    record: Option<TapRecord>,
}

/// The plugin: the one door requests go through (see the module docs of [`crate::serving`]).
pub struct LeafServer {
    mistral: Arc<MistralRs>,
    model: ModelDir,
    config: ServerConfig,
    store: Option<AdapterStore>,
    units: Option<Arc<UnitEncoder>>,
    current: RwLock<Arc<Slot>>,
    previous_version: Mutex<Option<String>>,
    swap_lock: tokio::sync::Mutex<()>,
    next_engine: AtomicU64,
    assembler: Arc<GroupAssembler>,
    reward: Arc<dyn RewardSource>,
    background: Arc<Semaphore>,
    /// Extra samples reserved and not yet finished (the group policy's budget).
    pending_forks: Arc<AtomicUsize>,
    foreground: Arc<AtomicUsize>,
    rng: Mutex<ChaCha8Rng>,
    counters: Counters,
    shutting_down: AtomicBool,
}

impl std::fmt::Debug for LeafServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafServer")
            .field("model", &self.model.dir())
            .field("current", &self.slot().version)
            .finish_non_exhaustive()
    }
}

fn scheduler(max_batch: usize) -> SchedulerConfig {
    SchedulerConfig::DefaultScheduler {
        method: DefaultSchedulerMethod::Fixed(
            std::num::NonZeroUsize::new(max_batch).unwrap_or(std::num::NonZeroUsize::MIN),
        ),
    }
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        no_prefix_cache: true,
        throughput_logging_enabled: false,
        ..EngineConfig::default()
    }
}

impl LeafServer {
    /// Validates the model, loads the store's current version (or the base model), starts
    /// the engine `policy@0` and the group sweeper. Returns the server and the queue of sealed
    /// groups (hand it to [`crate::online::OnlineTrainer`], or drain it yourself).
    pub async fn start(
        config: ServerConfig,
        reward: Arc<dyn RewardSource>,
    ) -> Result<(Arc<LeafServer>, crossbeam_channel::Receiver<SealedGroup>), ServeError> {
        config.check()?;
        let model = ModelDir::open(&config.model_dir)?;
        let store = match &config.store_dir {
            Some(dir) => Some(AdapterStore::open(dir).map_err(ServeError::Adapter)?),
            None => None,
        };
        let units = match &config.unit_codebook {
            Some(p) => Some(Arc::new(UnitEncoder::load(p)?)),
            None => None,
        };
        let (version, adapter_dir) = match store.as_ref().map(|s| s.current()).transpose() {
            Ok(Some(Some(id))) => {
                let s = store.as_ref().ok_or(ServeError::NoStore)?;
                let dir = s.path(&id).map_err(ServeError::Adapter)?;
                model.validate_adapter(&dir, &config.limits)?;
                (id.to_string(), Some(dir))
            }
            Ok(_) => (BASE_VERSION.to_string(), None),
            Err(e) => return Err(ServeError::Adapter(e)),
        };
        let pipeline = load_pipeline_async(&model, adapter_dir.as_deref()).await?;
        let engine_id = "policy@0".to_string();
        let mistral = MistralRsBuilder::new(pipeline, scheduler(config.max_batch), false, None)
            .with_model_id(engine_id.clone())
            .with_no_prefix_cache(true)
            .build()
            .await;
        let (assembler, rx) = GroupAssembler::new(config.assembler.clone())?;
        let server = Arc::new(LeafServer {
            mistral,
            model,
            store,
            units,
            current: RwLock::new(Arc::new(Slot {
                engine_id,
                version,
                inflight: Arc::new(AtomicUsize::new(0)),
            })),
            previous_version: Mutex::new(None),
            swap_lock: tokio::sync::Mutex::new(()),
            next_engine: AtomicU64::new(1),
            assembler: Arc::new(assembler),
            reward,
            background: Arc::new(Semaphore::new(config.group_policy.background_concurrency)),
            pending_forks: Arc::new(AtomicUsize::new(0)),
            foreground: Arc::new(AtomicUsize::new(0)),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(config.group_policy.seed)),
            counters: Counters {
                engines_created: AtomicU64::new(1),
                ..Counters::default()
            },
            shutting_down: AtomicBool::new(false),
            config,
        });
        let weak = Arc::downgrade(&server);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { break };
                if s.shutting_down.load(Ordering::SeqCst) {
                    break;
                }
                s.assembler.sweep();
            }
        });
        Ok((server, rx))
    }

    /// The underlying mistral.rs instance (read-only uses: listing models, metadata).
    /// Removing models through it bypasses the plugin's guarantees; use the plugin's methods.
    pub fn mistral(&self) -> &Arc<MistralRs> {
        &self.mistral
    }

    /// The validated model directory.
    pub fn model(&self) -> &ModelDir {
        &self.model
    }

    /// The group assembler.
    pub fn assembler(&self) -> &Arc<GroupAssembler> {
        &self.assembler
    }

    /// The adapter store, if configured.
    pub fn store(&self) -> Option<&AdapterStore> {
        self.store.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The version being served.
    pub fn current_version(&self) -> String {
        self.slot().version.clone()
    }

    fn slot(&self) -> Arc<Slot> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Takes a lease on the current engine: the in-flight count is raised under the read lock,
    /// so a swap that replaced the slot afterwards sees it.
    fn lease(&self) -> (Arc<Slot>, InflightGuard) {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        let slot = guard.clone();
        slot.inflight.fetch_add(1, Ordering::SeqCst);
        drop(guard);
        let inflight = InflightGuard(slot.inflight.clone());
        (slot, inflight)
    }

    /// Records that the online trainer finished an update (for the status).
    pub fn note_update(&self) {
        self.counters.updates.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("leaf_updates_total").increment(1);
    }

    /// Feedback for a served request: its reward. Unknown, sealed or expired ids are a typed
    /// error ([`crate::harvest::HarvestError::UnknownRequest`]); a reward outside
    /// [`ServerConfig::feedback_reward_range`] (or not finite) is a [`ServeError::Request`].
    pub fn feedback(&self, request_id: &str, reward: f64) -> Result<(), ServeError> {
        let reward = self
            .config
            .feedback_reward_range
            .accept(reward)
            .map_err(ServeError::Request)?;
        Ok(self.assembler.set_reward(request_id, reward)?)
    }

    fn to_engine_messages(
        &self,
        messages: &[Message],
    ) -> Result<Vec<IndexMap<String, MessageContent>>, ServeError> {
        if messages.is_empty() {
            return Err(ServeError::Request("messages is empty".into()));
        }
        let mut out = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                return Err(ServeError::Request(format!(
                    "messages[{i}].role {:?} is not system, user or assistant",
                    m.role
                )));
            }
            let content = match m.content.as_slice() {
                [Part::Text(t)] => Either::Left(t.clone()),
                parts => {
                    let mut list = Vec::with_capacity(parts.len());
                    for p in parts {
                        let mut part = IndexMap::new();
                        match p {
                            Part::Text(t) => {
                                part.insert("type".to_string(), "text".into());
                                part.insert("text".to_string(), t.clone().into());
                            }
                            Part::Units(u) => {
                                part.insert("type".to_string(), "audio".into());
                                part.insert("units".to_string(), serde_json::json!(u));
                            }
                            Part::Wav(wav) => {
                                let enc = self.units.as_ref().ok_or_else(|| {
                                    ServeError::Request(
                                        "audio input needs a unit codebook (unit_codebook)".into(),
                                    )
                                })?;
                                let units = enc.units_from_wav(wav)?;
                                part.insert("type".to_string(), "audio".into());
                                part.insert("units".to_string(), serde_json::json!(units));
                            }
                        }
                        list.push(part);
                    }
                    Either::Right(list)
                }
            };
            let mut msg = IndexMap::new();
            msg.insert("role".to_string(), Either::Left(m.role.clone()));
            msg.insert("content".to_string(), content);
            out.push(msg);
        }
        Ok(out)
    }

    /// Serves one chat request through the current version, harvesting its sample.
    ///
    /// Dropping the returned future (a client that went away) cancels the request through its
    /// tap; the response channel is drained by a task of its own either way.
    pub async fn chat(self: &Arc<Self>, mut req: ChatRequest) -> Result<ChatReply, ServeError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ServeError::ShuttingDown);
        }
        let temperature = req.temperature.unwrap_or(self.config.sampling.temperature);
        let top_p = req.top_p.unwrap_or(self.config.sampling.top_p);
        check_sampling(temperature, top_p)?;
        let max_tokens = req.max_tokens.unwrap_or(self.config.sampling.max_tokens);
        if max_tokens == 0 {
            return Err(ServeError::Request("max_tokens must be positive".into()));
        }
        if req.top_logprobs > 20 {
            return Err(ServeError::Request(format!(
                "top_logprobs {} must be at most 20",
                req.top_logprobs
            )));
        }
        let messages = self.wav_to_units(std::mem::take(&mut req.messages)).await?;
        let messages = self.to_engine_messages(&messages)?;
        let seed = req.seed.unwrap_or_else(|| self.next_seed());
        let top_n = if req.logprobs { req.top_logprobs } else { 0 };
        let meta = Meta {
            reference: req.reference.clone(),
            task: req.task.clone(),
            temperature,
            top_p,
            max_tokens,
        };
        self.foreground.fetch_add(1, Ordering::SeqCst);
        let fg = InflightGuard(self.foreground.clone());
        let (run, rx) = self
            .submit(
                RequestMessage::Chat {
                    messages,
                    enable_thinking: None,
                    reasoning_effort: None,
                },
                TapConfig {
                    temperature,
                    top_p,
                    top_logprobs: top_n,
                    stop_token: self.stop_token(),
                    seed,
                    forced: Vec::new(),
                },
                max_tokens,
                req.logprobs,
                None,
                Plan::User,
                meta,
            )
            .await?;
        let mut cancel = CancelOnDrop {
            tap: run.tap.clone(),
            done: false,
            cancelled: self.counters.cancelled.clone(),
        };
        let finished = rx
            .await
            .map_err(|_| ServeError::Aborted(run.request_id.clone()))?;
        cancel.done = true;
        drop(fg);
        let Finished { response, record } = finished;
        let mut resp = match response {
            Response::Done(r) => r,
            other => return Err(response_error(other, &run.request_id)),
        };
        let record = record.unwrap_or_default();
        resp.id = run.request_id.clone();
        if req.logprobs {
            self.rewrite_logprobs(&mut resp, &record);
        }
        Ok(ChatReply {
            request_id: run.request_id,
            adapter_version: run.version,
            engine_id: run.engine_id,
            response: resp,
            completion_ids: record.tokens,
            logprobs: record.logprobs,
            prompt_ids: record.prompt,
        })
    }

    /// Turns every WAV part into units on the blocking pool: decoding, resampling and log-mel
    /// take milliseconds to seconds of CPU and must not stall the async workers.
    async fn wav_to_units(&self, mut messages: Vec<Message>) -> Result<Vec<Message>, ServeError> {
        let has_wav = |m: &Vec<Message>| {
            m.iter()
                .any(|m| m.content.iter().any(|p| matches!(p, Part::Wav(_))))
        };
        if !has_wav(&messages) {
            return Ok(messages);
        }
        let enc = self.units.clone().ok_or_else(|| {
            ServeError::Request("audio input needs a unit codebook (unit_codebook)".into())
        })?;
        tokio::task::spawn_blocking(move || -> Result<Vec<Message>, ServeError> {
            for part in messages.iter_mut().flat_map(|m| m.content.iter_mut()) {
                if let Part::Wav(wav) = part {
                    *part = Part::Units(enc.units_from_wav(wav)?);
                }
            }
            Ok(messages)
        })
        .await
        .map_err(|e| ServeError::Engine(format!("audio front-end task failed: {e}")))?
    }

    fn stop_token(&self) -> u32 {
        self.model.stop_ids().first().copied().unwrap_or(0)
    }

    fn next_seed(&self) -> u64 {
        self.rng.lock().unwrap_or_else(|p| p.into_inner()).random()
    }

    /// Replaces the engine's log10 values (meaningless with a tap) by the tap's natural logs.
    fn rewrite_logprobs(&self, resp: &mut ChatCompletionResponse, record: &TapRecord) {
        let tok = self.model.tokenizer();
        for choice in &mut resp.choices {
            let Some(lp) = choice.logprobs.as_mut() else {
                continue;
            };
            let Some(content) = lp.content.as_mut() else {
                continue;
            };
            content.truncate(record.tokens.len());
            for (i, entry) in content.iter_mut().enumerate() {
                entry.logprob = record.logprobs[i] as f32;
                entry.top_logprobs = record
                    .top
                    .get(i)
                    .map(|alts| {
                        alts.iter()
                            .map(|&(token, logprob)| TopLogprob {
                                token,
                                logprob: logprob as f32,
                                bytes: tok.decode(&[token], false).ok(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
            }
        }
    }

    /// Sends one request with a fresh tap, pinned to the current engine (or `pin`), and spawns
    /// the task that owns its receiver.
    #[allow(clippy::too_many_arguments)]
    async fn submit(
        self: &Arc<Self>,
        message: RequestMessage,
        tap_config: TapConfig,
        max_tokens: usize,
        return_logprobs: bool,
        pin: Option<&str>,
        plan: Plan,
        meta: Meta,
    ) -> Result<(Run, oneshot::Receiver<Finished>), ServeError> {
        let tap = Arc::new(SamplingTap::new(tap_config).map_err(ServeError::Request)?);
        let (engine_id, version, inflight) = match pin {
            None => {
                let (s, g) = self.lease();
                (s.engine_id.clone(), s.version.clone(), g)
            }
            Some(id) => (
                id.to_string(),
                "probe".to_string(),
                InflightGuard(Arc::new(AtomicUsize::new(1))),
            ),
        };
        let request_id = format!("leaf-{}", uuid::Uuid::new_v4().simple());
        let (tx, rx) = mpsc::channel::<Response>(64);
        let mut params = SamplingParams::neutral();
        params.temperature = Some(0.0);
        params.max_len = Some(max_tokens);
        params.top_n_logprobs = tap.config().top_logprobs;
        let request = NormalRequest {
            messages: message,
            sampling_params: params,
            response: tx,
            return_logprobs,
            is_streaming: false,
            id: self.mistral.next_request_id(),
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: Some(vec![tap.clone()]),
            return_raw_logits: false,
            web_search_options: None,
            model_id: Some(engine_id.clone()),
            truncate_sequence: false,
        };
        let sender = self
            .mistral
            .get_sender(Some(&engine_id))
            .map_err(|e| ServeError::Engine(format!("{e}")))?;
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("leaf_requests_total").increment(1);
        if let Err(e) = sender.send(Request::Normal(Box::new(request))).await {
            // The engine never saw the request; its receiver may go.
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            return Err(ServeError::Engine(format!(
                "cannot send to {engine_id}: {e}"
            )));
        }
        let (done_tx, done_rx) = oneshot::channel();
        let run = Run {
            request_id: request_id.clone(),
            engine_id: engine_id.clone(),
            version: version.clone(),
            tap: tap.clone(),
        };
        let server = self.clone();
        let started = now_unix_ms();
        let drained = run.clone();
        tokio::spawn(async move {
            server
                .drain(rx, drained, inflight, done_tx, plan, meta, started)
                .await;
        });
        Ok((run, done_rx))
    }

    /// Owns a request's receiver: delivers the final response, harvests the sample, then keeps
    /// reading until the engine closes the channel (a run-on sequence must never find its
    /// receiver gone).
    #[allow(clippy::too_many_arguments)]
    async fn drain(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Response>,
        run: Run,
        inflight: InflightGuard,
        done: oneshot::Sender<Finished>,
        plan: Plan,
        meta: Meta,
        started: u64,
    ) {
        let t0 = Instant::now();
        let final_response = loop {
            match rx.recv().await {
                Some(Response::Chunk(_)) | Some(Response::CompletionChunk(_)) => continue,
                Some(r) => break Some(r),
                None => break None,
            }
        };
        // From here on any further call of this sequence forces the stop token.
        run.tap.cancel();
        drop(inflight);
        metrics::histogram!("leaf_request_seconds").record(t0.elapsed().as_secs_f64());
        let (completion_tokens, text, finish) = match &final_response {
            Some(Response::Done(r)) => (
                Some(r.usage.completion_tokens),
                r.choices
                    .first()
                    .and_then(|c| c.message.content.clone())
                    .unwrap_or_default(),
                r.choices
                    .first()
                    .map(|c| c.finish_reason.clone())
                    .unwrap_or_default(),
            ),
            Some(Response::CompletionDone(r)) => (
                Some(r.usage.completion_tokens),
                r.choices
                    .first()
                    .map(|c| c.text.clone())
                    .unwrap_or_default(),
                r.choices
                    .first()
                    .map(|c| c.finish_reason.clone())
                    .unwrap_or_default(),
            ),
            _ => (None, String::new(), String::new()),
        };
        let record = completion_tokens.map(|n| run.tap.take_record(n));
        let ok = record.is_some();
        if !ok {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("leaf_requests_failed_total").increment(1);
        }
        let client_gone = match final_response {
            Some(response) => done
                .send(Finished {
                    response,
                    record: record.clone(),
                })
                .is_err(),
            None => {
                drop(done);
                true
            }
        };
        // Harvest off the client's path.
        match (record, plan) {
            (Some(rec), Plan::User) | (Some(rec), Plan::Fork(_)) => {
                let n = completion_tokens.unwrap_or(0);
                let cancelled =
                    rec.forced_from.is_some() || (client_gone && matches!(plan, Plan::User));
                if cancelled || rec.tokens.len() != n || rec.prompt.is_empty() {
                    self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("leaf_rollouts_skipped_total").increment(1);
                    if let Plan::Fork(g) = plan {
                        self.counters.forks_failed.fetch_add(1, Ordering::Relaxed);
                        self.assembler.expect_fewer(g);
                    }
                } else {
                    self.harvest(rec, &run, plan, meta, text, finish, started)
                        .await;
                }
            }
            (None, Plan::Fork(g)) => {
                self.counters.forks_failed.fetch_add(1, Ordering::Relaxed);
                self.assembler.expect_fewer(g);
            }
            _ => {}
        }
        // Keep the receiver alive until the engine drops the sequence.
        let _ = tokio::time::timeout(Duration::from_secs(120), async {
            while rx.recv().await.is_some() {}
        })
        .await;
    }

    #[allow(clippy::too_many_arguments)]
    async fn harvest(
        self: &Arc<Self>,
        rec: TapRecord,
        run: &Run,
        plan: Plan,
        meta: Meta,
        text: String,
        finish: String,
        started: u64,
    ) {
        let reward = self
            .reward
            .score(RewardContext {
                request_id: &run.request_id,
                text: &text,
                reference: meta.reference.as_deref(),
                task: meta.task.as_deref(),
                completion_ids: &rec.tokens,
            })
            .await;
        let sample = HarvestedSample {
            request_id: run.request_id.clone(),
            prompt_key: prompt_key(&rec.prompt),
            prompt_ids: rec.prompt,
            completion_ids: rec.tokens,
            logprobs: rec.logprobs,
            adapter_version: run.version.clone(),
            engine_id: run.engine_id.clone(),
            origin: if matches!(plan, Plan::Fork(_)) {
                SampleOrigin::Fork
            } else {
                SampleOrigin::User
            },
            finish_reason: finish,
            started_unix_ms: started,
            finished_unix_ms: now_unix_ms(),
            text: Some(text),
            reference: meta.reference.clone(),
            task: meta.task.clone(),
        };
        match plan {
            Plan::Fork(g) => {
                if self
                    .assembler
                    .submit(sample, reward, Membership::Reserved(g))
                    .is_some()
                {
                    self.counters.forks_usable.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("leaf_forks_usable_total").increment(1);
                }
            }
            Plan::User => {
                self.counters
                    .fork_candidates
                    .fetch_add(1, Ordering::Relaxed);
                let policy = &self.config.group_policy;
                let k = self.config.assembler.group_size;
                let mut fire = k > 1 && policy.fork_fraction > 0.0 && {
                    let u: f64 = self.rng.lock().unwrap_or_else(|p| p.into_inner()).random();
                    u < policy.fork_fraction
                };
                // The budget: at most `background_concurrency` groups wait for their extra
                // samples, so groups fill promptly instead of queueing without bound.
                if fire
                    && self.pending_forks.load(Ordering::SeqCst)
                        >= policy.background_concurrency * (k - 1)
                {
                    fire = false;
                    self.counters
                        .forks_skipped_budget
                        .fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("leaf_forks_skipped_total", "reason" => "budget")
                        .increment(1);
                }
                let group = if fire {
                    self.assembler.reserve(k)
                } else {
                    None
                };
                match group {
                    Some(g) => {
                        self.counters.forks_fired.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("leaf_forks_fired_total").increment(1);
                        let prompt = sample.prompt_ids.clone();
                        self.assembler
                            .submit(sample, reward, Membership::Reserved(g));
                        self.pending_forks.fetch_add(k - 1, Ordering::SeqCst);
                        for _ in 1..k {
                            let s = self.clone();
                            let prompt = prompt.clone();
                            let meta = meta.clone();
                            tokio::spawn(async move { s.fork(g, prompt, meta).await });
                        }
                    }
                    None => {
                        self.assembler.submit(sample, reward, Membership::Coalesce);
                    }
                }
            }
            Plan::None => {}
        }
    }

    /// Draws one extra sample of `prompt` for reserved group `group`, in the background.
    /// (A boxed future with a named type: `fork` -> `submit` -> `drain` -> `harvest` ->
    /// `fork` is recursive, and the compiler cannot prove `Send` through a cycle of opaque
    /// types.)
    fn fork(
        self: Arc<Self>,
        group: u64,
        prompt: Vec<u32>,
        meta: Meta,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(self.fork_inner(group, prompt, meta))
    }

    async fn fork_inner(self: Arc<Self>, group: u64, prompt: Vec<u32>, meta: Meta) {
        /// Gives the fork's place in the budget back however the fork ends.
        struct Pending(Arc<AtomicUsize>);
        impl Drop for Pending {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _pending = Pending(self.pending_forks.clone());
        let fail = |s: &LeafServer| {
            s.counters.forks_failed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("leaf_forks_failed_total").increment(1);
            s.assembler.expect_fewer(group);
        };
        let Ok(_permit) = self.background.clone().acquire_owned().await else {
            fail(&self);
            return;
        };
        if self.shutting_down.load(Ordering::SeqCst)
            || self.foreground.load(Ordering::SeqCst)
                > self.config.group_policy.max_foreground_inflight
        {
            fail(&self);
            return;
        }
        let tap = TapConfig {
            temperature: meta.temperature,
            top_p: meta.top_p,
            top_logprobs: 0,
            stop_token: self.stop_token(),
            seed: self.next_seed(),
            forced: Vec::new(),
        };
        let max_tokens = meta.max_tokens;
        match self
            .submit(
                RequestMessage::CompletionTokens(prompt),
                tap,
                max_tokens,
                false,
                None,
                Plan::Fork(group),
                meta,
            )
            .await
        {
            // The drain task harvests it (or lowers the group's size on failure).
            Ok((_run, rx)) => {
                let _ = rx.await;
            }
            Err(_) => fail(&self),
        }
    }

    /// Serves the base model (no adapter).
    pub async fn activate_base(self: &Arc<Self>) -> Result<SwapReport, ServeError> {
        self.swap(BASE_VERSION.to_string(), None).await
    }

    /// Validates, loads and swaps in the store's version `version` (a full id or a unique
    /// prefix) and makes it the store's current version. The current version keeps serving
    /// if anything fails.
    pub async fn promote(self: &Arc<Self>, version: &str) -> Result<SwapReport, ServeError> {
        let store = self.store.as_ref().ok_or(ServeError::NoStore)?;
        let id = store.resolve(version).map_err(ServeError::Adapter)?;
        if self.current_version() == id.as_str() {
            // Already served: nothing to load; just record it as current in the store.
            store.promote(&id).map_err(ServeError::Adapter)?;
            let slot = self.slot();
            return Ok(SwapReport {
                from_version: slot.version.clone(),
                to_version: slot.version.clone(),
                engine_id: slot.engine_id.clone(),
                load_ms: 0.0,
                activate_ms: 0.0,
                drained_requests: 0,
                drain_ms: 0.0,
                remove_ms: 0.0,
            });
        }
        let dir = store.path(&id).map_err(ServeError::Adapter)?;
        // The content must still hash to its id.
        store.get(&id).map_err(ServeError::Adapter)?;
        let report = self.swap(id.to_string(), Some(dir)).await?;
        store.promote(&id).map_err(ServeError::Adapter)?;
        Ok(report)
    }

    /// Swaps back to the store's previous version and makes it current there.
    pub async fn rollback(self: &Arc<Self>) -> Result<SwapReport, ServeError> {
        let store = self.store.as_ref().ok_or(ServeError::NoStore)?;
        let record = store.record().map_err(ServeError::Adapter)?;
        let target = record
            .previous
            .iter()
            .rev()
            .find(|id| store.path(id).is_ok())
            .cloned()
            .ok_or(ServeError::Adapter(leaf_adapters::Error::NoRollbackTarget))?;
        let dir = store.path(&target).map_err(ServeError::Adapter)?;
        store.get(&target).map_err(ServeError::Adapter)?;
        let report = self.swap(target.to_string(), Some(dir)).await?;
        store.rollback().map_err(ServeError::Adapter)?;
        Ok(report)
    }

    /// Validates a PEFT adapter directory, publishes it into the store and promotes it (the
    /// vLLM-style `load_lora_adapter`). Without a store it is served straight from `dir`.
    pub async fn load_adapter_dir(self: &Arc<Self>, dir: &Path) -> Result<SwapReport, ServeError> {
        self.model.validate_adapter(dir, &self.config.limits)?;
        match &self.store {
            Some(store) => {
                let adapter =
                    leaf_adapters::peft::LoraAdapter::load(dir).map_err(ServeError::Adapter)?;
                let id = store
                    .publish(&adapter, Default::default())
                    .map_err(ServeError::Adapter)?;
                self.promote(id.as_str()).await
            }
            None => {
                let adapter =
                    leaf_adapters::peft::LoraAdapter::load(dir).map_err(ServeError::Adapter)?;
                let id = adapter.version_id().map_err(ServeError::Adapter)?;
                self.swap(id, Some(dir.to_path_buf())).await
            }
        }
    }

    /// The swap itself (see the module docs of [`crate::serving`]).
    async fn swap(
        self: &Arc<Self>,
        version: String,
        adapter_dir: Option<PathBuf>,
    ) -> Result<SwapReport, ServeError> {
        let _one_at_a_time = self.swap_lock.lock().await;
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ServeError::ShuttingDown);
        }
        let swaps = self.counters.swaps.load(Ordering::SeqCst);
        if swaps >= self.config.max_swaps {
            return Err(ServeError::SwapLimit(self.config.max_swaps));
        }
        if let Some(dir) = &adapter_dir {
            self.model.validate_adapter(dir, &self.config.limits)?;
        }
        let t0 = Instant::now();
        let pipeline: SharedPipeline =
            load_pipeline_async(&self.model, adapter_dir.as_deref()).await?;
        let load_ms = ms(t0);
        let t1 = Instant::now();
        let engine_id = format!("policy@{}", self.next_engine.fetch_add(1, Ordering::SeqCst));
        self.mistral
            .add_model(
                engine_id.clone(),
                pipeline,
                scheduler(self.config.max_batch),
                AddModelConfig::new(engine_config()),
            )
            .await
            .map_err(ServeError::Engine)?;
        self.counters
            .engines_created
            .fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.probe(&engine_id).await {
            let _ = self.remove_engine(engine_id.clone()).await;
            return Err(ServeError::Probe {
                version,
                reason: e.to_string(),
            });
        }
        self.mistral
            .set_default_model_id(&engine_id)
            .map_err(ServeError::Engine)?;
        let new_slot = Arc::new(Slot {
            engine_id: engine_id.clone(),
            version: version.clone(),
            inflight: Arc::new(AtomicUsize::new(0)),
        });
        let old = {
            let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *cur, new_slot)
        };
        *self
            .previous_version
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(old.version.clone());
        let activate_ms = ms(t1);
        self.counters.swaps.fetch_add(1, Ordering::SeqCst);
        metrics::counter!("leaf_swaps_total").increment(1);
        tracing::info!(from = %old.version, to = %version, engine = %engine_id, "swapped adapter version");
        // Drain the old engine, then remove it off the async runtime.
        let drained_requests = old.inflight.load(Ordering::SeqCst);
        let t2 = Instant::now();
        let deadline = Duration::from_secs_f64(self.config.drain_timeout_s);
        while old.inflight.load(Ordering::SeqCst) > 0 && t2.elapsed() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let drain_ms = ms(t2);
        let t3 = Instant::now();
        self.remove_engine(old.engine_id.clone()).await?;
        let remove_ms = ms(t3);
        metrics::histogram!("leaf_swap_seconds").record(t0.elapsed().as_secs_f64());
        Ok(SwapReport {
            from_version: old.version.clone(),
            to_version: version,
            engine_id,
            load_ms,
            activate_ms,
            drained_requests,
            drain_ms,
            remove_ms,
        })
    }

    /// One greedy token through a new engine before it takes traffic.
    async fn probe(self: &Arc<Self>, engine_id: &str) -> Result<(), ServeError> {
        let prompt = vec![self.stop_token()];
        let (run, rx) = self
            .submit(
                RequestMessage::CompletionTokens(prompt),
                TapConfig {
                    temperature: 1.0,
                    top_p: 1.0,
                    top_logprobs: 0,
                    stop_token: self.stop_token(),
                    seed: 0,
                    forced: Vec::new(),
                },
                1,
                false,
                Some(engine_id),
                Plan::None,
                Meta::default(),
            )
            .await?;
        let finished = tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .map_err(|_| ServeError::Engine("probe timed out".into()))?
            .map_err(|_| ServeError::Aborted(run.request_id.clone()))?;
        match finished.response {
            Response::CompletionDone(_) => {
                let rec = finished.record.unwrap_or_default();
                if rec.logprobs.iter().all(|l| l.is_finite()) && !rec.tokens.is_empty() {
                    Ok(())
                } else {
                    Err(ServeError::Engine(
                        "the probe produced no finite token".into(),
                    ))
                }
            }
            other => Err(response_error(other, &run.request_id)),
        }
    }

    /// Removes an engine on the blocking pool (never on an async worker: `remove_model`
    /// blocks on a channel and would panic there), then trims the heap.
    async fn remove_engine(&self, engine_id: String) -> Result<(), ServeError> {
        let mistral = self.mistral.clone();
        tokio::task::spawn_blocking(move || {
            let r = mistral.remove_model(&engine_id);
            trim_heap();
            r
        })
        .await
        .map_err(|e| ServeError::Engine(format!("remove task failed: {e}")))?
        .map_err(ServeError::Engine)
    }

    /// The server's counters.
    pub fn status(&self) -> ServerStatus {
        let slot = self.slot();
        let a = self.assembler.stats();
        let c = &self.counters;
        let get = |x: &AtomicU64| x.load(Ordering::Relaxed);
        ServerStatus {
            current_version: slot.version.clone(),
            previous_version: self
                .previous_version
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            engine_id: slot.engine_id.clone(),
            requests: get(&c.requests),
            requests_failed: get(&c.failed),
            requests_cancelled: get(&c.cancelled),
            inflight: slot.inflight.load(Ordering::SeqCst),
            rollouts_harvested: get(&a.harvested),
            rollouts_skipped: get(&c.skipped),
            groups_sealed: get(&a.sealed),
            groups_sealed_partial: get(&a.sealed_partial),
            groups_dropped: get(&a.dropped_too_small)
                + get(&a.dropped_queue_full)
                + get(&a.dropped_capacity)
                + get(&a.dropped_unfillable),
            forks_fired: get(&c.forks_fired),
            fork_candidates: get(&c.fork_candidates),
            forks_usable: get(&c.forks_usable),
            forks_failed: get(&c.forks_failed),
            forks_skipped_budget: get(&c.forks_skipped_budget),
            open_groups: self.assembler.open_groups(),
            sealed_queue_depth: self.assembler.queue_depth(),
            updates_done: get(&c.updates),
            swaps: get(&c.swaps),
            leaked_threads: get(&c.engines_created),
        }
    }

    /// Stops accepting requests, waits (up to `timeout`) for the in-flight ones and the
    /// background forks, then seals every open group as its timeout would.
    pub async fn shutdown(&self, timeout: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        let permits = self.config.group_policy.background_concurrency as u32;
        while t0.elapsed() < timeout {
            let busy = self.slot().inflight.load(Ordering::SeqCst) > 0
                || self.background.available_permits() < permits as usize;
            if !busy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.assembler.flush();
    }
}

#[derive(Debug, Clone, Default)]
struct Meta {
    reference: Option<String>,
    task: Option<String>,
    temperature: f64,
    top_p: f64,
    max_tokens: usize,
}

#[derive(Debug, Clone)]
struct Run {
    request_id: String,
    engine_id: String,
    version: String,
    tap: Arc<SamplingTap>,
}

fn response_error(r: Response, request_id: &str) -> ServeError {
    match r {
        Response::ValidationError(e) => ServeError::Request(e.to_string()),
        Response::InternalError(e) => ServeError::Engine(e.to_string()),
        Response::ModelError(e, _) | Response::CompletionModelError(e, _) => ServeError::Engine(e),
        _ => ServeError::Engine(format!("unexpected response kind for {request_id}")),
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Hands freed heap pages back to the OS (glibc keeps them otherwise).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident set size of this process in bytes (Linux; `None` elsewhere).
pub fn rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(0) as u64)
}

/// Number of threads of this process (Linux; `None` elsewhere).
pub fn thread_count() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}
