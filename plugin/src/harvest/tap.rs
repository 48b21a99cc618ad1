//! The sampling tap: a per-request [`CustomLogitsProcessor`] that draws the next token itself.
//!
//! mistral.rs calls [`SamplingTap::apply`] once per generated token with the raw logits and
//! the sequence so far. The tap
//!
//! 1. scales the logits by `1 / temperature` and takes a log-softmax in `f64`;
//! 2. selects the top-p nucleus (the smallest set of most likely tokens whose mass reaches
//!    `top_p`, ties broken by lower id) with a quickselect over probability mass: expected
//!    O(vocabulary), never a full sort ([`nucleus`]);
//! 3. draws a token from the nucleus renormalised, with its own seeded RNG;
//! 4. records the id and its natural-log probability under that renormalised distribution,
//!    `ln p - ln(nucleus mass)` (exactly `ln p` when `top_p >= 1`);
//! 5. returns logits that are `-inf` everywhere except 0 at the chosen id, so the engine (run
//!    greedy) emits exactly that id.
//!
//! The first call's `context` is the prompt the model saw (the engine's prefix cache must be
//! off; [`crate::serving`] guarantees it). A cancel flag forces the stop token at the next call,
//! which ends the sequence without touching anything batched with it. Because the engine can
//! run a sequence on after its final response, the record is always cut at the response's
//! `usage.completion_tokens` ([`SamplingTap::take_record`]).
//!
//! With `temperature` below 1e-7 the tap is greedy (lowest id among maximal logits) and records
//! log-prob 0: the token had probability 1 under the distribution it was drawn from.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::{DType, Tensor};
use mistralrs_core::CustomLogitsProcessor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Temperatures below this are greedy.
pub const GREEDY_TEMPERATURE: f64 = 1e-7;

/// How the tap samples.
#[derive(Debug, Clone, PartialEq)]
pub struct TapConfig {
    /// Softmax temperature (> 0; below [`GREEDY_TEMPERATURE`] means greedy).
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
    /// Checks the ranges; returns the reason on failure.
    pub fn check(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature {} must be finite and >= 0",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        Ok(())
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
    /// Scratch buffers reused across calls (no allocation per token after the first).
    z: Vec<f64>,
    idx: Vec<u32>,
}

/// The per-request sampling tap (see the module docs). `Send + Sync`: the engine calls it from
/// several threads; all state sits behind one mutex.
pub struct SamplingTap {
    config: TapConfig,
    cancel: AtomicBool,
    state: Mutex<TapState>,
}

impl std::fmt::Debug for SamplingTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SamplingTap")
            .field("config", &self.config)
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
        config.check()?;
        Ok(SamplingTap {
            cancel: AtomicBool::new(false),
            state: Mutex::new(TapState {
                rng: ChaCha8Rng::seed_from_u64(config.seed),
                record: TapRecord::default(),
                z: Vec::new(),
                idx: Vec::new(),
            }),
            config,
        })
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
        if logits.is_empty() {
            return Err("empty logits".into());
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let now = now_unix_ms();
        if st.record.first_call_unix_ms.is_none() {
            st.record.prompt = context.to_vec();
            st.record.first_call_unix_ms = Some(now);
        }
        st.record.last_call_unix_ms = Some(now);
        let cfg = &self.config;
        let forced = self.cancel.load(Ordering::SeqCst);
        let v = logits.len();
        // Pass 1: validate, max of z = logits / T (f64).
        let greedy = cfg.temperature < GREEDY_TEMPERATURE;
        let inv_t = if greedy { 1.0 } else { 1.0 / cfg.temperature };
        let mut max = f64::NEG_INFINITY;
        let mut arg = 0usize;
        for (i, &l) in logits.iter().enumerate() {
            if l.is_nan() || l == f32::INFINITY {
                return Err(format!("logit {i} is {l}"));
            }
            let z = l as f64 * inv_t;
            if z > max {
                max = z;
                arg = i;
            }
        }
        if max == f64::NEG_INFINITY {
            return Err("every logit is -inf".into());
        }
        let z_of = |i: usize| logits[i] as f64 * inv_t;
        if greedy && !forced && cfg.forced.is_empty() && cfg.top_logprobs == 0 {
            // Greedy without alternatives needs no normalisation at all.
            return Ok(self.push(st, arg as u32, 0.0, forced, logits, inv_t, max));
        }
        // Pass 2: unnormalised weights w = exp(z - max) (one exp per id) and their sum.
        st.z.clear();
        st.z.extend(logits.iter().map(|&l| (l as f64 * inv_t - max).exp()));
        let sum: f64 = st.z.iter().sum();
        let lse = max + sum.ln();
        let replay = !cfg.forced.is_empty();
        let (chosen, logprob) = if replay && !forced {
            let pos = st.record.tokens.len();
            let c = cfg.forced.get(pos).copied().unwrap_or(cfg.stop_token);
            let ci = c as usize;
            if ci >= v {
                return Err(format!("forced id {c} is outside the vocabulary of {v}"));
            }
            let lp = if greedy {
                if ci == arg {
                    0.0
                } else {
                    f64::NEG_INFINITY
                }
            } else if cfg.top_p >= 1.0 {
                z_of(ci) - lse
            } else {
                let mass = top_p_nucleus(&st.z, cfg.top_p, sum, &mut st.idx);
                if st.idx.contains(&c) {
                    (z_of(ci) - lse - (mass / sum).ln()).min(0.0)
                } else {
                    f64::NEG_INFINITY
                }
            };
            (c, lp)
        } else if forced {
            let s = cfg.stop_token as usize;
            let lp = if s < v {
                z_of(s) - lse
            } else {
                f64::NEG_INFINITY
            };
            (cfg.stop_token, lp)
        } else {
            let u: f64 = st.rng.random();
            let (chosen, mass) = if cfg.top_p >= 1.0 {
                (draw(&st.z, 0..v, u * sum), sum)
            } else {
                let mass = top_p_nucleus(&st.z, cfg.top_p, sum, &mut st.idx);
                let members = st.idx.iter().map(|&i| i as usize);
                (draw(&st.z, members, u * mass), mass)
            };
            let renorm = if cfg.top_p >= 1.0 {
                0.0
            } else {
                (mass / sum).ln()
            };
            // A one-token nucleus gives ln p - ln p, which rounding can leave a hair above 0.
            (chosen as u32, (z_of(chosen) - lse - renorm).min(0.0))
        };
        Ok(self.push(st, chosen, logprob, forced, logits, inv_t, lse))
    }

