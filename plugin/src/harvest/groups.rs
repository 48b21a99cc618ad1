//! Group assembly: harvested samples of one prompt become a group of K for the trainer.
//!
//! Two ways into a group:
//!
//! * **Fork groups.** The group policy ([`crate::serving::GroupPolicy`]) reserves a group of K
//!   for a client's request ([`GroupAssembler::reserve`]) and draws K - 1 extra samples of the
//!   same prompt in the background; all K join that group by its number.
//! * **Coalescing.** Any other sample joins the open coalescing group of its prompt key if that
//!   group was opened less than `coalesce_window` ago and holds fewer than K samples; otherwise
//!   it opens a new one. Identical prompts arriving close together thus form one group.
//!
//! A group is **sealed** as soon as it holds its expected number of samples and every one has a
//! reward. A group still open `seal_timeout` after it was opened is swept
//! ([`GroupAssembler::sweep`]) and handled as a **partial group**: members without a reward
//! are dropped (their feedback can no longer arrive), and the rest is sealed with
//! `partial = true` if at least `min_group_size` remain, or dropped otherwise (counted as
//! `leaf_groups_dropped_total{reason="too_small"}`). A fork that fails lowers its group's
//! expected size ([`GroupAssembler::expect_fewer`]) instead of making it wait for the timeout.
//!
//! Sealed groups go out on a bounded `crossbeam-channel` with `try_send`: when the trainer lags
//! and the queue is full the group is dropped and counted (`reason="queue_full"`); the serving
//! path never blocks. A group that cannot reach the trainer because it is down (or restarting
//! with a full queue) is counted as `reason="trainer_down"` instead ([`TrainerLiveness`]).
//! Retention is bounded: at most `max_open_groups` groups are held (a sample
//! that would open one more is dropped, `reason="capacity"`), and nothing is held longer than
//! `seal_timeout`. With [`PrivacyMode::IdsOnly`] samples are stripped of text and reference on
//! entry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use super::liveness::{TrainerLiveness, TrainerState};
use super::tap::now_unix_ms;
use super::{HarvestError, HarvestedSample, PrivacyMode};
use crate::rollout::{Group, GroupError, Rollout, RolloutMeta};

/// How groups are assembled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AssemblerConfig {
    /// Group size K. Default 8 (the spec's).
    pub group_size: usize,
    /// Fewest rewarded samples a partial group needs to be sealed. Default 2.
    pub min_group_size: usize,
    /// How long a group may stay open, in seconds. Default 120.
    pub seal_timeout_s: f64,
    /// How long after a coalescing group opens identical prompts may still join it, in
    /// seconds. Default 5.
    pub coalesce_window_s: f64,
    /// Most groups held open at once. Default 10 000.
    pub max_open_groups: usize,
    /// Capacity of the sealed-group queue. Default 256.
    pub queue_capacity: usize,
    /// What is kept of each sample.
    pub privacy: PrivacyMode,
    /// Harvest each request's reference also as the ids the model would generate for it
    /// ([`HarvestedSample::reference_ids`]), for reference guidance. Default false.
    pub reference_ids: bool,
}

impl Default for AssemblerConfig {
    fn default() -> Self {
        AssemblerConfig {
            group_size: 8,
            min_group_size: 2,
            seal_timeout_s: 120.0,
            coalesce_window_s: 5.0,
            max_open_groups: 10_000,
            queue_capacity: 256,
            privacy: PrivacyMode::Full,
            reference_ids: false,
        }
    }
}

impl AssemblerConfig {
    /// Checks every field; the error names the offending one.
    pub fn check(&self) -> Result<(), HarvestError> {
        let bad = |m: String| Err(HarvestError::Config(m));
        if self.group_size == 0 {
            return bad("group_size must be positive".into());
        }
        if self.min_group_size == 0 || self.min_group_size > self.group_size {
            return bad(format!(
                "min_group_size {} must be in 1..=group_size ({})",
                self.min_group_size, self.group_size
            ));
        }
        for (name, v) in [
            ("seal_timeout_s", self.seal_timeout_s),
            ("coalesce_window_s", self.coalesce_window_s),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} {v} must be finite and >= 0"));
            }
        }
        if self.max_open_groups == 0 || self.queue_capacity == 0 {
            return bad("max_open_groups and queue_capacity must be positive".into());
        }
        Ok(())
    }
}

