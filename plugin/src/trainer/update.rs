//! One update of the LoRA policy over a batch of samples.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use leaf_adapters::model::{Batch, LlamaModel, ModelOptions, Pass, Trainable};
use serde::{Deserialize, Serialize};

use super::config::{TisMode, TrainConfig};
use super::loss::{self, LossInputs};
use super::optim::{clip_factor, global_norm, Adam};
use super::schedule::CosineSchedule;
use super::TrainError;

/// One response to train on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSample {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Generated token ids; an empty completion is skipped.
    pub completion: Vec<u32>,
    /// Per-token advantages, one per completion token.
    pub advantages: Vec<f64>,
    /// Natural-log probabilities of the completion tokens under the sampling distribution, one
    /// per token. Needed only for samples that get importance weighting; may be empty otherwise.
    #[serde(default)]
    pub behaviour_logprobs: Vec<f64>,
    /// Version id of the adapter that served the sample.
    #[serde(default)]
    pub behaviour_version: String,
    /// An answer the policy did not sample (a request's reference, see reference guidance):
    /// never importance-weighted, its ratio taken against the policy itself.
    #[serde(default)]
    pub demonstration: bool,
}

/// What one [`Trainer::step`] did. Loss terms are means over sequences of per-sequence token
/// means (averaged over epochs when `epochs > 1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// 0-based index of this step in the schedule.
    pub step: u64,
    /// Learning rate used.
    pub learning_rate: f64,
    /// The objective, `pg + beta * kl` per token, aggregated as
    /// [`TrainConfig::loss_aggregation`] says.
    pub loss: f64,
    /// PPO-clip term (mean over sequences of their token means).
    pub pg_loss: f64,
    /// k3 KL to the reference (mean over the sequences the policy sampled of their token
    /// means; demonstrations carry no KL term).
    pub kl: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the gradient was scaled down by the norm clip.
    pub grad_clipped: bool,
    /// Fraction of tokens whose PPO clip was active.
    pub clip_fraction: f64,
    /// Sequences trained on.
    pub sequences: usize,
    /// Completion tokens trained on.
    pub tokens: usize,
    /// Samples skipped because their completion was empty.
    pub skipped_empty: usize,
    /// Samples that got truncated importance weights.
    pub tis_sequences: usize,
    /// Mean importance weight over weighted tokens (1 when none).
    pub tis_mean_weight: f64,
    /// Fraction of weighted tokens whose weight hit the cap.
    pub tis_capped_fraction: f64,
    /// Policy entropy per token, in nats, estimated as the mean surprisal `-ln p` of the trained
    /// tokens under the policy before the update (an unbiased estimate of the entropy of the
    /// distribution they were drawn from when the policy served them, as on-policy samples are).
    #[serde(default)]
    pub entropy: f64,
    /// Mean over tokens of the importance ratio `exp(logp_policy - logp_behaviour)` of the
    /// policy before the update against the distribution that sampled the token (1 when the
    /// serving adapter is the trained one; tokens without behaviour log-probs are left out).
    #[serde(default)]
    pub ratio_mean: f64,
    /// Largest such ratio in the batch.
    #[serde(default)]
    pub ratio_max: f64,
}

/// A micro-batch ready for the loss.
struct Micro {
    batch: Batch,
    advantages: Tensor,
    behaviour: Tensor,
    /// Rows whose behaviour log-probs are known (one per completion token).
    has_behaviour: Vec<bool>,
    tis_rows: Vec<bool>,
    /// 1 for rows the policy sampled, 0 for demonstrations: the KL term counts only the former.
    kl_rows: Tensor,
    /// Every row is a demonstration: no KL term, so the reference pass is skipped.
    demonstrations_only: bool,
    logp_old: Option<Tensor>,
    logp_ref: Option<Tensor>,
}

#[derive(Default)]
struct Totals {
    loss: f64,
    pg: f64,
    kl: f64,
    clipped: usize,
    tis_tokens: usize,
    tis_weight_sum: f64,
    tis_capped: usize,
    surprisal_sum: f64,
    ratio_sum: f64,
    ratio_max: f64,
    ratio_tokens: usize,
}

/// The LEAF/GRPO trainer: owns the LoRA model, Adam's state and the schedule.
#[derive(Debug)]
pub struct Trainer {
    model: LlamaModel,
    config: TrainConfig,
    pub(super) names: Vec<String>,
    pub(super) optimizer: Adam,
    schedule: CosineSchedule,
    pub(super) steps: u64,
    policy_version: Option<String>,
}