    /// Records one step (and the top alternatives, when asked for, normalised by `lse`; the
    /// greedy fast path, which asks for none, passes the max instead).
    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        st: &mut TapState,
        chosen: u32,
        logprob: f64,
        forced: bool,
        logits: &[f32],
        inv_t: f64,
        lse: f64,
    ) -> u32 {
        let cfg = &self.config;
        let v = logits.len();
        if cfg.top_logprobs > 0 {
            // Recompute the log-probs (the z buffer may hold probabilities now).
            let k = cfg.top_logprobs.min(v);
            st.idx.clear();
            st.idx.extend(0..v as u32);
            let key = |i: &u32| logits[*i as usize];
            st.idx
                .select_nth_unstable_by(k - 1, |a, b| key(b).total_cmp(&key(a)).then(a.cmp(b)));
            let mut top: Vec<u32> = st.idx[..k].to_vec();
            top.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.cmp(b)));
            st.record.top.push(
                top.into_iter()
                    .map(|i| (i, logits[i as usize] as f64 * inv_t - lse))
                    .collect(),
            );
        }
        if forced && st.record.forced_from.is_none() {
            st.record.forced_from = Some(st.record.tokens.len());
        }
        st.record.tokens.push(chosen);
        st.record.logprobs.push(logprob);
        chosen
    }
}

/// [`nucleus`] of the weights `w` (summing to `sum`) at `top_p`, into `idx`; returns its mass.
///
/// Only ids whose weight is at least `(1 - top_p) * sum / len` are handed to the quickselect.
/// The others together weigh less than `(1 - top_p) * sum` and all lie below them, so they
/// belong to the excluded tail whatever the order: one linear pass that usually leaves the
/// quickselect a small fraction of the vocabulary.
fn top_p_nucleus(w: &[f64], top_p: f64, sum: f64, idx: &mut Vec<u32>) -> f64 {
    let cut = (1.0 - top_p).max(0.0) * sum / w.len() as f64;
    idx.clear();
    idx.extend(
        w.iter()
            .enumerate()
            .filter(|(_, &x)| x >= cut && x > 0.0)
            .map(|(i, _)| i as u32),
    );
    nucleus(w, top_p * sum, idx)
}

