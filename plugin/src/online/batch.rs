//! Sourced groups -> validated groups -> advantages -> trainer samples: the one conversion
//! both the online trainer and the main job's learner run before an update.

use serde::{Deserialize, Serialize};

use super::source::SourcedGroup;
use crate::advantage::{AdvantageEstimator, ForkStats};
use crate::rollout::{Group, Rollout};
use crate::trainer::TrainSample;

/// Reference guidance (off-policy guidance in the manner of LUFFY, Yan et al. 2025, "Learning
/// to Reason under Off-Policy Guidance"): a group whose request carried a reference answer
/// gets it as one more member, scored `reward`, before advantages are computed. The sampled
/// members are then compared with an answer known to be right, so a prompt none of whose
/// samples was right still teaches something, and the update pulls towards the reference
/// rather than only away from the sampled mistakes (the README measures what that did to greedy
/// answers on the spoken-digit workload: nothing beyond noise). The reference member is
/// trained as a demonstration (no importance weight: the policy did not sample it). Its
/// surprisal is unknown, so LEAF's fork boundaries come from the sampled members only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReferenceGuidance {
    /// The reference member's reward. Default 1, the maximum of every reference metric
    /// (`leaf_plugin::reward`), which a reference scores against itself.
    pub reward: f64,
}

impl Default for ReferenceGuidance {
    fn default() -> Self {
        ReferenceGuidance { reward: 1.0 }
    }
}

/// Supervised learning on the traffic's reference answers, alongside the reinforcement
/// objective (the mix of SRFT, Fu et al. 2025, "SRFT: A Single-Stage Method with Supervised
/// and Reinforcement Fine-Tuning for Reasoning", in its simplest form): every group whose
/// request carried a reference answer also yields that reference as a demonstration with the
/// constant advantage `weight` on each token. On the first pass over a batch the token-level
/// PPO term of a demonstration is then exactly `weight` times the negative log-likelihood of
/// the reference: its gradient is the supervised one. It does not depend on the group's
/// rewards, so a group whose samples all scored the same (or a one-sample group: a labelled
/// request that was not forked, see `GroupPolicy::labelled_singles`) still teaches.
///
/// The README measures why it is there: on the spoken-digit workload the base model's greedy
/// answers are limited by optimisation, and supervised steps on distinct labelled requests
/// close that gap where reinforcement on the model's own samples does not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisedReference {
    /// Weight of the reference's log-likelihood against the reinforcement term (advantages
    /// are z-scored, so 1 puts a reference token on the scale of a sampled token one standard
    /// deviation above its group). Default 1; must be finite and positive.
    pub weight: f64,
    /// One-member groups (labelled requests nobody compared) that make an update on their
    /// own when fewer than `groups_per_update` compared groups arrived with them. Default 8.
    pub singles_per_update: usize,
}

impl Default for SupervisedReference {
    fn default() -> Self {
        SupervisedReference {
            weight: 1.0,
            singles_per_update: 8,
        }
    }
}

impl SupervisedReference {
    /// Checks the settings; the message names the bad one.
    pub fn check(&self) -> Result<(), String> {
        if !(self.weight.is_finite() && self.weight > 0.0) {
            return Err(format!(
                "supervised.weight {} must be finite and positive",
                self.weight
            ));
        }
        if self.singles_per_update == 0 {
            return Err("supervised.singles_per_update must be positive".into());
        }
        Ok(())
    }
}

/// When the groups a learner holds make an update: `groups` groups of two or more responses
/// (what advantages compare), or `singles` one-response groups (labelled requests that only
/// the supervised objective learns from), whichever comes first. Without the supervised
/// objective one-response groups count as groups, as they always did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRule {
    /// Compared groups per update.
    pub groups: usize,
    /// One-response groups per update (`usize::MAX`: they only ride along).
    pub singles: usize,
}

impl BatchRule {
    /// The rule of a learner with `groups_per_update` and, maybe, the supervised objective.
    pub fn new(groups_per_update: usize, supervised: Option<&SupervisedReference>) -> Self {
        BatchRule {
            groups: groups_per_update.max(1),
            singles: supervised.map_or(usize::MAX, |s| s.singles_per_update.max(1)),
        }
    }

    /// Whether groups with these response counts make an update.
    pub fn ready(&self, responses: impl IntoIterator<Item = usize>) -> bool {
        let (mut compared, mut singles) = (0usize, 0usize);
        for n in responses {
            if n >= 2 || self.singles == usize::MAX {
                compared += 1;
            } else {
                singles += 1;
            }
        }
        compared >= self.groups || singles >= self.singles
    }

