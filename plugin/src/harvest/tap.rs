//! The sampling tap: a per-request [`CustomLogitsProcessor`] that draws the next token itself.
//!
//! mistral.rs calls [`SamplingTap::apply`] once per generated token with the raw logits and
//! the sequence so far. The tap draws with [`crate::sampling`] (the one sampler, shared with
//! the evaluator: temperature, top-p nucleus with ties to the lower id, one seeded uniform
//! per draw, greedy below [`GREEDY_TEMPERATURE`]), then
//!
//! 1. records the id and its natural-log probability under the distribution it was drawn
//!    from: `ln p - ln(nucleus mass)` (exactly `ln p` when `top_p >= 1`, 0 when greedy);
//! 2. returns logits that are `-inf` everywhere except 0 at the chosen id, so the engine (run
//!    greedy) emits exactly that id.
//!
//! The first call's `context` is the prompt the model saw (the engine's prefix cache must be
//! off; [`crate::serving`] guarantees it). A cancel flag forces the stop token at the next call,
//! which ends the sequence without touching anything batched with it. Because the engine can
//! run a sequence on after its final response, the record is always cut at the response's
//! `usage.completion_tokens` ([`SamplingTap::take_record`]).
//!
//! The sampling buffers are per thread ([`crate::sampling::with_sampler`]) and the tap's own
//! lock is per request, so the engine's threads never wait on one another through the tap.
//!
//! Where the row is sampled ([`SamplerPlacement`]): logits on the CPU go through the host
//! kernels; logits on an accelerator (a `cuda` or `metal` build) are sampled on their device
//! by [`crate::sampling::device`] (the same rules; only a few small vectors reach the host)
//! and the one-hot answer is built there. A row the device search cannot settle is sampled
//! on the host instead (counted in `leaf_tap_device_fallbacks_total`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::{DType, Tensor};
use mistralrs_core::CustomLogitsProcessor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::sampling::device::{self, DeviceDistribution, DeviceSamplingError};
pub use crate::sampling::GREEDY_TEMPERATURE;
use crate::sampling::{with_sampler, SamplingParams};

/// Where the tap samples a row of logits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SamplerPlacement {
    /// On the logits' device when it is an accelerator, with the host kernels when the
    /// logits are on the CPU (faster there). The default.
    #[default]
    Auto,
    /// Always copy the row to the host and use the host kernels.
    Host,
    /// Always use the device sampler, also for logits on the CPU (for tests and benches).
    Device,
}

/// How the tap samples.
#[derive(Debug, Clone, PartialEq)]
pub struct TapConfig {
    /// Softmax temperature in [0, 100] (below [`GREEDY_TEMPERATURE`] means greedy).
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 keeps the whole vocabulary.
    pub top_p: f64,
    /// Alternatives to record per position for OpenAI-style `top_logprobs` (0: none).
    pub top_logprobs: usize,
    /// The token forced when the request is cancelled (or runs on after its final response).
    pub stop_token: u32,
    /// Seed of the tap's RNG.
    pub seed: u64,
    /// Replay mode: when non-empty the tap emits these ids in order (then the stop token)
    /// instead of sampling, and records each one's log-prob under the configured
    /// distribution (`-inf` outside the nucleus). For scoring a given completion through the
    /// engine; normal serving leaves it empty.
    pub forced: Vec<u32>,
}

impl TapConfig {
    /// Checks the ranges ([`SamplingParams::new`]'s rules); returns the reason on failure.
    pub fn check(&self) -> Result<(), String> {
        self.params().map(|_| ())
    }

    /// The checked sampling settings.
    pub fn params(&self) -> Result<SamplingParams, String> {
        SamplingParams::new(self.temperature, self.top_p).map_err(|e| e.to_string())
    }
}

/// What the tap saw and chose for one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TapRecord {
    /// The prompt ids the model saw (the first call's context).
    pub prompt: Vec<u32>,
    /// The chosen ids, in order.
    pub tokens: Vec<u32>,
    /// Natural-log probability of each chosen id under the distribution it was drawn from.
    pub logprobs: Vec<f64>,
    /// Per position, the `top_logprobs` most likely ids with their natural-log probabilities
    /// under the temperature-scaled distribution (before top-p), most likely first.
    pub top: Vec<Vec<(u32, f64)>>,
    /// Position of the first token forced by cancellation, if any.
    pub forced_from: Option<usize>,
    /// Milliseconds since the Unix epoch of the first call.
    pub first_call_unix_ms: Option<u64>,
    /// Milliseconds since the Unix epoch of the last recorded call.
    pub last_call_unix_ms: Option<u64>,
}