/// Walks `members` (ids into `probs`) in order and returns the first id at which the running
/// sum exceeds `target`; the last member when rounding leaves the target unreached.
fn draw(probs: &[f64], members: impl Iterator<Item = usize>, target: f64) -> usize {
    let mut acc = 0.0;
    let mut last = 0;
    for i in members {
        if probs[i] <= 0.0 {
            continue;
        }
        acc += probs[i];
        last = i;
        if acc > target {
            return i;
        }
    }
    last
}

/// Selects the top-p nucleus of `probs` in expected O(len): on return `idx` holds the ids of the
/// smallest set of most likely tokens whose probability reaches `top_p` (ties broken by lower
/// id; the order inside `idx` is unspecified) and the function returns their total mass. `idx`
/// must hold the candidate ids on entry (normally `0..len`).
///
/// The rule is mistral.rs's: in descending order a token is kept while the mass before it is
/// below `top_p`. Zero-probability tokens are never kept.
pub fn nucleus(probs: &[f64], top_p: f64, idx: &mut Vec<u32>) -> f64 {
    // `probs` may be unnormalised weights: `top_p` is then the target mass (top-p times
    // their sum), and the returned mass is in the same units.
    let mut taken = 0usize; // idx[..taken] are in the nucleus
    let mut lo = 0usize; // idx[lo..hi] are the candidates still undecided
    let mut hi = idx.len();
    let mut remaining = top_p;
    let mut mass = 0.0;
    // A cheap deterministic pivot stream (xorshift).
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ (idx.len() as u64);
    while lo < hi && remaining > 0.0 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let pivot = probs[idx[lo + (state % (hi - lo) as u64) as usize] as usize];
        if pivot <= 0.0 {
            // Everything positive is above the pivot: keep only those that are positive.
            let (g_end, _) = three_way(probs, &mut idx[lo..hi], 0.0);
            let g_mass: f64 = idx[lo..lo + g_end].iter().map(|&i| probs[i as usize]).sum();
            if g_end == 0 {
                break;
            }
            if g_mass < remaining {
                // Take every positive token: the nucleus cannot be completed beyond them.
                idx.copy_within(lo..lo + g_end, taken);
                taken += g_end;
                mass += g_mass;
                break;
            }
            hi = lo + g_end;
            continue;
        }
        // Partition [lo, hi) into > pivot, == pivot, < pivot.
        let (g_end, e_end) = three_way(probs, &mut idx[lo..hi], pivot);
        let g_mass: f64 = idx[lo..lo + g_end].iter().map(|&i| probs[i as usize]).sum();
        if g_mass >= remaining && g_end > 0 {
            // The nucleus ends among the greater ones.
            hi = lo + g_end;
            continue;
        }
        // Every greater token is in.
        idx.copy_within(lo..lo + g_end, taken);
        taken += g_end;
        mass += g_mass;
        remaining -= g_mass;
        // Equal tokens, lowest id first, while the mass before each is below the target.
        let eq = &mut idx[lo + g_end..lo + e_end];
        eq.sort_unstable();
        let eq: Vec<u32> = eq.to_vec();
        let mut done = false;
        for id in eq {
            if remaining <= 0.0 {
                done = true;
                break;
            }
            idx[taken] = id;
            taken += 1;
            mass += pivot;
            remaining -= pivot;
        }
        if done || remaining <= 0.0 {
            break;
        }
        lo += e_end;
    }
    idx.truncate(taken);
    mass
}

/// Partitions `ids` by `probs[id]` into (> pivot, == pivot, < pivot); returns the ends of the
/// first two parts.
fn three_way(probs: &[f64], ids: &mut [u32], pivot: f64) -> (usize, usize) {
    // Dutch national flag.
    let (mut lt, mut i, mut gt) = (0usize, 0usize, ids.len());
    while i < gt {
        let p = probs[ids[i] as usize];
        if p > pivot {
            ids.swap(lt, i);
            lt += 1;
            i += 1;
        } else if p < pivot {
            gt -= 1;
            ids.swap(i, gt);
        } else {
            i += 1;
        }
    }
    (lt, gt)
}