    /// Cuts `items` (in order) into the batches this rule makes, the last one possibly short;
    /// `responses` gives an item's response count.
    pub fn batches<T>(&self, items: Vec<T>, responses: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
        let mut out = Vec::new();
        let mut batch: Vec<T> = Vec::new();
        for item in items {
            batch.push(item);
            if self.ready(batch.iter().map(&responses)) {
                out.push(std::mem::take(&mut batch));
            }
        }
        if !batch.is_empty() {
            out.push(batch);
        }
        out
    }
}

/// An advantage whose magnitude is below this counts as zero (z-scoring equal span values
/// leaves rounding residue of about 1e-10 rather than exact zeros).
pub const ZERO_ADVANTAGE: f64 = 1e-9;

/// A batch of groups, ready for [`Trainer::step`](crate::trainer::Trainer::step).
#[derive(Debug, Default)]
pub struct PreparedBatch {
    /// One sample per harvested response of an informative group, with its per-token
    /// advantages, behaviour log-probs and the adapter version that served it.
    pub samples: Vec<TrainSample>,
    /// Fork counts of the estimator over the batch (zero for GRPO).
    pub forks: ForkStats,
    /// Groups that became samples.
    pub groups: u64,
    /// Groups skipped because they did not validate (logged and counted in
    /// `leaf_groups_invalid_total`).
    pub invalid: u64,
    /// Groups left out because every advantage was zero (all rewards equal: nothing to learn;
    /// counted in `leaf_groups_uninformative_total`).
    pub uninformative: u64,
    /// Responses harvested in the batch, trained on or not (what a rollout budget counts).
    pub harvested: u64,
    /// Rewards of every valid group's responses, informative or not (reference members not
    /// included).
    pub all_rewards: Vec<f64>,
    /// Groups that got their reference as a member ([`ReferenceGuidance`]).
    pub guided: u64,
    /// Groups of one response: nothing to compare, so no advantages (with the supervised
    /// objective their reference still trains); not counted as uninformative.
    pub singles: u64,
    /// Advantage statistics over the valid groups, before the uninformative ones are left out.
    pub stats: BatchStats,
}

impl PreparedBatch {
    /// True when no sample has a token to train on.
    pub fn is_empty(&self) -> bool {
        self.samples.iter().all(|s| s.completion.is_empty())
    }
}

/// What the advantages of a batch looked like (the diagnostics of why an update moves the
/// policy or does not).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchStats {
    /// Valid groups.
    pub groups: u64,
    /// Share of valid groups whose rewards are not all equal (the only ones with signal).
    pub informative_group_share: f64,
    /// Mean per-token advantage over every response token of the valid groups.
    pub advantage_mean: f64,
    /// Its standard deviation (population).
    pub advantage_std: f64,
    /// Share of those tokens whose advantage is zero (below [`ZERO_ADVANTAGE`]).
    pub zero_advantage_share: f64,
    /// Mean reward of the valid groups' responses.
    pub reward_mean: f64,
    /// Share of valid groups that got their reference as a member ([`ReferenceGuidance`]).
    #[serde(default)]
    pub guided_group_share: f64,
    /// References trained on as supervised demonstrations ([`SupervisedReference`]).
    #[serde(default)]
    pub supervised: u64,
}

#[derive(Default)]
struct Moments {
    n: u64,
    zero: u64,
    sum: f64,
    sum_sq: f64,
}

impl Moments {
    fn add(&mut self, a: f64) {
        self.n += 1;
        self.sum += a;
        self.sum_sq += a * a;
        if a.abs() < ZERO_ADVANTAGE {
            self.zero += 1;
        }
    }

    fn stats(&self, groups: u64, informative: u64, guided: u64, rewards: &[f64]) -> BatchStats {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let mean = ratio(self.sum, self.n as f64);
        let var = (ratio(self.sum_sq, self.n as f64) - mean * mean).max(0.0);
        BatchStats {
            groups,
            informative_group_share: ratio(informative as f64, groups as f64),
            advantage_mean: mean,
            advantage_std: var.sqrt(),
            zero_advantage_share: ratio(self.zero as f64, self.n as f64),
            reward_mean: ratio(rewards.iter().sum(), rewards.len() as f64),
            guided_group_share: ratio(guided as f64, groups as f64),
            supervised: 0,
        }
    }
}

