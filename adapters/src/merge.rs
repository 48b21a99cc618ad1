//! Merging an adapter into its base weights: `W' = W + scale * B A` with `scale = alpha / r`,
//! for servers that take plain weights.
//!
//! The update is computed in `f32` and added to `W` in `f32`, then cast back to `W`'s dtype,
//! which is what mistral.rs 0.8.1 does when it merges an adapter at load time on the CPU.
//! Base weights use Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`, ...).
//! [`merge_into`] works on tensors in memory, [`merge_model_dir`] on a model directory
//! (`model.safetensors` or shards with `model.safetensors.index.json`): weights the adapter does
//! not touch are copied byte for byte, as are the other files of the directory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::peft::{
    base_weight_name, parse_tensor_name, sync_dir, tensor_name, write_synced, LoraAdapter, LoraPart,
};

/// What a merge changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeReport {
    /// The LoRA scale `alpha / r` used.
    pub scale: f64,
    /// Base weights that were updated, by Hugging Face name.
    pub merged: Vec<String>,
    /// Weight files written (empty for an in-memory merge).
    pub files: Vec<PathBuf>,
}

/// One adapted module: its base weight name and the update `scale * B A` (`f32`, CPU).
struct Update {
    weight: String,
    layer: usize,
    module: String,
}

/// The adapted modules of `adapter`, each with both factors present.
fn updates(adapter: &LoraAdapter) -> Result<Vec<Update>> {
    let mut pairs: BTreeSet<(usize, String)> = BTreeSet::new();
    for name in adapter.tensors.keys() {
        let (layer, module, _) = parse_tensor_name(name)
            .ok_or_else(|| Error::tensor(name, "unknown tensor name: cannot merge"))?;
        pairs.insert((layer, module));
    }
    let mut out = Vec::with_capacity(pairs.len());
    for (layer, module) in pairs {
        for part in [LoraPart::A, LoraPart::B] {
            if adapter.get(layer, &module, part).is_none() {
                return Err(Error::tensor(
                    tensor_name(layer, &module, part),
                    "missing: the other factor of this module is present",
                ));
            }
        }
        let weight = base_weight_name(layer, &module)
            .ok_or_else(|| Error::Adapter(format!("unknown module {module}")))?;
        out.push(Update {
            weight,
            layer,
            module,
        });
    }
    Ok(out)
}

/// The weight update `scale * B A` of `module` in `layer` as an `[out, in]` `f32` tensor.
pub fn delta(adapter: &LoraAdapter, layer: usize, module: &str) -> Result<Tensor> {
    let get = |part| {
        adapter.get(layer, module, part).ok_or_else(|| {
            Error::tensor(tensor_name(layer, module, part), "missing from the adapter")
        })
    };
    let a = get(LoraPart::A)?.to_dtype(DType::F32)?;
    let b = get(LoraPart::B)?.to_dtype(DType::F32)?;
    let (r_a, _) = a.dims2()?;
    let (_, r_b) = b.dims2()?;
    if r_a != r_b {
        return Err(Error::tensor(
            tensor_name(layer, module, LoraPart::B),
            format!("rank {r_b} differs from lora_A's rank {r_a}"),
        ));
    }
    Ok((b.matmul(&a)? * adapter.config.scale())?)
}

