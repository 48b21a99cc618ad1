//! The differentiable decoder of every supported family (Hugging Face `LlamaForCausalLM`,
//! `Qwen2ForCausalLM`, `MistralForCausalLM`, `Phi3ForCausalLM` layouts).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use super::batch::Batch;
use super::checkpoint;
use super::frozen::frozen_linear;
use super::init;
use super::kv_cache::KvCache;
use super::lora::{plain_linear, Linear, LoraOptions, Param};
use super::ops;
use crate::config::{Family, LlamaConfig};
use crate::error::{Error, Result};

/// Standard deviation of the random initialisation (Hugging Face's `initializer_range`).
pub const INIT_STD: f64 = 0.02;

/// What the model trains.
#[derive(Debug, Clone, PartialEq)]
pub enum Trainable {
    /// Nothing: an inference-only model.
    Nothing,
    /// LoRA pairs on the configured modules; base weights frozen.
    Lora(LoraOptions),
    /// Every base weight (embeddings, norms, projections, LM head), for supervised
    /// pre-training; no LoRA.
    Full,
}

/// How to build a [`LlamaModel`].
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Compute dtype; checkpoint tensors are converted to it. Default `F32`.
    pub dtype: DType,
    /// Device. Default CPU.
    pub device: Device,
    /// What is trained. Default LoRA with the spec's defaults.
    pub trainable: Trainable,
    /// Multiply frozen weights with [`frozen_linear`] (no weight gradient). `false` uses
    /// candle's plain matmul, which also computes the unused weight gradient; it exists to
    /// measure the difference. Default `true`.
    pub frozen_matmul: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            trainable: Trainable::Lora(LoraOptions::default()),
            frozen_matmul: true,
        }
    }
}

/// One forward pass: with or without LoRA, with or without dropout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Add the LoRA updates. `false` is the reference policy (the base model).
    pub lora: bool,
    /// `Some(seed)` applies LoRA dropout with masks derived from `seed` (a training pass);
    /// `None` applies none (evaluation).
    pub dropout_seed: Option<u64>,
}

impl Pass {
    /// The base model: LoRA off, no dropout.
    pub const BASE: Pass = Pass {
        lora: false,
        dropout_seed: None,
    };
    /// The policy in evaluation: LoRA on, no dropout.
    pub const POLICY: Pass = Pass {
        lora: true,
        dropout_seed: None,
    };

    /// The policy in a training pass: LoRA on, dropout masks from `seed`.
    pub fn train(seed: u64) -> Pass {
        Pass {
            lora: true,
            dropout_seed: Some(seed),
        }
    }
}

/// How a decoder pass attends.
enum Attention<'a> {
    /// Causal attention over a right-padded batch (`lens[r]` real tokens in row `r`); with
    /// `kv`, every layer's keys (after RoPE) and values are kept for generation.
    Causal {
        lens: &'a [usize],
        kv: Option<&'a mut Vec<(Tensor, Tensor)>>,
    },
    /// One new position per row, attending over a [`KvCache`] that it extends.
    Step(&'a mut KvCache),
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: Param,
    post_norm: Param,
    /// The family's projections in [`Family::lora_targets`] order: q, k, v, o, gate, up, down,
    /// or Phi-3's qkv, o, gate_up, down.
    proj: Vec<Linear>,
}

/// Where each projection sits in [`Layer::proj`].
#[derive(Debug, Clone, Copy)]
struct Slots {
    fused: bool,
}

impl Slots {
    const Q: usize = 0;
    const K: usize = 1;
    const V: usize = 2;
    fn o(self) -> usize {
        if self.fused {
            1
        } else {
            3
        }
    }
    fn gate(self) -> usize {
        if self.fused {
            2
        } else {
            4
        }
    }
    const UP: usize = 5;
    fn down(self) -> usize {
        if self.fused {
            3
        } else {
            6
        }
    }
}