/// What a learner does with the references its groups carry.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReferenceUse<'a> {
    /// The reference as one more member of its group ([`ReferenceGuidance`]).
    pub guidance: Option<&'a ReferenceGuidance>,
    /// The reference as a supervised demonstration ([`SupervisedReference`]).
    pub supervised: Option<&'a SupervisedReference>,
}

/// Runs `estimator` on every group of `batch` and builds the trainer samples. Groups whose
/// advantages are all zero are left out (no sampled answer of theirs is trained on) but
/// counted, and they take part in [`PreparedBatch::stats`]; one-response groups have nothing
/// to compare and are counted as singles. With `references.guidance`, a group that carries
/// its reference's ids gets the reference as its last member first; with
/// `references.supervised`, every valid group that carries them adds the reference as a
/// demonstration of constant advantage (after every group's samples).
pub fn prepare_batch(
    batch: &[SourcedGroup],
    estimator: &dyn AdvantageEstimator,
    references: ReferenceUse<'_>,
) -> PreparedBatch {
    let guidance = references.guidance;
    let mut out = PreparedBatch::default();
    let mut demonstrations = Vec::new();
    let mut moments = Moments::default();
    let mut valid = 0u64;
    for sourced in batch {
        out.harvested += sourced.rollouts.len() as u64;
        if sourced.prompt_ids.is_empty() {
            tracing::warn!(group = %sourced.id, "group without prompt ids skipped");
            metrics::counter!("leaf_groups_invalid_total").increment(1);
            out.invalid += 1;
            continue;
        }
        let demonstration = guidance.zip(sourced.reference_ids.as_deref());
        let group = match sourced.to_group().and_then(|g| match demonstration {
            Some((guide, ids)) => with_reference(g, ids, guide.reward),
            None => Ok(g),
        }) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(group = %sourced.id, error = %e, "invalid group skipped");
                metrics::counter!("leaf_groups_invalid_total").increment(1);
                out.invalid += 1;
                continue;
            }
        };
        if let Some((sup, ids)) = references.supervised.zip(sourced.reference_ids.as_deref()) {
            if !ids.is_empty() {
                demonstrations.push(TrainSample {
                    prompt: sourced.prompt_ids.clone(),
                    completion: ids.to_vec(),
                    advantages: vec![sup.weight; ids.len()],
                    behaviour_logprobs: Vec::new(),
                    behaviour_version: String::new(),
                    demonstration: true,
                });
                metrics::counter!("leaf_references_supervised_total").increment(1);
            }
        }
        if group.rollouts().len() < 2 {
            // One response: nothing to compare it with.
            out.all_rewards
                .extend(sourced.rollouts.iter().map(|r| r.reward));
            metrics::counter!("leaf_groups_single_total").increment(1);
            out.singles += 1;
            continue;
        }
        valid += 1;
        let adv = estimator.estimate(&group);
        if let Some(s) = &adv.stats {
            out.forks.merge(s);
        }
        adv.per_token.iter().flatten().for_each(|a| moments.add(*a));
        out.all_rewards
            .extend(sourced.rollouts.iter().map(|r| r.reward));
        let informative = adv
            .per_token
            .iter()
            .flatten()
            .any(|a| a.abs() >= ZERO_ADVANTAGE);
        if !informative {
            metrics::counter!("leaf_groups_uninformative_total").increment(1);
            out.uninformative += 1;
            continue;
        }
        for (i, (r, a)) in group.rollouts().iter().zip(adv.per_token).enumerate() {
            // Members past the sampled ones are the reference: no behaviour to weigh against.
            let sampled = i < sourced.rollouts.len();
            let (behaviour_logprobs, behaviour_version) = if sampled {
                (r.logprobs.clone(), sourced.behaviour_version(i).to_string())
            } else {
                (Vec::new(), String::new())
            };
            out.samples.push(TrainSample {
                prompt: sourced.prompt_ids.clone(),
                completion: r.tokens.clone(),
                advantages: a,
                behaviour_logprobs,
                behaviour_version,
                demonstration: !sampled,
            });
        }
        if demonstration.is_some() {
            metrics::counter!("leaf_groups_guided_total").increment(1);
            out.guided += 1;
        }
        out.groups += 1;
    }
    out.stats = moments.stats(valid, out.groups, out.guided, &out.all_rewards);
    out.stats.supervised = demonstrations.len() as u64;
    out.samples.append(&mut demonstrations);
    out
}

