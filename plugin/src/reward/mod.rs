//! Rewards that match the references people publish: sentence BLEU and chrF(++) as
//! sacreBLEU 2.x computes them, WER and CER as jiwer 4 computes them, and exact match.
//!
//! Two layers:
//!
//! * raw scores on each metric's own scale ([`Metric::raw_score`], or the functions of
//!   [`bleu`], [`chrf`], [`edit`], [`exact`]): BLEU and chrF on sacreBLEU's 0-100 scale
//!   (higher is better), WER and CER as error rates (lower is better, unbounded above),
//!   exact match as 0 or 1;
//! * rewards ([`Reward`], built by [`Metric::reward`]): every metric mapped to [0, 1],
//!   higher is better, as the trainer wants them.
//!
//! | metric  | raw score                           | reward                          |
//! |---------|-------------------------------------|---------------------------------|
//! | bleu    | sacreBLEU `sentence_bleu`, 0-100    | raw / 100                       |
//! | chrf    | sacreBLEU `sentence_chrf`, 0-100    | raw / 100                       |
//! | chrf++  | sacreBLEU `CHRF(word_order=2)`      | raw / 100                       |
//! | wer     | jiwer `wer`: (S+D+I)/N, >= 0        | 1 - min(1, raw)                 |
//! | cer     | jiwer `cer`: (S+D+I)/N, >= 0        | 1 - min(1, raw)                 |
//! | exact   | 1 if equal after normalisation      | raw                             |
//! | positional | words equal at the same place / longer word count, 0-1 | raw          |
//!
//! One departure from raw / 100: sacreBLEU scores a pair with nothing on either side (no
//! tokens for BLEU, no non-whitespace character for chrF) as 0, but an empty answer to an
//! empty reference is right, so the BLEU and chrF rewards are 1 there, as the WER, CER and
//! exact rewards are. A BLEU with every n-gram matched and no brevity penalty is 100 exactly,
//! so its reward is 1 (sacreBLEU's float for it, `exp(mean(ln 100))`, is
//! 100.00000000000004); every reward is clamped to [0, 1].
//!
//! Text is never rejected: every metric accepts any UTF-8 (empty, whitespace-only, very
//! long, any script) and returns a finite number.

pub mod bleu;
pub mod chrf;
pub mod edit;
pub mod exact;
pub mod text;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use bleu::{sentence_bleu, BleuOptions, BleuScore};
pub use chrf::{sentence_chrf, ChrfOptions};
pub use edit::{cer, char_errors, wer, word_errors, EditCounts, ErrorRateOptions};
pub use exact::{exact_match, positional_accuracy};

/// A reward could not be computed or configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewardError {
    /// A metric name that is not one of [`Metric::ALL`].
    #[error("unknown metric {name:?} (expected one of: bleu, chrf, chrf++, wer, cer, exact, positional)")]
    UnknownMetric {
        /// The name that was given.
        name: String,
    },
}

/// Scores one hypothesis against one reference.
pub trait Reward: Send + Sync {
    /// The metric's name (`"bleu"`, `"chrf++"`, ...).
    fn name(&self) -> &'static str;

    /// The reward of `hypothesis` given `reference`: a finite value in [0, 1], higher is
    /// better, 1 for a perfect answer.
    fn score(&self, hypothesis: &str, reference: &str) -> f64;
}

/// Options shared by every metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardOptions {
    /// Compare case-insensitively (Python's `str.lower()` on both sides). Off by default,
    /// as in sacreBLEU and jiwer. Exact match always lowercases.
    #[serde(default)]
    pub lowercase: bool,
}

/// The metrics a reward can be built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
pub enum Metric {
    /// Sentence BLEU (sacreBLEU `sentence_bleu` defaults: 13a, exp smoothing, effective
    /// order). Raw 0-100, higher is better.
    #[serde(rename = "bleu")]
    #[value(name = "bleu")]
    Bleu,
    /// chrF (sacreBLEU `sentence_chrf` defaults: char 6-grams, beta 2). Raw 0-100, higher is
    /// better.
    #[serde(rename = "chrf")]
    #[value(name = "chrf")]
    Chrf,
    /// chrF++ (chrF plus word 1- and 2-grams). Raw 0-100, higher is better.
    #[serde(rename = "chrf++")]
    #[value(name = "chrf++")]
    ChrfPlusPlus,
    /// Word error rate (jiwer `wer`). Raw error rate >= 0, lower is better.
    #[serde(rename = "wer")]
    #[value(name = "wer")]
    Wer,
    /// Character error rate (jiwer `cer`). Raw error rate >= 0, lower is better.
    #[serde(rename = "cer")]
    #[value(name = "cer")]
    Cer,
    /// Exact match after [`text::normalize_for_exact`]. Raw 0 or 1, higher is better.
    #[serde(rename = "exact")]
    #[value(name = "exact")]
    Exact,
    /// Word accuracy by position ([`exact::positional_accuracy`]): partial credit where a
    /// missing word costs as much as a wrong one. Raw 0-1, higher is better.
    #[serde(rename = "positional")]
    #[value(name = "positional")]
    Positional,
}

