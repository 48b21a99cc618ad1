//! [`GroupPolicy`]: which client requests get K - 1 extra samples of their prompt, drawn in
//! the background within a budget, and how finished samples go into groups.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use mistralrs_core::RequestMessage;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::engine::{Meta, Plan, Run};
use super::server::LeafServer;
use crate::harvest::groups::Membership;
use crate::harvest::tap::now_unix_ms;
use crate::harvest::{
    prompt_key, HarvestedSample, RewardContext, SampleOrigin, TapConfig, TapRecord,
};

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
    /// A client request that is not forked and whose reference the assembler harvested as ids
    /// is sealed at once as a group of its one response, instead of waiting to coalesce with
    /// an identical prompt: nothing compares it, but the learner's supervised objective
    /// (`online::SupervisedReference`) trains on its reference. Default false.
    pub labelled_singles: bool,
}

impl Default for GroupPolicy {
    fn default() -> Self {
        GroupPolicy {
            fork_fraction: 0.0,
            background_concurrency: 2,
            max_foreground_inflight: 8,
            seed: 0,
            labelled_singles: false,
        }
    }
}

impl LeafServer {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn harvest(
        self: &Arc<Self>,
        rec: TapRecord,
        run: &Run,
        plan: Plan,
        mut meta: Meta,
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
        if meta.reference_ids.is_none() {
            meta.reference_ids = self.reference_ids(meta.reference.as_deref());
        }
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
            reference_ids: meta.reference_ids.clone(),
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
                let single =
                    group.is_none() && policy.labelled_singles && sample.reference_ids.is_some();
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
                        // A group of one seals as soon as its sample is in (or, with the
                        // open-group capacity reached, coalesces as any other).
                        let membership = match single.then(|| self.assembler.reserve(1)).flatten() {
                            Some(g) => Membership::Reserved(g),
                            None => Membership::Coalesce,
                        };
                        self.assembler.submit(sample, reward, membership);
                    }
                }
            }
            Plan::None => {}
        }
    }

    /// The reference as the ids the model would generate for it, when the assembler harvests
    /// them; a reference the chat format cannot tokenize is logged and left out.
    fn reference_ids(&self, reference: Option<&str>) -> Option<Vec<u32>> {
        if !self.config.assembler.reference_ids {
            return None;
        }
        match self.model.chat_format().answer_ids(reference?) {
            Ok(ids) => Some(ids),
            Err(e) => {
                tracing::warn!(error = %e, "reference not tokenized; no guidance for it");
                None
            }
        }
    }

    /// Draws one extra sample of `prompt` for reserved group `group`, in the background.
    /// (A boxed future with a named type: `fork` -> `submit` -> `drain` -> `harvest` ->
    /// `fork` is recursive, and the compiler cannot prove `Send` through a cycle of opaque
    /// types.)
    pub(super) fn fork(
        self: Arc<Self>,
        group: u64,
        prompt: Vec<u32>,
        meta: Meta,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(self.fork_inner(group, prompt, meta))
    }

    pub(super) async fn fork_inner(self: Arc<Self>, group: u64, prompt: Vec<u32>, meta: Meta) {
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
}