impl CustomLogitsProcessor for SamplingTap {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        let values: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let chosen = self
            .step(&values, context)
            .map_err(candle_core::Error::Msg)?;
        let mut out = vec![f32::NEG_INFINITY; values.len()];
        out[chosen as usize] = 0.0;
        Tensor::from_vec(out, logits.shape(), logits.device())?.to_dtype(logits.dtype())
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

    #[test]
    fn nucleus_hand_checked() {
        // Sorted: 0.4 (id 2), 0.3 (id 0), 0.2 (id 3), 0.1 (id 1).
        let p = [0.3, 0.1, 0.4, 0.2];
        for (top_p, expect) in [
            (0.35, vec![2]),
            (0.4, vec![2]),
            (0.41, vec![0, 2]),
            (0.7, vec![0, 2]),
            (0.75, vec![0, 2, 3]),
            (1.0, vec![0, 1, 2, 3]),
        ] {
            let mut idx: Vec<u32> = (0..4).collect();
            let mass = nucleus(&p, top_p, &mut idx);
            idx.sort_unstable();
            assert_eq!(idx, expect, "top_p {top_p}");
            let want: f64 = expect.iter().map(|&i| p[i as usize]).sum();
            assert!((mass - want).abs() < 1e-12);
        }
    }

    #[test]
    fn nucleus_ties_take_lower_ids() {
        let p = [0.25, 0.25, 0.25, 0.25];
        let mut idx: Vec<u32> = (0..4).collect();
        let mass = nucleus(&p, 0.5, &mut idx);
        idx.sort_unstable();
        assert_eq!(idx, vec![0, 1]);
        assert_eq!(mass, 0.5);
    }

    proptest! {
        #[test]
        fn nucleus_matches_sort(raw in proptest::collection::vec(0u32..1000, 1..200), top_p in 0.01f64..1.0) {
            let total: f64 = raw.iter().map(|&r| r as f64).sum();
            prop_assume!(total > 0.0);
            let p: Vec<f64> = raw.iter().map(|&r| r as f64 / total).collect();
            let mut idx: Vec<u32> = (0..p.len() as u32).collect();
            let mass = nucleus(&p, top_p, &mut idx);
            idx.sort_unstable();
            let want = nucleus_by_sort(&p, top_p);
            // Equal sets unless a float sum lands within rounding of top_p.
            let want_mass: f64 = want.iter().map(|&i| p[i as usize]).sum();
            if idx != want {
                prop_assert!((want_mass - top_p).abs() < 1e-9 || (mass - top_p).abs() < 1e-9);
            } else {
                prop_assert!((mass - want_mass).abs() < 1e-9);
                prop_assert!(mass + 1e-9 >= top_p.min(want_mass));
            }
        }

        #[test]
        fn prefilter_keeps_the_nucleus(raw in proptest::collection::vec(0u32..1000, 1..300), top_p in 0.01f64..1.0) {
            let total: f64 = raw.iter().map(|&r| r as f64).sum();
            prop_assume!(total > 0.0);
            let mut all: Vec<u32> = (0..raw.len() as u32).collect();
            let w: Vec<f64> = raw.iter().map(|&r| r as f64).collect();
            let m1 = nucleus(&w, top_p * total, &mut all);
            let mut some = Vec::new();
            let m2 = top_p_nucleus(&w, top_p, total, &mut some);
            all.sort_unstable();
            some.sort_unstable();
            prop_assert_eq!(all, some);
            prop_assert!((m1 - m2).abs() < 1e-9 * total.max(1.0));
        }

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
            prop_assert!((rec.logprobs[0] - want).abs() < 1e-9, "{} vs {want}", rec.logprobs[0]);
            prop_assert_eq!(rec.prompt, vec![1, 2, 3]);
        }
    }

    #[test]
    fn sampling_frequencies_follow_the_renormalised_nucleus() {
        // p = softmax(ln [0.5, 0.3, 0.15, 0.05]); top_p 0.8 keeps ids 0, 1 -> 0.625, 0.375.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let tap = SamplingTap::new(cfg(1.0, 0.8)).unwrap();
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
            ..cfg(1.0, 0.8)
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