impl Trainer {
    /// A trainer for a model that carries LoRA with exactly `config.lora`.
    pub fn new(model: LlamaModel, config: TrainConfig) -> Result<Self, TrainError> {
        config.check()?;
        // The model carries the config's targets in its family's names.
        let wanted = config
            .lora
            .for_family(model.config().family())
            .map_err(|e| TrainError::Config(format!("lora: {e}")))?;
        match model.trainable() {
            Trainable::Lora(l) if *l == wanted => {}
            Trainable::Lora(l) => {
                return Err(TrainError::Config(format!(
                    "lora: the model's LoRA options {l:?} differ from the config's {:?}",
                    config.lora
                )))
            }
            other => {
                return Err(TrainError::Config(format!(
                    "the model must carry LoRA to be trained here (it is {other:?})"
                )))
            }
        }
        let (names, vars): (Vec<String>, Vec<Var>) = model.trainable_vars().into_iter().unzip();
        let lr_scales = names
            .iter()
            .map(|n| {
                if n.ends_with(".lora_B.weight") {
                    config.lora_plus_ratio
                } else {
                    1.0
                }
            })
            .collect();
        let optimizer = Adam::new(
            vars,
            config.adam_beta1,
            config.adam_beta2,
            config.adam_eps,
            config.weight_decay,
        )?
        .with_lr_scales(lr_scales)?;
        let schedule = CosineSchedule::new(
            config.learning_rate,
            config.total_steps,
            config.warmup_fraction,
            config.min_lr_fraction,
        );
        Ok(Trainer {
            model,
            config,
            names,
            optimizer,
            schedule,
            steps: 0,
            policy_version: None,
        })
    }

