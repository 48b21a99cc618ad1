//! Checks an adapter against a base model before anything serves or merges it.
//!
//! [`validate`] checks the config (LoRA only, rank and targets within [`Limits`], no features
//! mistral.rs 0.8.1 cannot serve), every tensor (a recognised PEFT name, a targeted module, a
//! layer the base model has, `f32`, the exact shape for its module and rank, finite values),
//! completeness (both factors of every targeted module in every layer) and the total size.
//! [`inspect`] runs the checks that need no base model and summarises the adapter.
//! The first problem found is returned as a typed error: [`Error::Tensor`] names the tensor,
//! [`Error::Adapter`] covers the config and the limits.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::config::{LlamaConfig, KNOWN_MODULES};
use crate::error::{Error, Result};
use crate::peft::{parse_tensor_name, tensor_name, LoraAdapter, LoraPart};

/// Size limits an adapter must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Largest accepted rank r.
    pub max_rank: usize,
    /// Largest accepted total number of LoRA parameters.
    pub max_parameters: usize,
}

impl Default for Limits {
    /// Rank at most 256 and at most 2^30 parameters (4 GiB of `f32`).
    fn default() -> Self {
        Limits {
            max_rank: 256,
            max_parameters: 1 << 30,
        }
    }
}

/// What a successful check found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationReport {
    /// Rank r.
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `lora_alpha / r`.
    pub scale: f64,
    /// `lora_dropout`.
    pub dropout: f64,
    /// Targeted modules, in config order.
    pub targets: Vec<String>,
    /// Layers that carry LoRA weights, ascending.
    pub layers: Vec<usize>,
    /// Number of LoRA tensors.
    pub num_tensors: usize,
    /// Total number of LoRA parameters.
    pub num_parameters: usize,
    /// The content hash ([`LoraAdapter::version_id`]).
    pub version_id: String,
    /// `base_model_name_or_path` from the config.
    pub base_model: String,
}

/// Checks `adapter` against the base model `base` and `limits`; see the module docs.
pub fn validate(
    adapter: &LoraAdapter,
    base: &LlamaConfig,
    limits: &Limits,
) -> Result<ValidationReport> {
    check_config(adapter, limits)?;
    check_size(adapter.num_parameters(), limits)?;
    let cfg = &adapter.config;
    let targets: BTreeSet<&str> = cfg.target_modules.iter().map(String::as_str).collect();
    if let Some(m) = targets.iter().find(|m| !base.lora_targets().contains(m)) {
        return Err(Error::Adapter(format!(
            "target module {m:?} does not exist in the base model (a {} model has {})",
            base.family().model_type(),
            base.lora_targets().join(", ")
        )));
    }
    let layers: Vec<usize> = match &cfg.layers_to_transform {
        None => (0..base.num_hidden_layers).collect(),
        Some(list) => {
            // mistral.rs applies the adapter to every layer whose module name matches, and
            // fails on a layer without tensors: only "all layers" can be served.
            let given: BTreeSet<usize> = list.iter().copied().collect();
            let all: BTreeSet<usize> = (0..base.num_hidden_layers).collect();
            if given != all {
                return Err(Error::Adapter(format!(
                    "layers_to_transform {list:?} does not cover all {} layers of the base model \
                     (mistral.rs 0.8.1 applies an adapter to every layer)",
                    base.num_hidden_layers
                )));
            }
            (0..base.num_hidden_layers).collect()
        }
    };
    for (name, t) in &adapter.tensors {
        let (layer, module, part) = parse_name(name)?;
        if !targets.contains(module.as_str()) {
            return Err(Error::tensor(
                name,
                format!(
                    "module {module} is not in target_modules {:?}",
                    cfg.target_modules
                ),
            ));
        }
        if layer >= base.num_hidden_layers {
            return Err(Error::tensor(
                name,
                format!(
                    "layer {layer} does not exist: the base model has {} layers",
                    base.num_hidden_layers
                ),
            ));
        }
        let (out_f, in_f) = base
            .module_shape(&module)
            .ok_or_else(|| Error::tensor(name, format!("unknown module {module}")))?;
        let expected = match part {
            LoraPart::A => [cfg.r, in_f],
            LoraPart::B => [out_f, cfg.r],
        };
        if t.dims() != expected {
            return Err(Error::tensor(
                name,
                format!(
                    "shape {:?}, expected {expected:?} for {} of {module} with rank {} \
                     (module is {out_f} x {in_f})",
                    t.dims(),
                    part.as_str(),
                    cfg.r
                ),
            ));
        }
        check_values(name, t)?;
    }
    for &layer in &layers {
        for module in &cfg.target_modules {
            for part in [LoraPart::A, LoraPart::B] {
                let name = tensor_name(layer, module, part);
                if !adapter.tensors.contains_key(&name) {
                    return Err(Error::tensor(
                        name,
                        format!(
                            "missing: {module} is targeted but layer {layer} has no {}",
                            part.as_str()
                        ),
                    ));
                }
            }
        }
    }
    summary(adapter, layers)
}

