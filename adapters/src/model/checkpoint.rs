//! Hugging Face checkpoint files: `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`) next to `config.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};

/// The single-file weights of a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Reads every tensor of the checkpoint in `dir` onto `device` (dtype as stored).
pub fn load_dir(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return load_file(&single, device);
    }
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        return Err(Error::io(
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("neither {WEIGHTS_FILE} nor {INDEX_FILE} found"),
            ),
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: index.clone(),
        source: e,
    })?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(Error::Model(format!(
            "{}: no \"weight_map\" object",
            index.display()
        )));
    };
    let mut shards = BTreeSet::new();
    for (name, file) in map {
        let Some(file) = file.as_str() else {
            return Err(Error::tensor(name, "weight_map entry is not a file name"));
        };
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(Error::tensor(
                name,
                format!("shard {file:?} is not a plain file name"),
            ));
        }
        shards.insert(file.to_string());
    }
    let mut out = HashMap::new();
    for shard in shards {
        out.extend(load_file(&dir.join(shard), device)?);
    }
    Ok(out)
}

fn load_file(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    candle_core::safetensors::load(path, device)
        .map_err(|e| Error::Model(format!("{}: cannot read safetensors: {e}", path.display())))
}

/// `torch_dtype` string of a dtype, as Hugging Face writes it.
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Writes `config.json` ([`LlamaConfig::normalized`]) and `model.safetensors` into `dir`
/// (created if missing); each file goes to a temporary name first and is renamed into place.
pub fn save_dir(dir: &Path, config: &LlamaConfig, tensors: Vec<(String, Tensor)>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!("{WEIGHTS_FILE}.tmp"));
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&map, &tmp)
        .map_err(|e| Error::Model(format!("{}: cannot write: {e}", tmp.display())))?;
    let dst = dir.join(WEIGHTS_FILE);
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    let cfg_tmp = dir.join("config.json.tmp");
    let text = serde_json::to_string_pretty(&config.normalized()).map_err(|e| Error::Json {
        path: cfg_tmp.clone(),
        source: e,
    })?;
    std::fs::write(&cfg_tmp, text).map_err(|e| Error::io(&cfg_tmp, e))?;
    let cfg = dir.join("config.json");
    std::fs::rename(&cfg_tmp, &cfg).map_err(|e| Error::io(&cfg, e))
}
