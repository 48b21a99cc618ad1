//! [`LeafServer`]: requests in, harvested samples out, versions swapped underneath.
//!
//! The server's parts live in one module per concept: [`super::config`] (what it is started
//! with), [`super::request`] (a chat request's path), [`super::engine`] (requests into
//! mistral.rs), [`super::group_policy`] (extra samples and grouping), [`super::swap`]
//! (versions) and [`super::status`] (counters). Their public items are re-exported here and
//! from [`crate::serving`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use leaf_adapters::store::AdapterStore;
use mistralrs_core::{MistralRs, MistralRsBuilder};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::Semaphore;

use super::engine::{scheduler, InflightGuard};
use super::fault;
use super::model::{load_pipeline_async, ModelDir};
use super::ServeError;
use crate::harvest::{GroupAssembler, RewardSource, SealedGroup};

pub use super::config::{EngineAdmission, SamplingDefaults, ServerConfig};
pub use super::group_policy::GroupPolicy;
pub use super::request::{ChatReply, ChatRequest, Message, Part};
pub use super::status::ServerStatus;
pub use super::swap::SwapReport;

/// The version label of the base model (no adapter).
pub const BASE_VERSION: &str = "base";

#[derive(Debug)]
pub(super) struct Slot {
    pub(super) engine_id: String,
    pub(super) version: String,
    pub(super) inflight: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) requests: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) cancelled: Arc<AtomicU64>,
    pub(super) skipped: AtomicU64,
    pub(super) fork_candidates: AtomicU64,
    pub(super) forks_fired: AtomicU64,
    pub(super) forks_usable: AtomicU64,
    pub(super) forks_failed: AtomicU64,
    pub(super) forks_skipped_budget: AtomicU64,
    pub(super) updates: AtomicU64,
    pub(super) swaps: AtomicU64,
    pub(super) engines_created: AtomicU64,
}

/// The plugin: the one door requests go through (see the module docs of [`crate::serving`]).
pub struct LeafServer {
    pub(super) mistral: Arc<MistralRs>,
    pub(super) model: ModelDir,
    /// The opened [`ServerConfig::device`]; every version is loaded onto it.
    pub(super) device: candle_core::Device,
    pub(super) config: ServerConfig,
    pub(super) store: Option<AdapterStore>,
    pub(super) current: RwLock<Arc<Slot>>,
    pub(super) previous_version: Mutex<Option<String>>,
    pub(super) swap_lock: tokio::sync::Mutex<()>,
    pub(super) next_engine: AtomicU64,
    pub(super) assembler: Arc<GroupAssembler>,
    pub(super) reward: Arc<dyn RewardSource>,
    pub(super) background: Arc<Semaphore>,
    /// The engine admission gate ([`super::config::EngineAdmission`]): one permit when
    /// serial, none (no gate) when concurrent.
    pub(super) admission: Option<Arc<Semaphore>>,
    /// Extra samples reserved and not yet finished (the group policy's budget).
    pub(super) pending_forks: Arc<AtomicUsize>,
    pub(super) foreground: Arc<AtomicUsize>,
    pub(super) rng: Mutex<ChaCha8Rng>,
    pub(super) counters: Counters,
    pub(super) shutting_down: AtomicBool,
    /// Set once `recycle_after_engines` engines were created.
    pub(super) recycle: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for LeafServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafServer")
            .field("model", &self.model.dir())
            .field("current", &self.slot().version)
            .finish_non_exhaustive()
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
        // First, before anything is read or loaded: a build without the device's back-end
        // (or a GPU that is not there) is refused by name.
        let device = config.device.open()?;
        let model = ModelDir::open(&config.model_dir)?;
        let store = match &config.store_dir {
            Some(dir) => {
                let mut store = AdapterStore::open(dir).map_err(ServeError::Adapter)?;
                fault::arm_store(&mut store);
                Some(store)
            }
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
        let pipeline = load_pipeline_async(&model, adapter_dir.as_deref(), &device).await?;
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
            device,
            store,
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
            admission: match config.engine_admission {
                EngineAdmission::Serial => Some(Arc::new(Semaphore::new(1))),
                EngineAdmission::Concurrent => None,
            },
            pending_forks: Arc::new(AtomicUsize::new(0)),
            foreground: Arc::new(AtomicUsize::new(0)),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(config.group_policy.seed)),
            counters: Counters {
                engines_created: AtomicU64::new(1),
                ..Counters::default()
            },
            shutting_down: AtomicBool::new(false),
            recycle: tokio::sync::watch::Sender::new(false),
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

    /// The underlying mistral.rs instance, for leaf's own bare-engine comparisons (feature
    /// `bare-engine`, which only leaf's tests and benches turn on). Requests sent through it
    /// bypass the tap, the request limits and the swap bookkeeping; removing models through it
    /// breaks the plugin's guarantees. Not part of the supported API.
    #[cfg(feature = "bare-engine")]
    #[doc(hidden)]
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

    pub(super) fn slot(&self) -> Arc<Slot> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Takes a lease on the current engine: the in-flight count is raised under the read lock,
    /// so a swap that replaced the slot afterwards sees it.
    pub(super) fn lease(&self) -> (Arc<Slot>, InflightGuard) {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        let slot = guard.clone();
        slot.inflight.fetch_add(1, Ordering::SeqCst);
        drop(guard);
        let inflight = InflightGuard(slot.inflight.clone());
        (slot, inflight)
    }

    /// Completes once this process created `recycle_after_engines` engines: time to restart
    /// it (see [`super::restart`]); never when that setting is 0.
    pub async fn recycle_requested(&self) {
        let mut rx = self.recycle.subscribe();
        if rx.wait_for(|due| *due).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Raises [`Self::recycle_requested`] when the engine count reached the setting.
    pub(super) fn check_recycle(&self) {
        let n = self.config.recycle_after_engines;
        let created = self.counters.engines_created.load(Ordering::SeqCst);
        if n > 0 && created > n && !*self.recycle.borrow() {
            tracing::info!(
                engines = created,
                "engine count reached recycle_after_engines"
            );
            self.recycle.send_replace(true);
        }
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
