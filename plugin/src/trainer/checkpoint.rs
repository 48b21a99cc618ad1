//! The trainer's own state on disk: Adam's moments and the step counters, so a killed run
//! continues with the optimizer it had (`leaf run --resume`). The weights themselves live in
//! the adapter store; a checkpoint names the adapter version it belongs to, and loading it
//! into a trainer at another version is refused.
//!
//! One safetensors file: `adam.m.<param>` and `adam.v.<param>` per trained tensor,
//! `counters` = `[schedule steps, adam steps]` (i64) and `version` (the UTF-8 bytes of the
//! adapter version, u8). Written to a temporary file and renamed, so a kill never leaves half
//! a file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::{TrainError, Trainer};

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Trainer {
    /// Writes Adam's moments and the step counters to `path`, marked as belonging to adapter
    /// `version` (the version the current weights are published as).
    pub fn save_state(&self, path: &Path, version: &str) -> Result<(), TrainError> {
        let (m, v) = self.optimizer.moments();
        let mut tensors: HashMap<String, Tensor> = HashMap::with_capacity(2 * m.len() + 2);
        for ((name, m), v) in self.names.iter().zip(m).zip(v) {
            tensors.insert(format!("adam.m.{name}"), m.clone());
            tensors.insert(format!("adam.v.{name}"), v.clone());
        }
        let counters = [self.steps, self.optimizer.steps()].map(|c| c as i64);
        tensors.insert("counters".into(), Tensor::new(&counters[..], &Device::Cpu)?);
        tensors.insert(
            "version".into(),
            Tensor::new(version.as_bytes(), &Device::Cpu)?,
        );
        let tmp = path.with_extension("safetensors.tmp");
        candle_core::safetensors::save(&tensors, &tmp)
            .map_err(|e| bad(&tmp, format!("cannot write: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| bad(path, format!("cannot rename: {e}")))?;
        Ok(())
    }

    /// The adapter version a checkpoint file belongs to.
    pub fn state_version(path: &Path) -> Result<String, TrainError> {
        version_of(path, &read(path)?)
    }

    /// Restores what [`save_state`](Self::save_state) wrote. Refused, with the trainer
    /// unchanged, when the file belongs to another adapter version than `version`, misses a
    /// parameter, or holds a moment of the wrong shape.
    pub fn load_state(&mut self, path: &Path, version: &str) -> Result<(), TrainError> {
        let mut tensors = read(path)?;
        let saved = version_of(path, &tensors)?;
        if saved != version {
            return Err(bad(
                path,
                format!("belongs to adapter version {saved}, not {version}"),
            ));
        }
        let counters: Vec<i64> = tensors
            .remove("counters")
            .ok_or_else(|| bad(path, "no `counters` tensor"))?
            .to_vec1()
            .map_err(|e| bad(path, format!("`counters`: {e}")))?;
        let [steps, adam_steps] = counters[..] else {
            return Err(bad(
                path,
                format!("`counters` holds {} values, not 2", counters.len()),
            ));
        };
        let (Ok(steps), Ok(adam_steps)) = (u64::try_from(steps), u64::try_from(adam_steps)) else {
            return Err(bad(path, "negative counters"));
        };
        let mut take = |key: String| {
            tensors
                .remove(&key)
                .ok_or_else(|| bad(path, format!("no `{key}` tensor")))
        };
        let mut m = Vec::with_capacity(self.names.len());
        let mut v = Vec::with_capacity(self.names.len());
        for name in &self.names {
            m.push(take(format!("adam.m.{name}"))?);
            v.push(take(format!("adam.v.{name}"))?);
        }
        self.optimizer
            .restore(m, v, adam_steps)
            .map_err(|e| bad(path, e.to_string()))?;
        self.steps = steps;
        Ok(())
    }
}

/// Every tensor of the checkpoint file at `path`.
fn read(path: &Path) -> Result<HashMap<String, Tensor>, TrainError> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| bad(path, format!("unreadable ({e})")))
}

fn version_of(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<String, TrainError> {
    let bytes: Vec<u8> = tensors
        .get("version")
        .ok_or_else(|| bad(path, "no `version` tensor"))?
        .to_vec1()
        .map_err(|e| bad(path, format!("`version`: {e}")))?;
    String::from_utf8(bytes).map_err(|_| bad(path, "`version` is not UTF-8"))
}