/// A sealed group, ready for the advantage estimator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SealedGroup {
    /// The group's id (`g<number>-<prompt key>`).
    pub id: String,
    /// The prompt key every member shares.
    pub prompt_key: String,
    /// The members with their rewards, in arrival order.
    pub members: Vec<(HarvestedSample, f64)>,
    /// Whether it was sealed by the timeout with fewer members than expected.
    pub partial: bool,
    /// When it was sealed, ms since the Unix epoch.
    pub sealed_unix_ms: u64,
}

impl SealedGroup {
    /// The validated training group: each member's ids, behaviour log-probs and reward, with
    /// the request, prompt and adapter version that produced it.
    pub fn to_group(&self) -> Result<Group, GroupError> {
        Group::new(self.id.clone(), self.rollouts())
    }

    /// The members as rollouts (ids, log-probs, reward) with the request, prompt and adapter
    /// version of each, in member order.
    pub fn rollouts(&self) -> Vec<Rollout> {
        self.members
            .iter()
            .map(|(s, r)| Rollout {
                tokens: s.completion_ids.clone(),
                logprobs: s.logprobs.clone(),
                reward: *r,
                meta: Some(RolloutMeta {
                    request_id: s.request_id.clone(),
                    prompt_id: s.prompt_key.clone(),
                    adapter_version: s.adapter_version.clone(),
                }),
            })
            .collect()
    }

    /// The reference answer's ids that the first member carrying them holds (every member
    /// answers the same prompt), if any.
    pub fn reference_ids(&self) -> Option<&[u32]> {
        self.members
            .iter()
            .find_map(|(s, _)| s.reference_ids.as_deref())
            .filter(|ids| !ids.is_empty())
    }
}

/// Counters of the assembler (also exported as `leaf_*` metrics).
#[derive(Debug, Default)]
pub struct AssemblerStats {
    /// Samples accepted.
    pub harvested: AtomicU64,
    /// Rewards recorded (at harvest or by feedback).
    pub rewards: AtomicU64,
    /// Groups sealed (partial ones included).
    pub sealed: AtomicU64,
    /// Groups sealed by the timeout with fewer members than expected.
    pub sealed_partial: AtomicU64,
    /// Groups dropped because fewer than `min_group_size` members had rewards.
    pub dropped_too_small: AtomicU64,
    /// Sealed groups dropped because the queue was full or closed.
    pub dropped_queue_full: AtomicU64,
    /// Samples dropped because `max_open_groups` groups were open.
    pub dropped_capacity: AtomicU64,
    /// Sealed groups dropped because the trainer was down (or restarting with a full queue),
    /// and groups a crashed trainer held.
    pub dropped_trainer_down: AtomicU64,
    /// Unrewarded members dropped from partial groups.
    pub dropped_unrewarded: AtomicU64,
    /// Coalescing groups dropped as soon as they could no longer fill: their joining window
    /// closed with fewer than `min_group_size` members (a prompt nobody repeated).
    pub dropped_unfillable: AtomicU64,
}

/// Which group a sample joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// The open coalescing group of its prompt (see the module docs).
    Coalesce,
    /// A group reserved with [`GroupAssembler::reserve`].
    Reserved(u64),
}

#[derive(Debug)]
struct OpenGroup {
    prompt_key: Option<String>,
    expected: usize,
    members: Vec<(HarvestedSample, Option<f64>)>,
    opened: Instant,
    coalescing: bool,
}

impl OpenGroup {
    fn complete(&self) -> bool {
        self.members.len() >= self.expected && self.members.iter().all(|m| m.1.is_some())
    }
}

