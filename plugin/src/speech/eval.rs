//! Evaluation of a speech model on the spoken-digit tasks: generate answers with the trainable
//! decoder (greedy, or sampled with temperature and nucleus), then score them per task family
//! with exact match, sentence BLEU, chrF and WER.
//!
//! Generation is the trainer's ([`crate::trainer::generate`], re-exported here).

use std::collections::BTreeMap;

use leaf_adapters::model::LlamaModel;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::prepare::ExampleEncoder;
use super::tasks::{generate, Corpus, Example, Split, TaskConfig, TaskFamily, MAX_ANSWER_TOKENS};
use super::tokenizer::SpeechTokenizer;
use super::SpeechError;
use crate::reward::{Metric, RewardOptions};
pub(crate) use crate::trainer::generate::candle;
pub use crate::trainer::generate::{generate_completions, pick_token, Decoding};
use crate::Result;

/// The answer text of generated ids: everything before the first stop token, special and unit
/// tokens left out, surrounding whitespace trimmed.
pub fn answer_text(tokenizer: &SpeechTokenizer, ids: &[u32]) -> Result<String> {
    let stop = tokenizer.stop_ids();
    let end = ids
        .iter()
        .position(|t| stop.contains(t))
        .unwrap_or(ids.len());
    Ok(tokenizer.decode(&ids[..end], true)?.trim().to_string())
}

/// Scores of one task family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FamilyScores {
    /// Number of examples scored.
    pub examples: usize,
    /// Fraction of answers equal to the reference after normalisation (0-1).
    pub exact_match: f64,
    /// Mean sentence BLEU (0-100).
    pub bleu: f64,
    /// Mean sentence chrF (0-100).
    pub chrf: f64,
    /// Mean word error rate (0 is perfect; may exceed 1).
    pub wer: f64,
}

/// One scored example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// The example.
    pub example: Example,
    /// The model's answer.
    pub hypothesis: String,
}

/// Mean scores of `(hypothesis, reference)` pairs; `None` when there are none.
pub fn score_pairs<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Option<FamilyScores> {
    let opts = RewardOptions::default();
    let mut n = 0usize;
    let (mut em, mut bleu, mut chrf, mut wer) = (0.0, 0.0, 0.0, 0.0);
    for (h, r) in pairs {
        n += 1;
        em += Metric::Exact.raw_score(h, r, opts);
        bleu += Metric::Bleu.raw_score(h, r, opts);
        chrf += Metric::Chrf.raw_score(h, r, opts);
        wer += Metric::Wer.raw_score(h, r, opts);
    }
    (n > 0).then(|| {
        let n_f = n as f64;
        FamilyScores {
            examples: n,
            exact_match: em / n_f,
            bleu: bleu / n_f,
            chrf: chrf / n_f,
            wer: wer / n_f,
        }
    })
}

/// Per-family scores of scored examples (families with no example are absent).
pub fn score_by_family(scored: &[Scored]) -> BTreeMap<String, FamilyScores> {
    TaskFamily::ALL
        .iter()
        .filter_map(|f| {
            score_pairs(
                scored
                    .iter()
                    .filter(|s| s.example.kind.family() == *f)
                    .map(|s| (s.hypothesis.as_str(), s.example.reference.as_str())),
            )
            .map(|s| (f.name().to_string(), s))
        })
        .collect()
}

/// What to evaluate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// Task families to evaluate.
    pub families: Vec<TaskFamily>,
    /// Which takes the utterances are built from.
    pub split: Split,
    /// Examples per family.
    pub samples: usize,
    /// Seed of the examples (and of sampling).
    pub seed: u64,
    /// Greedy or sampled.
    pub decoding: Decoding,
    /// Longest answer, in tokens (the stop token included); the default,
    /// [`MAX_ANSWER_TOKENS`], fits every reference.
    pub max_new_tokens: usize,
    /// Prompts per decoder pass.
    pub batch_size: usize,
    /// A speaker evaluated separately (as one left out of training): the in-speaker figures
    /// leave this speaker out, and a second block reports this speaker alone.
    pub holdout_speaker: Option<String>,
    /// Worker threads for audio encoding (0 = all cores); does not change the result.
    pub threads: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            families: TaskFamily::ALL.to_vec(),
            split: Split::Test,
            samples: 200,
            seed: 0,
            decoding: Decoding::Greedy,
            max_new_tokens: MAX_ANSWER_TOKENS,
            batch_size: 64,
            holdout_speaker: None,
            threads: 0,
        }
    }
}