/// Adds `scale * B A` to every base weight the adapter targets, in place. Each weight is
/// updated in `f32` and cast back to its own dtype and device. A missing base weight or a
/// shape mismatch is an error naming the weight, and leaves `weights` unchanged.
pub fn merge_into(
    weights: &mut HashMap<String, Tensor>,
    adapter: &LoraAdapter,
) -> Result<MergeReport> {
    let mut new_weights = Vec::new();
    for u in updates(adapter)? {
        let w = weights
            .get(&u.weight)
            .ok_or_else(|| Error::tensor(&u.weight, "base weight not found"))?;
        let d = delta(adapter, u.layer, &u.module)?;
        if w.dims() != d.dims() {
            return Err(Error::tensor(
                &u.weight,
                format!(
                    "base weight has shape {:?} but the adapter's update has {:?}",
                    w.dims(),
                    d.dims()
                ),
            ));
        }
        let merged = (w.to_dtype(DType::F32)? + d.to_device(w.device())?)?.to_dtype(w.dtype())?;
        new_weights.push((u.weight, merged));
    }
    let merged: Vec<String> = new_weights.iter().map(|(n, _)| n.clone()).collect();
    for (name, t) in new_weights {
        weights.insert(name, t);
    }
    Ok(MergeReport {
        scale: adapter.config.scale(),
        merged,
        files: Vec::new(),
    })
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// Merges `adapter` into the model in `base_dir` and writes the merged model to `out_dir`
/// (created if needed; must differ from `base_dir`). Weight files keep their names, layout,
/// dtypes and metadata; other regular files (config, tokenizer, ...) are copied. Every weight the
/// adapter targets must be found, with the right shape, in an `f32`, `f16` or `bf16` tensor.
pub fn merge_model_dir(
    base_dir: &Path,
    adapter: &LoraAdapter,
    out_dir: &Path,
) -> Result<MergeReport> {
    let index_path = base_dir.join("model.safetensors.index.json");
    let files: Vec<String> = if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
        let index: ShardIndex = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: index_path.clone(),
            source: e,
        })?;
        let set: BTreeSet<String> = index.weight_map.into_values().collect();
        for f in &set {
            if f.contains('/') || f.contains('\\') || f == ".." {
                return Err(Error::Adapter(format!(
                    "{}: shard name {f:?} is not a plain file name",
                    index_path.display()
                )));
            }
        }
        set.into_iter().collect()
    } else {
        vec!["model.safetensors".to_string()]
    };
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let same = match (base_dir.canonicalize(), out_dir.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(Error::Adapter(format!(
            "the merged model must go to another directory than the base model ({})",
            base_dir.display()
        )));
    }

    let ups = updates(adapter)?;
    let mut pending: HashMap<String, &Update> = ups.iter().map(|u| (u.weight.clone(), u)).collect();
    let mut merged_names = Vec::new();
    let mut written = Vec::new();
    for file in &files {
        let src = base_dir.join(file);
        let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            Error::Adapter(format!(
                "{}: not a valid safetensors file: {e}",
                src.display()
            ))
        })?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            Error::Adapter(format!(
                "{}: not a valid safetensors file: {e}",
                src.display()
            ))
        })?;
        // Each tensor with its merged bytes, if the adapter updates it.
        let mut out: Vec<(String, safetensors::tensor::TensorView<'_>, Option<Vec<u8>>)> =
            Vec::new();
        for (name, view) in st.tensors() {
            let new_data = match pending.remove(&name) {
                None => None,
                Some(u) => {
                    let d = delta(adapter, u.layer, &u.module)?;
                    if view.shape() != d.dims() {
                        return Err(Error::tensor(
                            &name,
                            format!(
                                "base weight has shape {:?} but the adapter's update has {:?}",
                                view.shape(),
                                d.dims()
                            ),
                        ));
                    }
                    let d = d.flatten_all()?.to_vec1::<f32>()?;
                    merged_names.push(name.clone());
                    Some(add_in_place(&name, view.dtype(), view.data(), &d)?)
                }
            };
            out.push((name, view, new_data));
        }
        let mut views = Vec::with_capacity(out.len());
        for (name, view, new_data) in &out {
            let data: &[u8] = match new_data {
                Some(d) => d,
                None => view.data(),
            };
            views.push((
                name.as_str(),
                safetensors::tensor::TensorView::new(view.dtype(), view.shape().to_vec(), data)?,
            ));
        }
        let metadata = header
            .metadata()
            .clone()
            .or_else(|| Some(HashMap::from([("format".to_string(), "pt".to_string())])));
        let bytes_out = safetensors::serialize(views, metadata)?;
        let dest = out_dir.join(file);
        let tmp = out_dir.join(format!(".{file}.tmp"));
        write_synced(&tmp, &bytes_out)?;
        std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        written.push(dest);
    }
    if let Some(missing) = pending.keys().min() {
        return Err(Error::tensor(
            missing,
            format!("base weight not found in {}", base_dir.display()),
        ));
    }

    let weight_files: BTreeSet<&String> = files.iter().collect();
    let entries = std::fs::read_dir(base_dir).map_err(|e| Error::io(base_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(base_dir, e))?;
        let path = entry.path();
        let ft = entry.file_type().map_err(|e| Error::io(&path, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !ft.is_file() || weight_files.contains(&name) {
            continue;
        }
        let dest = out_dir.join(&name);
        std::fs::copy(&path, &dest).map_err(|e| Error::io(&dest, e))?;
    }
    sync_dir(out_dir)?;
    merged_names.sort();
    Ok(MergeReport {
        scale: adapter.config.scale(),
        merged: merged_names,
        files: written,
    })
}

/// `data` (little-endian, `dtype`) plus `delta`, computed in `f32` and written back in `dtype`.
fn add_in_place(
    name: &str,
    dtype: safetensors::Dtype,
    data: &[u8],
    delta: &[f32],
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len());
    match dtype {
        safetensors::Dtype::F32 => {
            for (c, d) in data.chunks_exact(4).zip(delta) {
                let w = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                out.extend_from_slice(&(w + d).to_le_bytes());
            }
        }
        safetensors::Dtype::F16 => {
            for (c, d) in data.chunks_exact(2).zip(delta) {
                let w = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                out.extend_from_slice(&half::f16::from_f32(w + d).to_le_bytes());
            }
        }
        safetensors::Dtype::BF16 => {
            for (c, d) in data.chunks_exact(2).zip(delta) {
                let w = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                out.extend_from_slice(&half::bf16::from_f32(w + d).to_le_bytes());
            }
        }
        other => {
            return Err(Error::tensor(
                name,
                format!("cannot merge into a {other:?} weight (expected F32, F16 or BF16)"),
            ))
        }
    }
    if out.len() != data.len() {
        return Err(Error::tensor(name, "weight data does not match its shape"));
    }
    Ok(out)
}
