//! Evaluation of a speech model on the spoken-digit tasks: generate answers with the trainable
//! decoder (greedy, or sampled with temperature and nucleus), then score them per task family
//! with exact match, sentence BLEU, chrF and WER.
//!
//! Generation runs examples in batches without a KV cache: every new token re-runs the decoder
//! over the right-padded batch (the causal mask keeps real positions from seeing padding) and
//! reads each row's logits at its own last position. Rows that have produced a stop token are
//! dropped from the batch.

use std::collections::BTreeMap;

use candle_core::{DType, IndexOp, Tensor};
use leaf_adapters::model::{LlamaModel, Pass};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::prepare::ExampleEncoder;
use super::tasks::{generate, Corpus, Example, Split, TaskConfig, TaskFamily, MAX_ANSWER_TOKENS};
use super::tokenizer::SpeechTokenizer;
use super::SpeechError;
use crate::reward::{Metric, RewardOptions};
use crate::sampling::{self, Pick, SamplingParams};
use crate::Result;

/// How tokens are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Decoding {
    /// The most likely token (ties to the lowest id).
    Greedy,
    /// A draw from the softmax of `logits / temperature`, restricted to the smallest set of
    /// most likely tokens whose probability reaches `top_p` (as the server samples).
    Sample {
        /// Softmax temperature in [0, 100] (below 1e-7: greedy).
        temperature: f64,
        /// Nucleus mass in (0, 1].
        top_p: f64,
    },
}

impl Decoding {
    /// The checked sampling settings ([`SamplingParams::new`]'s rules, shared with the
    /// serving tap; a temperature below [`crate::sampling::GREEDY_TEMPERATURE`] is greedy).
    pub fn params(&self) -> std::result::Result<SamplingParams, SpeechError> {
        match *self {
            Decoding::Greedy => Ok(SamplingParams::GREEDY),
            Decoding::Sample { temperature, top_p } => SamplingParams::new(temperature, top_p)
                .map_err(|e| SpeechError::Config(e.to_string())),
        }
    }

    /// Checks the sampling parameters.
    pub fn validate(&self) -> std::result::Result<(), SpeechError> {
        self.params().map(|_| ())
    }
}

/// Picks one token id from a row of logits, exactly as the serving tap does
/// ([`crate::sampling`]): greedy takes the lowest id among the maximal logits; sampling draws
/// one uniform from `rng` and returns the id with its log-prob under the renormalised nucleus.
/// NaN or `+inf` logits, an empty row or one of only `-inf` are errors.
pub fn pick_token<R: Rng>(
    logits: &[f32],
    decoding: &Decoding,
    rng: &mut R,
) -> std::result::Result<Pick, SpeechError> {
    sampling::sample(logits, &decoding.params()?, rng)
        .map_err(|e| SpeechError::Config(e.to_string()))
}

/// Generates a completion for every prompt (with the policy, LoRA on, when the model carries
/// LoRA; else with the base model), `batch_size` prompts per decoder pass, until a stop
/// token (which is kept at the end of the returned ids) or `max_new_tokens`. Sampling draws from
/// `rng` in prompt order, so one seed gives one result whatever the batch size.
pub fn generate_completions<R: Rng>(
    model: &LlamaModel,
    prompts: &[Vec<u32>],
    stop: &[u32],
    decoding: &Decoding,
    max_new_tokens: usize,
    batch_size: usize,
    rng: &mut R,
) -> Result<Vec<Vec<u32>>> {
    decoding.validate()?;
    if batch_size == 0 {
        return Err(SpeechError::Config("batch size must be positive".into()).into());
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(SpeechError::Config(format!("prompt {i} is empty")).into());
    }
    // One RNG per prompt, seeded from the caller's stream in prompt order, so batching does not
    // change what is drawn.
    let mut rngs: Vec<ChaCha8Rng> = prompts
        .iter()
        .map(|_| ChaCha8Rng::seed_from_u64(rng.random::<u64>()))
        .collect();
    let max_len = model.config().max_position_embeddings;
    let pass = if model.lora_options().is_some() {
        Pass::POLICY
    } else {
        Pass::BASE
    };
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for lo in (0..prompts.len()).step_by(batch_size) {
        let hi = (lo + batch_size).min(prompts.len());
        let mut active: Vec<usize> = (lo..hi).collect();
        for _ in 0..max_new_tokens {
            active.retain(|&i| prompts[i].len() + out[i].len() < max_len);
            if active.is_empty() {
                break;
            }
            let rows: Vec<Vec<u32>> = active
                .iter()
                .map(|&i| prompts[i].iter().chain(&out[i]).copied().collect())
                .collect();
            let t = rows.iter().map(Vec::len).max().unwrap_or(1);
            let mut ids = vec![0u32; rows.len() * t];
            for (r, row) in rows.iter().enumerate() {
                ids[r * t..r * t + row.len()].copy_from_slice(row);
            }
            let input = candle(Tensor::from_vec(ids, (rows.len(), t), model.device()))?;
            let logits = model.forward(&input, &pass)?;
            let mut next_active = Vec::with_capacity(active.len());
            for (r, &i) in active.iter().enumerate() {
                let last: Vec<f32> = candle(
                    logits
                        .i((r, rows[r].len() - 1))
                        .and_then(|l| l.to_dtype(DType::F32))
                        .and_then(|l| l.to_vec1()),
                )?;
                let tok = pick_token(&last, decoding, &mut rngs[i])
                    .map_err(|e| SpeechError::Config(format!("prompt {i}: {e}")))?
                    .id;
                out[i].push(tok);
                if !stop.contains(&tok) {
                    next_active.push(i);
                }
            }
            active = next_active;
        }
    }
    Ok(out)
}

