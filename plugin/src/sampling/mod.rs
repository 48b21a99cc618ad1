//! Token sampling: the one implementation of temperature, top-p and greedy decoding that the
//! serving tap ([`crate::harvest::tap`], `serve` feature) and the evaluator
//! ([`crate::trainer::generate`]: `leaf eval` and the held-out checks) both call, so that
//! evaluation decodes exactly as the server samples: the same validation, nucleus, tie-breaks,
//! RNG consumption and greedy rule.
//!
//! The rules:
//!
//! * [`SamplingParams`]: temperature finite in [0, [`MAX_TEMPERATURE`]], top-p in (0, 1].
//!   Below [`GREEDY_TEMPERATURE`] decoding is greedy.
//! * Logits: NaN or `+inf` is an error, and so is a row where every logit is `-inf`.
//! * Greedy: the lowest id among the maximal logits, log-prob 0, no RNG draw.
//! * Sampling: weights `w = exp((l - max) / T)` (so the most likely token weighs exactly 1);
//!   with `top_p < 1` the nucleus is the shortest prefix of the tokens ordered by weight
//!   (ties by lower id) whose mass reaches `top_p` of the total, a token kept while the mass
//!   before it is below that (mistral.rs's rule); tokens of weight 0 are never kept. One
//!   uniform `f64` from the RNG per draw, inverse CDF over the kept tokens.
//! * The recorded log-prob of the chosen token `c` is `ln softmax(l / T)[c] - ln(kept mass)`
//!   = `(l_c - max) / T - ln(kept weight)`, computed from the exact `f64` difference, the
//!   weights summed in `f64` and the weight-1 tokens counted apart, so it keeps a relative
//!   precision near 2e-7 (that of one `f32` weight) even when it is tiny.
//!
//! Cost: a row of `V` logits is read in two vectorised passes (the maximum; the `f32`
//! weights, eight lanes wide, and their `f64` block sums). For top-p < 1 one more pass over
//! the stored weights packs the candidates (the weights above a cut no nucleus token is
//! below), and the histogram, the boundary bin and the draw walk only those. No sort, no
//! branch per token in the passes over `V` (so none mispredicted), and no allocation once a
//! [`Sampler`]'s buffers have grown. On x86-64 the passes run as AVX2 + FMA builds when the
//! CPU has both (a portable build otherwise, with the same results). Callers on many threads
//! use [`with_sampler`], one [`Sampler`] per thread, so that nothing serialises unrelated
//! requests.

pub mod device;
mod kernels;
mod nucleus;

use std::cell::RefCell;

use rand::Rng;

use kernels::{BlockMass, BLOCK};
use nucleus::{Candidates, Member, Nucleus};

/// Temperatures below this are greedy.
pub const GREEDY_TEMPERATURE: f64 = 1e-7;

/// The largest temperature accepted.
pub const MAX_TEMPERATURE: f64 = 100.0;

/// Sampling settings that passed [`SamplingParams::new`]'s checks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    temperature: f64,
    top_p: f64,
}

/// Why sampling refused its input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// The temperature is not finite or out of [0, [`MAX_TEMPERATURE`]].
    #[error("temperature {0} must be in [0, 100]")]
    Temperature(f64),
    /// Top-p is out of (0, 1].
    #[error("top_p {0} must be in (0, 1]")]
    TopP(f64),
    /// The row of logits is empty.
    #[error("empty logits")]
    Empty,
    /// The row has more ids than a `u32` holds.
    #[error("{0} logits: token ids must fit in u32")]
    TooLong(usize),
    /// A logit is NaN or `+inf`.
    #[error("logit {index} is {value}")]
    BadLogit {
        /// Its id.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// Every logit is `-inf`.
    #[error("every logit is -inf")]
    AllMasked,
}