/// `group` with the reference `ids` appended as a member scored `reward` (log-probs 0: the
/// policy did not sample it, and a zero surprisal never wins a fork boundary).
fn with_reference(
    group: Group,
    ids: &[u32],
    reward: f64,
) -> Result<Group, crate::rollout::GroupError> {
    let id = group.id().to_string();
    let mut rollouts = group.into_rollouts();
    rollouts.push(Rollout::new(ids.to_vec(), vec![0.0; ids.len()], reward));
    Group::new(id, rollouts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advantage::{EstimatorConfig, Grpo};
    use crate::online::GroupReceipt;

    fn guided(guide: &ReferenceGuidance) -> ReferenceUse<'_> {
        ReferenceUse {
            guidance: Some(guide),
            supervised: None,
        }
    }

    fn supervised(sup: &SupervisedReference) -> ReferenceUse<'_> {
        ReferenceUse {
            guidance: None,
            supervised: Some(sup),
        }
    }

    fn group(rewards: &[f64], reference_ids: Option<Vec<u32>>) -> SourcedGroup {
        SourcedGroup {
            id: "g".into(),
            prompt_ids: vec![1, 2],
            rollouts: rewards
                .iter()
                .enumerate()
                .map(|(i, &r)| Rollout::new(vec![10 + i as u32, 3], vec![-0.5, -0.1], r))
                .collect(),
            adapter_version: Some("v1".into()),
            reference_ids,
            receipt: GroupReceipt::none(),
        }
    }

    #[test]
    fn the_reference_makes_a_group_of_equal_rewards_teach_and_is_a_demonstration() {
        let equal = [group(&[0.0, 0.0, 0.0], Some(vec![20, 21, 3]))];
        let off = prepare_batch(&equal, &Grpo, ReferenceUse::default());
        assert_eq!((off.groups, off.uninformative, off.guided), (0, 1, 0));
        assert!(off.samples.is_empty());
        let on = prepare_batch(&equal, &Grpo, guided(&ReferenceGuidance::default()));
        assert_eq!((on.groups, on.uninformative, on.guided), (1, 0, 1));
        assert_eq!(on.stats.guided_group_share, 1.0);
        assert_eq!(off.stats.guided_group_share, 0.0);
        assert_eq!(on.samples.len(), 4);
        // GRPO over (0, 0, 0, 1): mean 0.25, sample std 0.5, so the reference gets
        // 0.75 / (0.5 + 1e-6) on every token and each sampled answer -0.25 / (0.5 + 1e-6).
        let scale = 0.5 + 1e-6;
        let reference = &on.samples[3];
        assert!(reference.demonstration);
        assert_eq!(reference.completion, [20, 21, 3]);
        assert!(reference.behaviour_logprobs.is_empty());
        assert_eq!(reference.behaviour_version, "");
        for a in &reference.advantages {
            assert!((a - 0.75 / scale).abs() < 1e-12, "{a}");
        }
        for s in &on.samples[..3] {
            assert!(!s.demonstration);
            assert_eq!(s.behaviour_version, "v1");
            assert_eq!(s.behaviour_logprobs, [-0.5, -0.1]);
            for a in &s.advantages {
                assert!((a + 0.25 / scale).abs() < 1e-12, "{a}");
            }
        }
        // The traffic's rewards exclude the reference; the harvested count too.
        assert_eq!(on.all_rewards, [0.0, 0.0, 0.0]);
        assert_eq!(on.harvested, 3);
    }

    #[test]
    fn without_reference_ids_guidance_changes_nothing_bit_for_bit() {
        let leaf = EstimatorConfig::default().build();
        let batch = [group(&[0.2, 0.9, 0.4], None), group(&[1.0, 0.0, 0.5], None)];
        let off = prepare_batch(&batch, leaf.as_ref(), ReferenceUse::default());
        let on = prepare_batch(&batch, leaf.as_ref(), guided(&ReferenceGuidance::default()));
        assert_eq!(off.samples, on.samples);
        assert_eq!((on.groups, on.guided), (2, 0));
    }

    #[test]
    fn a_guided_group_gives_the_same_advantages_on_every_run() {
        let leaf = EstimatorConfig::default().build();
        let batch = [group(&[0.2, 0.9, 0.4, 0.0], Some(vec![10, 3]))];
        let guide = ReferenceGuidance { reward: 0.8 };
        let a = prepare_batch(&batch, leaf.as_ref(), guided(&guide));
        let b = prepare_batch(&batch, leaf.as_ref(), guided(&guide));
        assert_eq!(a.samples, b.samples);
        assert_eq!(a.samples.len(), 5);
        // The reference (0.8, above the mean) ends above the answer that scored 0.
        let last = |i: usize| *a.samples[i].advantages.last().unwrap();
        assert!(last(4) > 0.0 && last(3) < 0.0, "{} vs {}", last(4), last(3));
    }

    #[test]
    fn supervised_references_train_with_constant_advantage_whatever_the_rewards() {
        let sup = SupervisedReference {
            weight: 0.5,
            singles_per_update: 4,
        };
        let batch = [
            // Informative: its samples train as before, its reference joins at the end.
            group(&[0.0, 1.0], Some(vec![20, 3])),
            // Equal rewards: no sample of its own, but its reference still trains.
            group(&[1.0, 1.0], Some(vec![21, 22, 3])),
            // A labelled request that was not forked: a single.
            group(&[0.4], Some(vec![23, 3])),
            // Compared but unlabelled: nothing supervised.
            group(&[0.0, 1.0], None),
        ];
        let off = prepare_batch(&batch, &Grpo, ReferenceUse::default());
        let on = prepare_batch(&batch, &Grpo, supervised(&sup));
        // The sampled answers are trained on exactly as without the objective.
        assert_eq!(on.samples[..4], off.samples[..]);
        assert_eq!((on.groups, on.uninformative, on.singles), (2, 1, 1));
        assert_eq!((off.groups, off.uninformative, off.singles), (2, 1, 1));
        assert_eq!((on.stats.supervised, off.stats.supervised), (3, 0));
        let demos = &on.samples[4..];
        let completions: Vec<&[u32]> = demos.iter().map(|d| &d.completion[..]).collect();
        assert_eq!(completions, [&[20, 3][..], &[21, 22, 3], &[23, 3]]);
        for d in demos {
            assert!(d.demonstration);
            assert_eq!(d.prompt, [1, 2]);
            assert!(d.behaviour_logprobs.is_empty());
            assert!(d.advantages.iter().all(|a| *a == 0.5));
        }
        // Singles are counted apart: the stats describe compared groups only.
        assert_eq!(on.stats.groups, 3);
        assert_eq!(on.harvested, 7);
        assert_eq!(on.all_rewards.len(), 7);
        assert!(!on.is_empty());
        // A batch of unlabelled singles has nothing to train on.
        let lone = prepare_batch(&[group(&[0.4], None)], &Grpo, supervised(&sup));
        assert!(lone.is_empty());
        assert_eq!((lone.singles, lone.uninformative), (1, 0));
        // Same batch, same bits.
        let again = prepare_batch(&batch, &Grpo, supervised(&sup));
        assert_eq!(again.samples, on.samples);
    }

    #[test]
    fn supervised_settings_are_checked() {
        assert!(SupervisedReference::default().check().is_ok());
        for weight in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let s = SupervisedReference {
                weight,
                ..SupervisedReference::default()
            };
            assert!(s.check().unwrap_err().contains("supervised.weight"));
        }
        let s = SupervisedReference {
            singles_per_update: 0,
            ..SupervisedReference::default()
        };
        assert!(s.check().unwrap_err().contains("singles_per_update"));
    }

    #[test]
    fn batches_close_on_compared_groups_or_on_singles() {
        let sup = SupervisedReference {
            singles_per_update: 3,
            ..SupervisedReference::default()
        };
        let with = BatchRule::new(2, Some(&sup));
        assert!(!with.ready([8, 1, 1]));
        assert!(with.ready([8, 1, 8]));
        assert!(with.ready([1, 1, 1]));
        assert!(!with.ready([]));
        // Without the objective every group counts, singles included.
        let without = BatchRule::new(2, None);
        assert!(without.ready([1, 1]));
        assert!(!without.ready([8]));
        // What is held at shutdown is cut by the same rule.
        let cut = with.batches(vec![1, 8, 1, 8, 1, 1, 1, 8], |n| *n);
        assert_eq!(cut, [vec![1, 8, 1, 8], vec![1, 1, 1], vec![8]]);
        assert_eq!(
            without.batches(vec![1, 8, 1], |n| *n),
            [vec![1, 8], vec![1]]
        );
        assert!(with.batches(Vec::<usize>::new(), |n| *n).is_empty());
    }
}
