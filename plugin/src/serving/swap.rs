//! Versions and swaps: [`LeafServer::promote`], [`LeafServer::rollback`],
//! [`LeafServer::load_adapter_dir`], [`LeafServer::activate_base`] and the swap itself.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mistralrs_core::AddModelConfig;
use serde::Serialize;

#[cfg(doc)]
use super::config::ServerConfig;

use super::engine::{engine_config, scheduler};
use super::fault::fault_point;
use super::model::{load_pipeline_async, SharedPipeline};
use super::server::{LeafServer, Slot, BASE_VERSION};
use super::ServeError;

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

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// What a swap is for: rollbacks are exempt from [`ServerConfig::max_swaps`], so rolling back
/// is always possible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SwapKind {
    Forward,
    Rollback,
}

impl LeafServer {
    /// Serves the base model (no adapter). Refused while the store has a current version
    /// (serving and the store's `current` must agree): roll back instead.
    pub async fn activate_base(self: &Arc<Self>) -> Result<SwapReport, ServeError> {
        self.detached(|s| async move { s.activate_base_locked().await })
            .await
    }

    /// Validates, loads and swaps in the store's version `version` (a full id or a unique
    /// prefix) and makes it the store's current version. The current version keeps serving
    /// if anything fails.
    pub async fn promote(self: &Arc<Self>, version: &str) -> Result<SwapReport, ServeError> {
        let version = version.to_string();
        self.detached(|s| async move { s.promote_locked(&version).await })
            .await
    }

    /// Swaps back to the store's previous version and makes it current there. Never refused
    /// by the swap limit.
    pub async fn rollback(self: &Arc<Self>) -> Result<SwapReport, ServeError> {
        self.detached(|s| async move { s.rollback_locked().await })
            .await
    }

    /// Validates a PEFT adapter directory, publishes it into the store and promotes it (the
    /// vLLM-style `load_lora_adapter`). Without a store it is served straight from `dir`.
    pub async fn load_adapter_dir(self: &Arc<Self>, dir: &Path) -> Result<SwapReport, ServeError> {
        let dir = dir.to_path_buf();
        self.detached(|s| async move { s.load_adapter_dir_locked(&dir).await })
            .await
    }