/// Collects samples into groups and seals them (see the module docs). Cheap to share: every
/// method takes `&self`.
#[derive(Debug)]
pub struct GroupAssembler {
    config: AssemblerConfig,
    groups: DashMap<u64, OpenGroup>,
    by_prompt: DashMap<String, u64>,
    by_request: DashMap<String, u64>,
    next: AtomicU64,
    tx: Sender<SealedGroup>,
    stats: Arc<AssemblerStats>,
    trainer: Arc<TrainerLiveness>,
}

impl GroupAssembler {
    /// An assembler and the receiving end of its sealed-group queue.
    pub fn new(config: AssemblerConfig) -> Result<(Self, Receiver<SealedGroup>), HarvestError> {
        config.check()?;
        let (tx, rx) = crossbeam_channel::bounded(config.queue_capacity);
        Ok((
            GroupAssembler {
                config,
                groups: DashMap::new(),
                by_prompt: DashMap::new(),
                by_request: DashMap::new(),
                next: AtomicU64::new(1),
                tx,
                stats: Arc::new(AssemblerStats::default()),
                trainer: Arc::new(TrainerLiveness::default()),
            },
            rx,
        ))
    }

    /// The configuration.
    pub fn config(&self) -> &AssemblerConfig {
        &self.config
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<AssemblerStats> {
        &self.stats
    }

    /// The liveness of the sealed groups' consumer (set by the online trainer).
    pub fn trainer(&self) -> &Arc<TrainerLiveness> {
        &self.trainer
    }

    /// Counts `n` sealed groups lost with a crashed trainer.
    pub fn count_trainer_down(&self, n: u64) {
        if n > 0 {
            self.stats
                .dropped_trainer_down
                .fetch_add(n, Ordering::Relaxed);
            metrics::counter!("leaf_groups_dropped_total", "reason" => "trainer_down").increment(n);
        }
    }

    /// Groups currently open.
    pub fn open_groups(&self) -> usize {
        self.groups.len()
    }

    /// Sealed groups waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.tx.len()
    }

    /// Reserves a group expecting `expected` samples (at least 1) for the group policy; `None`
    /// when `max_open_groups` groups are open.
    pub fn reserve(&self, expected: usize) -> Option<u64> {
        if self.groups.len() >= self.config.max_open_groups {
            self.stats.dropped_capacity.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("leaf_groups_dropped_total", "reason" => "capacity").increment(1);
            return None;
        }
        let no = self.next.fetch_add(1, Ordering::Relaxed);
        self.groups.insert(
            no,
            OpenGroup {
                prompt_key: None,
                expected: expected.max(1),
                members: Vec::new(),
                opened: Instant::now(),
                coalescing: false,
            },
        );
        self.gauges();
        Some(no)
    }

    /// One sample of reserved group `group` will never arrive (its fork failed).
    pub fn expect_fewer(&self, group: u64) {
        if let Some(mut g) = self.groups.get_mut(&group) {
            g.expected = g.expected.saturating_sub(1).max(1);
        }
        self.try_seal(group);
    }

