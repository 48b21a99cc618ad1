//! The sampler for a row of logits that lives on an accelerator: the same rules as the host
//! sampler (see the [module docs](super)), computed with candle tensor ops on the row's
//! device, so that only a few scalars and small vectors cross to the host per token instead
//! of the whole row (152k-262k floats) there and a one-hot row back.
//!
//! Every op used exists on candle 0.10's CPU, CUDA and Metal back-ends for `f32` (no sort:
//! candle's CUDA `arg_sort` is a bitonic sort in one block's shared memory, which cannot hold
//! a 152k row; no `f64`, which Metal lacks; no integer arithmetic on `u8` masks, which CUDA
//! lacks): comparisons into `u8` masks, `where_cond`, `exp`, `affine`, broadcast
//! subtraction and addition, `sum`/`min`/`max` over the last dimension, casts, `cat`,
//! `narrow` and `reshape`.
//!
//! Steps, for a row of `V` logits `l` (padded with `-inf` to `B` blocks of [`BLOCK`]):
//!
//! 1. **Stats** (one copy of `B + 3` floats to the host): the first NaN/`+inf` id, the
//!    maximum, the lowest id holding it, and per block the sum of the `f32` weights
//!    `w = exp((l - max) / T)`. The host adds the block sums in `f64`: the total.
//! 2. **Nucleus** (top-p < 1 only): the cut logit `λ*`, the largest logit whose mass at or
//!    above it, `S(λ*) = Σ_{l_i >= λ*} w_i`, reaches `top_p` times the total. Every logit above
//!    it is kept, none below it, and of the tokens at `λ*` the first in id order while the
//!    mass before each is below the target (mistral.rs's rule, as on the host). Found by a
//!    vectorised interval search on the logits: each round takes the smallest and largest
//!    logit in the current interval `[lo, hi)` and [`GRID`] thresholds spread evenly between
//!    them, computes `S` at every threshold at once (a `[GRID, V]` comparison, the masked
//!    weights summed per block, then the blocks), and copies `2 GRID + 3` floats to the host,
//!    which keeps the sub-interval where `S` crosses the target. The search ends when the
//!    interval holds one distinct logit (typically after 3-4 rounds at a 152k vocabulary).
//!    When ties at `λ*` are cut, the tie count per block (one copy of `B` floats) and one
//!    block's mask (one copy of [`BLOCK`] floats) give the id where the cut falls.
//! 3. **Kept mass** (one copy of `B` floats): the kept weights summed per block; the host
//!    adds them in `f64`.
//! 4. **Draw** (one copy of `2 BLOCK` floats): one uniform `f64` from the caller's RNG (as
//!    on the host: the run stays reproducible from the request's seed), inverse CDF in id
//!    order over the block sums on the host, then over the chosen block's kept weights and
//!    logits, copied to the host.
//!
//! The log-prob of the chosen token `c` is computed on the host as on the host path,
//! `(l_c - max) / T - ln(kept mass)`, from the exact `f32` logits and the `f64` sum of the
//! device's block sums: within about 1e-6 of the host kernel's (the weights are `f32` on
//! both sides; the device's `exp` is the back-end's).
//!
//! **Where the device and the host may keep different sets.** The nucleus is the same rule,
//! but masses are summed in a different order (`f32` per block here, `f64` of bins there),
//! and the host orders tokens by their rounded `f32` weight (ties to the lower id) while the
//! device orders them by logit. So the kept sets can differ (a) by the boundary token when
//! the mass before it is within rounding (about 1e-6 relative) of `top_p` times the total,
//! and (b) when distinct logits round to the same `f32` weight at the cut (the host breaks
//! that tie by id, the device by logit). The tests hold both to these cases.
//!
//! **Where it gives up.** The search narrows a value interval; logits of pathological
//! spacing (e.g. a geometric run towards 0) could need many rounds. After [`MAX_ROUNDS`] it
//! returns [`DeviceSamplingError::NoConvergence`] before drawing anything, and the caller
//! samples that row on the host instead. Ids are carried as `f32`, so rows longer than
//! 2^24 are refused ([`DeviceSamplingError::VocabTooLarge`]).
//!
//! The same uniform gives the same token as the host path when top-p is 1 (both walk the
//! ids in order) up to summation rounding; with a nucleus the host walks its weight bins
//! first, so the same seed draws from the same distribution but not the same token.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor, D};
use rand::Rng;

