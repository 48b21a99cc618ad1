//! The ceiling that reinforcement learning can reach without new information: the base
//! model's **pass@k** (an example passes when any of k answers sampled the way the server
//! samples is an exact match), next to its greedy exact match, per task family. A run closes
//! `(final greedy - base greedy) / (pass@k - base greedy)` of that gap.

use std::collections::BTreeMap;

use leaf_adapters::model::LlamaModel;
use serde::{Deserialize, Serialize};

use crate::reward::{Metric, RewardOptions};
use crate::speech::eval::{evaluate_examples, family_examples, EvalConfig, EvalReport};
use crate::speech::prepare::ExampleEncoder;
use crate::speech::tasks::Corpus;

/// pass@k of one family.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FamilyPass {
    /// Examples.
    pub examples: usize,
    /// Share of examples with at least one exact answer among k samples.
    pub pass_at_k: f64,
    /// Mean exact match of a single sample (pass@1 under sampling).
    pub sample_exact: f64,
}

/// Base greedy, pass@k and final greedy exact match of one family.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FamilyCeiling {
    /// Base model, greedy exact match.
    pub base_greedy: f64,
    /// Base model, pass@k under the serving decoding.
    pub base_pass_at_k: f64,
    /// Final adapter, greedy exact match.
    pub final_greedy: f64,
    /// `(final - base greedy) / (pass@k - base greedy)`; `None` when there is no gap.
    pub gap_closed: Option<f64>,
}

impl FamilyCeiling {
    /// The ceiling row of one family.
    pub fn new(base_greedy: f64, base_pass_at_k: f64, final_greedy: f64) -> Self {
        let gap = base_pass_at_k - base_greedy;
        FamilyCeiling {
            base_greedy,
            base_pass_at_k,
            final_greedy,
            gap_closed: (gap > 1e-9).then(|| (final_greedy - base_greedy) / gap),
        }
    }
}

/// The run's ceiling table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ceiling {
    /// Samples per example.
    pub k: usize,
    /// Per family name.
    pub families: BTreeMap<String, FamilyCeiling>,
    /// The speaker never heard in pretraining or traffic, when there is one.
    pub unheard_speaker: Option<String>,
    /// Its greedy recognition exact match, base model.
    pub unheard_base_greedy_asr: Option<f64>,
    /// Its greedy recognition exact match, final adapter.
    pub unheard_final_greedy_asr: Option<f64>,
}

impl Ceiling {
    /// The table from the base model's pass@k and the greedy evaluations of the base model
    /// and the final adapter.
    pub fn new(
        k: usize,
        pass: &BTreeMap<String, FamilyPass>,
        base_greedy: &EvalReport,
        final_greedy: &EvalReport,
    ) -> Self {
        let exact = |e: &EvalReport, f: &str| e.in_speaker.tasks.get(f).map(|s| s.exact_match);
        let families = pass
            .iter()
            .filter_map(|(f, p)| {
                Some((
                    f.clone(),
                    FamilyCeiling::new(
                        exact(base_greedy, f)?,
                        p.pass_at_k,
                        exact(final_greedy, f)?,
                    ),
                ))
            })
            .collect();
        let unheard_asr = |e: &EvalReport| {
            e.holdout
                .as_ref()
                .and_then(|h| h.tasks.get("asr"))
                .map(|s| s.exact_match)
        };
        Ceiling {
            k,
            families,
            unheard_speaker: base_greedy
                .holdout
                .as_ref()
                .and_then(|h| h.speakers.first().cloned()),
            unheard_base_greedy_asr: unheard_asr(base_greedy),
            unheard_final_greedy_asr: unheard_asr(final_greedy),
        }
    }

    /// The smallest share of the gap closed over the families that have a gap.
    pub fn worst_gap_closed(&self) -> Option<f64> {
        self.families
            .values()
            .filter_map(|f| f.gap_closed)
            .min_by(f64::total_cmp)
    }
}

/// pass@k of `model` per family of `config` (its decoding must sample): every example of the
/// in-speaker evaluation is answered `k` times, each with its own draws.
pub fn pass_at_k(
    model: &LlamaModel,
    encoder: &ExampleEncoder,
    corpus: &Corpus,
    config: &EvalConfig,
    k: usize,
) -> crate::Result<BTreeMap<String, FamilyPass>> {
    let opts = RewardOptions::default();
    let mut out = BTreeMap::new();
    for (fi, family) in config.families.iter().enumerate() {
        let examples = family_examples(corpus, config, fi, 0)?;
        let repeated: Vec<_> = examples
            .iter()
            .flat_map(|e| std::iter::repeat_n(e.clone(), k))
            .collect();
        let scored = evaluate_examples(model, encoder, corpus, &repeated, config)?;
        let (mut pass, mut exact) = (0usize, 0.0);
        for answers in scored.chunks(k) {
            let em: Vec<f64> = answers
                .iter()
                .map(|s| Metric::Exact.raw_score(&s.hypothesis, &s.example.reference, opts))
                .collect();
            exact += em.iter().sum::<f64>();
            if em.iter().any(|m| *m >= 1.0) {
                pass += 1;
            }
        }
        let n = examples.len().max(1) as f64;
        out.insert(
            family.name().to_string(),
            FamilyPass {
                examples: examples.len(),
                pass_at_k: pass as f64 / n,
                sample_exact: exact / (n * k as f64),
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_closed_by_hand() {
        let c = FamilyCeiling::new(0.4, 0.8, 0.6);
        assert!((c.gap_closed.unwrap() - 0.5).abs() < 1e-12);
        assert!(FamilyCeiling::new(0.4, 0.8, 0.3).gap_closed.unwrap() < 0.0);
        assert_eq!(FamilyCeiling::new(0.9, 0.9, 0.9).gap_closed, None);
    }
}
