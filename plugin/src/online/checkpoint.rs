//! The trainer checkpoint: what a learner needs to resume exactly where it stopped.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::OnlineError;
use crate::trainer::Trainer;

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync of
/// the directory. A reader sees the old content or the new, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> crate::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let io = |p: &Path| OnlineError::io(p);
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Directory of the trainer checkpoint inside an adapter store's root.
pub const CHECKPOINT_DIR: &str = "trainer";
/// The checkpoint's commit record.
pub const STATE_FILE: &str = "trainer.json";
/// Adam's moments and the schedule's step, tagged with the version they belong to.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Most group ids remembered for the duplicate filter.
pub const MAX_RECENT_GROUPS: usize = 16_384;

/// The commit record of a [`TrainerCheckpoint`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// The adapter version the trainer's weights are (a store version id, or `base`).
    pub version: String,
    /// Updates applied so far (over every session).
    pub updates: u64,
    /// Groups consumed so far (trained on or not).
    pub groups_consumed: u64,
    /// Ids of the last groups consumed (at most [`MAX_RECENT_GROUPS`], oldest first): a group
    /// redelivered after a crash that lost its ack is acked again without being trained on.
    pub recent_groups: VecDeque<String>,
    /// The last good version's held-out reward, when the gate measured one.
    pub good_reward: Option<f64>,
    /// The estimator's name.
    pub estimator: String,
    /// The base model directory.
    pub base_model: PathBuf,
    /// Sessions so far.
    pub sessions: u64,
}

impl CheckpointState {
    /// Remembers that a group was consumed.
    pub fn note_group(&mut self, id: &str) {
        self.groups_consumed += 1;
        self.recent_groups.push_back(id.to_string());
        while self.recent_groups.len() > MAX_RECENT_GROUPS {
            self.recent_groups.pop_front();
        }
    }

    /// Whether a group with this id was consumed recently.
    pub fn seen(&self, id: &str) -> bool {
        self.recent_groups.iter().any(|g| g == id)
    }
}

/// The trainer checkpoint of `leaf train`: a directory holding the optimizer state and the
/// commit record. The weights are not copied: they are the store's version `version`.
///
/// [`TrainerCheckpoint::save`] writes the optimizer first and the commit record last
/// (atomically): a crash in between leaves the old record, whose version does not match the
/// new optimizer file, so the resume restarts Adam on the old weights, and the source
/// redelivers the groups that were not acked; no group is lost or applied twice.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerCheckpoint {
    dir: PathBuf,
}

impl TrainerCheckpoint {
    /// The checkpoint in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TrainerCheckpoint { dir: dir.into() }
    }

    /// The checkpoint of the store rooted at `store_root` (`STORE/trainer`).
    pub fn in_store(store_root: &Path) -> Self {
        TrainerCheckpoint::new(store_root.join(CHECKPOINT_DIR))
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The commit record, `None` when there is no checkpoint yet.
    pub fn load(&self) -> crate::Result<Option<CheckpointState>> {
        let path = self.dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(OnlineError::io(&path)(e).into()),
        };
        let state: CheckpointState =
            serde_json::from_str(&text).map_err(|e| OnlineError::Checkpoint {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        Ok(Some(state))
    }

    /// Saves the optimizer of `trainer` (tagged with `state.version`), then the record.
    pub fn save(&self, trainer: &Trainer, state: &CheckpointState) -> crate::Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(OnlineError::io(&self.dir))?;
        trainer.save_state(&self.dir.join(OPTIMIZER_FILE), &state.version)?;
        let text = serde_json::to_string_pretty(state).map_err(|e| OnlineError::Checkpoint {
            path: self.dir.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&self.dir.join(STATE_FILE), text.as_bytes())
    }

    /// Restores the optimizer of `trainer` if the saved one belongs to `version`.
    pub fn restore_optimizer(&self, trainer: &mut Trainer, version: &str) -> crate::Result<()> {
        Ok(trainer.load_state(&self.dir.join(OPTIMIZER_FILE), version)?)
    }

    /// The file a groups source may keep its cursor in.
    pub fn cursor_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("cursor-{name}.json"))
    }
}