/// Scores of one group of speakers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupReport {
    /// The speakers the examples came from.
    pub speakers: Vec<String>,
    /// Scores per family name ([`TaskFamily::name`]: `asr`, `ast`, `sqa`, `asr_long`,
    /// `ast_long`, `arith`).
    pub tasks: BTreeMap<String, FamilyScores>,
    /// Total number of examples.
    pub examples: usize,
}

/// The result of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The split evaluated.
    pub split: Split,
    /// How tokens were chosen.
    pub decoding: Decoding,
    /// Seed of the examples.
    pub seed: u64,
    /// Every speaker but the held-out one.
    pub in_speaker: GroupReport,
    /// The held-out speaker alone, when one was named.
    pub holdout: Option<GroupReport>,
    /// Seconds spent.
    pub seconds: f64,
}

/// Every answer behind an [`EvalReport`], per speaker group.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EvalAnswers {
    /// Answers of the in-speaker group, in evaluation order.
    pub in_speaker: Vec<Scored>,
    /// Answers of the held-out speaker (empty when none was named).
    pub holdout: Vec<Scored>,
}

/// Evaluates `model` on examples generated from `corpus` (see [`EvalConfig`]).
pub fn evaluate(
    model: &LlamaModel,
    encoder: &ExampleEncoder,
    corpus: &Corpus,
    config: &EvalConfig,
) -> Result<EvalReport> {
    evaluate_with_answers(model, encoder, corpus, config).map(|(report, _)| report)
}

/// [`evaluate`], also returning every example with the model's answer (for error analysis:
/// `leaf eval --answers FILE`).
pub fn evaluate_with_answers(
    model: &LlamaModel,
    encoder: &ExampleEncoder,
    corpus: &Corpus,
    config: &EvalConfig,
) -> Result<(EvalReport, EvalAnswers)> {
    let started = std::time::Instant::now();
    config.decoding.validate()?;
    if config.families.is_empty() || config.samples == 0 {
        return Err(
            SpeechError::Config("nothing to evaluate (no families or samples)".into()).into(),
        );
    }
    let holdout = config.holdout_speaker.as_deref();
    if let Some(s) = holdout {
        if !corpus.speakers().iter().any(|x| x == s) {
            return Err(SpeechError::Config(format!(
                "holdout speaker {s:?} has no recordings (speakers: {})",
                corpus.speakers().join(", ")
            ))
            .into());
        }
    }
    let inside = corpus.filter(|c| Some(c.speaker.as_str()) != holdout);
    if inside.is_empty() {
        return Err(SpeechError::Config(
            "no speaker left to evaluate besides the held-out one".into(),
        )
        .into());
    }
    let mut answers = EvalAnswers::default();
    let in_speaker = evaluate_group(model, encoder, &inside, config, 0, &mut answers.in_speaker)?;
    let holdout = match holdout {
        Some(s) => {
            let only = corpus.filter(|c| c.speaker == s);
            Some(evaluate_group(
                model,
                encoder,
                &only,
                config,
                1,
                &mut answers.holdout,
            )?)
        }
        None => None,
    };
    let report = EvalReport {
        split: config.split,
        decoding: config.decoding,
        seed: config.seed,
        in_speaker,
        holdout,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((report, answers))
}

/// Generates and scores the examples of one group of speakers; also returns every answer.
pub fn evaluate_examples(
    model: &LlamaModel,
    encoder: &ExampleEncoder,
    corpus: &Corpus,
    examples: &[Example],
    config: &EvalConfig,
) -> Result<Vec<Scored>> {
    let encoded = encoder.encode_all(corpus, examples, config.seed, config.threads)?;
    let prompts: Vec<Vec<u32>> = encoded.into_iter().map(|e| e.prompt).collect();
    let tok = encoder.tokenizer();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x005E_ED0F_5A4D_11E5);
    let completions = generate_completions(
        model,
        &prompts,
        &tok.stop_ids(),
        &config.decoding,
        config.max_new_tokens,
        config.batch_size,
        &mut rng,
    )?;
    examples
        .iter()
        .zip(&completions)
        .map(|(e, ids)| {
            Ok(Scored {
                example: e.clone(),
                hypothesis: answer_text(tok, ids)?,
            })
        })
        .collect()
}