use super::{Pick, SamplingError, SamplingParams};

/// Ids per block: the unit of the two-level sums and of the draw's copy.
pub const BLOCK: usize = 512;
/// Thresholds per search round.
pub const GRID: usize = 64;
/// Search rounds before [`DeviceSamplingError::NoConvergence`].
pub const MAX_ROUNDS: usize = 24;
/// The longest row: ids are carried as `f32`, exact up to 2^24.
pub const MAX_VOCAB: usize = 1 << 24;

/// Why the device sampler refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSamplingError {
    /// The settings or the logits break the sampling rules (as on the host).
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// The row is longer than [`MAX_VOCAB`].
    #[error("{0} logits: the device sampler carries ids as f32 (at most 2^24)")]
    VocabTooLarge(usize),
    /// The nucleus search did not isolate the cut logit in [`MAX_ROUNDS`] rounds; nothing was
    /// drawn, so the caller can sample the row on the host.
    #[error("the device nucleus search did not converge in {0} rounds")]
    NoConvergence(usize),
    /// A tensor op failed.
    #[error("device sampling: {0}")]
    Candle(#[from] candle_core::Error),
}

impl DeviceSamplingError {
    /// Whether the host sampler should take the row instead (nothing was drawn).
    pub fn use_host_instead(&self) -> bool {
        matches!(
            self,
            DeviceSamplingError::NoConvergence(_) | DeviceSamplingError::VocabTooLarge(_)
        )
    }
}

type Result<T> = std::result::Result<T, DeviceSamplingError>;

/// Per-thread ids `0..P` as `f32` on one device (built once per device and padded length).
struct IdsCache {
    device: Device,
    ids: Tensor,
}

thread_local! {
    static IDS: RefCell<Vec<IdsCache>> = const { RefCell::new(Vec::new()) };
}

/// Ids `0..padded` as `f32` on `device` (from this thread's cache).
fn ids_on(device: &Device, padded: usize) -> Result<Tensor> {
    let hit = IDS.with(|c| {
        c.borrow()
            .iter()
            .find(|e| e.device.same_device(device) && e.ids.dim(0).ok() == Some(padded))
            .map(|e| e.ids.clone())
    });
    if let Some(ids) = hit {
        return Ok(ids);
    }
    let v: Vec<f32> = (0..padded).map(|i| i as f32).collect();
    let ids = Tensor::from_vec(v, padded, device)?;
    IDS.with(|c| {
        let mut c = c.borrow_mut();
        // Few devices and lengths per thread: keep the last four.
        if c.len() >= 4 {
            c.remove(0);
        }
        c.push(IdsCache {
            device: device.clone(),
            ids: ids.clone(),
        });
    });
    Ok(ids)
}

/// A scalar `f32` tensor on `device` broadcast to `shape`.
fn filled(v: f32, shape: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::new(v, device)?.broadcast_as(shape)?)
}