    /// Runs one version operation to completion on a task of its own, holding the swap lock.
    /// The caller only waits for it: a client that goes away (its handler future dropped) can
    /// no longer stop a swap half-way, between loading, activating, recording the store's
    /// `current` and removing the old engine.
    async fn detached<F, Fut>(self: &Arc<Self>, op: F) -> Result<SwapReport, ServeError>
    where
        F: FnOnce(Arc<LeafServer>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<SwapReport, ServeError>> + Send + 'static,
    {
        let server = self.clone();
        let task = tokio::spawn(async move {
            let _one_at_a_time = server.swap_lock.lock().await;
            if server.shutting_down.load(Ordering::SeqCst) {
                return Err(ServeError::ShuttingDown);
            }
            op(server.clone()).await
        });
        task.await
            .map_err(|e| ServeError::Engine(format!("the swap task failed: {e}")))?
    }

    fn unchanged(&self) -> SwapReport {
        let slot = self.slot();
        SwapReport {
            from_version: slot.version.clone(),
            to_version: slot.version.clone(),
            engine_id: slot.engine_id.clone(),
            load_ms: 0.0,
            activate_ms: 0.0,
            drained_requests: 0,
            drain_ms: 0.0,
            remove_ms: 0.0,
        }
    }

    async fn activate_base_locked(self: Arc<Self>) -> Result<SwapReport, ServeError> {
        if let Some(store) = &self.store {
            if let Some(id) = store.current().map_err(ServeError::Adapter)? {
                return Err(ServeError::Request(format!(
                    "the store's current version is {id}: serving the base model would \
                     disagree with it (roll back, or serve without a store)"
                )));
            }
        }
        if self.current_version() == BASE_VERSION {
            return Ok(self.unchanged());
        }
        self.swap(BASE_VERSION.to_string(), None, SwapKind::Forward, || Ok(()))
            .await
    }

    async fn promote_locked(self: Arc<Self>, version: &str) -> Result<SwapReport, ServeError> {
        let store = self.store.as_ref().ok_or(ServeError::NoStore)?;
        let id = store.resolve(version).map_err(ServeError::Adapter)?;
        if self.current_version() == id.as_str() {
            // Already served: nothing to load; just record it as current in the store.
            store.promote(&id).map_err(ServeError::Adapter)?;
            return Ok(self.unchanged());
        }
        let dir = store.path(&id).map_err(ServeError::Adapter)?;
        // The content must still hash to its id.
        store.get(&id).map_err(ServeError::Adapter)?;
        // The store's `current` switches only once the new engine answered its probe, and
        // just before it takes traffic; a failed switch removes the new engine again.
        self.swap(id.to_string(), Some(dir), SwapKind::Forward, || {
            fault_point("promote-before-record");
            store.promote(&id).map_err(ServeError::Adapter)?;
            fault_point("promote-after-record");
            Ok(())
        })
        .await
    }

    async fn rollback_locked(self: Arc<Self>) -> Result<SwapReport, ServeError> {
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
        self.swap(target.to_string(), Some(dir), SwapKind::Rollback, || {
            fault_point("rollback-before-record");
            let got = store.rollback().map_err(ServeError::Adapter)?;
            if got != target {
                // Another process changed the history since it was read: record the version
                // this process is about to serve.
                tracing::warn!(expected = %target, got = %got, "the store rolled back to another version");
                store.promote(&target).map_err(ServeError::Adapter)?;
            }
            fault_point("rollback-after-record");
            Ok(())
        })
        .await
    }

    async fn load_adapter_dir_locked(
        self: Arc<Self>,
        dir: &Path,
    ) -> Result<SwapReport, ServeError> {
        self.model.validate_adapter(dir, &self.config.limits)?;
        let adapter = leaf_adapters::peft::LoraAdapter::load(dir).map_err(ServeError::Adapter)?;
        match &self.store {
            Some(store) => {
                fault_point("publish-before");
                let id = store
                    .publish(&adapter, Default::default())
                    .map_err(ServeError::Adapter)?;
                fault_point("publish-after");
                self.clone().promote_locked(id.as_str()).await
            }
            None => {
                let id = adapter.version_id().map_err(ServeError::Adapter)?;
                self.swap(id, Some(dir.to_path_buf()), SwapKind::Forward, || Ok(()))
                    .await
            }
        }
    }

    /// The swap itself (see the module docs of [`crate::serving`]).
    ///
    /// Runs with the swap lock held (see [`Self::detached`]). `commit` records the new version
    /// (in the store) after the new engine answered its probe and before it takes traffic; if
    /// it fails, the new engine is removed and the current version keeps serving.
    async fn swap(
        self: &Arc<Self>,
        version: String,
        adapter_dir: Option<PathBuf>,
        kind: SwapKind,
        commit: impl FnOnce() -> Result<(), ServeError>,
    ) -> Result<SwapReport, ServeError> {
        // Every engine ever added leaks one idle thread (the module docs): count engines, not
        // successful swaps, and never refuse a rollback.
        let extra_engines = self
            .counters
            .engines_created
            .load(Ordering::SeqCst)
            .saturating_sub(1);
        if kind == SwapKind::Forward && extra_engines >= self.config.max_swaps {
            return Err(ServeError::SwapLimit(self.config.max_swaps));
        }
        if let Some(dir) = &adapter_dir {
            self.model.validate_adapter(dir, &self.config.limits)?;
        }
        let t0 = Instant::now();
        let pipeline: SharedPipeline =
            load_pipeline_async(&self.model, adapter_dir.as_deref(), &self.device).await?;
        let load_ms = ms(t0);
        fault_point("swap-loaded");
        let t1 = Instant::now();
        let engine_id = format!("policy@{}", self.next_engine.fetch_add(1, Ordering::SeqCst));
        // Counted before the call: a failed `add_model` may still have started its logger.
        self.counters.engines_created.fetch_add(1, Ordering::SeqCst);
        self.mistral
            .add_model(
                engine_id.clone(),
                pipeline,
                scheduler(self.config.max_batch),
                AddModelConfig::new(engine_config()),
            )
            .await
            .map_err(ServeError::Engine)?;
        if let Err(e) = self.probe(&engine_id).await {
            let _ = self.remove_engine(engine_id.clone()).await;
            return Err(ServeError::Probe {
                version,
                reason: e.to_string(),
            });
        }
        if let Err(e) = commit() {
            let _ = self.remove_engine(engine_id.clone()).await;
            return Err(e);
        }
        if let Err(e) = self.mistral.set_default_model_id(&engine_id) {
            // Unreachable in practice (the engine was just added); the store already names
            // the new version, so say so loudly.
            tracing::error!(engine = %engine_id, error = %e, "cannot make the new engine the default");
            return Err(ServeError::Engine(e));
        }
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
        fault_point("swap-activated");
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
        self.check_recycle();
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
}