/// The examples [`evaluate`] asks of family number `family` of `config` for speaker group
/// `group` (0: the in-speaker group, 1: the held-out speaker), drawn from `corpus`. They depend
/// on the family, the seed, the split, the sample count and the group, not on which other
/// families `config` lists: an evaluation of spoken QA alone asks the same examples as one of
/// every family.
pub fn family_examples(
    corpus: &Corpus,
    config: &EvalConfig,
    family: usize,
    group: u64,
) -> Result<Vec<Example>> {
    let Some(f) = config.families.get(family) else {
        return Err(SpeechError::Config(format!(
            "family number {family} is not among the {} evaluated",
            config.families.len()
        ))
        .into());
    };
    let seed = config
        .seed
        .wrapping_add(1000 * group)
        .wrapping_add(f.index() as u64 + 1);
    Ok(generate(
        corpus,
        config.split,
        f.kinds(),
        config.samples,
        seed,
        &TaskConfig::default(),
    )?)
}

fn evaluate_group(
    model: &LlamaModel,
    encoder: &ExampleEncoder,
    corpus: &Corpus,
    config: &EvalConfig,
    group: u64,
    answers: &mut Vec<Scored>,
) -> Result<GroupReport> {
    let mut examples = Vec::new();
    for fi in 0..config.families.len() {
        examples.extend(family_examples(corpus, config, fi, group)?);
    }
    let scored = evaluate_examples(model, encoder, corpus, &examples, config)?;
    let speakers: Vec<String> = {
        let mut s: Vec<String> = corpus
            .clips()
            .iter()
            .filter(|c| c.split() == config.split)
            .map(|c| c.speaker.clone())
            .collect();
        s.dedup();
        s
    };
    let report = GroupReport {
        speakers,
        tasks: score_by_family(&scored),
        examples: scored.len(),
    };
    *answers = scored;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_hand_checked() {
        let s = score_pairs([("seven three", "seven three"), ("seven", "seven three")]).unwrap();
        assert_eq!(s.examples, 2);
        assert!((s.exact_match - 0.5).abs() < 1e-12);
        // WER: 0 and 1/2 (one deletion of two words).
        assert!((s.wer - 0.25).abs() < 1e-12);
        assert!(s.bleu > 0.0 && s.bleu < 100.0);
        assert!(s.chrf > 50.0 && s.chrf < 100.0);
        assert!(score_pairs(std::iter::empty()).is_none());
    }

    #[test]
    fn a_family_asks_the_same_examples_whatever_else_is_evaluated() {
        let clips = (0..10u8)
            .flat_map(|digit| {
                (0..6u32).map(move |take| crate::speech::Clip {
                    digit,
                    speaker: "ann".into(),
                    take,
                    path: format!("{digit}_ann_{take}.wav").into(),
                })
            })
            .collect();
        let corpus = Corpus::from_clips(clips).unwrap();
        let all = EvalConfig {
            samples: 20,
            ..EvalConfig::default()
        };
        let sqa = EvalConfig {
            families: vec![TaskFamily::Sqa],
            ..all.clone()
        };
        let alone = family_examples(&corpus, &sqa, 0, 0).unwrap();
        assert_eq!(alone.len(), 20);
        assert_eq!(alone, family_examples(&corpus, &all, 2, 0).unwrap());
        // Another family draws other examples; a family number out of range is an error.
        assert_ne!(alone, family_examples(&corpus, &all, 0, 0).unwrap());
        let e = family_examples(&corpus, &sqa, 1, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("family number 1"), "{e}");
        for (i, f) in TaskFamily::ALL.iter().enumerate() {
            assert_eq!(f.index(), i);
        }
    }
}