struct TapState {
    rng: ChaCha8Rng,
    record: TapRecord,
}

/// The per-request sampling tap (see the module docs). `Send + Sync`: the engine calls it from
/// several threads; the request's state sits behind its own mutex.
pub struct SamplingTap {
    config: TapConfig,
    params: SamplingParams,
    placement: SamplerPlacement,
    cancel: AtomicBool,
    state: Mutex<TapState>,
}

impl std::fmt::Debug for SamplingTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SamplingTap")
            .field("config", &self.config)
            .field("placement", &self.placement)
            .field("cancelled", &self.is_cancelled())
            .finish_non_exhaustive()
    }
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl SamplingTap {
    /// A tap with `config` (checked: an out-of-range value is an error naming it).
    pub fn new(config: TapConfig) -> Result<Self, String> {
        let params = config.params()?;
        Ok(SamplingTap {
            cancel: AtomicBool::new(false),
            state: Mutex::new(TapState {
                rng: ChaCha8Rng::seed_from_u64(config.seed),
                record: TapRecord::default(),
            }),
            params,
            placement: SamplerPlacement::Auto,
            config,
        })
    }

    /// The same tap sampling where `placement` says ([`SamplerPlacement::Auto`] by default).
    pub fn with_placement(mut self, placement: SamplerPlacement) -> Self {
        self.placement = placement;
        self
    }

    /// Where the tap samples.
    pub fn placement(&self) -> SamplerPlacement {
        self.placement
    }

    /// The configuration.
    pub fn config(&self) -> &TapConfig {
        &self.config
    }

    /// Forces the stop token from the next call on (client gone, or the response is final).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether [`SamplingTap::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Number of tokens recorded so far (run-on calls included).
    pub fn recorded(&self) -> usize {
        self.lock().record.tokens.len()
    }

    /// The record cut at `completion_tokens` (the response's `usage.completion_tokens`); later
    /// calls (a sequence the engine ran on) are discarded. Leaves the tap's record empty.
    pub fn take_record(&self, completion_tokens: usize) -> TapRecord {
        let mut st = self.lock();
        let mut rec = std::mem::take(&mut st.record);
        rec.tokens.truncate(completion_tokens);
        rec.logprobs.truncate(completion_tokens);
        rec.top.truncate(completion_tokens);
        if rec.forced_from.is_some_and(|f| f >= completion_tokens) {
            rec.forced_from = None;
        }
        rec
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TapState> {
        // A panic while holding the lock cannot leave the record half-written in a way that
        // matters (every push is of complete values), so a poisoned lock is recovered.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One sampling step on plain logits: returns the chosen id and records it. This is what
    /// [`CustomLogitsProcessor::apply`] runs; exposed for tests and benchmarks.
    pub fn step(&self, logits: &[f32], context: &[u32]) -> Result<u32, String> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let cfg = &self.config;
        let forced = self.cancel.load(Ordering::SeqCst);
        let (chosen, logprob, top) = with_sampler(|sampler| {
            let mut dist = sampler
                .distribution(logits, &self.params)
                .map_err(|e| e.to_string())?;
            let (chosen, logprob) = if forced {
                // The stop token's log-prob under the whole (tempered) softmax.
                (cfg.stop_token, dist.full_logprob(cfg.stop_token))
            } else if !cfg.forced.is_empty() {
                let pos = st.record.tokens.len();
                let c = cfg.forced.get(pos).copied().unwrap_or(cfg.stop_token);
                if c as usize >= dist.vocab() {
                    return Err(format!(
                        "forced id {c} is outside the vocabulary of {}",
                        dist.vocab()
                    ));
                }
                (c, dist.logprob(c))
            } else {
                let pick = dist.draw(&mut st.rng);
                (pick.id, pick.logprob)
            };
            let top = (cfg.top_logprobs > 0).then(|| dist.top(cfg.top_logprobs));
            Ok((chosen, logprob, top))
        })?;
        record(st, context, forced, chosen, logprob, top);
        Ok(chosen)
    }

    /// [`SamplingTap::step`] on the logits' device ([`crate::sampling::device`]): the same
    /// choices, RNG use and record. Nothing is recorded or drawn when it fails.
    fn step_device(&self, logits: &Tensor, context: &[u32]) -> Result<u32, DeviceSamplingError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let cfg = &self.config;
        let forced = self.cancel.load(Ordering::SeqCst);
        let mut dist = DeviceDistribution::new(logits, &self.params)?;
        let (chosen, logprob) = if forced {
            (cfg.stop_token, dist.full_logprob(cfg.stop_token)?)
        } else if !cfg.forced.is_empty() {
            let pos = st.record.tokens.len();
            let c = cfg.forced.get(pos).copied().unwrap_or(cfg.stop_token);
            if c as usize >= dist.vocab() {
                return Err(candle_core::Error::Msg(format!(
                    "forced id {c} is outside the vocabulary of {}",
                    dist.vocab()
                ))
                .into());
            }
            (c, dist.logprob(c)?)
        } else {
            let pick = dist.draw(&mut st.rng)?;
            (pick.id, pick.logprob)
        };
        let top = if cfg.top_logprobs > 0 {
            Some(dist.top(cfg.top_logprobs)?)
        } else {
            None
        };
        record(st, context, forced, chosen, logprob, top);
        Ok(chosen)
    }

    /// Whether `logits` are sampled on their device.
    fn on_device(&self, logits: &Tensor) -> bool {
        match self.placement {
            SamplerPlacement::Auto => !logits.device().is_cpu(),
            SamplerPlacement::Host => false,
            SamplerPlacement::Device => true,
        }
    }
}