/// A candle result as this crate's error.
pub(crate) fn candle<T>(r: candle_core::Result<T>) -> Result<T> {
    r.map_err(|e| crate::Error::Adapter(leaf_adapters::Error::Candle(e)))
}

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

/// Evaluates `model` on examples generated from `corpus` (see [`EvalConfig`]).
pub fn evaluate(
    model: &LlamaModel,
    encoder: &ExampleEncoder,
    corpus: &Corpus,
    config: &EvalConfig,
) -> Result<EvalReport> {
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
    let in_speaker = evaluate_group(model, encoder, &inside, config, 0)?;
    let holdout = match holdout {
        Some(s) => {
            let only = corpus.filter(|c| c.speaker == s);
            Some(evaluate_group(model, encoder, &only, config, 1)?)
        }
        None => None,
    };
    Ok(EvalReport {
        split: config.split,
        decoding: config.decoding,
        seed: config.seed,
        in_speaker,
        holdout,
        seconds: started.elapsed().as_secs_f64(),
    })
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
/// `group` (0: the in-speaker group, 1: the held-out speaker), drawn from `corpus`.
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
        .wrapping_add(family as u64 + 1);
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
    Ok(GroupReport {
        speakers,
        tasks: score_by_family(&scored),
        examples: scored.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_first_maximum_and_refuses_nan() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let pick = pick_token(&[0.0, 2.0, 2.0, 1.0], &Decoding::Greedy, &mut rng).unwrap();
        assert_eq!((pick.id, pick.logprob), (1, 0.0));
        // As in serving: NaN logits and empty rows are errors, not skipped.
        assert!(pick_token(&[f32::NAN, -1.0], &Decoding::Greedy, &mut rng).is_err());
        assert!(pick_token(&[], &Decoding::Greedy, &mut rng).is_err());
    }

    #[test]
    fn tiny_top_p_is_greedy_and_sampling_follows_the_softmax() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let near_greedy = Decoding::Sample {
            temperature: 1.0,
            top_p: 0.01,
        };
        for _ in 0..50 {
            let pick = pick_token(&logits, &near_greedy, &mut rng).unwrap();
            assert_eq!((pick.id, pick.logprob), (1, 0.0));
        }
        // Probabilities 1/4 and 3/4; the -inf token is never drawn.
        let full = Decoding::Sample {
            temperature: 1.0,
            top_p: 1.0,
        };
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| pick_token(&logits, &full, &mut rng).unwrap().id == 1)
            .count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
        // Temperature 2 flattens: p1 = sqrt(3) / (1 + sqrt(3)) = 0.634.
        let warm = Decoding::Sample {
            temperature: 2.0,
            top_p: 1.0,
        };
        let ones = (0..n)
            .filter(|_| pick_token(&logits, &warm, &mut rng).unwrap().id == 1)
            .count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.634).abs() < 0.02, "{frac}");
    }

    #[test]
    fn bad_sampling_settings_are_refused_and_zero_temperature_is_greedy() {
        for (t, p) in [
            (-1.0, 0.9),
            (f64::NAN, 0.9),
            (1000.0, 0.9),
            (1.0, 0.0),
            (1.0, 1.5),
        ] {
            assert!(Decoding::Sample {
                temperature: t,
                top_p: p
            }
            .validate()
            .is_err());
        }
        // Temperature 0 is greedy, as the server treats it.
        let zero = Decoding::Sample {
            temperature: 0.0,
            top_p: 0.9,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let pick = pick_token(&[0.0, 1.0, 1.0], &zero, &mut rng).unwrap();
        assert_eq!((pick.id, pick.logprob), (1, 0.0));
    }

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
}
