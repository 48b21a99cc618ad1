//! `report.json` of `leaf run`, and the summary figures taken from `leaf eval` objects.
//!
//! The held-out **reward** of an evaluation is the mean over task families of the family's
//! mean sentence BLEU / 100 (the training reward, measured on the test takes with the run's
//! evaluation decoding); its **exact match** is the mean over families of the family's
//! exact-match rate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ceiling::Ceiling;
use super::run::EvalDecoding;
use crate::advantage::ForkStats;
use crate::online::{Phase, PhaseTimes, UpdateRecord, UpdateSummary};
use crate::speech::eval::EvalReport;

/// Held-out reward of an evaluation: mean over families of BLEU / 100 (0 when empty).
pub fn heldout_reward(eval: &EvalReport) -> f64 {
    mean(eval.in_speaker.tasks.values().map(|f| f.bleu / 100.0))
}

/// Held-out exact match of an evaluation: mean over families of the exact-match rate.
pub fn heldout_exact(eval: &EvalReport) -> f64 {
    mean(eval.in_speaker.tasks.values().map(|f| f.exact_match))
}

/// The mean of the values (0 for none).
pub fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

/// Reward and exact match of one task family at one point of the curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FamilyPoint {
    /// Mean BLEU / 100.
    pub reward: f64,
    /// Exact-match rate.
    pub exact_match: f64,
}

/// One held-out check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Rollouts (harvested samples) trained on so far.
    pub rollouts: u64,
    /// Held-out reward of the candidate adapter (see the module docs).
    pub reward: f64,
    /// Held-out exact match of the candidate.
    pub exact_match: f64,
    /// The version served after this check (the candidate when it was promoted, else the
    /// last good version).
    pub adapter_version: String,
    /// Whether the candidate was promoted.
    pub promoted: bool,
    /// Mean training reward of the samples trained on since the previous point.
    pub train_reward: f64,
    /// Per-family figures of the candidate.
    pub tasks: BTreeMap<String, FamilyPoint>,
    /// Seconds since the run started.
    pub seconds: f64,
}

impl CurvePoint {
    /// Per-family figures of an evaluation.
    pub fn families(eval: &EvalReport) -> BTreeMap<String, FamilyPoint> {
        eval.in_speaker
            .tasks
            .iter()
            .map(|(k, f)| {
                (
                    k.clone(),
                    FamilyPoint {
                        reward: f.bleu / 100.0,
                        exact_match: f.exact_match,
                    },
                )
            })
            .collect()
    }
}

/// LEAF's fork statistics summed over the groups trained on, with the rates derived from them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ForkSummary {
    /// The raw counts.
    pub counts: ForkStats,
    /// Boundaries that produced a node, per boundary accepted (0 with none).
    pub fork_fire_rate: f64,
    /// Nodes whose members' rewards differ, per node (0 with none).
    pub usable_fork_rate: f64,
    /// Mean members per node (0 with none).
    pub mean_node_size: f64,
}

impl ForkSummary {
    /// The rates of `counts`.
    pub fn from_counts(counts: ForkStats) -> Self {
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        ForkSummary {
            counts,
            fork_fire_rate: ratio(counts.fired_boundaries, counts.boundaries),
            usable_fork_rate: ratio(counts.usable_nodes, counts.nodes),
            mean_node_size: ratio(counts.node_members, counts.nodes),
        }
    }
}

/// The server's group-policy counters (extra samples of live prompts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupPolicyStats {
    /// Client requests eligible for the group policy.
    pub candidates: u64,
    /// Client requests whose policy fired.
    pub fired: u64,
    /// Extra samples harvested.
    pub usable: u64,
    /// Extra samples that failed or were skipped.
    pub failed: u64,
    /// Groups sealed.
    pub groups_sealed: u64,
    /// Groups dropped (too small, queue full).
    pub groups_dropped: u64,
}

/// Something the run decided on its own (a rollback, a refused promotion).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEvent {
    /// Rollouts trained on when it happened.
    pub rollouts: u64,
    /// `"nan_loss"`, `"reward_collapse"`, `"update_failed"` or `"publish_failed"`.
    pub kind: String,
    /// What happened, in words.
    pub message: String,
}