    /// Adds a sample with its reward if already known. Returns the group number it joined, or
    /// `None` when it was dropped (capacity, or its reserved group is gone).
    pub fn submit(
        &self,
        mut sample: HarvestedSample,
        reward: Option<f64>,
        membership: Membership,
    ) -> Option<u64> {
        if self.config.privacy == PrivacyMode::IdsOnly {
            sample.text = None;
            sample.reference = None;
        }
        let reward = reward.filter(|r| r.is_finite());
        let request_id = sample.request_id.clone();
        let key = sample.prompt_key.clone();
        let rewarded = reward.is_some();
        let no = match membership {
            Membership::Reserved(no) => {
                let mut g = self.groups.get_mut(&no)?;
                g.prompt_key.get_or_insert_with(|| key.clone());
                g.members.push((sample, reward));
                no
            }
            Membership::Coalesce => {
                let window = Duration::from_secs_f64(self.config.coalesce_window_s);
                let k = self.config.group_size;
                let mut entry = self.by_prompt.entry(key.clone()).or_insert(0);
                let joined = match self.groups.get_mut(&*entry) {
                    Some(mut g) if g.opened.elapsed() <= window && g.members.len() < k => {
                        g.members.push((sample.clone(), reward));
                        Some(*entry)
                    }
                    _ => None,
                };
                match joined {
                    Some(no) => no,
                    None => {
                        if self.groups.len() >= self.config.max_open_groups {
                            self.stats.dropped_capacity.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("leaf_groups_dropped_total", "reason" => "capacity")
                                .increment(1);
                            return None;
                        }
                        let no = self.next.fetch_add(1, Ordering::Relaxed);
                        self.groups.insert(
                            no,
                            OpenGroup {
                                prompt_key: Some(key.clone()),
                                expected: k,
                                members: vec![(sample, reward)],
                                opened: Instant::now(),
                                coalescing: true,
                            },
                        );
                        *entry = no;
                        no
                    }
                }
            }
        };
        self.by_request.insert(request_id, no);
        self.stats.harvested.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("leaf_rollouts_harvested_total").increment(1);
        if rewarded {
            self.stats.rewards.fetch_add(1, Ordering::Relaxed);
        }
        self.try_seal(no);
        self.gauges();
        Some(no)
    }

    /// Records feedback for a request still held in an open group.
    pub fn set_reward(&self, request_id: &str, reward: f64) -> Result<(), HarvestError> {
        if !reward.is_finite() {
            return Err(HarvestError::BadReward {
                request_id: request_id.to_string(),
                value: reward,
            });
        }
        let unknown = || HarvestError::UnknownRequest {
            request_id: request_id.to_string(),
        };
        let no = *self.by_request.get(request_id).ok_or_else(unknown)?;
        {
            let mut g = self.groups.get_mut(&no).ok_or_else(unknown)?;
            let member = g
                .members
                .iter_mut()
                .find(|m| m.0.request_id == request_id)
                .ok_or_else(unknown)?;
            member.1 = Some(reward);
        }
        self.stats.rewards.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("leaf_feedback_total").increment(1);
        self.try_seal(no);
        Ok(())
    }

    /// Seals or drops every group open longer than `seal_timeout_s`, and drops at once every
    /// coalescing group that can no longer fill (its joining window closed with fewer than
    /// `min_group_size` members: holding it to the timeout would only keep a prompt nobody
    /// repeats, and its reference, in memory). Returns how many groups it closed. Called
    /// periodically by the server.
    pub fn sweep(&self) -> usize {
        let timeout = Duration::from_secs_f64(self.config.seal_timeout_s);
        let window = Duration::from_secs_f64(self.config.coalesce_window_s);
        let min = self.config.min_group_size.min(self.config.group_size);
        let unfillable =
            |g: &OpenGroup| g.coalescing && g.opened.elapsed() > window && g.members.len() < min;
        let expired: Vec<(u64, bool)> = self
            .groups
            .iter()
            .filter(|g| g.opened.elapsed() >= timeout || unfillable(g))
            .map(|g| (*g.key(), g.opened.elapsed() < timeout))
            .collect();
        let mut closed = 0;
        for (no, early) in expired {
            let Some((_, g)) = self.groups.remove_if(&no, |_, g| !early || unfillable(g)) else {
                continue;
            };
            closed += 1;
            if early {
                self.unindex(no, &g);
                self.stats
                    .dropped_unfillable
                    .fetch_add(1, Ordering::Relaxed);
                metrics::counter!("leaf_groups_dropped_total", "reason" => "unfillable")
                    .increment(1);
            } else {
                self.close(no, g, true);
            }
        }
        self.gauges();
        closed
    }

    /// Seals every open group now, as the timeout would (for shutdown).
    pub fn flush(&self) -> usize {
        let all: Vec<u64> = self.groups.iter().map(|g| *g.key()).collect();
        let mut closed = 0;
        for no in all {
            if let Some((_, g)) = self.groups.remove(&no) {
                closed += 1;
                self.close(no, g, true);
            }
        }
        self.gauges();
        closed
    }

