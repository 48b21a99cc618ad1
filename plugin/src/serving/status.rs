//! [`ServerStatus`]: a snapshot of the server's counters, and the process figures (RSS,
//! threads) the soak and the metrics report.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::server::LeafServer;

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
    /// Groups dropped (too small, queue full, capacity, unfillable, trainer down).
    pub groups_dropped: u64,
    /// Of those, sealed groups that could not reach the trainer because it was down (or
    /// restarting with a full queue), and groups lost with a crashed trainer.
    pub groups_dropped_trainer_down: u64,
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
    /// Times this process restarted itself to hand leaked threads back (see
    /// [`super::restart`]).
    pub restarts: u64,
    /// The online trainer: `up`, `restarting`, `down` (not ready), `stopped` or `absent`,
    /// its restarts and last error, and what its promotion gate checks.
    pub trainer: crate::harvest::TrainerStatus,
}

impl LeafServer {
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
                + get(&a.dropped_unfillable)
                + get(&a.dropped_trainer_down),
            groups_dropped_trainer_down: get(&a.dropped_trainer_down),
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
            restarts: super::restart::restarts(),
            trainer: self.assembler.trainer().status(),
        }
    }
}
