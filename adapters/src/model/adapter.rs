//! The model's LoRA pairs as a PEFT adapter ([`crate::peft::LoraAdapter`]) and back.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Device};

use super::llama::{LlamaModel, Trainable};
use crate::error::{Error, Result};
use crate::peft::{tensor_name, LoraAdapter, LoraPart, PeftConfig};

impl LlamaModel {
    /// The current LoRA pairs as a PEFT adapter for the base model `base_name` (written into
    /// `base_model_name_or_path`): rank, alpha, dropout and targets from the model's
    /// [`LoraOptions`](super::LoraOptions), tensors in `f32` on the CPU.
    pub fn export_adapter(&self, base_name: &str) -> Result<LoraAdapter> {
        let options = self
            .lora_options()
            .ok_or_else(|| Error::Model("the model has no LoRA to export".into()))?;
        let mut config = PeftConfig::new(
            options.rank,
            options.alpha,
            options.target_modules.clone(),
            base_name,
        );
        config.lora_dropout = options.dropout;
        let mut tensors = BTreeMap::new();
        for layer in 0..self.layer_count() {
            for &module in self.config().lora_targets() {
                if let Some((a, b)) = self.lora_pair(layer, module) {
                    for (part, var) in [(LoraPart::A, a), (LoraPart::B, b)] {
                        let t = var
                            .as_tensor()
                            .to_device(&Device::Cpu)?
                            .to_dtype(DType::F32)?;
                        tensors.insert(tensor_name(layer, module, part), t);
                    }
                }
            }
        }
        Ok(LoraAdapter::new(config, tensors))
    }

    /// Overwrites the LoRA pairs with an adapter's tensors (converted to the model's dtype and
    /// device). The adapter must match the model: same rank and target modules, every layer,
    /// plain LoRA (no rsLoRA, DoRA, rank or alpha patterns), every tensor present, of the right
    /// shape and finite, and no unknown tensors. Its `lora_alpha` and `lora_dropout` replace
    /// the model's. Nothing changes on error.
    pub fn load_adapter(&mut self, adapter: &LoraAdapter) -> Result<()> {
        let options = self
            .lora_options()
            .ok_or_else(|| Error::Model("the model has no LoRA to load an adapter into".into()))?
            .clone();
        let cfg = &adapter.config;
        if cfg.peft_type != "LORA" {
            return Err(Error::Adapter(format!(
                "peft_type {:?} is not LORA",
                cfg.peft_type
            )));
        }
        if cfg.use_rslora || cfg.use_dora {
            return Err(Error::Adapter(
                "rsLoRA and DoRA adapters are not supported".into(),
            ));
        }
        if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
            return Err(Error::Adapter(
                "per-module rank_pattern / alpha_pattern is not supported".into(),
            ));
        }
        if let Some(layers) = &cfg.layers_to_transform {
            let all: Vec<usize> = (0..self.layer_count()).collect();
            let mut given = layers.clone();
            given.sort_unstable();
            if given != all {
                return Err(Error::Adapter(format!(
                    "layers_to_transform {layers:?} does not cover every layer"
                )));
            }
        }
        if cfg.r != options.rank {
            return Err(Error::Adapter(format!(
                "adapter rank {} differs from the model's LoRA rank {}",
                cfg.r, options.rank
            )));
        }
        let given: BTreeSet<&str> = cfg.target_modules.iter().map(String::as_str).collect();
        let ours: BTreeSet<&str> = options.target_modules.iter().map(String::as_str).collect();
        if given != ours {
            return Err(Error::Adapter(format!(
                "adapter targets {given:?}, the model's LoRA targets {ours:?}"
            )));
        }
        if !(cfg.lora_alpha.is_finite() && cfg.lora_alpha > 0.0) {
            return Err(Error::Adapter(format!(
                "lora_alpha {} must be positive and finite",
                cfg.lora_alpha
            )));
        }
        if !(0.0..1.0).contains(&cfg.lora_dropout) {
            return Err(Error::Adapter(format!(
                "lora_dropout {} must be in [0, 1)",
                cfg.lora_dropout
            )));
        }
        // Convert and check everything first, then assign.
        let mut staged = Vec::new();
        let mut expected = BTreeSet::new();
        for layer in 0..self.layer_count() {
            for &module in self.config().lora_targets() {
                let Some((a, b)) = self.lora_pair(layer, module) else {
                    continue;
                };
                for (part, var) in [(LoraPart::A, a), (LoraPart::B, b)] {
                    let name = tensor_name(layer, module, part);
                    let t = adapter
                        .tensors
                        .get(&name)
                        .ok_or_else(|| Error::tensor(&name, "missing from the adapter"))?;
                    if t.dims() != var.dims() {
                        return Err(Error::tensor(
                            &name,
                            format!("shape {:?}, expected {:?}", t.dims(), var.dims()),
                        ));
                    }
                    let values = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
                        return Err(Error::tensor(&name, format!("non-finite value {bad}")));
                    }
                    let converted = t.to_dtype(self.dtype())?.to_device(self.device())?;
                    staged.push((var.clone(), converted));
                    expected.insert(name);
                }
            }
        }
        if let Some(extra) = adapter.tensors.keys().find(|n| !expected.contains(*n)) {
            return Err(Error::tensor(extra, "unknown to the model"));
        }
        for (var, t) in staged {
            var.set(&t)?;
        }
        let mut updated = options;
        updated.alpha = cfg.lora_alpha;
        updated.dropout = cfg.lora_dropout;
        self.set_lora_scale(updated.scale(), updated.dropout);
        self.set_trainable(Trainable::Lora(updated));
        Ok(())
    }
}