/// Copies a small `f32` vector to the host (one synchronisation).
fn fetch(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Sums of `[.., P]` (`P` a multiple of [`BLOCK`]) per block of its last dimension:
/// `[.., P / BLOCK]`. Summing those again gives a two-level sum, more accurate than one long
/// `f32` sum (and spread over many GPU blocks instead of one).
fn block_sums(t: &Tensor) -> Result<Tensor> {
    let mut dims = t.dims().to_vec();
    let p = dims.pop().unwrap_or(0);
    dims.push(p / BLOCK);
    dims.push(BLOCK);
    Ok(t.reshape(dims)?.sum(D::Minus1)?)
}

/// The host rule for the ties kept at the cut: tie `r` (0-based, id order) is kept while
/// `above + r w < target`; at least one, at most `ties`.
fn ties_kept(above: f64, w: f64, target: f64, ties: usize) -> usize {
    if ties == 0 {
        return 0;
    }
    let mut r = if w > 0.0 {
        ((target - above) / w).ceil().clamp(1.0, ties as f64) as usize
    } else {
        ties
    };
    while r > 1 && above + (r - 1) as f64 * w >= target {
        r -= 1;
    }
    while r < ties && above + r as f64 * w < target {
        r += 1;
    }
    r
}

/// The nucleus as a cut in (logit descending, id ascending) order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cut {
    /// The cut logit `λ*` (or a threshold with no logit between it and `λ*`).
    pub at: f32,
    /// When the ties at `at` are cut: the first id at `at` that is left out.
    pub tie_end: Option<u32>,
}

impl Cut {
    /// Whether the token `id` of logit `l` is kept.
    pub fn contains(&self, l: f32, id: u32) -> bool {
        match self.tie_end {
            None => l >= self.at,
            Some(end) => l > self.at || (l == self.at && id < end),
        }
    }
}

#[derive(Debug, Clone)]
struct Kept {
    cut: Option<Cut>,
    /// Kept weights `[P]` (all weights when there is no cut).
    weights: Tensor,
    /// Their sums per block, and the total in `f64`.
    blocks: Vec<f32>,
    mass: f64,
}

/// Counters of one row's work (for tests and benches).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceWork {
    /// Search rounds run.
    pub rounds: usize,
    /// Copies to the host so far.
    pub copies: usize,
}

/// One row of logits prepared on its device under some [`SamplingParams`]; see the module
/// docs. Mirrors the host [`super::Distribution`].
#[derive(Debug)]
pub struct DeviceDistribution {
    /// Logits `[P]`, `-inf` past the vocabulary.
    x: Tensor,
    /// Weights `[P]`, 0 past the vocabulary.
    w: Tensor,
    ids: Tensor,
    vocab: usize,
    greedy: bool,
    top_p: f64,
    inv_t: f64,
    max: f32,
    arg: u32,
    full_blocks: Vec<f32>,
    total: f64,
    kept: Option<Kept>,
    work: DeviceWork,
}

