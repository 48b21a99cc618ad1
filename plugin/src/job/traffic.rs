//! Live traffic: the spoken-digit **training** tasks replayed through the plugin by several
//! concurrent clients. The prompts' task kinds are the run's setting: by default the short
//! families ([`super::run::DEFAULT_TRAFFIC_KINDS`]: translation and spoken QA weighted up), or
//! any mix of the pretraining's kinds, the long families (5-10 digit codes and arithmetic with
//! the working, whose answers run to 20 tokens) included; each request names its family
//! (`task`), so the server can report them apart.
//!
//! Every request carries its reference answer, so the server's
//! [`crate::harvest::ReferenceReward`] scores each sample (the job uses cased sentence
//! BLEU / 100, the spec's default reward: partial credit for a partly right digit string, 1 for
//! an exact answer). With the group policy on, the server draws K - 1 extra samples of every
//! client prompt in the background and the K samples form one group.
//!
//! Clients hold back while enough groups wait for the learner (`max_pending_groups`), so the
//! rollout budget is spent on samples of recent adapter versions rather than on a queue that
//! overflows and drops.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::serving::{ChatRequest, LeafServer, Message, Part};
use crate::speech::augment::{AugmentConfig, Augmenter};
use crate::speech::prepare::{example_seed, ExampleEncoder};
use crate::speech::pretrain::load_encoder;
use crate::speech::tasks::{generate, Corpus, Split, TaskConfig, TaskKind};

use super::JobError;

/// One prompt of the replayed traffic: the audio already turned into units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficItem {
    /// The task kind.
    pub kind: TaskKind,
    /// The instruction text.
    pub instruction: String,
    /// The reference answer.
    pub reference: String,
    /// The unit ids of the audio.
    pub units: Vec<u32>,
    /// Unit ids of augmented renderings of the same audio (speed, gain, noise, masks), one per
    /// variant; empty without traffic augmentation. Replay `r >= 1` of the prompt sends
    /// variant `(r - 1) % len`, so the same recording comes back sounding different.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub augmented: Vec<Vec<u32>>,
}

impl TrafficItem {
    /// The units replay `replay` (0 for the first time the prompt is sent) sends.
    pub fn units_for(&self, replay: u64) -> &[u32] {
        match (replay, self.augmented.len() as u64) {
            (0, _) | (_, 0) => &self.units,
            (r, n) => &self.augmented[((r - 1) % n) as usize],
        }
    }

    /// The chat request of replay `replay` of this item (audio, then instruction; reference
    /// and task attached).
    pub fn request(&self, config: &TrafficConfig, seed: u64, replay: u64) -> ChatRequest {
        ChatRequest {
            messages: vec![Message {
                role: "user".into(),
                content: vec![
                    Part::Units(self.units_for(replay).to_vec()),
                    Part::Text(self.instruction.clone()),
                ],
            }],
            max_tokens: Some(config.max_tokens),
            temperature: Some(config.temperature),
            top_p: Some(config.top_p),
            seed: Some(seed),
            reference: Some(self.reference.clone()),
            task: Some(self.kind.family().name().to_string()),
            ..ChatRequest::default()
        }
    }
}

/// Generates `n` training-split examples, task kinds drawn uniformly from `kinds` (seeded;
/// repeat a kind to weight it), and encodes their audio with the codebook of the model in
/// `model_dir`, clean, plus `augment_variants` augmented renderings of each (the pretraining
/// augmentation, [`AugmentConfig::default`], each variant with its own seed). Answers of the
/// long kinds need up to [`crate::speech::tasks::MAX_ANSWER_TOKENS`] new tokens; a smaller
/// [`TrafficConfig::max_tokens`] cuts them short.
pub fn prepare(
    model_dir: &Path,
    corpus: &Corpus,
    kinds: &[TaskKind],
    n: usize,
    seed: u64,
    augment_variants: usize,
) -> crate::Result<Vec<TrafficItem>> {
    if n == 0 {
        return Err(JobError::Config("the traffic needs at least one prompt".into()).into());
    }
    let encoder = load_encoder(model_dir)?;
    let examples = generate(corpus, Split::Train, kinds, n, seed, &TaskConfig::default())?;
    let encoded = encoder.encode_all(corpus, &examples, seed, 0)?;
    let mut augmented: Vec<Vec<Vec<u32>>> = vec![Vec::new(); examples.len()];
    if augment_variants > 0 {
        let augmenting = ExampleEncoder::new(
            encoder.unit_encoder().clone(),
            encoder.tokenizer().clone(),
            Some(Augmenter::new(AugmentConfig::default())?),
        )?;
        for v in 0..augment_variants as u64 {
            let variant_seed = example_seed(seed ^ 0xA06_0E47, v);
            for (out, enc) in augmented.iter_mut().zip(augmenting.encode_all(
                corpus,
                &examples,
                variant_seed,
                0,
            )?) {
                out.push(enc.units);
            }
        }
    }
    Ok(examples
        .into_iter()
        .zip(encoded)
        .zip(augmented)
        .map(|((e, enc), augmented)| TrafficItem {
            kind: e.kind,
            instruction: e.instruction,
            reference: e.reference,
            units: enc.units,
            augmented,
        })
        .collect())
}