impl SamplingParams {
    /// Greedy decoding (temperature 0, top-p 1).
    pub const GREEDY: SamplingParams = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
    };

    /// Checked settings: `temperature` finite in [0, [`MAX_TEMPERATURE`]] (below
    /// [`GREEDY_TEMPERATURE`] is greedy) and `top_p` in (0, 1].
    pub fn new(temperature: f64, top_p: f64) -> Result<Self, SamplingError> {
        if !(temperature.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&temperature)) {
            return Err(SamplingError::Temperature(temperature));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(SamplingError::TopP(top_p));
        }
        Ok(SamplingParams { temperature, top_p })
    }

    /// The temperature.
    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    /// The nucleus mass.
    pub fn top_p(&self) -> f64 {
        self.top_p
    }

    /// Whether decoding is greedy (temperature below [`GREEDY_TEMPERATURE`]).
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }
}

/// A chosen token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    /// Its id.
    pub id: u32,
    /// Its natural-log probability under the distribution it was drawn from (0 for greedy).
    pub logprob: f64,
}

/// Reusable buffers for sampling (they grow to the vocabulary once, then are reused).
#[derive(Debug, Default)]
pub struct Sampler {
    blocks: Vec<BlockMass>,
    weights: Vec<f32>,
    hist: Vec<f64>,
    spare: Vec<f64>,
    members: Vec<Member>,
    cands: Candidates,
    order: Vec<u32>,
}

thread_local! {
    static SAMPLER: RefCell<Sampler> = RefCell::new(Sampler::default());
}

/// Runs `f` with this thread's [`Sampler`] (a fresh one if it is already in use up the
/// stack), so that callers on many threads neither allocate per call nor share a lock.
pub fn with_sampler<T>(f: impl FnOnce(&mut Sampler) -> T) -> T {
    let mut f = Some(f);
    if let Ok(Some(t)) = SAMPLER.try_with(|cell| {
        let mut s = cell.try_borrow_mut().ok()?;
        f.take().map(|f| f(&mut s))
    }) {
        return t;
    }
    // The thread's sampler is busy (a nested call) or gone (thread teardown): `f` was not run.
    match f {
        Some(f) => f(&mut Sampler::default()),
        None => unreachable!("the closure ran and returned its result"),
    }
}

/// Draws one token from `logits` with this thread's [`Sampler`] (see the module docs).
pub fn sample<R: Rng + ?Sized>(
    logits: &[f32],
    params: &SamplingParams,
    rng: &mut R,
) -> Result<Pick, SamplingError> {
    with_sampler(|s| s.sample(logits, params, rng))
}

impl Sampler {
    /// An empty sampler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Draws one token from `logits` (see the module docs).
    pub fn sample<R: Rng + ?Sized>(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
        rng: &mut R,
    ) -> Result<Pick, SamplingError> {
        Ok(self.distribution(logits, params)?.draw(rng))
    }

    /// Checks `logits` and prepares the distribution `params` gives them; the passes that a
    /// question needs run on first use.
    pub fn distribution<'a>(
        &'a mut self,
        logits: &'a [f32],
        params: &SamplingParams,
    ) -> Result<Distribution<'a>, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::Empty);
        }
        if u32::try_from(logits.len()).is_err() {
            return Err(SamplingError::TooLong(logits.len()));
        }
        let scan = kernels::scan_max(logits);
        if scan.bad {
            let index = logits
                .iter()
                .position(|l| l.is_nan() || *l == f32::INFINITY)
                .unwrap_or(0);
            return Err(SamplingError::BadLogit {
                index,
                value: logits[index],
            });
        }
        if scan.max == f32::NEG_INFINITY {
            return Err(SamplingError::AllMasked);
        }
        let greedy = params.is_greedy();
        Ok(Distribution {
            sampler: self,
            logits,
            greedy,
            top_p: params.top_p,
            inv_t: if greedy {
                1.0
            } else {
                1.0 / params.temperature
            },
            max: f64::from(scan.max),
            arg: scan.arg as u32,
            full: None,
            nucleus: None,
        })
    }
}