/// The checks that need no base model: the config, tensor names, targets, dtypes, values,
/// rank dimensions, A/B pairs present in the same layers, consistent shapes across layers,
/// and the limits. Returns the adapter's summary.
pub fn inspect(adapter: &LoraAdapter, limits: &Limits) -> Result<ValidationReport> {
    check_config(adapter, limits)?;
    check_size(adapter.num_parameters(), limits)?;
    let cfg = &adapter.config;
    let targets: BTreeSet<&str> = cfg.target_modules.iter().map(String::as_str).collect();
    // (module, part) -> (shape, first tensor with it)
    let mut shapes: BTreeMap<(String, LoraPart), (Vec<usize>, String)> = BTreeMap::new();
    for (name, t) in &adapter.tensors {
        let (_, module, part) = parse_name(name)?;
        if !targets.contains(module.as_str()) {
            return Err(Error::tensor(
                name,
                format!(
                    "module {module} is not in target_modules {:?}",
                    cfg.target_modules
                ),
            ));
        }
        let dims = t.dims();
        let rank_ok = match part {
            LoraPart::A => dims.len() == 2 && dims[0] == cfg.r,
            LoraPart::B => dims.len() == 2 && dims[1] == cfg.r,
        };
        if !rank_ok {
            return Err(Error::tensor(
                name,
                format!(
                    "shape {dims:?} does not match rank {} ({} must be {})",
                    cfg.r,
                    part.as_str(),
                    match part {
                        LoraPart::A => "[r, in_features]",
                        LoraPart::B => "[out_features, r]",
                    }
                ),
            ));
        }
        match shapes.get(&(module.clone(), part)) {
            Some((shape, first)) if shape.as_slice() != dims => {
                return Err(Error::tensor(
                    name,
                    format!("shape {dims:?} differs from {first} with shape {shape:?}"),
                ))
            }
            Some(_) => {}
            None => {
                shapes.insert((module.clone(), part), (dims.to_vec(), name.clone()));
            }
        }
        check_values(name, t)?;
    }
    let layers = adapter.layers();
    if layers.is_empty() {
        return Err(Error::Adapter("the adapter holds no LoRA tensors".into()));
    }
    for &layer in &layers {
        for module in &cfg.target_modules {
            for part in [LoraPart::A, LoraPart::B] {
                let name = tensor_name(layer, module, part);
                if !adapter.tensors.contains_key(&name) {
                    return Err(Error::tensor(
                        name,
                        format!(
                            "missing: {module} is targeted but layer {layer} has no {}",
                            part.as_str()
                        ),
                    ));
                }
            }
        }
    }
    summary(adapter, layers)
}