impl Metric {
    /// Every metric, in CLI order.
    pub const ALL: [Metric; 7] = [
        Metric::Bleu,
        Metric::Chrf,
        Metric::ChrfPlusPlus,
        Metric::Wer,
        Metric::Cer,
        Metric::Exact,
        Metric::Positional,
    ];

    /// The metric's name as the CLI and serde spell it.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Bleu => "bleu",
            Metric::Chrf => "chrf",
            Metric::ChrfPlusPlus => "chrf++",
            Metric::Wer => "wer",
            Metric::Cer => "cer",
            Metric::Exact => "exact",
            Metric::Positional => "positional",
        }
    }

    /// Whether a larger raw score is better (false for the error rates).
    pub fn higher_is_better(self) -> bool {
        !matches!(self, Metric::Wer | Metric::Cer)
    }

    /// The reward of this metric with `options`.
    pub fn reward(self, options: RewardOptions) -> Box<dyn Reward> {
        match self {
            Metric::Bleu => Box::new(BleuReward::new(options)),
            Metric::Chrf => Box::new(ChrfReward::new(ChrfOptions {
                lowercase: options.lowercase,
                ..ChrfOptions::default()
            })),
            Metric::ChrfPlusPlus => Box::new(ChrfReward::new(ChrfOptions {
                lowercase: options.lowercase,
                ..ChrfOptions::chrf_plus_plus()
            })),
            Metric::Wer => Box::new(ErrorRateReward::words(options)),
            Metric::Cer => Box::new(ErrorRateReward::chars(options)),
            Metric::Exact => Box::new(ExactReward),
            Metric::Positional => Box::new(PositionalReward),
        }
    }

    /// The raw score on the metric's own scale (see the module table): BLEU and chrF 0-100,
    /// WER and CER as error rates, exact as 0 or 1.
    pub fn raw_score(self, hypothesis: &str, reference: &str, options: RewardOptions) -> f64 {
        let rate_options = ErrorRateOptions {
            lowercase: options.lowercase,
        };
        match self {
            Metric::Bleu => {
                sentence_bleu(
                    hypothesis,
                    reference,
                    &BleuOptions {
                        lowercase: options.lowercase,
                    },
                )
                .score
            }
            Metric::Chrf => sentence_chrf(
                hypothesis,
                reference,
                &ChrfOptions {
                    lowercase: options.lowercase,
                    ..ChrfOptions::default()
                },
            ),
            Metric::ChrfPlusPlus => sentence_chrf(
                hypothesis,
                reference,
                &ChrfOptions {
                    lowercase: options.lowercase,
                    ..ChrfOptions::chrf_plus_plus()
                },
            ),
            Metric::Wer => wer(hypothesis, reference, &rate_options),
            Metric::Cer => cer(hypothesis, reference, &rate_options),
            Metric::Exact => {
                if exact_match(hypothesis, reference) {
                    1.0
                } else {
                    0.0
                }
            }
            Metric::Positional => positional_accuracy(hypothesis, reference),
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Metric {
    type Err = RewardError;

    /// Parses a metric name, ignoring ASCII case and surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim();
        Metric::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| RewardError::UnknownMetric { name: s.to_owned() })
    }
}

/// Clamps a score already known to be finite into [0, 1].
fn unit(x: f64) -> f64 {
    x.clamp(0.0, 1.0)
}

/// Sentence BLEU / 100 as a reward (see the module docs for the empty-pair rule).
#[derive(Debug, Clone, Copy, Default)]
pub struct BleuReward {
    options: BleuOptions,
}

impl BleuReward {
    /// BLEU with the metric-wide `options`.
    pub fn new(options: RewardOptions) -> Self {
        BleuReward {
            options: BleuOptions {
                lowercase: options.lowercase,
            },
        }
    }
}

impl Reward for BleuReward {
    fn name(&self) -> &'static str {
        "bleu"
    }

    fn score(&self, hypothesis: &str, reference: &str) -> f64 {
        let s = sentence_bleu(hypothesis, reference, &self.options);
        if s.sys_len == 0 && s.ref_len == 0 {
            return 1.0;
        }
        // Every n-gram matched and no brevity penalty: BLEU is 100 exactly, whatever the
        // rounding of exp(mean(ln 100)) gives.
        if s.counts == s.totals && s.sys_len >= s.ref_len {
            return 1.0;
        }
        unit(s.score / 100.0)
    }
}

/// chrF or chrF++ / 100 as a reward (see the module docs for the empty-pair rule).
#[derive(Debug, Clone, Copy, Default)]
pub struct ChrfReward {
    options: ChrfOptions,
}

impl ChrfReward {
    /// chrF with explicit sacreBLEU options.
    pub fn new(options: ChrfOptions) -> Self {
        ChrfReward { options }
    }
}