    /// Loads a Hugging Face base model from `dir`, attaches fresh LoRA per `config.lora`
    /// (`B = 0`, so the policy starts equal to the base) and builds the trainer.
    pub fn from_base(
        dir: &Path,
        config: TrainConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, TrainError> {
        config.check()?;
        let options = ModelOptions {
            dtype,
            device: device.clone(),
            trainable: Trainable::Lora(config.lora.clone()),
            frozen_matmul: true,
        };
        let model = LlamaModel::load(dir, &options)?;
        Self::new(model, config)
    }

    /// [`Trainer::from_base`] on the device the configuration names
    /// ([`TrainConfig::device`]).
    pub fn load(dir: &Path, config: TrainConfig, dtype: DType) -> Result<Self, TrainError> {
        let device = config.device.open()?;
        Self::from_base(dir, config, dtype, &device)
    }

    /// The model being trained.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// The model, mutably (e.g. to load an adapter; Adam's moments are kept).
    pub fn model_mut(&mut self) -> &mut LlamaModel {
        &mut self.model
    }

    /// Gives the model back.
    pub fn into_model(self) -> LlamaModel {
        self.model
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Names of the trained tensors, in optimizer order.
    pub fn parameter_names(&self) -> &[String] {
        &self.names
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Learning rate the next step will use.
    pub fn next_learning_rate(&self) -> f64 {
        self.schedule.lr(self.steps)
    }

    /// Declares the adapter version the current weights correspond to. With
    /// [`TisMode::Stale`], samples whose `behaviour_version` differs from it get importance
    /// weights; while no version is declared, no sample counts as stale.
    pub fn set_policy_version(&mut self, version: impl Into<String>) {
        self.policy_version = Some(version.into());
    }

    /// The declared policy version.
    pub fn policy_version(&self) -> Option<&str> {
        self.policy_version.as_deref()
    }

    fn wants_tis(&self, sample: &TrainSample) -> bool {
        if sample.demonstration {
            return false;
        }
        match self.config.tis.mode {
            TisMode::Off => false,
            TisMode::Always => true,
            TisMode::Stale => self
                .policy_version
                .as_deref()
                .is_some_and(|v| v != sample.behaviour_version),
        }
    }

    fn check_sample(&self, index: usize, s: &TrainSample) -> Result<(), TrainError> {
        let bad = |reason: String| Err(TrainError::Sample { index, reason });
        let vocab = self.model.config().vocab_size;
        if s.prompt.is_empty() {
            return bad("the prompt is empty".into());
        }
        if let Some(t) = s
            .prompt
            .iter()
            .chain(&s.completion)
            .find(|t| **t as usize >= vocab)
        {
            return bad(format!("token id {t} is outside the vocabulary of {vocab}"));
        }
        if s.advantages.len() != s.completion.len() {
            return bad(format!(
                "{} advantages for {} completion tokens",
                s.advantages.len(),
                s.completion.len()
            ));
        }
        if let Some(a) = s.advantages.iter().find(|a| !a.is_finite()) {
            return bad(format!("non-finite advantage {a}"));
        }
        if self.wants_tis(s) && !s.completion.is_empty() {
            if s.behaviour_logprobs.len() != s.completion.len() {
                return bad(format!(
                    "importance weighting needs one behaviour log-prob per token: {} for {}",
                    s.behaviour_logprobs.len(),
                    s.completion.len()
                ));
            }
            if let Some(l) = s
                .behaviour_logprobs
                .iter()
                .find(|l| !l.is_finite() || **l > 1e-6)
            {
                return bad(format!(
                    "behaviour log-prob {l} is not a finite natural-log probability"
                ));
            }
        }
        Ok(())
    }

    fn micro_batch(&self, samples: &[&TrainSample]) -> Result<Micro, TrainError> {
        let device = self.model.device();
        let dtype = self.model.logprob_dtype();
        let pairs: Vec<(&[u32], &[u32])> = samples
            .iter()
            .map(|s| (s.prompt.as_slice(), s.completion.as_slice()))
            .collect();
        let batch = Batch::new(&pairs, device)?;
        let c = batch.max_completion();
        let mut adv = vec![0f64; samples.len() * c];
        let mut beh = vec![0f64; samples.len() * c];
        let mut tis_rows = Vec::with_capacity(samples.len());
        let mut has_behaviour = Vec::with_capacity(samples.len());
        let neg = self.config.negative_weight;
        for (i, s) in samples.iter().enumerate() {
            for (slot, &a) in adv[i * c..].iter_mut().zip(&s.advantages) {
                *slot = if a < 0.0 { a * neg } else { a };
            }
            // Rows that get TIS were checked to carry one finite log-prob per token; others
            // are copied when complete and finite, for the importance-ratio diagnostics.
            let known = s.behaviour_logprobs.len() == s.completion.len()
                && s.behaviour_logprobs.iter().all(|l| l.is_finite());
            if known {
                beh[i * c..i * c + s.behaviour_logprobs.len()]
                    .copy_from_slice(&s.behaviour_logprobs);
            }
            has_behaviour.push(known);
            tis_rows.push(self.wants_tis(s));
        }
        let shape = (samples.len(), c);
        let kl_rows: Vec<f64> = samples
            .iter()
            .map(|s| if s.demonstration { 0.0 } else { 1.0 })
            .collect();
        Ok(Micro {
            kl_rows: Tensor::from_vec(kl_rows, samples.len(), device)?.to_dtype(dtype)?,
            demonstrations_only: samples.iter().all(|s| s.demonstration),
            batch,
            advantages: Tensor::from_vec(adv, shape, device)?.to_dtype(dtype)?,
            behaviour: Tensor::from_vec(beh, shape, &Device::Cpu)?,
            has_behaviour,
            tis_rows,
            logp_old: None,
            logp_ref: None,
        })
    }

    /// One update over `samples`: the PPO-clip + k3 KL loss (per-sequence token mean, then the
    /// mean over sequences; or the token mean of the batch, [`TrainConfig::loss_aggregation`]),
    /// gradients accumulated over micro-batches, clipped to
    /// `max_grad_norm`, and one Adam step per epoch at the scheduled learning rate.
    ///
    /// Samples with an empty completion are skipped. A non-finite loss or gradient norm returns
    /// [`TrainError::NonFinite`] and that epoch's update is not applied (earlier epochs of the
    /// same call stay applied). The schedule advances by one step per call.
    ///
    /// The step runs on a thread of rayon's pool (the pool the CPU kernels and matmuls split
    /// their work over), so each of its hundreds of parallel ops forks from inside the pool
    /// instead of waking the pool from outside and sleeping until it is done.
    pub fn step(&mut self, samples: &[TrainSample]) -> Result<StepStats, TrainError> {
        rayon::scope(|_| self.step_in_pool(samples))
    }

    fn step_in_pool(&mut self, samples: &[TrainSample]) -> Result<StepStats, TrainError> {
        for (i, s) in samples.iter().enumerate() {
            self.check_sample(i, s)?;
        }
        let mut used: Vec<&TrainSample> = samples
            .iter()
            .filter(|s| !s.completion.is_empty())
            .collect();
        // Rows are padded to the longest row of their micro-batch: cut from length order, the
        // micro-batches pad little. Demonstrations come after the sampled rows, so that most
        // micro-batches of them hold nothing else and skip the reference pass (the KL term
        // counts only sampled rows). The loss does not depend on how the batch is cut (tested).
        used.sort_by_key(|s| (s.demonstration, s.prompt.len() + s.completion.len()));
        if used.is_empty() {
            return Err(TrainError::EmptyBatch);
        }
        let n_seq = used.len();
        let n_tok: usize = used.iter().map(|s| s.completion.len()).sum();
        let n_sampled = used.iter().filter(|s| !s.demonstration).count();
        let mut micros = used
            .chunks(self.config.micro_batch_size)
            .map(|chunk| self.micro_batch(chunk))
            .collect::<Result<Vec<_>, _>>()?;
        let epochs = self.config.epochs;
        if epochs > 1 {
            for m in &mut micros {
                m.logp_old = Some(self.model.logprobs(&m.batch, true)?.detach());
                if !m.demonstrations_only {
                    m.logp_ref = Some(self.model.logprobs(&m.batch, false)?.detach());
                }
            }
        }
        let lr = self.schedule.lr(self.steps);
        let mut sums = (0.0, 0.0, 0.0, 0.0, 0.0);
        let mut any_clip = false;
        let mut last = Totals::default();
        let mut first: Option<(f64, f64, f64)> = None;
        for epoch in 0..epochs {
            let (grads, totals) = self.accumulate(&micros, epoch, n_seq, n_tok)?;
            let norm = global_norm(&grads)?;
            if !norm.is_finite() {
                return Err(TrainError::NonFinite {
                    what: format!("gradient norm {norm}"),
                });
            }
            let factor = clip_factor(norm, self.config.max_grad_norm);
            any_clip |= factor < 1.0;
            let grads = if factor < 1.0 {
                grads
                    .iter()
                    .map(|g| g * factor)
                    .collect::<candle_core::Result<Vec<_>>>()?
            } else {
                grads
            };
            self.optimizer.step(&grads, lr)?;
            let pg = totals.pg / n_seq as f64;
            let kl = totals.kl / n_sampled.max(1) as f64;
            sums.0 += totals.loss;
            sums.1 += pg;
            sums.2 += kl;
            sums.3 += norm;
            sums.4 += totals.clipped as f64 / n_tok as f64;
            // Entropy and ratios describe the policy that met the batch: the first epoch's.
            first.get_or_insert((
                totals.surprisal_sum / n_tok as f64,
                if totals.ratio_tokens > 0 {
                    totals.ratio_sum / totals.ratio_tokens as f64
                } else {
                    1.0
                },
                if totals.ratio_tokens > 0 {
                    totals.ratio_max
                } else {
                    1.0
                },
            ));
            last = totals;
        }
        let e = epochs as f64;
        let (entropy, ratio_mean, ratio_max) = first.unwrap_or((0.0, 1.0, 1.0));
        let step = self.steps;
        self.steps += 1;
        Ok(StepStats {
            step,
            learning_rate: lr,
            loss: sums.0 / e,
            pg_loss: sums.1 / e,
            kl: sums.2 / e,
            grad_norm: sums.3 / e,
            grad_clipped: any_clip,
            clip_fraction: sums.4 / e,
            sequences: n_seq,
            tokens: n_tok,
            skipped_empty: samples.len() - n_seq,
            tis_sequences: micros
                .iter()
                .flat_map(|m| &m.tis_rows)
                .filter(|t| **t)
                .count(),
            tis_mean_weight: if last.tis_tokens > 0 {
                last.tis_weight_sum / last.tis_tokens as f64
            } else {
                1.0
            },
            tis_capped_fraction: if last.tis_tokens > 0 {
                last.tis_capped as f64 / last.tis_tokens as f64
            } else {
                0.0
            },
            entropy,
            ratio_mean,
            ratio_max,
        })
    }

    /// Forward + backward over every micro-batch; returns the summed gradients (of the batch
    /// loss, already divided by the batch's sequences or tokens) and the loss totals.
    fn accumulate(
        &self,
        micros: &[Micro],
        epoch: usize,
        n_seq: usize,
        n_tok: usize,
    ) -> Result<(Vec<Tensor>, Totals), TrainError> {
        let vars = self.optimizer.vars();
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut totals = Totals::default();
        let dtype = self.model.logprob_dtype();
        let eps = self.config.clip_eps;
        for (mi, m) in micros.iter().enumerate() {
            let seed = self.dropout_seed(epoch, mi);
            let new = self.model.logprobs_with(&m.batch, &Pass::train(seed))?;
            let old = match &m.logp_old {
                Some(t) => t.clone(),
                None => new.detach(),
            };
            // A demonstration is not a sample of the policy, so k3 (an estimate under the
            // policy's samples) says nothing of the KL there: the reference pass of a
            // micro-batch of demonstrations alone is skipped, its KL term is 0.
            let reference = match &m.logp_ref {
                Some(t) => t.clone(),
                None if m.demonstrations_only => new.detach(),
                None => self.model.logprobs(&m.batch, false)?.detach(),
            };
            let mask = m.batch.mask(dtype)?;
            let weights = self.tis_weights(m, &old, &mut totals)?;
            let terms = loss::sequence_terms(
                LossInputs {
                    logp_new: &new,
                    logp_old: &old,
                    logp_ref: &reference,
                    advantages: &m.advantages,
                    weights: &weights,
                    mask: &mask,
                },
                eps,
            )?;
            let kl = terms.kl.mul(&m.kl_rows)?;
            let per_seq = (&terms.pg + (&kl * self.config.kl_beta)?)?;
            let loss = self.config.loss_aggregation.micro_batch_loss(
                &per_seq,
                &terms.counts,
                n_seq,
                n_tok,
            )?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(TrainError::NonFinite {
                    what: format!("loss {value} in micro-batch {mi}"),
                });
            }
            totals.loss += value;
            totals.pg += terms
                .pg
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
            totals.kl += kl.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            self.token_stats(m, &new, &old, &mut totals)?;
            let grads = loss.backward()?;
            for (slot, var) in acc.iter_mut().zip(vars) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(sum) => (sum + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        let grads = acc
            .into_iter()
            .zip(vars)
            .map(|(g, v)| match g {
                Some(g) => Ok(g),
                None => v.zeros_like(),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((grads, totals))
    }

    fn dropout_seed(&self, epoch: usize, micro: usize) -> u64 {
        self.config
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(self.steps << 24)
            .wrapping_add((epoch as u64) << 16)
            .wrapping_add(micro as u64)
    }

    /// Importance weights `[batch, max_completion]`: `min(exp(old - behaviour), cap)` on rows that
    /// get TIS, 1 elsewhere.
    fn tis_weights(
        &self,
        m: &Micro,
        old: &Tensor,
        totals: &mut Totals,
    ) -> Result<Tensor, TrainError> {
        let dtype = self.model.logprob_dtype();
        let shape = old.dims2()?;
        if !m.tis_rows.iter().any(|t| *t) {
            return Ok(Tensor::ones(shape, dtype, self.model.device())?);
        }
        let old_v: Vec<Vec<f64>> = old.to_dtype(DType::F64)?.to_vec2()?;
        let beh_v: Vec<Vec<f64>> = m.behaviour.to_vec2()?;
        let cap = self.config.tis.cap;
        let mut w = vec![1f64; shape.0 * shape.1];
        for (i, &tis) in m.tis_rows.iter().enumerate() {
            if !tis {
                continue;
            }
            for j in 0..m.batch.completion_lens()[i] {
                let raw = (old_v[i][j] - beh_v[i][j]).exp();
                let wt = raw.min(cap);
                w[i * shape.1 + j] = wt;
                totals.tis_tokens += 1;
                totals.tis_weight_sum += wt;
                if raw >= cap {
                    totals.tis_capped += 1;
                }
            }
        }
        Ok(Tensor::from_vec(w, shape, self.model.device())?.to_dtype(dtype)?)
    }

    /// Per-token diagnostics of a micro-batch: clipped tokens, surprisal under the policy and
    /// the importance ratio against the behaviour distribution.
    fn token_stats(
        &self,
        m: &Micro,
        new: &Tensor,
        old: &Tensor,
        totals: &mut Totals,
    ) -> Result<(), TrainError> {
        let new_v: Vec<Vec<f64>> = new.to_dtype(DType::F64)?.to_vec2()?;
        let old_v: Vec<Vec<f64>> = old.to_dtype(DType::F64)?.to_vec2()?;
        let adv: Vec<Vec<f64>> = m.advantages.to_dtype(DType::F64)?.to_vec2()?;
        let beh_v: Vec<Vec<f64>> = m.behaviour.to_vec2()?;
        for (i, &len) in m.batch.completion_lens().iter().enumerate() {
            for j in 0..len {
                let ratio = (new_v[i][j] - old_v[i][j]).exp();
                if loss::is_clipped(ratio, adv[i][j], self.config.clip_eps) {
                    totals.clipped += 1;
                }
                totals.surprisal_sum -= new_v[i][j];
                if m.has_behaviour[i] {
                    let r = (new_v[i][j] - beh_v[i][j]).exp();
                    totals.ratio_sum += r;
                    totals.ratio_max = totals.ratio_max.max(r);
                    totals.ratio_tokens += 1;
                }
            }
        }
        Ok(())
    }
}