/// A decoder of any supported [`Family`]: GQA attention with RoPE (`rotate_half`, optionally
/// Llama 3 scaled), RMSNorm, SwiGLU MLP, tied or untied LM head, q/k/v biases (Qwen2), fused
/// qkv and gate/up projections (Phi-3), LoRA on any of the family's projections.
///
/// Every op is differentiable (see [`ops`]); frozen weights go through [`frozen_linear`].
#[derive(Debug, Clone)]
pub struct LlamaModel {
    config: LlamaConfig,
    dtype: DType,
    device: Device,
    trainable: Trainable,
    embed: Param,
    layers: Vec<Layer>,
    norm: Param,
    /// `None` when tied to the embeddings.
    lm_head: Option<Param>,
}

/// Hugging Face name of a layer weight.
pub(crate) fn layer_weight_name(layer: usize, part: &str) -> String {
    format!("model.layers.{layer}.{part}.weight")
}

/// Hugging Face name of a projection weight.
pub(crate) fn proj_weight_name(layer: usize, module: &str) -> String {
    let parent = LlamaConfig::module_parent(module).unwrap_or("self_attn");
    format!("model.layers.{layer}.{parent}.{module}.weight")
}

/// Hugging Face name of a projection bias.
pub(crate) fn proj_bias_name(layer: usize, module: &str) -> String {
    let parent = LlamaConfig::module_parent(module).unwrap_or("self_attn");
    format!("model.layers.{layer}.{parent}.{module}.bias")
}

/// Whether `module` of `family` carries a bias.
fn has_bias(family: Family, module: &str) -> bool {
    family.qkv_bias() && matches!(module, "q_proj" | "k_proj" | "v_proj")
}

/// The weights of one layer before assembly: norms, then `(weight, bias)` per projection.
type LayerWeights = (Tensor, Tensor, Vec<(Tensor, Option<Tensor>)>);

/// Stream id of the LoRA `A` initialisation and dropout of one module.
fn lora_stream(layer: usize, module: usize) -> u64 {
    init::splitmix64(((layer as u64) << 8) | module as u64)
}

impl LlamaModel {
    /// Loads `config.json` and `model.safetensors` (or a sharded
    /// `model.safetensors.index.json`) from a Hugging Face model directory of any supported
    /// family.
    pub fn load(dir: &Path, options: &ModelOptions) -> Result<Self> {
        let config = LlamaConfig::from_path(dir)?;
        let tensors = checkpoint::load_dir(dir, &options.device)?;
        Self::from_tensors(config, tensors, options)
    }