/// Appends one call's choice to the record (the prompt and times on the first call).
fn record(
    st: &mut TapState,
    context: &[u32],
    forced: bool,
    chosen: u32,
    logprob: f64,
    top: Option<Vec<(u32, f64)>>,
) {
    let now = now_unix_ms();
    let rec = &mut st.record;
    if rec.first_call_unix_ms.is_none() {
        rec.prompt = context.to_vec();
        rec.first_call_unix_ms = Some(now);
    }
    rec.last_call_unix_ms = Some(now);
    if let Some(top) = top {
        rec.top.push(top);
    }
    if forced && rec.forced_from.is_none() {
        rec.forced_from = Some(rec.tokens.len());
    }
    rec.tokens.push(chosen);
    rec.logprobs.push(logprob);
}

impl CustomLogitsProcessor for SamplingTap {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        if self.on_device(logits) {
            match self.step_device(logits, context) {
                Ok(chosen) => {
                    return device::one_hot(chosen, logits)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()));
                }
                Err(e) if e.use_host_instead() => {
                    metrics::counter!("leaf_tap_device_fallbacks_total").increment(1);
                    tracing::debug!(reason = %e, "tap: sampling this row on the host");
                }
                Err(e) => return Err(candle_core::Error::Msg(e.to_string())),
            }
        }
        let mut values: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let chosen = self
            .step(&values, context)
            .map_err(candle_core::Error::Msg)?;
        if chosen as usize >= values.len() {
            return Err(candle_core::Error::Msg(format!(
                "token {chosen} is outside the vocabulary of {}",
                values.len()
            )));
        }
        // The answer reuses the logits' buffer: no second row allocated per token.
        values.fill(f32::NEG_INFINITY);
        values[chosen as usize] = 0.0;
        Tensor::from_vec(values, logits.shape(), logits.device())?.to_dtype(logits.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(temperature: f64, top_p: f64) -> TapConfig {
        TapConfig {
            temperature,
            top_p,
            top_logprobs: 0,
            stop_token: 0,
            seed: 7,
            forced: Vec::new(),
        }
    }

    /// The nucleus by a full sort (the reference the quickselect must match).
    fn nucleus_by_sort(probs: &[f64], top_p: f64) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..probs.len() as u32).collect();
        ids.sort_by(|&a, &b| {
            probs[b as usize]
                .total_cmp(&probs[a as usize])
                .then(a.cmp(&b))
        });
        let mut out = Vec::new();
        let mut cum = 0.0;
        for id in ids {
            if cum >= top_p || probs[id as usize] <= 0.0 {
                break;
            }
            cum += probs[id as usize];
            out.push(id);
        }
        out.sort_unstable();
        out
    }

    proptest! {
        #[test]
        fn tap_logprob_is_renormalised_nucleus_logprob(
            logits in proptest::collection::vec(-8.0f32..8.0, 2..64),
            t in 0.3f64..2.0,
            top_p in 0.05f64..1.0,
            seed in 0u64..1000,
        ) {
            let tap = SamplingTap::new(TapConfig { seed, ..cfg(t, top_p) }).unwrap();
            let id = tap.step(&logits, &[1, 2, 3]).unwrap() as usize;
            let rec = tap.take_record(1);
            // Reference: softmax(l / t), nucleus by sort, renormalise.
            let z: Vec<f64> = logits.iter().map(|&l| l as f64 / t).collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
            let p: Vec<f64> = z.iter().map(|v| (v - m).exp() / s).collect();
            let nuc = nucleus_by_sort(&p, top_p);
            prop_assert!(nuc.contains(&(id as u32)), "sampled {id} outside the nucleus {nuc:?}");
            let mass: f64 = nuc.iter().map(|&i| p[i as usize]).sum();
            let want = if top_p >= 1.0 { p[id].ln() } else { (p[id] / mass).ln() };
            // This reference divides probabilities, so near 0 it is only good to ~1e-15
            // absolute; `crate::sampling`'s tests hold the 1e-6-relative check.
            prop_assert!((rec.logprobs[0] - want).abs() <= 1e-6 * want.abs() + 1e-12, "{} vs {want}", rec.logprobs[0]);
            prop_assert_eq!(rec.prompt, vec![1, 2, 3]);
        }
    }

    #[test]
    fn sampling_frequencies_follow_the_renormalised_nucleus() {
        // p = softmax(ln [0.5, 0.3, 0.15, 0.05]); top_p 0.79 keeps ids 0, 1 -> 0.625, 0.375.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let tap = SamplingTap::new(cfg(1.0, 0.79)).unwrap();
        let n = 20_000;
        let mut count = [0usize; 4];
        for _ in 0..n {
            count[tap.step(&logits, &[0]).unwrap() as usize] += 1;
        }
        assert_eq!(count[2] + count[3], 0);
        let f0 = count[0] as f64 / n as f64;
        assert!((f0 - 0.625).abs() < 0.015, "{f0}");
        let rec = tap.take_record(n);
        for (t, lp) in rec.tokens.iter().zip(&rec.logprobs) {
            let want = if *t == 0 {
                0.625f64.ln()
            } else {
                0.375f64.ln()
            };
            assert!((lp - want).abs() < 1e-6);
        }
    }

    #[test]
    fn cancel_forces_stop_and_record_is_cut() {
        let tap = SamplingTap::new(TapConfig {
            stop_token: 3,
            ..cfg(1.0, 1.0)
        })
        .unwrap();
        let logits = [5.0f32, 0.0, 0.0, -1.0];
        tap.step(&logits, &[9]).unwrap();
        tap.cancel();
        assert_eq!(tap.step(&logits, &[9, 0]).unwrap(), 3);
        assert_eq!(tap.step(&logits, &[9, 0, 3]).unwrap(), 3);
        let rec = tap.take_record(2);
        assert_eq!(rec.tokens.len(), 2);
        assert_eq!(rec.forced_from, Some(1));
        assert_eq!(rec.prompt, vec![9]);
    }

    #[test]
    fn replay_scores_forced_ids() {
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let tap = SamplingTap::new(TapConfig {
            forced: vec![1, 3],
            stop_token: 2,
            ..cfg(1.0, 0.79)
        })
        .unwrap();
        assert_eq!(tap.step(&logits, &[0]).unwrap(), 1);
        assert_eq!(tap.step(&logits, &[0, 1]).unwrap(), 3);
        assert_eq!(tap.step(&logits, &[0, 1, 3]).unwrap(), 2);
        let rec = tap.take_record(3);
        assert!((rec.logprobs[0] - 0.375f64.ln()).abs() < 1e-6);
        assert_eq!(rec.logprobs[1], f64::NEG_INFINITY);
    }

    #[test]
    fn greedy_is_argmax_with_logprob_zero() {
        let tap = SamplingTap::new(cfg(0.0, 1.0)).unwrap();
        assert_eq!(tap.step(&[0.1, 2.0, 2.0, -1.0], &[0]).unwrap(), 1);
        assert_eq!(tap.take_record(1).logprobs, vec![0.0]);
    }

    #[test]
    fn bad_config_and_logits_are_errors() {
        assert!(SamplingTap::new(cfg(-1.0, 1.0)).is_err());
        assert!(SamplingTap::new(cfg(1.0, 0.0)).is_err());
        assert!(SamplingTap::new(cfg(1.0, 1.5)).is_err());
        let tap = SamplingTap::new(cfg(1.0, 1.0)).unwrap();
        assert!(tap.step(&[], &[0]).is_err());
        assert!(tap.step(&[f32::NAN, 0.0], &[0]).is_err());
        assert!(tap.step(&[f32::NEG_INFINITY; 3], &[0]).is_err());
    }

    #[test]
    fn apply_returns_one_hot() {
        let tap = SamplingTap::new(cfg(1.0, 0.5)).unwrap();
        let logits = Tensor::new(&[0.0f32, 4.0, 1.0], &candle_core::Device::Cpu).unwrap();
        let out: Vec<f32> = tap.apply(&logits, &[0]).unwrap().to_vec1().unwrap();
        assert_eq!(out, vec![f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY]);
    }

    /// A row for step `i` of the device-path tests: uniform in [-6, 6], some masked.
    fn step_row(vocab: usize, i: u64) -> Vec<f32> {
        let mut state = 0x5EED ^ i;
        (0..vocab)
            .map(|j| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if j % 97 == 5 {
                    f32::NEG_INFINITY
                } else {
                    ((state >> 40) as f32 / (1u64 << 24) as f32) * 12.0 - 6.0
                }
            })
            .collect()
    }

    /// The chosen id of a one-hot answer (and its checks: the input's shape and dtype, one
    /// 0, the rest -inf).
    fn hot_id(out: &Tensor, like: &Tensor) -> u32 {
        assert_eq!(out.dims(), like.dims());
        assert_eq!(out.dtype(), like.dtype());
        let v: Vec<f32> = out
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(v.iter().filter(|&&x| x == 0.0).count(), 1);
        assert_eq!(
            v.iter().filter(|&&x| x == f32::NEG_INFINITY).count(),
            v.len() - 1
        );
        v.iter().position(|&x| x == 0.0).unwrap() as u32
    }

    /// The tap forced onto the device sampler (on the CPU device) records what the host path
    /// records: the same shape, every log-prob the host kernel's for the token drawn (within
    /// 1e-5), the same top alternatives, and the same tokens where both walk the ids in
    /// order (top-p 1, greedy); its answer is a valid one-hot row.
    #[test]
    fn device_path_records_as_the_host_path() {
        const V: usize = 3001;
        for (t, top_p, k) in [(1.0, 1.0, 0), (0.8, 0.9, 3), (0.0, 1.0, 2), (0.7, 0.5, 1)] {
            let config = TapConfig {
                top_logprobs: k,
                seed: 11,
                ..cfg(t, top_p)
            };
            let host = SamplingTap::new(config.clone())
                .unwrap()
                .with_placement(SamplerPlacement::Host);
            let dev = SamplingTap::new(config)
                .unwrap()
                .with_placement(SamplerPlacement::Device);
            assert_eq!(dev.placement(), SamplerPlacement::Device);
            let params = SamplingParams::new(t, top_p).unwrap();
            let mut context = vec![4u32, 5];
            let steps = 12;
            for i in 0..steps {
                let row = step_row(V, i);
                let like = Tensor::new(row.as_slice(), &candle_core::Device::Cpu)
                    .unwrap()
                    .reshape((1, V))
                    .unwrap();
                let h = hot_id(&host.apply(&like, &context).unwrap(), &like);
                let d = hot_id(&dev.apply(&like, &context).unwrap(), &like);
                if top_p >= 1.0 {
                    assert_eq!(h, d, "t {t} step {i}");
                }
                context.push(d);
            }
            let (rh, rd) = (
                host.take_record(steps as usize),
                dev.take_record(steps as usize),
            );
            assert_eq!(rd.prompt, vec![4, 5]);
            assert_eq!(rd.tokens.len(), rh.tokens.len());
            assert_eq!(rd.logprobs.len(), rh.logprobs.len());
            assert_eq!(rd.top.len(), rh.top.len());
            assert_eq!(rd.forced_from, None);
            for (i, (&tok, &lp)) in rd.tokens.iter().zip(&rd.logprobs).enumerate() {
                let row = step_row(V, i as u64);
                let want = with_sampler(|s| s.distribution(&row, &params).unwrap().logprob(tok));
                assert!(
                    want > f64::NEG_INFINITY,
                    "step {i}: drew {tok} outside the nucleus"
                );
                assert!((lp - want).abs() <= 1e-5, "step {i}: {lp} vs host {want}");
            }
            for (a, b) in rh.top.iter().zip(&rd.top) {
                assert_eq!(a.len(), k);
                assert_eq!(
                    a.iter().map(|x| x.0).collect::<Vec<_>>(),
                    b.iter().map(|x| x.0).collect::<Vec<_>>()
                );
                for (x, y) in a.iter().zip(b) {
                    assert!((x.1 - y.1).abs() <= 1e-5, "{x:?} vs {y:?}");
                }
            }
        }
    }

    #[test]
    fn device_path_replays_and_cancels_as_the_host_path() {
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let like = Tensor::new(logits.as_slice(), &candle_core::Device::Cpu).unwrap();
        let tap = SamplingTap::new(TapConfig {
            forced: vec![1, 3],
            stop_token: 2,
            ..cfg(1.0, 0.79)
        })
        .unwrap()
        .with_placement(SamplerPlacement::Device);
        for want in [1, 3, 2] {
            assert_eq!(hot_id(&tap.apply(&like, &[0]).unwrap(), &like), want);
        }
        let rec = tap.take_record(3);
        assert!((rec.logprobs[0] - 0.375f64.ln()).abs() < 1e-6);
        assert_eq!(rec.logprobs[1], f64::NEG_INFINITY);
        assert_eq!(rec.logprobs[2], f64::NEG_INFINITY);

        let tap = SamplingTap::new(TapConfig {
            stop_token: 3,
            ..cfg(1.0, 1.0)
        })
        .unwrap()
        .with_placement(SamplerPlacement::Device);
        tap.apply(&like, &[9]).unwrap();
        tap.cancel();
        assert_eq!(hot_id(&tap.apply(&like, &[9, 0]).unwrap(), &like), 3);
        let rec = tap.take_record(2);
        assert_eq!(rec.forced_from, Some(1));
        assert!((rec.logprobs[1] - 0.05f64.ln()).abs() < 1e-6);
        // Bad logits are errors naming the logit, as on the host path.
        let bad = Tensor::new(&[0.0f32, f32::NAN], &candle_core::Device::Cpu).unwrap();
        let err = tap.apply(&bad, &[0]).unwrap_err().to_string();
        assert!(err.contains("logit 1 is NaN"), "{err}");
    }

    /// A row the device search gives up on is sampled on the host: a valid token of the
    /// nucleus with the host's log-prob.
    #[test]
    fn device_path_falls_back_to_the_host() {
        let logits: Vec<f32> = (0..149).map(|k| -(2f32.powi(-k))).collect();
        let like = Tensor::new(logits.as_slice(), &candle_core::Device::Cpu).unwrap();
        let params = SamplingParams::new(1.0, 0.05).unwrap();
        let tap = SamplingTap::new(cfg(1.0, 0.05))
            .unwrap()
            .with_placement(SamplerPlacement::Device);
        for _ in 0..5 {
            tap.apply(&like, &[0]).unwrap();
        }
        let rec = tap.take_record(5);
        // When the device settles the cut it orders the weight-1 ties by logit, the host by
        // id: compare with a host-kept token of the same f32 weight.
        let w = |i: u32| f64::from(logits[i as usize]).exp() as f32;
        for (&tok, &lp) in rec.tokens.iter().zip(&rec.logprobs) {
            let want = with_sampler(|s| {
                let mut d = s.distribution(&logits, &params).unwrap();
                (0..logits.len() as u32)
                    .filter(|&i| w(i) == w(tok))
                    .map(|i| d.logprob(i))
                    .fold(f64::NEG_INFINITY, f64::max)
            });
            assert!((lp - want).abs() <= 1e-5, "{tok}: {lp} vs {want}");
        }
    }

    #[test]
    fn top_logprobs_are_the_most_likely() {
        let tap = SamplingTap::new(TapConfig {
            top_logprobs: 2,
            ..cfg(1.0, 1.0)
        })
        .unwrap();
        tap.step(&[0.0, 3.0, 1.0, 2.0], &[0]).unwrap();
        let rec = tap.take_record(1);
        let ids: Vec<u32> = rec.top[0].iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3]);
    }
}
