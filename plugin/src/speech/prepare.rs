//! From a task [`Example`] to model inputs: render the audio, optionally augment it, encode it to
//! units, and build the prompt and answer ids. Deterministic per example (each example's
//! augmentation draws from its own seed), and parallel over examples with identical results.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::augment::Augmenter;
use super::tasks::{Corpus, Example};
use super::tokenizer::SpeechTokenizer;
use super::units::{collapse, par_chunks, thread_count, UnitEncoder};
use super::SpeechError;

/// Model inputs of one example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedExample {
    /// The prompt ids (what mistral.rs computes for the same chat request).
    pub prompt: Vec<u32>,
    /// The ids the model should generate: the reference answer, then `<|im_end|>`.
    pub answer: Vec<u32>,
    /// The collapsed units of the audio.
    pub units: Vec<u32>,
}

/// Turns examples into [`EncodedExample`]s.
#[derive(Debug, Clone)]
pub struct ExampleEncoder {
    encoder: UnitEncoder,
    tokenizer: SpeechTokenizer,
    augmenter: Option<Augmenter>,
}

/// The seed of example `index` under base seed `seed` (SplitMix64 of both), so every example has
/// its own stream whatever order or thread it is encoded in.
pub fn example_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl ExampleEncoder {
    /// Units must fit the tokenizer: the codebook's `k` may not exceed its unit tokens.
    pub fn new(
        encoder: UnitEncoder,
        tokenizer: SpeechTokenizer,
        augmenter: Option<Augmenter>,
    ) -> Result<Self, SpeechError> {
        if encoder.codebook().k() > tokenizer.n_units() {
            return Err(SpeechError::Config(format!(
                "the codebook has {} units, the tokenizer only {} unit tokens",
                encoder.codebook().k(),
                tokenizer.n_units()
            )));
        }
        Ok(Self {
            encoder,
            tokenizer,
            augmenter,
        })
    }

    /// The unit encoder.
    pub fn unit_encoder(&self) -> &UnitEncoder {
        &self.encoder
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &SpeechTokenizer {
        &self.tokenizer
    }

    /// Encodes one example; with an augmenter, its waveform perturbation and feature masks draw
    /// from `ChaCha8Rng::seed_from_u64(seed)`.
    pub fn encode(
        &self,
        corpus: &Corpus,
        example: &Example,
        seed: u64,
    ) -> Result<EncodedExample, SpeechError> {
        let audio = corpus.render(example)?;
        let units = match &self.augmenter {
            None => self.encoder.units(&audio)?,
            Some(aug) => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let audio = aug.perturb_audio(&audio, &mut rng)?;
                let mut features = self.encoder.frontend().features(&audio)?;
                aug.mask_features(&mut features, &mut rng);
                collapse(&self.encoder.codebook().assign(&features)?)
            }
        };
        Ok(EncodedExample {
            prompt: self
                .tokenizer
                .chat_prompt_ids(&example.instruction, &units)?,
            answer: self.tokenizer.answer_ids(&example.reference)?,
            units,
        })
    }

    /// Encodes every example, example `i` with seed [`example_seed`]`(seed, i)`, on `threads`
    /// workers (0 = available parallelism). The result does not depend on `threads`.
    pub fn encode_all(
        &self,
        corpus: &Corpus,
        examples: &[Example],
        seed: u64,
        threads: usize,
    ) -> Result<Vec<EncodedExample>, SpeechError> {
        const PER_CHUNK: usize = 16;
        let chunks = par_chunks(
            examples.len().div_ceil(PER_CHUNK),
            thread_count(threads),
            |ch| {
                let lo = ch * PER_CHUNK;
                let hi = (lo + PER_CHUNK).min(examples.len());
                (lo..hi)
                    .map(|i| self.encode(corpus, &examples[i], example_seed(seed, i as u64)))
                    .collect::<Result<Vec<_>, _>>()
            },
        );
        let mut out = Vec::with_capacity(examples.len());
        for c in chunks {
            out.extend(c?);
        }
        Ok(out)
    }
}