    fn try_seal(&self, no: u64) {
        if let Some((_, g)) = self.groups.remove_if(&no, |_, g| g.complete()) {
            self.close(no, g, false);
            self.gauges();
        }
    }

    /// Removes the request and prompt indexes of a removed group.
    fn unindex(&self, no: u64, g: &OpenGroup) {
        for (s, _) in &g.members {
            self.by_request.remove_if(&s.request_id, |_, v| *v == no);
        }
        if let Some(key) = &g.prompt_key {
            if g.coalescing {
                self.by_prompt.remove_if(key, |_, v| *v == no);
            }
        }
    }

    /// Removes the indexes of a removed group and seals or drops it.
    fn close(&self, no: u64, g: OpenGroup, timed_out: bool) {
        self.unindex(no, &g);
        let expected = g.expected;
        let age = g.opened.elapsed().as_secs_f64();
        let total = g.members.len();
        let members: Vec<(HarvestedSample, f64)> = g
            .members
            .into_iter()
            .filter_map(|(s, r)| r.map(|r| (s, r)))
            .collect();
        let unrewarded = total - members.len();
        if unrewarded > 0 {
            self.stats
                .dropped_unrewarded
                .fetch_add(unrewarded as u64, Ordering::Relaxed);
        }
        let partial = timed_out && members.len() < expected;
        if members.len() < self.config.min_group_size.min(expected) || members.is_empty() {
            self.stats.dropped_too_small.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("leaf_groups_dropped_total", "reason" => "too_small").increment(1);
            return;
        }
        let prompt_key = g.prompt_key.unwrap_or_default();
        let sealed = SealedGroup {
            id: format!("g{no}-{prompt_key}"),
            prompt_key,
            members,
            partial,
            sealed_unix_ms: now_unix_ms(),
        };
        let trainer = self.trainer.state();
        if trainer == TrainerState::Down {
            self.count_trainer_down(1);
            return;
        }
        match self.tx.try_send(sealed) {
            Ok(()) => {
                self.stats.sealed.fetch_add(1, Ordering::Relaxed);
                if partial {
                    self.stats.sealed_partial.fetch_add(1, Ordering::Relaxed);
                }
                metrics::counter!("leaf_groups_sealed_total").increment(1);
                metrics::histogram!("leaf_group_seal_seconds").record(age);
            }
            Err(TrySendError::Full(_)) if trainer == TrainerState::Restarting => {
                self.count_trainer_down(1);
            }
            Err(TrySendError::Disconnected(_))
                if !matches!(trainer, TrainerState::Absent | TrainerState::Stopped) =>
            {
                self.count_trainer_down(1);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
                metrics::counter!("leaf_groups_dropped_total", "reason" => "queue_full")
                    .increment(1);
            }
        }
    }

