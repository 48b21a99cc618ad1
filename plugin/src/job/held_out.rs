//! The spoken-digit held-out check of the promotion gate: the tasks on a directory of
//! recordings, scored per family. `leaf run` gates on it; `leaf` registers
//! [`open_recordings`] so that `--gate-data DIR` means recordings (see
//! [`crate::online::gate::set_directory_check`]).

use std::collections::BTreeMap;
use std::path::Path;

use leaf_adapters::model::LlamaModel;

use crate::online::gate::{GateConfig, HeldOutCheck, HeldOutScore, TaskScore};
use crate::online::OnlineError;
use crate::speech::eval::{evaluate, Decoding, EvalConfig, EvalReport};
use crate::speech::prepare::ExampleEncoder;
use crate::speech::tasks::{Corpus, Split, TaskFamily};

/// The score of a spoken-digit evaluation: per family, BLEU / 100 and exact match of the
/// in-speaker group; `reward` and `exact_match` are their means over families.
pub fn held_out_score(eval: &EvalReport) -> HeldOutScore {
    let tasks: BTreeMap<String, TaskScore> = eval
        .in_speaker
        .tasks
        .iter()
        .map(|(k, f)| {
            (
                k.clone(),
                TaskScore {
                    reward: f.bleu / 100.0,
                    exact_match: f.exact_match,
                },
            )
        })
        .collect();
    let mean = |f: fn(&TaskScore) -> f64| {
        if tasks.is_empty() {
            0.0
        } else {
            tasks.values().map(f).sum::<f64>() / tasks.len() as f64
        }
    };
    HeldOutScore {
        reward: mean(|t| t.reward),
        exact_match: mean(|t| t.exact_match),
        examples: eval.in_speaker.examples,
        tasks,
        seconds: eval.seconds,
    }
}

/// The spoken-digit tasks on recordings: what `leaf run` checks, and `--gate-data DIR` for a
/// directory of recordings.
pub struct RecordingsCheck {
    encoder: ExampleEncoder,
    corpus: Corpus,
    config: EvalConfig,
    label: String,
}

impl RecordingsCheck {
    /// A check of `config` on `corpus`, prompts built by `encoder`.
    pub fn new(encoder: ExampleEncoder, corpus: Corpus, config: EvalConfig, label: String) -> Self {
        RecordingsCheck {
            encoder,
            corpus,
            config,
            label,
        }
    }

    /// The evaluation settings.
    pub fn config(&self) -> &EvalConfig {
        &self.config
    }
}

impl HeldOutCheck for RecordingsCheck {
    fn evaluate(&mut self, model: &LlamaModel) -> crate::Result<HeldOutScore> {
        let eval = evaluate(model, &self.encoder, &self.corpus, &self.config)?;
        Ok(held_out_score(&eval))
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} examples per family, {} families)",
            self.label,
            self.config.samples,
            self.config.families.len()
        )
    }
}

/// Opens a directory of recordings as the gate's held-out data for the model in `model_dir`
/// (which must hold the unit codebook and speech tokenizer): the test takes of every task
/// family, `config.samples` per family, decoded greedily. A
/// [`crate::online::gate::DirectoryCheckOpener`].
pub fn open_recordings(
    dir: &Path,
    model_dir: &Path,
    config: &GateConfig,
) -> crate::Result<Box<dyn HeldOutCheck>> {
    let encoder = crate::speech::pretrain::load_encoder(model_dir).map_err(|e| {
        OnlineError::Gate(format!(
            "recordings in {} need the model's unit codebook and speech tokenizer: {e}",
            dir.display()
        ))
    })?;
    let mut corpus = Corpus::open(dir)?;
    corpus.preload()?;
    let eval = EvalConfig {
        families: TaskFamily::ALL.to_vec(),
        split: Split::Test,
        samples: config.samples,
        seed: config.seed,
        decoding: Decoding::Greedy,
        max_new_tokens: config.max_new_tokens,
        ..EvalConfig::default()
    };
    Ok(Box::new(RecordingsCheck::new(
        encoder,
        corpus,
        eval,
        format!("recordings {}", dir.display()),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speech::tasks::MAX_ANSWER_TOKENS;

    #[test]
    fn the_gate_answers_as_long_as_the_tasks_need() {
        assert_eq!(
            GateConfig::default().max_new_tokens,
            MAX_ANSWER_TOKENS,
            "online::gate::DEFAULT_MAX_NEW_TOKENS must follow the tasks' answer cap"
        );
    }

    #[test]
    fn a_model_without_a_codebook_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_recordings(dir.path(), dir.path(), &GateConfig::default())
            .err()
            .expect("no codebook, no check")
            .to_string();
        assert!(e.contains("unit codebook"), "{e}");
    }
}