/// How the clients behave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TrafficConfig {
    /// Concurrent clients.
    pub clients: usize,
    /// Most new tokens per answer.
    pub max_tokens: usize,
    /// Sampling temperature.
    pub temperature: f64,
    /// Nucleus mass.
    pub top_p: f64,
    /// Clients wait while at least this many groups are open or sealed but not yet trained on.
    pub max_pending_groups: usize,
    /// Seed of the per-request sampling seeds.
    pub seed: u64,
}

/// What the clients did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrafficStats {
    /// Requests answered.
    pub requests: u64,
    /// Requests that failed.
    pub failed: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// Replays `items` (cyclically, starting at `cursor`) through `server` with
/// `config.clients` concurrent clients until `stop` is set. `cursor` counts the prompts sent,
/// so a resumed run continues where the last one stopped.
pub async fn replay(
    server: Arc<LeafServer>,
    items: Arc<Vec<TrafficItem>>,
    config: TrafficConfig,
    cursor: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<TrafficStats, JobError> {
    if items.is_empty() || config.clients == 0 {
        return Err(JobError::Config(
            "traffic needs at least one prompt and one client".into(),
        ));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.clients {
        let server = server.clone();
        let items = items.clone();
        let config = config.clone();
        let cursor = cursor.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut stats = TrafficStats::default();
            while !stop.load(Ordering::SeqCst) {
                let st = server.status();
                if st.open_groups + st.sealed_queue_depth >= config.max_pending_groups {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let i = cursor.fetch_add(1, Ordering::SeqCst);
                let n = items.len() as u64;
                let item = &items[(i % n) as usize];
                let req = item.request(&config, example_seed(config.seed, i), i / n);
                match server.chat(req).await {
                    Ok(_) => stats.requests += 1,
                    Err(e) => {
                        stats.failed += 1;
                        tracing::warn!(error = %e, "traffic request failed");
                        stats.last_error = Some(e.to_string());
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            stats
        });
    }
    let mut total = TrafficStats::default();
    while let Some(r) = tasks.join_next().await {
        let s = r.map_err(|e| JobError::Failed(format!("a traffic client panicked: {e}")))?;
        total.requests += s.requests;
        total.failed += s.failed;
        if s.last_error.is_some() {
            total.last_error = s.last_error;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(augmented: Vec<Vec<u32>>) -> TrafficItem {
        TrafficItem {
            kind: TaskKind::Recognition,
            instruction: "Transcribe the audio.".into(),
            reference: "one".into(),
            units: vec![1, 2, 3],
            augmented,
        }
    }

    #[test]
    fn replays_after_the_first_cycle_through_the_augmented_variants() {
        let plain = item(Vec::new());
        for r in 0..4 {
            assert_eq!(plain.units_for(r), &[1, 2, 3]);
        }
        let aug = item(vec![vec![7], vec![8, 9]]);
        let sent: Vec<&[u32]> = (0..5).map(|r| aug.units_for(r)).collect();
        assert_eq!(sent, [&[1, 2, 3][..], &[7], &[8, 9], &[7], &[8, 9]]);
        let config = TrafficConfig {
            clients: 1,
            max_tokens: 8,
            temperature: 1.0,
            top_p: 1.0,
            max_pending_groups: 1,
            seed: 0,
        };
        let req = aug.request(&config, 5, 2);
        assert_eq!(req.messages[0].content[0], Part::Units(vec![8, 9]));
        // Items written before augmentation existed still load.
        let old = r#"{"kind":"recognition","instruction":"x","reference":"one","units":[4]}"#;
        let parsed: TrafficItem = serde_json::from_str(old).unwrap();
        assert!(parsed.augmented.is_empty());
    }
}