impl DeviceDistribution {
    /// Checks `logits` (any float dtype and shape; read as one flattened row) and prepares
    /// the distribution `params` gives them, on the logits' device.
    pub fn new(logits: &Tensor, params: &SamplingParams) -> Result<Self> {
        let device = logits.device().clone();
        let x = logits.flatten_all()?.to_dtype(DType::F32)?;
        let vocab = x.dim(0)?;
        if vocab == 0 {
            return Err(SamplingError::Empty.into());
        }
        if vocab > MAX_VOCAB {
            return Err(DeviceSamplingError::VocabTooLarge(vocab));
        }
        let padded = vocab.div_ceil(BLOCK) * BLOCK;
        let x = if padded > vocab {
            let pad = Tensor::full(f32::NEG_INFINITY, padded - vocab, &device)?;
            Tensor::cat(&[&x, &pad], 0)?
        } else {
            x.contiguous()?
        };
        let ids = ids_on(&device, padded)?;
        let greedy = params.is_greedy();
        let inv_t = if greedy {
            1.0
        } else {
            1.0 / params.temperature()
        };
        let big = filled(f32::MAX, &[padded], &device)?;
        // NaN (the only value unequal to itself) or +inf.
        let nan = x.ne(&x)?.to_dtype(DType::F32)?;
        let pinf = x.eq(f64::INFINITY)?.to_dtype(DType::F32)?;
        let bad = nan.add(&pinf)?.gt(0.0)?;
        let first_bad = bad.where_cond(&ids, &big)?.min_keepdim(0)?;
        let max = x.max_keepdim(0)?;
        let at_max = x.broadcast_eq(&max)?;
        let arg = at_max.where_cond(&ids, &big)?.min_keepdim(0)?;
        let w = x.broadcast_sub(&max)?.affine(inv_t, 0.0)?.exp()?;
        let blocks = block_sums(&w)?;
        let stats = fetch(&Tensor::cat(&[&first_bad, &max, &arg, &blocks], 0)?)?;
        let work = DeviceWork {
            rounds: 0,
            copies: 1,
        };
        let (first_bad, max, arg) = (stats[0], stats[1], stats[2]);
        if first_bad < f32::MAX {
            let index = first_bad as usize;
            let value = fetch(&x.narrow(0, index, 1)?)?[0];
            return Err(SamplingError::BadLogit { index, value }.into());
        }
        if max == f32::NEG_INFINITY {
            return Err(SamplingError::AllMasked.into());
        }
        let full_blocks = stats[3..].to_vec();
        let total: f64 = full_blocks.iter().map(|&b| f64::from(b)).sum();
        Ok(DeviceDistribution {
            x,
            w,
            ids,
            vocab,
            greedy,
            top_p: params.top_p(),
            inv_t,
            max,
            arg: arg as u32,
            full_blocks,
            total,
            kept: None,
            work,
        })
    }

    /// The lowest id among the maximal logits (the greedy choice).
    pub fn argmax(&self) -> u32 {
        self.arg
    }

    /// The vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The work done so far.
    pub fn work(&self) -> DeviceWork {
        self.work
    }

    /// The total weight (the most likely token weighs 1).
    pub fn total(&self) -> f64 {
        self.total
    }

    fn has_nucleus(&self) -> bool {
        !self.greedy && self.top_p < 1.0
    }

    fn x_of(&self, l: f32) -> f64 {
        (f64::from(l) - f64::from(self.max)) * self.inv_t
    }

    /// The logit of `id` (one copy).
    fn logit(&mut self, id: u32) -> Result<f32> {
        self.work.copies += 1;
        Ok(fetch(&self.x.narrow(0, id as usize, 1)?)?[0])
    }

    /// Natural-log probability of `id` under the whole tempered softmax (the raw softmax
    /// when greedy); `-inf` outside the vocabulary.
    pub fn full_logprob(&mut self, id: u32) -> Result<f64> {
        if id as usize >= self.vocab {
            return Ok(f64::NEG_INFINITY);
        }
        let l = self.logit(id)?;
        Ok(self.x_of(l) - self.total.ln())
    }

    /// Natural-log probability of `id` under the distribution tokens are drawn from (0 or
    /// `-inf` when greedy; the nucleus renormalised otherwise, `-inf` outside it).
    pub fn logprob(&mut self, id: u32) -> Result<f64> {
        if id as usize >= self.vocab {
            return Ok(f64::NEG_INFINITY);
        }
        if self.greedy {
            return Ok(if id == self.arg {
                0.0
            } else {
                f64::NEG_INFINITY
            });
        }
        let l = self.logit(id)?;
        let kept = self.kept()?;
        let (cut, mass) = (kept.cut, kept.mass);
        if cut.is_some_and(|c| !c.contains(l, id)) {
            return Ok(f64::NEG_INFINITY);
        }
        Ok(self.x_of(l) - mass.ln())
    }

    /// The nucleus cut (`None` when every token is kept: top-p 1 or greedy).
    pub fn cut(&mut self) -> Result<Option<Cut>> {
        Ok(self.kept()?.cut)
    }

    /// The kept mass (the total when there is no nucleus).
    pub fn kept_mass(&mut self) -> Result<f64> {
        Ok(self.kept()?.mass)
    }