    fn gauges(&self) {
        metrics::gauge!("leaf_open_groups").set(self.groups.len() as f64);
        metrics::gauge!("leaf_sealed_queue_depth").set(self.tx.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harvest::SampleOrigin;

    fn sample(id: &str, prompt: &[u32]) -> HarvestedSample {
        HarvestedSample {
            request_id: id.into(),
            prompt_key: crate::harvest::prompt_key(prompt),
            prompt_ids: prompt.to_vec(),
            completion_ids: vec![5, 6],
            logprobs: vec![-0.5, -0.25],
            adapter_version: "base".into(),
            engine_id: "policy@0".into(),
            origin: SampleOrigin::User,
            finish_reason: "stop".into(),
            started_unix_ms: 0,
            finished_unix_ms: 1,
            text: Some("hello".into()),
            reference: Some("hello".into()),
            reference_ids: None,
            task: None,
        }
    }

    fn cfg(k: usize) -> AssemblerConfig {
        AssemblerConfig {
            group_size: k,
            ..AssemblerConfig::default()
        }
    }

    #[test]
    fn reserved_group_seals_when_all_rewarded() {
        let (a, rx) = GroupAssembler::new(cfg(3)).unwrap();
        let g = a.reserve(3).unwrap();
        a.submit(sample("a", &[1]), Some(1.0), Membership::Reserved(g));
        a.submit(sample("b", &[1]), None, Membership::Reserved(g));
        a.submit(sample("c", &[1]), Some(0.0), Membership::Reserved(g));
        assert!(rx.try_recv().is_err(), "b has no reward yet");
        assert_eq!(
            a.set_reward("zzz", 1.0),
            Err(HarvestError::UnknownRequest {
                request_id: "zzz".into()
            })
        );
        assert!(matches!(
            a.set_reward("b", f64::NAN),
            Err(HarvestError::BadReward { .. })
        ));
        a.set_reward("b", 0.5).unwrap();
        let sealed = rx.try_recv().unwrap();
        assert_eq!(sealed.members.len(), 3);
        assert!(!sealed.partial);
        let rewards: Vec<f64> = sealed.members.iter().map(|m| m.1).collect();
        assert_eq!(rewards, vec![1.0, 0.5, 0.0]);
        assert_eq!(a.open_groups(), 0);
        // Sealed: feedback is refused with a typed error.
        assert!(matches!(
            a.set_reward("b", 0.1),
            Err(HarvestError::UnknownRequest { .. })
        ));
    }

    #[test]
    fn identical_prompts_coalesce_and_different_ones_do_not() {
        let (a, rx) = GroupAssembler::new(cfg(2)).unwrap();
        a.submit(sample("a", &[1, 2]), Some(1.0), Membership::Coalesce);
        a.submit(sample("x", &[9]), Some(1.0), Membership::Coalesce);
        a.submit(sample("b", &[1, 2]), Some(0.0), Membership::Coalesce);
        let g = rx.try_recv().unwrap();
        let ids: Vec<&str> = g.members.iter().map(|m| m.0.request_id.as_str()).collect();
        assert_eq!(ids, vec!["a", "b"]);
        assert!(rx.try_recv().is_err());
        assert_eq!(a.open_groups(), 1);
    }

    #[test]
    fn coalescing_groups_that_cannot_fill_are_dropped_at_once_and_counted() {
        let (a, rx) = GroupAssembler::new(AssemblerConfig {
            coalesce_window_s: 0.0,
            seal_timeout_s: 3600.0,
            ..cfg(4)
        })
        .unwrap();
        // A unique prompt: its window is over, one member < min_group_size 2.
        a.submit(sample("u", &[7]), Some(1.0), Membership::Coalesce);
        // A repeated prompt that reached min_group_size waits for the timeout as before.
        let g = a.reserve(4).unwrap();
        a.submit(sample("r1", &[8]), Some(1.0), Membership::Reserved(g));
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(a.sweep(), 1);
        assert_eq!(a.open_groups(), 1);
        assert!(rx.try_recv().is_err());
        assert_eq!(a.stats().dropped_unfillable.load(Ordering::Relaxed), 1);
        assert_eq!(a.stats().dropped_too_small.load(Ordering::Relaxed), 0);
        // Its request id is forgotten: feedback is refused with a typed error.
        assert!(matches!(
            a.set_reward("u", 0.1),
            Err(HarvestError::UnknownRequest { .. })
        ));
    }

    #[test]
    fn timeout_seals_partial_or_drops() {
        let (a, rx) = GroupAssembler::new(AssemblerConfig {
            seal_timeout_s: 0.0,
            ..cfg(4)
        })
        .unwrap();
        let g = a.reserve(4).unwrap();
        a.submit(sample("a", &[1]), Some(1.0), Membership::Reserved(g));
        a.submit(sample("b", &[1]), Some(0.0), Membership::Reserved(g));
        a.submit(sample("c", &[1]), None, Membership::Reserved(g));
        let g2 = a.reserve(4).unwrap();
        a.submit(sample("d", &[2]), Some(1.0), Membership::Reserved(g2));
        assert_eq!(a.sweep(), 2);
        let sealed = rx.try_recv().unwrap();
        assert!(sealed.partial);
        assert_eq!(sealed.members.len(), 2);
        assert!(rx.try_recv().is_err());
        let s = a.stats();
        assert_eq!(s.dropped_too_small.load(Ordering::Relaxed), 1);
        assert_eq!(s.dropped_unrewarded.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let (a, rx) = GroupAssembler::new(AssemblerConfig {
            queue_capacity: 1,
            min_group_size: 1,
            ..cfg(1)
        })
        .unwrap();
        a.submit(sample("a", &[1]), Some(1.0), Membership::Coalesce);
        a.submit(sample("b", &[2]), Some(1.0), Membership::Coalesce);
        assert_eq!(a.stats().dropped_queue_full.load(Ordering::Relaxed), 1);
        assert_eq!(rx.len(), 1);
    }

    #[test]
    fn a_dead_trainer_counts_trainer_down_not_queue_full() {
        let (a, rx) = GroupAssembler::new(AssemblerConfig {
            queue_capacity: 1,
            min_group_size: 1,
            ..cfg(1)
        })
        .unwrap();
        let s = a.stats().clone();
        let down = || s.dropped_trainer_down.load(Ordering::Relaxed);
        a.trainer().set_state(TrainerState::Restarting);
        a.submit(sample("a", &[1]), Some(1.0), Membership::Coalesce);
        assert_eq!(rx.len(), 1, "a restarting trainer still gets the queue");
        a.submit(sample("b", &[2]), Some(1.0), Membership::Coalesce);
        assert_eq!(down(), 1, "full while restarting");
        rx.try_recv().unwrap();
        a.trainer().set_state(TrainerState::Down);
        a.submit(sample("c", &[3]), Some(1.0), Membership::Coalesce);
        assert_eq!(down(), 2);
        assert_eq!(rx.len(), 0, "nothing is queued for a dead trainer");
        a.trainer().set_state(TrainerState::Up);
        drop(rx);
        a.submit(sample("d", &[4]), Some(1.0), Membership::Coalesce);
        assert_eq!(down(), 3, "a closed queue with a trainer attached");
        assert_eq!(s.dropped_queue_full.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn failed_fork_lowers_the_expected_size() {
        let (a, rx) = GroupAssembler::new(cfg(3)).unwrap();
        let g = a.reserve(3).unwrap();
        a.submit(sample("a", &[1]), Some(1.0), Membership::Reserved(g));
        a.submit(sample("b", &[1]), Some(0.0), Membership::Reserved(g));
        a.expect_fewer(g);
        assert_eq!(rx.try_recv().unwrap().members.len(), 2);
    }

    #[test]
    fn ids_only_privacy_strips_text() {
        let (a, rx) = GroupAssembler::new(AssemblerConfig {
            privacy: PrivacyMode::IdsOnly,
            min_group_size: 1,
            ..cfg(1)
        })
        .unwrap();
        a.submit(sample("a", &[1]), Some(1.0), Membership::Coalesce);
        let g = rx.try_recv().unwrap();
        assert_eq!(g.members[0].0.text, None);
        assert_eq!(g.members[0].0.reference, None);
        assert_eq!(g.members[0].0.completion_ids, vec![5, 6]);
    }

    #[test]
    fn capacity_is_bounded() {
        let (a, _rx) = GroupAssembler::new(AssemblerConfig {
            max_open_groups: 1,
            ..cfg(4)
        })
        .unwrap();
        assert!(a
            .submit(sample("a", &[1]), None, Membership::Coalesce)
            .is_some());
        assert!(a
            .submit(sample("b", &[2]), None, Membership::Coalesce)
            .is_none());
        assert!(a.reserve(2).is_none());
        assert_eq!(a.stats().dropped_capacity.load(Ordering::Relaxed), 2);
    }
}