/// The distribution of one row of logits under some [`SamplingParams`]; from
/// [`Sampler::distribution`].
#[derive(Debug)]
pub struct Distribution<'a> {
    sampler: &'a mut Sampler,
    logits: &'a [f32],
    greedy: bool,
    top_p: f64,
    /// `1 / T` (1 when greedy: full log-probs are then those of the raw logits).
    inv_t: f64,
    max: f64,
    arg: u32,
    /// The total weight (weights and block sums in the sampler) once computed.
    full: Option<BlockMass>,
    /// The nucleus (weights stored and histogram in the sampler) once computed.
    nucleus: Option<Nucleus>,
}

/// `ln(ones + small)` with full relative precision when `ones` is 1.
fn ln_mass(m: BlockMass) -> f64 {
    if m.ones == 1.0 {
        m.small.ln_1p()
    } else {
        m.total().ln()
    }
}

impl Distribution<'_> {
    /// The lowest id among the maximal logits (the greedy choice).
    pub fn argmax(&self) -> u32 {
        self.arg
    }

    /// The vocabulary size.
    pub fn vocab(&self) -> usize {
        self.logits.len()
    }

    fn x_of(&self, id: usize) -> f64 {
        (f64::from(self.logits[id]) - self.max) * self.inv_t
    }

    /// Whether the nucleus is a strict part of the vocabulary.
    fn has_nucleus(&self) -> bool {
        !self.greedy && self.top_p < 1.0
    }

    /// The total weight, by one pass (also stores the weights when a nucleus will need them).
    fn full(&mut self) -> BlockMass {
        if let Some(f) = self.full {
            return f;
        }
        let keep = self.has_nucleus();
        let s = &mut *self.sampler;
        let store = if keep {
            // Every slot is overwritten: only a length change touches the buffer here.
            s.weights.resize(self.logits.len(), 0.0);
            Some(&mut s.weights[..])
        } else {
            None
        };
        kernels::weigh(self.logits, self.max, self.inv_t, &mut s.blocks, store);
        let total = BlockMass {
            ones: s.blocks.iter().map(|b| b.ones).sum(),
            small: s.blocks.iter().map(|b| b.small).sum(),
        };
        self.full = Some(total);
        total
    }

    fn nucleus(&mut self) -> Nucleus {
        if let Some(n) = self.nucleus {
            return n;
        }
        let total = self.full().total();
        let s = &mut *self.sampler;
        let cut = nucleus::prefilter_cut(total, self.top_p, s.weights.len());
        s.cands.collect(&s.weights, cut);
        nucleus::histogram(&s.cands, &mut s.hist, &mut s.spare);
        let n = nucleus::find(&s.cands, &s.hist, total, self.top_p, &mut s.members);
        self.nucleus = Some(n);
        n
    }

    /// Natural-log probability of `id` under the whole tempered softmax (before top-p; the
    /// raw softmax when greedy); `-inf` for an id outside the vocabulary.
    pub fn full_logprob(&mut self, id: u32) -> f64 {
        let id = id as usize;
        if id >= self.logits.len() {
            return f64::NEG_INFINITY;
        }
        let full = self.full();
        self.x_of(id) - ln_mass(full)
    }

    /// Natural-log probability of `id` under the distribution tokens are drawn from: 0 or
    /// `-inf` when greedy, the nucleus renormalised otherwise (`-inf` outside it or outside
    /// the vocabulary).
    pub fn logprob(&mut self, id: u32) -> f64 {
        let i = id as usize;
        if i >= self.logits.len() {
            return f64::NEG_INFINITY;
        }
        if self.greedy {
            return if id == self.arg {
                0.0
            } else {
                f64::NEG_INFINITY
            };
        }
        if !self.has_nucleus() {
            return self.full_logprob(id);
        }
        let n = self.nucleus();
        if n.contains(self.sampler.weights[i], id) {
            self.x_of(i) - ln_mass(n.mass)
        } else {
            f64::NEG_INFINITY
        }
    }

    /// Draws a token (greedy: the arg-max, drawing nothing from `rng`; else one `f64`).
    pub fn draw<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Pick {
        if self.greedy {
            return Pick {
                id: self.arg,
                logprob: 0.0,
            };
        }
        let u: f64 = rng.random();
        let id = if self.has_nucleus() {
            self.draw_nucleus(u)
        } else {
            self.draw_full(u)
        };
        Pick {
            id,
            logprob: self.logprob(id),
        }
    }

    /// Inverse CDF over all ids: the block sums, then the one block.
    fn draw_full(&mut self, u: f64) -> u32 {
        let total = self.full().total();
        let target = u * total;
        let blocks = &self.sampler.blocks;
        let mut before = 0.0;
        let mut last = None;
        for (b, m) in blocks.iter().enumerate() {
            let t = m.total();
            if t <= 0.0 {
                continue;
            }
            last = Some(b);
            if before + t > target {
                let ids = b * BLOCK..((b + 1) * BLOCK).min(self.logits.len());
                let (hit, fallback) =
                    kernels::walk(self.logits, ids, self.max, self.inv_t, target - before);
                if let Some(i) = hit.or(fallback) {
                    return i as u32;
                }
            }
            before += t;
        }
        // Rounding left the target unreached: the last token of positive weight.
        let b = last.unwrap_or(self.arg as usize / BLOCK);
        let ids = b * BLOCK..((b + 1) * BLOCK).min(self.logits.len());
        let (_, fallback) = kernels::walk(self.logits, ids, self.max, self.inv_t, f64::INFINITY);
        fallback.map_or(self.arg, |i| i as u32)
    }

    /// Inverse CDF over the nucleus: the bins from the top, then the ids of one bin.
    fn draw_nucleus(&mut self, u: f64) -> u32 {
        let n = self.nucleus();
        let target = u * n.mass.total();
        let s = &*self.sampler;
        let mut before = 0.0;
        let mut chosen = None;
        let mut lowest = None;
        for b in (1..=nucleus::TOP_BIN).rev() {
            let kept = n.kept_in(b, &s.hist);
            if kept <= 0.0 {
                continue;
            }
            lowest = Some(b);
            if before + kept > target {
                chosen = Some((b, target - before));
                break;
            }
            before += kept;
        }
        // Rounding left the target unreached: the lowest bin, up to its last member.
        let (b, rest) = match (chosen, lowest) {
            (Some(c), _) => c,
            (None, Some(b)) => (b, f64::INFINITY),
            (None, None) => return self.arg,
        };
        let mut acc = 0.0;
        let mut pick = None;
        nucleus::for_each_in_bin(&s.cands, b, |id, w| {
            if !n.contains(w, id) {
                return true;
            }
            acc += f64::from(w);
            pick = Some(id);
            acc <= rest
        });
        pick.unwrap_or(self.arg)
    }

    /// The `k` most likely ids (by logit, ties to the lower id) with their
    /// [`Distribution::full_logprob`]s, most likely first.
    pub fn top(&mut self, k: usize) -> Vec<(u32, f64)> {
        let v = self.logits.len();
        let k = k.min(v);
        if k == 0 {
            return Vec::new();
        }
        let lse = ln_mass(self.full());
        let logits = self.logits;
        let order = &mut self.sampler.order;
        order.clear();
        order.extend(0..v as u32);
        let key = |i: &u32| logits[*i as usize];
        order.select_nth_unstable_by(k - 1, |a, b| key(b).total_cmp(&key(a)).then(a.cmp(b)));
        let top = &mut order[..k];
        top.sort_unstable_by(|a, b| key(b).total_cmp(&key(a)).then(a.cmp(b)));
        let (max, inv_t) = (self.max, self.inv_t);
        top.iter()
            .map(|&i| (i, (f64::from(logits[i as usize]) - max) * inv_t - lse))
            .collect()
    }
}

#[cfg(test)]
mod tests;