    /// Builds the model from tensors with Hugging Face names (`model.embed_tokens.weight`,
    /// `model.layers.{i}.self_attn.q_proj.weight`, ...). Each is checked for presence and shape
    /// and converted to `options.dtype`; `lm_head.weight` is ignored when the embeddings are tied,
    /// other extra tensors are ignored.
    pub fn from_tensors(
        config: LlamaConfig,
        mut tensors: HashMap<String, Tensor>,
        options: &ModelOptions,
    ) -> Result<Self> {
        config
            .check()
            .map_err(|reason| Error::Model(format!("config: {reason}")))?;
        let mut take = |name: String, shape: &[usize]| -> Result<Tensor> {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| Error::tensor(&name, "missing from the checkpoint"))?;
            if t.dims() != shape {
                return Err(Error::tensor(
                    &name,
                    format!("shape {:?}, expected {:?}", t.dims(), shape),
                ));
            }
            Ok(t.to_dtype(options.dtype)?.to_device(&options.device)?)
        };
        let d = config.hidden_size;
        let family = config.family();
        let embed = take("model.embed_tokens.weight".into(), &[config.vocab_size, d])?;
        let mut layers_w = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let mut proj = Vec::with_capacity(7);
            for &m in family.lora_targets() {
                let (out_f, in_f) = config
                    .module_shape(m)
                    .ok_or_else(|| Error::Model(format!("unknown module {m}")))?;
                let w = take(proj_weight_name(i, m), &[out_f, in_f])?;
                let b = if has_bias(family, m) {
                    Some(take(proj_bias_name(i, m), &[out_f])?)
                } else {
                    None
                };
                proj.push((w, b));
            }
            let input_norm = take(layer_weight_name(i, "input_layernorm"), &[d])?;
            let post_norm = take(layer_weight_name(i, "post_attention_layernorm"), &[d])?;
            layers_w.push((input_norm, post_norm, proj));
        }
        let norm = take("model.norm.weight".into(), &[d])?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(take("lm_head.weight".into(), &[config.vocab_size, d])?)
        };
        Self::assemble(config, embed, layers_w, norm, lm_head, options)
    }

    /// A randomly initialised model, deterministic given `seed`: every linear and embedding
    /// weight `N(0, 0.02^2)` ([`INIT_STD`], Hugging Face's default), every norm weight 1, and
    /// (Qwen2) every bias `N(0, 0.02^2)` too, so that biases are exercised.
    pub fn random(config: &LlamaConfig, seed: u64, options: &ModelOptions) -> Result<Self> {
        config
            .check()
            .map_err(|reason| Error::Model(format!("config: {reason}")))?;
        let dtype = options.dtype;
        let dev = &options.device;
        let normal = |name: &str, shape: &[usize]| -> Result<Tensor> {
            Ok(init::normal(
                shape,
                INIT_STD,
                seed,
                init::name_stream(name),
                dtype,
                dev,
            )?)
        };
        let d = config.hidden_size;
        let family = config.family();
        let embed = normal("model.embed_tokens.weight", &[config.vocab_size, d])?;
        let mut layers_w = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let mut proj = Vec::with_capacity(7);
            for &m in family.lora_targets() {
                let (out_f, in_f) = config
                    .module_shape(m)
                    .ok_or_else(|| Error::Model(format!("unknown module {m}")))?;
                let w = normal(&proj_weight_name(i, m), &[out_f, in_f])?;
                let b = if has_bias(family, m) {
                    Some(normal(&proj_bias_name(i, m), &[out_f])?)
                } else {
                    None
                };
                proj.push((w, b));
            }
            let ones = Tensor::ones(d, dtype, dev)?;
            layers_w.push((ones.clone(), ones, proj));
        }
        let norm = Tensor::ones(d, dtype, dev)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(normal("lm_head.weight", &[config.vocab_size, d])?)
        };
        Self::assemble(config.clone(), embed, layers_w, norm, lm_head, options)
    }

    fn assemble(
        config: LlamaConfig,
        embed: Tensor,
        layers_w: Vec<LayerWeights>,
        norm: Tensor,
        lm_head: Option<Tensor>,
        options: &ModelOptions,
    ) -> Result<Self> {
        let full = options.trainable == Trainable::Full;
        let family = config.family();
        // LoRA targets in the family's own names (Llama names map onto Phi-3's fused ones).
        let mut trainable = options.trainable.clone();
        if let Trainable::Lora(l) = &mut trainable {
            *l = l.for_family(family).map_err(Error::Model)?;
        }
        let lora = match &trainable {
            Trainable::Lora(l) => Some(l),
            _ => None,
        };
        let mut layers = Vec::with_capacity(layers_w.len());
        for (i, (input_norm, post_norm, proj)) in layers_w.into_iter().enumerate() {
            let mut linears = Vec::with_capacity(7);
            for (j, (w, bias)) in proj.into_iter().enumerate() {
                let module = family.lora_targets()[j];
                let pair = match lora {
                    Some(l) if l.targets(module) => {
                        let (out_f, in_f) = w.dims2()?;
                        Some(Linear::init_lora(
                            out_f,
                            in_f,
                            l,
                            lora_stream(i, j),
                            options.dtype,
                            &options.device,
                        )?)
                    }
                    _ => None,
                };
                linears.push(Linear {
                    weight: Param::new(w, full)?,
                    bias: bias.map(|b| Param::new(b, full)).transpose()?,
                    lora: pair,
                    frozen_matmul: options.frozen_matmul,
                });
            }
            if linears.len() != family.lora_targets().len() {
                return Err(Error::Model(format!(
                    "a {} layer needs {} projections",
                    family.model_type(),
                    family.lora_targets().len()
                )));
            }
            layers.push(Layer {
                input_norm: Param::new(input_norm, full)?,
                post_norm: Param::new(post_norm, full)?,
                proj: linears,
            });
        }
        Ok(LlamaModel {
            config,
            dtype: options.dtype,
            device: options.device.clone(),
            trainable,
            embed: Param::new(embed, full)?,
            layers,
            norm: Param::new(norm, full)?,
            lm_head: lm_head.map(|t| Param::new(t, full)).transpose()?,
        })
    }

    /// The base model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Dtype of log-probs and logits-derived values: `F64` for an `F64` model, else `F32`
    /// (half-precision models upcast their logits before the log-softmax, as Hugging Face
    /// trainers do).
    pub fn logprob_dtype(&self) -> DType {
        match self.dtype {
            DType::F64 => DType::F64,
            _ => DType::F32,
        }
    }

    /// Device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// What is trained.
    pub fn trainable(&self) -> &Trainable {
        &self.trainable
    }

    /// The LoRA options, when the model carries LoRA.
    pub fn lora_options(&self) -> Option<&LoraOptions> {
        match &self.trainable {
            Trainable::Lora(l) => Some(l),
            _ => None,
        }
    }

    /// The base weights with their Hugging Face names (current values; in full mode, the trained
    /// ones). `lm_head.weight` is absent when tied.
    pub fn base_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed.tensor().clone(),
        )];
        let targets = self.config.lora_targets();
        for (i, layer) in self.layers.iter().enumerate() {
            for (j, m) in targets.iter().enumerate() {
                out.push((
                    proj_weight_name(i, m),
                    layer.proj[j].weight.tensor().clone(),
                ));
                if let Some(b) = &layer.proj[j].bias {
                    out.push((proj_bias_name(i, m), b.tensor().clone()));
                }
            }
            out.push((
                layer_weight_name(i, "input_layernorm"),
                layer.input_norm.tensor().clone(),
            ));
            out.push((
                layer_weight_name(i, "post_attention_layernorm"),
                layer.post_norm.tensor().clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.tensor().clone()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.tensor().clone()));
        }
        out
    }

    /// Writes `config.json` and `model.safetensors` (Hugging Face names, the model's dtype) into
    /// `dir`, creating it if needed. Each file is written to a temporary name and renamed.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut config = self.config.clone();
        config.torch_dtype = checkpoint::torch_dtype_name(self.dtype).to_string();
        checkpoint::save_dir(dir, &config, self.base_tensors())
    }

    /// The trainable variables with stable names: LoRA pairs as
    /// `model.layers.{i}.{parent}.{module}.lora_{A|B}.weight`, or in full mode every base weight
    /// under its Hugging Face name. Empty for an inference-only model.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let targets = self.config.lora_targets();
        let mut out = Vec::new();
        let mut push = |name: String, p: &Param| {
            if let Param::Trainable(v) = p {
                out.push((name, v.clone()));
            }
        };
        push("model.embed_tokens.weight".into(), &self.embed);
        for (i, layer) in self.layers.iter().enumerate() {
            push(layer_weight_name(i, "input_layernorm"), &layer.input_norm);
            push(
                layer_weight_name(i, "post_attention_layernorm"),
                &layer.post_norm,
            );
            for (j, m) in targets.iter().enumerate() {
                push(proj_weight_name(i, m), &layer.proj[j].weight);
                if let Some(b) = &layer.proj[j].bias {
                    push(proj_bias_name(i, m), b);
                }
            }
        }
        push("model.norm.weight".into(), &self.norm);
        if let Some(head) = &self.lm_head {
            push("lm_head.weight".into(), head);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            for (j, m) in targets.iter().enumerate() {
                if let Some(pair) = &layer.proj[j].lora {
                    let parent = LlamaConfig::module_parent(m).unwrap_or("self_attn");
                    let base = format!("model.layers.{i}.{parent}.{m}");
                    out.push((format!("{base}.lora_A.weight"), pair.a.clone()));
                    out.push((format!("{base}.lora_B.weight"), pair.b.clone()));
                }
            }
        }
        out
    }

    /// The LoRA pair `(A, B)` of `module` in `layer`, if it has one.
    pub fn lora_pair(&self, layer: usize, module: &str) -> Option<(&Var, &Var)> {
        let j = self
            .config
            .lora_targets()
            .iter()
            .position(|m| *m == module)?;
        let pair = self.layers.get(layer)?.proj[j].lora.as_ref()?;
        Some((&pair.a, &pair.b))
    }

    fn check_ids(&self, max_token: u32, seq: usize) -> Result<()> {
        if max_token as usize >= self.config.vocab_size {
            return Err(Error::Model(format!(
                "token id {max_token} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        if seq > self.config.max_position_embeddings {
            return Err(Error::Model(format!(
                "sequence of {seq} positions exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        if let Some(window) = self.config.sliding_window.filter(|w| seq > *w) {
            return Err(Error::Model(format!(
                "sequence of {seq} positions exceeds the sliding attention window of {window}, \
                 which the trainer does not implement"
            )));
        }
        Ok(())
    }

    /// Hidden states `[b, t, d]` after the last decoder layer (before the final norm), under
    /// causal attention over the right-padded batch.
    fn hidden(&self, ids: &Tensor, lens: &[usize], pass: &Pass) -> Result<Tensor> {
        self.decoder(ids, Attention::Causal { lens, kv: None }, pass)
    }

    /// The decoder layers over `ids` (`[b, t]`), attending as `attention` says.
    fn decoder(&self, ids: &Tensor, mut attention: Attention<'_>, pass: &Pass) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let cfg = &self.config;
        let d = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        let kv_heads = cfg.num_kv_heads();
        let hd = cfg.head_dim();
        let n_rep = heads / kv_heads;
        let mut x = self
            .embed
            .tensor()
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let slots = Slots {
            fused: cfg.family().fused(),
        };
        let (q_width, kv_width) = (heads * hd, kv_heads * hd);
        let inner = cfg.intermediate_size;
        // RoPE tables and the mask: positions 0..t under a causal mask, or the angles of each
        // row's next position (once per step, for every layer) over the cache.
        let (cos, sin, mask) = match &attention {
            Attention::Causal { lens, .. } => {
                let (cos, sin) =
                    ops::rope_tables_from(&cfg.rope_inv_freq(), t, self.dtype, &self.device)?;
                (
                    cos,
                    sin,
                    ops::attention_mask(lens, t, self.dtype, &self.device)?,
                )
            }
            Attention::Step(cache) => {
                let (cos, sin) = cache.tables();
                let (cos, sin) = ops::rope_tables_at(cos, sin, &cache.positions())?;
                let cols = cache.columns() + 1;
                let mask = ops::step_mask(
                    cache.lens(),
                    cache.prompt_columns(),
                    cols,
                    self.dtype,
                    &self.device,
                )?;
                (cos, sin, mask)
            }
        };
        let scale = 1.0 / (hd as f64).sqrt();
        for (li, layer) in self.layers.iter().enumerate() {
            let drop = |j: usize| pass.dropout_seed.map(|s| (s, lora_stream(li, j)));
            let p = &layer.proj;
            let h = ops::rms_norm(&x, layer.input_norm.tensor(), cfg.rms_norm_eps)?;
            let (q, k, v) = if slots.fused {
                let qkv = p[Slots::Q].forward(&h, pass.lora, drop(Slots::Q))?;
                (
                    qkv.narrow(2, 0, q_width)?,
                    qkv.narrow(2, q_width, kv_width)?,
                    qkv.narrow(2, q_width + kv_width, kv_width)?,
                )
            } else {
                (
                    p[Slots::Q].forward(&h, pass.lora, drop(Slots::Q))?,
                    p[Slots::K].forward(&h, pass.lora, drop(Slots::K))?,
                    p[Slots::V].forward(&h, pass.lora, drop(Slots::V))?,
                )
            };
            let v = ops::split_heads(&v, kv_heads, None)?;
            let (q, k, v) = match &mut attention {
                Attention::Causal { kv, .. } => {
                    let rope = Some((&cos, &sin));
                    let q = ops::split_heads(&q, heads, rope)?;
                    let k = ops::split_heads(&k, kv_heads, rope)?;
                    if let Some(kv) = kv {
                        kv.push((k.detach(), v.detach()));
                    }
                    (q, k, v)
                }
                Attention::Step(cache) => {
                    let rotate = |x: &Tensor, n: usize| {
                        ops::rope_rows(&ops::split_heads(x, n, None)?, &cos, &sin)
                    };
                    let (q, k) = (rotate(&q, heads)?, rotate(&k, kv_heads)?);
                    let (k, v) = cache.append(li, &k, &v)?;
                    (q, k, v)
                }
            };
            let k = ops::repeat_kv(&k, n_rep)?.contiguous()?;
            let v = ops::repeat_kv(&v, n_rep)?.contiguous()?;
            let probs = ops::masked_softmax(&ops::attention_matmul(&q, &k.t()?)?, &mask, scale)?;
            let ctx = ops::merge_heads(&ops::attention_matmul(&probs, &v)?)?;
            let o = slots.o();
            x = ops::add_scaled(&x, &p[o].forward(&ctx, pass.lora, drop(o))?, 1.0)?;
            let h = ops::rms_norm(&x, layer.post_norm.tensor(), cfg.rms_norm_eps)?;
            let g = slots.gate();
            let (gate, up) = if slots.fused {
                let gate_up = p[g].forward(&h, pass.lora, drop(g))?;
                (
                    gate_up.narrow(2, 0, inner)?,
                    gate_up.narrow(2, inner, inner)?,
                )
            } else {
                (
                    p[g].forward(&h, pass.lora, drop(g))?,
                    p[Slots::UP].forward(&h, pass.lora, drop(Slots::UP))?,
                )
            };
            let act = ops::swiglu(&gate, &up)?;
            let down = slots.down();
            x = ops::add_scaled(&x, &p[down].forward(&act, pass.lora, drop(down))?, 1.0)?;
        }
        if let Attention::Step(cache) = attention {
            cache.advance();
        }
        Ok(x)
    }

    /// Starts generation: runs the right-padded prompts `input_ids` (`[b, t]`, u32; row `r`'s
    /// real tokens are its first `lens[r]`) once and returns the logits `[b, vocab]` at each
    /// row's last real token with a [`KvCache`] holding every layer's keys and values, room for
    /// `max_new_tokens` more positions per row ([`LlamaModel::decode_step`]). Inference only:
    /// nothing flows back through the cache.
    pub fn prefill(
        &self,
        input_ids: &Tensor,
        lens: &[usize],
        max_new_tokens: usize,
        pass: &Pass,
    ) -> Result<(Tensor, KvCache)> {
        let (b, t) = input_ids.dims2()?;
        if t == 0 || b != lens.len() || lens.iter().any(|&l| l == 0 || l > t) {
            return Err(Error::Model(format!(
                "prefill: {b} rows of {t} columns do not fit the row lengths {lens:?}"
            )));
        }
        let max_token = input_ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        self.check_ids(max_token, t)?;
        let mut kv = Vec::with_capacity(self.layers.len());
        let h = self.decoder(
            input_ids,
            Attention::Causal {
                lens,
                kv: Some(&mut kv),
            },
            pass,
        )?;
        let last: Vec<u32> = lens
            .iter()
            .enumerate()
            .map(|(r, &len)| (r * t + len - 1) as u32)
            .collect();
        let last = Tensor::from_vec(last, b, &self.device)?;
        let h = h
            .reshape((b * t, self.config.hidden_size))?
            .index_select(&last, 0)?;
        let positions = t + max_new_tokens;
        let (cos, sin) = ops::rope_tables_from(
            &self.config.rope_inv_freq(),
            positions,
            self.dtype,
            &self.device,
        )?;
        Ok((self.head(&h)?, KvCache::new(kv, lens.to_vec(), t, cos, sin)))
    }

    /// One generation step: feeds `tokens[r]` as row `r`'s next token and returns the logits
    /// `[rows, vocab]` after it, attending to the row's prompt and earlier tokens in `cache`
    /// (which grows by one column). The same values as [`LlamaModel::forward`] over the whole
    /// sequence, up to rounding. Bad tokens and a full cache are refused before anything
    /// changes; after any other error the cache is not to be used again.
    pub fn decode_step(&self, cache: &mut KvCache, tokens: &[u32], pass: &Pass) -> Result<Tensor> {
        let rows = cache.rows();
        if tokens.len() != rows {
            return Err(Error::Model(format!(
                "decode step: {} tokens for a cache of {rows} rows",
                tokens.len()
            )));
        }
        if rows == 0 {
            return Err(Error::Model("decode step: the cache has no rows".into()));
        }
        let longest = cache.positions().into_iter().max().unwrap_or(0) + 1;
        self.check_ids(tokens.iter().copied().max().unwrap_or(0), longest)?;
        if longest > cache.capacity() {
            return Err(Error::Model(format!(
                "decode step: position {} is beyond the {} the cache was made for",
                longest - 1,
                cache.capacity()
            )));
        }
        let ids = Tensor::from_vec(tokens.to_vec(), (rows, 1), &self.device)?;
        let h = self.decoder(&ids, Attention::Step(cache), pass)?;
        self.head(&h.reshape((rows, self.config.hidden_size))?)
    }

    /// Final norm and LM head on hidden states `[.., d]`.
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let h = ops::rms_norm(h, self.norm.tensor(), self.config.rms_norm_eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        Ok(match head {
            Param::Frozen(w) => frozen_linear(&h, w)?,
            Param::Trainable(v) => plain_linear(&h, v.as_tensor())?,
        })
    }

    /// Logits `[batch, seq, vocab]` for `input_ids` (`[batch, seq]`, u32) under a causal mask.
    ///
    /// For right-padded batches the causal mask alone keeps every real position from seeing
    /// padding, so the logits of real positions are exact; mask the loss on padded positions.
    pub fn forward(&self, input_ids: &Tensor, pass: &Pass) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if t == 0 {
            return Err(Error::Model("empty input".into()));
        }
        let max_token = input_ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        self.check_ids(max_token, t)?;
        let h = self.hidden(input_ids, &vec![t; b], pass)?;
        self.head(&h)
    }

    /// Log-probs `[batch, max_completion]` of each completion token after its prompt under the
    /// policy (`lora = true`) or the base model (`lora = false`), in evaluation mode (no
    /// dropout), in [`LlamaModel::logprob_dtype`]. Padded slots hold 0; [`Batch::mask`] tells
    /// them apart.
    pub fn logprobs(&self, batch: &Batch, lora: bool) -> Result<Tensor> {
        let pass = if lora { Pass::POLICY } else { Pass::BASE };
        self.logprobs_with(batch, &pass)
    }

    /// [`LlamaModel::logprobs`] for any [`Pass`] (e.g. a training pass with dropout).
    pub fn logprobs_with(&self, batch: &Batch, pass: &Pass) -> Result<Tensor> {
        self.check_ids(batch.max_token(), batch.seq_len())?;
        let ids = batch.input_ids().to_device(&self.device)?;
        let (b, t) = ids.dims2()?;
        let c = batch.max_completion();
        let h = self.hidden(&ids, batch.lens(), pass)?;
        let index = batch.gather_index().to_device(&self.device)?;
        let picked = h
            .reshape((b * t, self.config.hidden_size))?
            .index_select(&index, 0)?;
        let logits = self.head(&picked)?.to_dtype(self.logprob_dtype())?;
        let targets = batch.targets().to_device(&self.device)?.reshape(b * c)?;
        let token = ops::target_logprobs(&logits, &targets)?.reshape((b, c))?;
        let mask = batch.mask(self.logprob_dtype())?.to_device(&self.device)?;
        Ok(token.mul(&mask)?)
    }

    /// Zeroes every LoRA `B` (the policy becomes the base model again) and re-draws `A` from
    /// the model's LoRA seed.
    pub fn reset_lora(&self) -> Result<()> {
        let Some(options) = self.lora_options() else {
            return Ok(());
        };
        for (i, layer) in self.layers.iter().enumerate() {
            for (j, lin) in layer.proj.iter().enumerate() {
                if let Some(pair) = &lin.lora {
                    let (r, in_f) = pair.a.dims2()?;
                    let a = init::uniform(
                        &[r, in_f],
                        1.0 / (in_f as f64).sqrt(),
                        options.seed,
                        lora_stream(i, j),
                        self.dtype,
                        &self.device,
                    )?;
                    pair.a.set(&a)?;
                    pair.b.set(&pair.b.zeros_like()?)?;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn layer_count(&self) -> usize {
        self.layers.len()
    }

    pub(crate) fn set_lora_scale(&mut self, scale: f64, dropout: f64) {
        for layer in &mut self.layers {
            for lin in &mut layer.proj {
                if let Some(pair) = &mut lin.lora {
                    pair.scale = scale;
                    pair.dropout = dropout;
                }
            }
        }
    }

    pub(crate) fn set_trainable(&mut self, trainable: Trainable) {
        self.trainable = trainable;
    }
}