impl Reward for ChrfReward {
    fn name(&self) -> &'static str {
        if self.options.word_order > 0 {
            "chrf++"
        } else {
            "chrf"
        }
    }

    fn score(&self, hypothesis: &str, reference: &str) -> f64 {
        let blank = |s: &str| {
            if self.options.whitespace {
                s.is_empty()
            } else {
                s.chars().all(text::is_py_whitespace)
            }
        };
        if blank(hypothesis) && blank(reference) {
            return 1.0;
        }
        let stats = chrf::chrf_statistics(hypothesis, reference, &self.options);
        unit(chrf::f_score(&stats, self.options.beta, self.options.eps_smoothing) / 100.0)
    }
}

/// `1 - min(1, error rate)` as a reward, over words (WER) or characters (CER).
#[derive(Debug, Clone, Copy)]
pub struct ErrorRateReward {
    options: ErrorRateOptions,
    chars: bool,
}

impl ErrorRateReward {
    /// Word error rate.
    pub fn words(options: RewardOptions) -> Self {
        ErrorRateReward {
            options: ErrorRateOptions {
                lowercase: options.lowercase,
            },
            chars: false,
        }
    }

    /// Character error rate.
    pub fn chars(options: RewardOptions) -> Self {
        ErrorRateReward {
            options: ErrorRateOptions {
                lowercase: options.lowercase,
            },
            chars: true,
        }
    }
}

impl Reward for ErrorRateReward {
    fn name(&self) -> &'static str {
        if self.chars {
            "cer"
        } else {
            "wer"
        }
    }

    fn score(&self, hypothesis: &str, reference: &str) -> f64 {
        let counts = if self.chars {
            char_errors(hypothesis, reference, &self.options)
        } else {
            word_errors(hypothesis, reference, &self.options)
        };
        unit(counts.reward())
    }
}

/// Exact match (0 or 1) as a reward.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExactReward;

impl Reward for ExactReward {
    fn name(&self) -> &'static str {
        "exact"
    }

    fn score(&self, hypothesis: &str, reference: &str) -> f64 {
        if exact_match(hypothesis, reference) {
            1.0
        } else {
            0.0
        }
    }
}

/// Word accuracy by position (0-1) as a reward.
#[derive(Debug, Clone, Copy, Default)]
pub struct PositionalReward;

impl Reward for PositionalReward {
    fn name(&self) -> &'static str {
        "positional"
    }

    fn score(&self, hypothesis: &str, reference: &str) -> f64 {
        positional_accuracy(hypothesis, reference)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Metric::ALL {
            assert_eq!(m.name().parse::<Metric>(), Ok(m));
            assert_eq!(m.to_string(), m.name());
            let json = serde_json::to_string(&m).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", m.name()));
            assert_eq!(serde_json::from_str::<Metric>(&json).ok(), Some(m));
            assert_eq!(m.reward(RewardOptions::default()).name(), m.name());
            let v =
                <Metric as clap::ValueEnum>::to_possible_value(&m).map(|v| v.get_name().to_owned());
            assert_eq!(v.as_deref(), Some(m.name()));
        }
        assert_eq!(" CHRF++ ".parse::<Metric>(), Ok(Metric::ChrfPlusPlus));
        assert!(
            matches!("rouge".parse::<Metric>(), Err(RewardError::UnknownMetric { name }) if name == "rouge")
        );
    }

    #[test]
    fn rewards_on_hand_cases() {
        let o = RewardOptions::default();
        for m in Metric::ALL {
            let r = m.reward(o);
            assert_eq!(r.score("", ""), 1.0, "{m} empty pair");
            assert_eq!(r.score("  ", "\t"), 1.0, "{m} blank pair");
            assert_eq!(
                r.score("Guten Morgen", "Guten Morgen"),
                1.0,
                "{m} identical"
            );
            assert_eq!(r.score("", "Guten Morgen"), 0.0, "{m} empty hypothesis");
            assert_eq!(r.score("Guten Morgen", ""), 0.0, "{m} empty reference");
        }
        // WER 1/4 -> reward 0.75; BLEU reward is raw / 100.
        let wer = Metric::Wer.reward(o);
        assert!((wer.score("a b c x", "a b c d") - 0.75).abs() < 1e-15);
        let raw = Metric::Bleu.raw_score("the cat sat on the mat", "the cat is on the mat", o);
        let r = Metric::Bleu
            .reward(o)
            .score("the cat sat on the mat", "the cat is on the mat");
        assert!((r - raw / 100.0).abs() < 1e-15);
        // Many insertions: rate > 1, reward 0.
        assert_eq!(Metric::Wer.raw_score("a b c d", "a", o), 3.0);
        assert_eq!(wer.score("a b c d", "a"), 0.0);
    }

    #[test]
    fn lowercase_option_applies_to_every_metric() {
        let lc = RewardOptions { lowercase: true };
        for m in Metric::ALL {
            assert_eq!(
                m.reward(lc).score("GUTEN Morgen", "guten MORGEN"),
                1.0,
                "{m}"
            );
        }
        for m in [Metric::Bleu, Metric::Chrf, Metric::Wer, Metric::Cer] {
            assert!(
                m.reward(RewardOptions::default()).score("GUTEN", "guten") < 1.0,
                "{m}"
            );
        }
    }
}