    fn kept(&mut self) -> Result<&Kept> {
        if self.kept.is_none() {
            let kept = if self.has_nucleus() {
                self.find_nucleus()?
            } else {
                Kept {
                    cut: None,
                    weights: self.w.clone(),
                    blocks: self.full_blocks.clone(),
                    mass: self.total,
                }
            };
            self.kept = Some(kept);
        }
        match &self.kept {
            Some(k) => Ok(k),
            None => unreachable!("set above"),
        }
    }

    /// The search of step 2 (module docs), then the kept mass of step 3.
    fn find_nucleus(&mut self) -> Result<Kept> {
        let device = self.x.device().clone();
        let p = self.x.dim(0)?;
        let target = self.top_p * self.total;
        // No token lighter than this is in the nucleus (the host's prefilter): the search
        // starts at the logit of that weight, rounded down.
        let cut_w = (1.0 - self.top_p) * self.total / (2.0 * self.vocab as f64);
        let lo0 = f64::from(self.max) + cut_w.ln() / self.inv_t;
        let mut lo = (lo0 as f32).min(self.max);
        if f64::from(lo) > lo0 {
            lo = next_down(lo);
        }
        let mut hi = f32::INFINITY;
        // Mass at or above `hi`.
        let mut above_hi = 0.0f64;
        let ramp: Vec<f32> = (0..GRID).map(|j| j as f32 / GRID as f32).collect();
        let ramp = Tensor::from_vec(ramp, GRID, &device)?;
        let ninf = filled(f32::NEG_INFINITY, &[p], &device)?;
        let pinf = filled(f32::INFINITY, &[p], &device)?;
        let zeros_grid = filled(0.0, &[GRID, p], &device)?;
        let w_grid = self.w.unsqueeze(0)?.broadcast_as((GRID, p))?;
        let x_grid = self.x.unsqueeze(0)?.broadcast_as((GRID, p))?;
        let (at, ties, above) = loop {
            if self.work.rounds == MAX_ROUNDS {
                return Err(DeviceSamplingError::NoConvergence(MAX_ROUNDS));
            }
            self.work.rounds += 1;
            // Logits in [lo, hi) (others -inf), their extremes and count.
            let below_hi = self.x.lt(f64::from(hi))?.where_cond(&self.x, &ninf)?;
            let inside = below_hi.ge(f64::from(lo))?;
            let max_in = inside.where_cond(&self.x, &ninf)?.max_keepdim(0)?;
            let min_in = inside.where_cond(&self.x, &pinf)?.min_keepdim(0)?;
            let n_in = inside.to_dtype(DType::F32)?.sum_keepdim(0)?;
            // GRID thresholds from min_in (exactly: + 0) towards max_in.
            let grid = ramp
                .broadcast_mul(&(&max_in - &min_in)?)?
                .broadcast_add(&min_in)?;
            let g = grid.unsqueeze(1)?.broadcast_as((GRID, p))?;
            let masked = x_grid.ge(&g)?.where_cond(&w_grid, &zeros_grid)?;
            let mass = block_sums(&masked)?.sum(D::Minus1)?;
            let out = fetch(&Tensor::cat(&[&grid, &mass, &min_in, &max_in, &n_in], 0)?)?;
            self.work.copies += 1;
            let (grid, mass) = (&out[..GRID], &out[GRID..2 * GRID]);
            let (min_in, max_in, n_in) = (out[2 * GRID], out[2 * GRID + 1], out[2 * GRID + 2]);
            if !(n_in >= 1.0 && min_in <= max_in) {
                // Nothing in the interval: only rounding of the sums can lead here.
                return Err(DeviceSamplingError::NoConvergence(self.work.rounds));
            }
            if min_in == max_in {
                break (min_in, n_in as usize, above_hi);
            }
            // The last threshold whose mass reaches the target (the first one, at min_in,
            // does unless rounding says otherwise).
            let k = (1..GRID)
                .rev()
                .find(|&j| f64::from(mass[j]) >= target)
                .unwrap_or(0);
            lo = grid[k];
            if k + 1 < GRID && grid[k + 1] > grid[k] {
                hi = grid[k + 1];
                above_hi = f64::from(mass[k + 1]);
            }
        };
        // The ties at `at`: how many are kept, and where their run ends in id order.
        let w_at = self.x_of(at).exp();
        let keep = ties_kept(above, w_at, target, ties);
        let tie_end = if keep < ties {
            Some(self.nth_tie(at, keep)?)
        } else {
            None
        };
        let cut = Cut { at, tie_end };
        let zeros = filled(0.0, &[p], &device)?;
        let weights = match tie_end {
            None => self.x.ge(f64::from(at))?.where_cond(&self.w, &zeros)?,
            Some(end) => {
                let tie_w = self.ids.lt(f64::from(end))?.where_cond(&self.w, &zeros)?;
                let tie_w = self.x.eq(f64::from(at))?.where_cond(&tie_w, &zeros)?;
                self.x.gt(f64::from(at))?.where_cond(&self.w, &tie_w)?
            }
        };
        let blocks = fetch(&block_sums(&weights)?)?;
        self.work.copies += 1;
        let mass: f64 = blocks.iter().map(|&b| f64::from(b)).sum();
        Ok(Kept {
            cut: Some(cut),
            weights,
            blocks,
            mass,
        })
    }

