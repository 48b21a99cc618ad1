//! Engine plumbing: one request into mistral.rs with its own tap, the task that owns its
//! response channel, the probe of a new engine and the removal of an old one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mistralrs_core::{
    Constraint, DefaultSchedulerMethod, EngineConfig, NormalRequest, Request, RequestMessage,
    Response, SamplingParams, SchedulerConfig,
};
use rand::Rng;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::server::LeafServer;
use super::ServeError;
use crate::harvest::tap::now_unix_ms;
use crate::harvest::{SamplingTap, TapConfig, TapRecord};

/// Decrements an engine's in-flight count when dropped.
pub(super) struct InflightGuard(pub(super) Arc<AtomicUsize>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Cancels a tap when the client's future is dropped before the answer arrived.
pub(super) struct CancelOnDrop {
    pub(super) tap: Arc<SamplingTap>,
    pub(super) done: bool,
    pub(super) cancelled: Arc<AtomicU64>,
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

/// What happens with a finished request's sample.
#[derive(Debug, Clone, Copy)]
pub(super) enum Plan {
    /// A client request: coalesce, or reserve a fork group.
    User,
    /// An extra sample of reserved group `.0`.
    Fork(u64),
    /// Not harvested (probes).
    None,
}

/// What the drain task hands back.
pub(super) struct Finished {
    pub(super) response: Response,
    pub(super) record: Option<TapRecord>,
}

#[derive(Debug, Clone, Default)]
pub(super) struct Meta {
    pub(super) reference: Option<String>,
    /// `reference` as answer ids (reference guidance): computed once, when the client's own
    /// sample is harvested, and handed on to the extra samples of its prompt.
    pub(super) reference_ids: Option<Vec<u32>>,
    pub(super) task: Option<String>,
    pub(super) temperature: f64,
    pub(super) top_p: f64,
    pub(super) max_tokens: usize,
}

#[derive(Debug, Clone)]
pub(super) struct Run {
    pub(super) request_id: String,
    pub(super) engine_id: String,
    pub(super) version: String,
    pub(super) tap: Arc<SamplingTap>,
}

pub(super) fn scheduler(max_batch: usize) -> SchedulerConfig {
    SchedulerConfig::DefaultScheduler {
        method: DefaultSchedulerMethod::Fixed(
            std::num::NonZeroUsize::new(max_batch).unwrap_or(std::num::NonZeroUsize::MIN),
        ),
    }
}

pub(super) fn engine_config() -> EngineConfig {
    EngineConfig {
        no_prefix_cache: true,
        throughput_logging_enabled: false,
        ..EngineConfig::default()
    }
}

pub(super) fn response_error(r: Response, request_id: &str) -> ServeError {
    match r {
        Response::ValidationError(e) => ServeError::Request(e.to_string()),
        Response::InternalError(e) => ServeError::Engine(e.to_string()),
        Response::ModelError(e, _) | Response::CompletionModelError(e, _) => ServeError::Engine(e),
        _ => ServeError::Engine(format!("unexpected response kind for {request_id}")),
    }
}

/// Hands freed heap pages back to the OS (glibc keeps them otherwise).
pub(super) fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl LeafServer {
    pub(super) fn stop_token(&self) -> u32 {
        self.model.stop_ids().first().copied().unwrap_or(0)
    }

    pub(super) fn next_seed(&self) -> u64 {
        self.rng.lock().unwrap_or_else(|p| p.into_inner()).random()
    }

    /// Sends one request with a fresh tap, pinned to the current engine (or `pin`), and spawns
    /// the task that owns its receiver.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn submit(
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
        // Serial admission: wait for the engine before choosing it, so a swap that happens
        // meanwhile is honoured. Dropping this future while it waits sends nothing.
        let admitted = match &self.admission {
            Some(gate) => Some(
                gate.clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| ServeError::Engine("the server is shutting down".into()))?,
            ),
            None => None,
        };
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
                .drain(
                    rx,
                    drained,
                    (inflight, admitted),
                    done_tx,
                    plan,
                    meta,
                    started,
                )
                .await;
        });
        Ok((run, done_rx))
    }

    /// Owns a request's receiver: delivers the final response, harvests the sample, then keeps
    /// reading until the engine closes the channel (a run-on sequence must never find its
    /// receiver gone).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn drain(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Response>,
        run: Run,
        (inflight, admitted): (InflightGuard, Option<OwnedSemaphorePermit>),
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
        // The next request may enter: anything this sequence still runs on for only forces
        // the stop token, and the newcomer's own decoding steps reload its cache.
        drop(admitted);
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

    /// One greedy token through a new engine before it takes traffic.
    pub(super) async fn probe(self: &Arc<Self>, engine_id: &str) -> Result<(), ServeError> {
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
    pub(super) async fn remove_engine(&self, engine_id: String) -> Result<(), ServeError> {
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
}
