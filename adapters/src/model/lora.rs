//! LoRA linear layers: a frozen base weight plus a trainable low-rank update
//! `y = x W^T + (alpha / r) * dropout(x) A^T B^T`.

use candle_core::{DType, Device, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::frozen::frozen_linear;
use super::init;
use super::kernels;
use super::ops;
use crate::config::{Family, ALL_TARGETS, KNOWN_MODULES};

/// Where and how LoRA is attached. Defaults are the LEAF spec's: rank 64, alpha 128,
/// dropout 0.05, all seven projections of every decoder layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraOptions {
    /// Rank `r` of the update (`A: [r, in]`, `B: [out, r]`).
    pub rank: usize,
    /// Scaling numerator: the update is multiplied by `alpha / rank` (PEFT's convention).
    pub alpha: f64,
    /// Dropout probability on the LoRA input, applied only in training passes.
    pub dropout: f64,
    /// Modules that get LoRA, by short name (`q_proj`, `k_proj`, `v_proj`, `o_proj`,
    /// `gate_proj`, `up_proj`, `down_proj`; Phi-3's `qkv_proj`, `gate_up_proj`). A model maps
    /// them onto its family's projections ([`crate::config::Family::resolve_targets`]), so the
    /// default (all seven Llama names) means "every projection" in every family.
    pub target_modules: Vec<String>,
    /// Seed of the initialisation of `A` (Kaiming-uniform, as PEFT does); `B` starts at zero.
    pub seed: u64,
}

impl Default for LoraOptions {
    fn default() -> Self {
        LoraOptions {
            rank: 64,
            alpha: 128.0,
            dropout: 0.05,
            target_modules: ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
            seed: 0,
        }
    }
}

impl LoraOptions {
    /// The factor `alpha / rank` applied to `B A`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Whether `module` (a short name) gets LoRA.
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|m| m == module)
    }

    /// These options with `target_modules` in `family`'s own names
    /// ([`Family::resolve_targets`]): what a model of that family carries.
    pub fn for_family(&self, family: Family) -> std::result::Result<LoraOptions, String> {
        self.check()?;
        Ok(LoraOptions {
            target_modules: family.resolve_targets(&self.target_modules)?,
            ..self.clone()
        })
    }

    /// Checks the options; returns the reason on failure.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.rank == 0 {
            return Err("LoRA rank must be positive".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!(
                "LoRA alpha {} must be positive and finite",
                self.alpha
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("LoRA dropout {} must be in [0, 1)", self.dropout));
        }
        if self.target_modules.is_empty() {
            return Err("LoRA target_modules is empty".into());
        }
        for (i, m) in self.target_modules.iter().enumerate() {
            if !KNOWN_MODULES.contains(&m.as_str()) {
                return Err(format!(
                    "unknown LoRA target module {m:?} (expected one of {KNOWN_MODULES:?})"
                ));
            }
            if self.target_modules[..i].contains(m) {
                return Err(format!("LoRA target module {m:?} listed twice"));
            }
        }
        Ok(())
    }
}

/// A weight that is either frozen (a plain tensor) or trained (a candle [`Var`]).
#[derive(Debug, Clone)]
pub(crate) enum Param {
    /// Not trained; never receives a gradient.
    Frozen(Tensor),
    /// Trained.
    Trainable(Var),
}

impl Param {
    pub(crate) fn new(t: Tensor, trainable: bool) -> Result<Self> {
        Ok(if trainable {
            Param::Trainable(Var::from_tensor(&t)?)
        } else {
            Param::Frozen(t)
        })
    }

    pub(crate) fn tensor(&self) -> &Tensor {
        match self {
            Param::Frozen(t) => t,
            Param::Trainable(v) => v.as_tensor(),
        }
    }
}

/// The trainable pair of one LoRA module.
#[derive(Debug, Clone)]
pub(crate) struct LoraPair {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
    /// `alpha / r`.
    pub scale: f64,
    /// Dropout probability on the LoRA input in training passes.
    pub dropout: f64,
}

/// One projection of a decoder layer.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    /// `[out, in]`.
    pub weight: Param,
    /// `[out]`, added after the matmul (Qwen2's q/k/v); never LoRA-adapted.
    pub bias: Option<Param>,
    /// The LoRA pair, if this module is targeted.
    pub lora: Option<LoraPair>,
    /// Use [`frozen_linear`] for a frozen weight (else candle's plain matmul).
    pub frozen_matmul: bool,
}

impl Linear {
    /// A LoRA pair for a `[out, in]` weight: `A` Kaiming-uniform with `a = sqrt(5)` (bound
    /// `1 / sqrt(in)`, PEFT's default), `B` zeros.
    pub(crate) fn init_lora(
        out_features: usize,
        in_features: usize,
        options: &LoraOptions,
        stream: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<LoraPair> {
        let bound = 1.0 / (in_features as f64).sqrt();
        let a = init::uniform(
            &[options.rank, in_features],
            bound,
            options.seed,
            stream,
            dtype,
            device,
        )?;
        let b = Tensor::zeros((out_features, options.rank), dtype, device)?;
        Ok(LoraPair {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale: options.scale(),
            dropout: options.dropout,
        })
    }

    /// `x W^T`, plus the LoRA update when `lora` is on. `dropout` carries the seed and stream of
    /// this module's dropout mask in training passes.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        lora: bool,
        dropout: Option<(u64, u64)>,
    ) -> Result<Tensor> {
        let y = self.forward_no_bias(x, lora, dropout)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b.tensor()),
            None => Ok(y),
        }
    }

    fn forward_no_bias(
        &self,
        x: &Tensor,
        lora: bool,
        dropout: Option<(u64, u64)>,
    ) -> Result<Tensor> {
        let pair = self.lora.as_ref().filter(|_| lora);
        if let (Param::Frozen(w), Some(pair), true) = (&self.weight, pair, self.frozen_matmul) {
            let (a, b) = (pair.a.as_tensor(), pair.b.as_tensor());
            if [x, w, a, b]
                .iter()
                .all(|t| kernels::supported(t) && t.dtype() == x.dtype())
            {
                // One graph node for the whole projection (see `kernels::lora_linear`).
                let drop = dropout
                    .filter(|_| pair.dropout > 0.0)
                    .map(|(seed, stream)| (pair.dropout, seed, stream));
                return kernels::lora_linear(x, w, a, b, pair.scale, drop);
            }
        }
        let base = match &self.weight {
            Param::Frozen(w) if self.frozen_matmul => frozen_linear(x, w)?,
            p => plain_linear(x, p.tensor())?,
        };
        let Some(pair) = pair else {
            return Ok(base);
        };
        let input = match dropout {
            Some((seed, stream)) if pair.dropout > 0.0 => {
                ops::lora_dropout(x, pair.dropout, seed, stream)?
            }
            _ => x.clone(),
        };
        let down = plain_linear(&input, pair.a.as_tensor())?;
        let up = plain_linear(&down, pair.b.as_tensor())?;
        ops::add_scaled(&base, &up, pair.scale)
    }
}

/// `x W^T` with candle's own matmul (gradients to both `x` and `W`).
pub(crate) fn plain_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (out_features, in_features) = w.dims2()?;
    let dims = x.dims();
    let Some((_, lead)) = dims.split_last() else {
        candle_core::bail!("linear: input must have at least one dimension");
    };
    let rows: usize = lead.iter().product();
    let y = x
        .contiguous()?
        .reshape((rows, in_features))?
        .matmul(&w.t()?)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(out_features);
    y.reshape(out_dims)
}