    /// The id just after the `n`-th (1-based) token of logit `at` in id order.
    fn nth_tie(&mut self, at: f32, n: usize) -> Result<u32> {
        let p = self.x.dim(0)?;
        let ties = self.x.eq(f64::from(at))?.to_dtype(DType::F32)?;
        let counts = fetch(&block_sums(&ties)?)?;
        self.work.copies += 1;
        let mut before = 0usize;
        for (b, &c) in counts.iter().enumerate() {
            let c = c as usize;
            if before + c >= n {
                let mask = fetch(&ties.narrow(0, b * BLOCK, BLOCK.min(p - b * BLOCK))?)?;
                self.work.copies += 1;
                let mut seen = before;
                for (j, &m) in mask.iter().enumerate() {
                    if m > 0.0 {
                        seen += 1;
                        if seen == n {
                            return Ok((b * BLOCK + j + 1) as u32);
                        }
                    }
                }
            }
            before += c;
        }
        Err(DeviceSamplingError::NoConvergence(self.work.rounds))
    }

    /// Draws a token (greedy: the arg-max, drawing nothing from `rng`; else one `f64`,
    /// taken after the nucleus is known, so an error before the draw consumes nothing).
    pub fn draw<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Result<Pick> {
        if self.greedy {
            return Ok(Pick {
                id: self.arg,
                logprob: 0.0,
            });
        }
        self.kept()?;
        let u: f64 = rng.random();
        let (id, l) = self.walk(u)?;
        let mass = self.kept()?.mass;
        Ok(Pick {
            id,
            logprob: self.x_of(l) - mass.ln(),
        })
    }

