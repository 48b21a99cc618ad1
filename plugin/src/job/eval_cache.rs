//! A disk cache of the base model's evaluations: the base model does not change between runs,
//! so its evaluations (greedy, sampled, pass@k) are computed once per model and settings and
//! read back afterwards (`leaf compare` evaluates the same base model for every seed).
//!
//! The key is the SHA-256 of the model directory's files (config, weights, tokenizer, unit
//! codebook), what is evaluated and the evaluation settings as JSON, so a retrained model or a
//! changed setting misses the cache. An unreadable or corrupt entry is recomputed and
//! rewritten, never trusted.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::report::write_json;

/// Files of a model directory that decide its answers.
const MODEL_FILES: [&str; 5] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "units.json",
];

/// Evaluations cached under one directory.
#[derive(Debug, Clone)]
pub struct EvalCache {
    dir: PathBuf,
}

impl EvalCache {
    /// A cache in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        EvalCache { dir: dir.into() }
    }

    /// The cached value of `what` for the model in `model_dir` under `settings`, or `compute`'s
    /// result (then stored). A cache that cannot be written is only logged.
    pub fn get_or_compute<T, S>(
        &self,
        model_dir: &Path,
        what: &str,
        settings: &S,
        compute: impl FnOnce() -> crate::Result<T>,
    ) -> crate::Result<T>
    where
        T: Serialize + DeserializeOwned,
        S: Serialize,
    {
        let Some(key) = key(model_dir, what, settings) else {
            return compute();
        };
        let path = self.dir.join(format!("{what}-{}.json", &key[..24]));
        if let Ok(text) = std::fs::read_to_string(&path) {
            match serde_json::from_str(&text) {
                Ok(v) => {
                    tracing::info!(path = %path.display(), "base evaluation read from the cache");
                    return Ok(v);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "corrupt cache entry recomputed")
                }
            }
        }
        let value = compute()?;
        let stored = std::fs::create_dir_all(&self.dir)
            .map_err(|e| crate::Error::Io {
                path: self.dir.clone(),
                source: e,
            })
            .and_then(|()| write_json(&path, &value));
        if let Err(e) = stored {
            tracing::warn!(error = %e, "cannot write the evaluation cache");
        }
        Ok(value)
    }
}

/// The hex SHA-256 of the model files, `what` and `settings`; `None` when a file cannot be read
/// (then nothing is cached).
fn key<S: Serialize>(model_dir: &Path, what: &str, settings: &S) -> Option<String> {
    let mut h = Sha256::new();
    for name in MODEL_FILES {
        let path = model_dir.join(name);
        h.update(name.as_bytes());
        match std::fs::File::open(&path) {
            Ok(mut f) => {
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = f.read(&mut buf).ok()?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => h.update(b"<absent>"),
            Err(_) => return None,
        }
    }
    h.update(what.as_bytes());
    h.update(serde_json::to_vec(settings).ok()?);
    Some(hex_of(&h.finalize()))
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn computes_once_per_model_and_settings_and_recomputes_corrupt_entries() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        let cache = EvalCache::new(dir.path().join("cache"));
        let calls = Cell::new(0);
        let compute = |v: u32| {
            calls.set(calls.get() + 1);
            Ok(v)
        };
        let a: u32 = cache
            .get_or_compute(&model, "x", &1, || compute(7))
            .unwrap();
        let b: u32 = cache
            .get_or_compute(&model, "x", &1, || compute(8))
            .unwrap();
        assert_eq!((a, b, calls.get()), (7, 7, 1));
        // Other settings, other entry.
        let c: u32 = cache
            .get_or_compute(&model, "x", &2, || compute(9))
            .unwrap();
        assert_eq!((c, calls.get()), (9, 2));
        // A changed model file misses.
        std::fs::write(model.join("config.json"), "{\"a\":1}").unwrap();
        let d: u32 = cache
            .get_or_compute(&model, "x", &1, || compute(10))
            .unwrap();
        assert_eq!((d, calls.get()), (10, 3));
        // A corrupt entry is recomputed.
        for e in std::fs::read_dir(dir.path().join("cache")).unwrap() {
            std::fs::write(e.unwrap().path(), "not json").unwrap();
        }
        let e: u32 = cache
            .get_or_compute(&model, "x", &1, || compute(11))
            .unwrap();
        assert_eq!((e, calls.get()), (11, 4));
    }
}