fn parse_name(name: &str) -> Result<(usize, String, LoraPart)> {
    parse_tensor_name(name).ok_or_else(|| {
        Error::tensor(
            name,
            "unknown tensor name (expected base_model.model.model.layers.<i>.<self_attn|mlp>.\
             <module>.lora_<A|B>.weight)",
        )
    })
}

fn check_config(adapter: &LoraAdapter, limits: &Limits) -> Result<()> {
    let cfg = &adapter.config;
    let bad = |msg: String| Err(Error::Adapter(msg));
    if cfg.peft_type != "LORA" {
        return bad(format!("peft_type {:?} is not \"LORA\"", cfg.peft_type));
    }
    if cfg.r == 0 {
        return bad("rank r must be positive".into());
    }
    if cfg.r > limits.max_rank {
        return bad(format!(
            "rank {} exceeds the limit {}",
            cfg.r, limits.max_rank
        ));
    }
    if !cfg.lora_alpha.is_finite() || cfg.lora_alpha <= 0.0 {
        return bad(format!(
            "lora_alpha {} must be a positive number",
            cfg.lora_alpha
        ));
    }
    if !(0.0..1.0).contains(&cfg.lora_dropout) {
        return bad(format!(
            "lora_dropout {} must be in [0, 1)",
            cfg.lora_dropout
        ));
    }
    if cfg.bias != "none" {
        return bad(format!(
            "bias {:?} is not supported (only \"none\")",
            cfg.bias
        ));
    }
    if cfg.task_type != "CAUSAL_LM" {
        return bad(format!(
            "task_type {:?} is not \"CAUSAL_LM\"",
            cfg.task_type
        ));
    }
    if cfg.fan_in_fan_out {
        return bad("fan_in_fan_out = true is not supported for Llama linear layers".into());
    }
    if cfg.use_rslora {
        return bad("use_rslora = true is not supported (mistral.rs scales by alpha / r)".into());
    }
    if cfg.use_dora {
        return bad("use_dora = true is not supported by mistral.rs".into());
    }
    if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
        return bad("rank_pattern / alpha_pattern overrides are not supported".into());
    }
    if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        return bad("modules_to_save is not supported (LoRA weights only)".into());
    }
    if cfg.target_modules.is_empty() {
        return bad("target_modules is empty".into());
    }
    let mut seen = BTreeSet::new();
    for m in &cfg.target_modules {
        if !KNOWN_MODULES.contains(&m.as_str()) {
            return bad(format!(
                "unknown target module {m:?} (supported: {})",
                KNOWN_MODULES.join(", ")
            ));
        }
        if !seen.insert(m.as_str()) {
            return bad(format!("target module {m:?} is listed twice"));
        }
    }
    Ok(())
}

fn check_values(name: &str, t: &candle_core::Tensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(Error::tensor(
            name,
            format!(
                "dtype {:?} is not supported in memory (expected f32)",
                t.dtype()
            ),
        ));
    }
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::tensor(
            name,
            format!("non-finite value {v} at flat index {i}"),
        ));
    }
    Ok(())
}

fn summary(adapter: &LoraAdapter, layers: Vec<usize>) -> Result<ValidationReport> {
    let cfg = &adapter.config;
    Ok(ValidationReport {
        rank: cfg.r,
        alpha: cfg.lora_alpha,
        scale: cfg.scale(),
        dropout: cfg.lora_dropout,
        targets: cfg.target_modules.clone(),
        layers,
        num_tensors: adapter.tensors.len(),
        num_parameters: adapter.num_parameters(),
        version_id: adapter.version_id()?,
        base_model: cfg.base_model_name_or_path.clone(),
    })
}

fn check_size(num_parameters: usize, limits: &Limits) -> Result<()> {
    if num_parameters > limits.max_parameters {
        return Err(Error::Adapter(format!(
            "{num_parameters} parameters exceed the limit {}",
            limits.max_parameters
        )));
    }
    Ok(())
}