    /// Inverse CDF at `u` in id order: the block on the host, then that block's kept
    /// weights and logits (one copy). Returns the id and its logit.
    fn walk(&mut self, u: f64) -> Result<(u32, f32)> {
        let kept = match &self.kept {
            Some(k) => k,
            None => unreachable!("computed by the caller"),
        };
        let target = u * kept.mass;
        let mut before = 0.0;
        let mut chosen = None;
        let mut last = None;
        for (b, &m) in kept.blocks.iter().enumerate() {
            let m = f64::from(m);
            if m <= 0.0 {
                continue;
            }
            last = Some(b);
            if before + m > target {
                chosen = Some((b, target - before));
                break;
            }
            before += m;
        }
        // Rounding left the target unreached: the last kept token of the last block.
        let (b, rest) = match (chosen, last) {
            (Some(c), _) => c,
            (None, Some(b)) => (b, f64::INFINITY),
            (None, None) => return Ok((self.arg, self.max)),
        };
        let both = Tensor::cat(
            &[
                &kept.weights.narrow(0, b * BLOCK, BLOCK)?,
                &self.x.narrow(0, b * BLOCK, BLOCK)?,
            ],
            0,
        )?;
        let both = fetch(&both)?;
        self.work.copies += 1;
        let (ws, ls) = both.split_at(BLOCK);
        let mut acc = 0.0;
        let mut pick = None;
        for (j, &w) in ws.iter().enumerate() {
            if w <= 0.0 {
                continue;
            }
            acc += f64::from(w);
            pick = Some(j);
            if acc > rest {
                break;
            }
        }
        Ok(match pick {
            Some(j) => ((b * BLOCK + j) as u32, ls[j]),
            None => (self.arg, self.max),
        })
    }

    /// The `k` most likely ids (by logit, ties to the lower id) with their
    /// [`DeviceDistribution::full_logprob`]s, most likely first: `k` rounds of maximum and
    /// lowest id on the device, then one copy.
    pub fn top(&mut self, k: usize) -> Result<Vec<(u32, f64)>> {
        let k = k.min(self.vocab);
        if k == 0 {
            return Ok(Vec::new());
        }
        let device = self.x.device().clone();
        let p = self.x.dim(0)?;
        let big = filled(f32::MAX, &[p], &device)?;
        let ninf = filled(f32::NEG_INFINITY, &[p], &device)?;
        // The ids still to rank (`f32::MAX` for those taken and for the padding) and the
        // logits with those taken set to -inf: a maximum of -inf then picks the lowest id
        // still to rank among the masked logits, as the host does.
        let mut cand = self
            .ids
            .lt(self.vocab as f64)?
            .where_cond(&self.ids, &big)?;
        let mut a = self.x.clone();
        let mut found = Vec::with_capacity(2 * k);
        for _ in 0..k {
            let m = a.max_keepdim(0)?;
            let id = a
                .broadcast_eq(&m)?
                .where_cond(&cand, &big)?
                .min_keepdim(0)?;
            let taken = self.ids.broadcast_eq(&id)?;
            cand = taken.where_cond(&big, &cand)?;
            a = taken.where_cond(&ninf, &a)?;
            found.push(id);
            found.push(m);
        }
        let out = fetch(&Tensor::cat(&found, 0)?)?;
        self.work.copies += 1;
        let lse = self.total.ln();
        Ok(out
            .chunks_exact(2)
            .map(|c| (c[0] as u32, self.x_of(c[1]) - lse))
            .collect())
    }
}

/// The largest `f32` below `v` (finite `v`).
fn next_down(v: f32) -> f32 {
    if v == 0.0 {
        return -f32::from_bits(1);
    }
    let bits = v.to_bits();
    f32::from_bits(if v > 0.0 { bits - 1 } else { bits + 1 })
}

/// Logits of `shape` and `dtype` on `device` that are `-inf` everywhere except 0 at `id`
/// (the tap's answer), built on the device.
pub fn one_hot(id: u32, like: &Tensor) -> Result<Tensor> {
    let n = like.elem_count();
    if id as usize >= n {
        return Err(candle_core::Error::Msg(format!(
            "token {id} is outside the vocabulary of {n}"
        ))
        .into());
    }
    let device = like.device();
    let ids = ids_on(device, n.div_ceil(BLOCK) * BLOCK)?.narrow(0, 0, n)?;
    let hot = ids.eq(f64::from(id))?.where_cond(
        &filled(0.0, &[n], device)?,
        &filled(f32::NEG_INFINITY, &[n], device)?,
    )?;
    Ok(hot.reshape(like.shape())?.to_dtype(like.dtype())?)
}

#[cfg(test)]
mod tests;