/// `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// `"leaf"` or `"grpo"`.
    pub estimator: String,
    /// Rollouts trained on.
    pub rollouts: u64,
    /// The rollout budget.
    pub rollout_budget: u64,
    /// Optimizer updates.
    pub updates: u64,
    /// How `base_eval`, `final_eval`, the rewards below and the curve decode.
    pub eval_decoding: EvalDecoding,
    /// `leaf eval` object of the base model.
    pub base_eval: EvalReport,
    /// `leaf eval` object of the final serving adapter (the base model's when none was
    /// promoted).
    pub final_eval: EvalReport,
    /// Held-out reward of the base model and of the final adapter (see the module docs).
    pub base_reward: f64,
    /// Held-out reward of the final adapter.
    pub final_reward: f64,
    /// Held-out exact match of the base model.
    pub base_exact_match: f64,
    /// Held-out exact match of the final adapter.
    pub final_exact_match: f64,
    /// The base model and the final adapter evaluated under the other decoding.
    pub other_decoding: OtherDecoding,
    /// The held-out checks, in order (the first is the base model at 0 rollouts).
    pub curve: Vec<CurvePoint>,
    /// Hot-swaps done (over every session of a resumed run).
    pub swaps: u64,
    /// Rollbacks to the last good version (NaN loss or reward collapse).
    pub rollbacks: u64,
    /// What the run decided on its own.
    pub events: Vec<RunEvent>,
    /// LEAF's fork statistics (all zero under GRPO).
    pub fork_stats: ForkSummary,
    /// The server's group-policy counters (this session).
    pub group_policy: GroupPolicyStats,
    /// The base model directory.
    pub base_model: PathBuf,
    /// The final serving adapter directory (`None` when the base model serves).
    pub final_adapter: Option<PathBuf>,
    /// Its store version.
    pub final_version: String,
    /// The adapter store.
    pub store: PathBuf,
    /// Traffic requests answered and failed (this session).
    pub requests: u64,
    /// Traffic requests that failed (this session).
    pub requests_failed: u64,
    /// Seconds of the whole run (this session), preparation of the model included.
    pub wall_seconds: f64,
    /// Seconds spent preparing (pre-training) the base model.
    pub prepare_seconds: f64,
    /// Sessions this run took (1 + resumes).
    pub sessions: u64,
    /// Every setting.
    pub settings: serde_json::Value,
    /// How to re-evaluate the final adapter.
    pub reproduce: String,
    /// Base greedy exact match, the base model's pass@K and the final greedy exact match per
    /// family, and the unheard speaker's recognition.
    pub ceiling: Ceiling,
    /// What the updates did and where the time went.
    pub diagnostics: Diagnostics,
}

/// Why a run's greedy answers moved or did not: per-update numbers, their summary, the wall
/// time per phase and the throughput of the learning phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Diagnostics {
    /// Means over the updates (first and last quarter for the entropy).
    pub summary: UpdateSummary,
    /// Seconds per phase of the learner thread (generation = waiting for sealed groups;
    /// rewards overlap generation, measured inside the server's reward source).
    pub phases: PhaseTimes,
    /// Seconds of the learning phase (traffic + learner, checks and swaps included).
    pub rl_seconds: f64,
    /// Rollouts harvested per second of the learning phase.
    pub rollouts_per_second: f64,
    /// CPU seconds of the process per wall second of the learning phase (2.0 = both cores of
    /// a 2-core machine busy).
    pub cpu_cores_busy: Option<f64>,
    /// Every update.
    pub updates: Vec<UpdateRecord>,
}

/// The base/final comparison of a run under the decoding it did not gate on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OtherDecoding {
    /// Which decoding.
    pub decoding: EvalDecoding,
    /// Held-out reward of the base model.
    pub base_reward: f64,
    /// Held-out reward of the final adapter.
    pub final_reward: f64,
    /// Held-out exact match of the base model.
    pub base_exact_match: f64,
    /// Held-out exact match of the final adapter.
    pub final_exact_match: f64,
    /// `leaf eval` object of the base model.
    pub base_eval: EvalReport,
    /// `leaf eval` object of the final adapter.
    pub final_eval: EvalReport,
}

impl RunReport {
    /// Writes the report as pretty JSON (through a temporary file and a rename).
    pub fn write(&self, path: &Path) -> crate::Result<()> {
        write_json(path, self)
    }
}

impl RunReport {
    /// The short diagnostics block `leaf run` prints at the end: the ceiling table, the unheard
    /// speaker, the update diagnostics and the time split.
    pub fn diagnostics_lines(&self) -> Vec<String> {
        let c = &self.ceiling;
        let mut out = vec![format!(
            "{:<8} {:>11} {:>7} {:>12} {:>10}",
            "family",
            "base greedy",
            format!("pass@{}", c.k),
            "final greedy",
            "gap closed"
        )];
        for (f, row) in &c.families {
            out.push(format!(
                "{f:<8} {:>11.3} {:>7.3} {:>12.3} {:>10}",
                row.base_greedy,
                row.base_pass_at_k,
                row.final_greedy,
                row.gap_closed
                    .map_or("-".to_string(), |g| format!("{:.0} %", 100.0 * g))
            ));
        }
        if let (Some(s), Some(b), Some(f)) = (
            &c.unheard_speaker,
            c.unheard_base_greedy_asr,
            c.unheard_final_greedy_asr,
        ) {
            out.push(format!(
                "unheard speaker {s}: greedy recognition exact match {b:.3} -> {f:.3}"
            ));
        }
        let d = &self.diagnostics;
        let u = &d.summary;
        out.push(format!(
            "{} updates: entropy {:.3} -> {:.3} nats/token, KL to base {:.4}, clip fraction \
             {:.3}, importance ratio mean {:.3} max {:.2}, grad norm {:.3}",
            u.updates,
            u.entropy_first,
            u.entropy_last,
            u.kl_last,
            u.clip_fraction,
            u.ratio_mean,
            u.ratio_max,
            u.grad_norm
        ));
        let guided = if u.guided_group_share > 0.0 {
            format!(
                " ({:.0} % guided by their reference)",
                100.0 * u.guided_group_share
            )
        } else {
            String::new()
        };
        out.push(format!(
            "advantages: std {:.3}, zero-advantage tokens {:.0} %, informative groups {:.0} %{guided}, \
             staleness {:.2} versions (max {})",
            u.advantage_std,
            100.0 * u.zero_advantage_share,
            100.0 * u.informative_group_share,
            u.staleness_mean,
            u.staleness_max
        ));
        if u.supervised > 0 {
            out.push(format!(
                "supervised: {} reference answers trained on as demonstrations",
                u.supervised
            ));
        }
        let p = |phase| d.phases.get(phase);
        out.push(format!(
            "time: generation {:.0} s (rewards {:.1} s within), advantages {:.1} s, training \
             {:.0} s, held-out checks {:.0} s, swaps {:.1} s; {:.1} rollouts/s, {} cores busy",
            p(Phase::Generation),
            p(Phase::Rewards),
            p(Phase::Advantages),
            p(Phase::Training),
            p(Phase::HeldoutChecks),
            p(Phase::Swaps),
            d.rollouts_per_second,
            d.cpu_cores_busy
                .map_or("?".to_string(), |c| format!("{c:.2}"))
        ));
        out
    }
}

/// Writes `value` as pretty JSON to `path` atomically (temporary file, then rename).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> crate::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| {
        super::JobError::Failed(format!("cannot serialise {}: {e}", path.display()))
    })?;
    let tmp = path.with_extension("json.tmp");
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| crate::Error::Io { path: p, source }
    };
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_summary_rates_by_hand() {
        let counts = ForkStats {
            groups: 2,
            boundaries: 4,
            fired_boundaries: 3,
            nodes: 5,
            usable_nodes: 2,
            node_members: 15,
            max_depth: 2,
            depth_sum: 3,
        };
        let s = ForkSummary::from_counts(counts);
        assert_eq!(s.fork_fire_rate, 0.75);
        assert_eq!(s.usable_fork_rate, 0.4);
        assert_eq!(s.mean_node_size, 3.0);
        let z = ForkSummary::from_counts(ForkStats::default());
        assert_eq!(
            (z.fork_fire_rate, z.usable_fork_rate, z.mean_node_size),
            (0.0, 0.0, 0.0)
        );
    }

    #[test]
    fn mean_of_values() {
        assert_eq!(mean([0.5, 1.0, 0.0].into_iter()), 0.5);
        assert_eq!(mean(std::iter::empty()), 0.0);
    }
}
