//! [`TrainerProgress`]: the cluster trainer's crash-safe state, and the one place where
//! "this group was applied" is recorded.
//!
//! The state directory holds one `step-<n>/` per commit (the adapter's PEFT files, Adam's
//! moments in `optimizer.safetensors` tied to that adapter's version, and `progress.json`:
//! counters and the ids of every applied group) and `COMMITTED`, naming the newest complete
//! step. A commit writes and fsyncs a fresh `step-<n>.tmp/`, renames it, then replaces
//! `COMMITTED` by write-temp + fsync + rename: a kill at any moment leaves the previous or the
//! new commit in force, never a mix. The trainer acks a group only after the commit that
//! holds its id, so a group redelivered after a kill is either in the commit (skipped) or
//! not (applied, once).

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

use leaf_adapters::peft::LoraAdapter;
use serde::{Deserialize, Serialize};

use super::ClusterError;
use crate::trainer::Trainer;

/// Applied group ids remembered (the newest ones). A redelivery older than this many groups
/// would be applied again; JetStream redelivers only unacked groups, and the trainer holds
/// at most one batch unacked, so this is a wide margin.
pub const APPLIED_KEEP: usize = 1 << 20;

/// Commits kept on disk (the newest is in force; the one before is a spare for inspection).
const KEEP_STEPS: usize = 2;

const COMMITTED: &str = "COMMITTED";
const PROGRESS: &str = "progress.json";
const OPTIMIZER: &str = "optimizer.safetensors";

/// The counters and applied ids of a commit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerProgress {
    /// Commit number.
    pub step: u64,
    /// Updates applied.
    pub updates: u64,
    /// Groups consumed: trained on, or left out as uninformative or invalid. Each counts once.
    pub groups_applied: u64,
    /// Groups trained on.
    pub groups_trained: u64,
    /// Groups left out because their rewards were all equal.
    pub groups_uninformative: u64,
    /// Groups that did not validate.
    pub groups_invalid: u64,
    /// Updates since the last publish.
    pub since_publish: u64,
    /// Versions published, oldest first.
    pub published: Vec<String>,
    /// The version the trainer's policy corresponds to (the last one published or loaded).
    pub policy_version: String,
    /// Ids of the applied groups, oldest first (the newest [`APPLIED_KEEP`]).
    pub applied: VecDeque<String>,
    #[serde(skip)]
    index: HashSet<String>,
}

impl TrainerProgress {
    /// A fresh start whose policy is `policy_version`.
    pub fn new(policy_version: &str) -> Self {
        TrainerProgress {
            policy_version: policy_version.to_string(),
            ..TrainerProgress::default()
        }
    }

    /// Whether group `id` was applied.
    pub fn is_applied(&self, id: &str) -> bool {
        self.index.contains(id)
    }

    /// Records group `id` as applied (once).
    pub fn record_applied(&mut self, id: &str) {
        if self.index.insert(id.to_string()) {
            self.applied.push_back(id.to_string());
            self.groups_applied += 1;
            while self.applied.len() > APPLIED_KEEP {
                if let Some(old) = self.applied.pop_front() {
                    self.index.remove(&old);
                }
            }
        }
    }

    fn reindex(&mut self) {
        self.index = self.applied.iter().cloned().collect();
    }

    /// Reads the committed progress only (no model), `None` when nothing was committed.
    pub fn read_committed(state_dir: &Path) -> Result<Option<Self>, ClusterError> {
        let Some(step_dir) = committed_dir(state_dir)? else {
            return Ok(None);
        };
        read_progress(&step_dir).map(Some)
    }
}

fn state_err(path: &Path, reason: impl Into<String>) -> ClusterError {
    ClusterError::State {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn committed_dir(state_dir: &Path) -> Result<Option<PathBuf>, ClusterError> {
    let pointer = state_dir.join(COMMITTED);
    let name = match std::fs::read_to_string(&pointer) {
        Ok(n) => n.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_err(&pointer, e.to_string())),
    };
    if !(name.starts_with("step-") && name[5..].chars().all(|c| c.is_ascii_digit())) {
        return Err(state_err(&pointer, format!("names {name:?}, not a step")));
    }
    Ok(Some(state_dir.join(name)))
}

fn read_progress(step_dir: &Path) -> Result<TrainerProgress, ClusterError> {
    let path = step_dir.join(PROGRESS);
    let text = std::fs::read_to_string(&path).map_err(|e| state_err(&path, e.to_string()))?;
    let mut p: TrainerProgress =
        serde_json::from_str(&text).map_err(|e| state_err(&path, e.to_string()))?;
    p.reindex();
    if p.applied.len() as u64 > p.groups_applied {
        return Err(state_err(&path, "more applied ids than groups applied"));
    }
    Ok(p)
}

/// Restores the last commit into `trainer` (adapter weights and optimizer); `None` when
/// nothing was committed (the trainer is left as it is).
pub fn restore(
    state_dir: &Path,
    trainer: &mut Trainer,
) -> Result<Option<TrainerProgress>, ClusterError> {
    let Some(step_dir) = committed_dir(state_dir)? else {
        return Ok(None);
    };
    let progress = read_progress(&step_dir)?;
    let adapter = LoraAdapter::load(&step_dir)?;
    let version = adapter.version_id()?;
    trainer.model_mut().load_adapter(&adapter)?;
    trainer.load_state(&step_dir.join(OPTIMIZER), &version)?;
    trainer.set_policy_version(progress.policy_version.clone());
    Ok(Some(progress))
}

fn sync_dir(dir: &Path) -> Result<(), ClusterError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| state_err(dir, e.to_string()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ClusterError> {
    let mut f = std::fs::File::create(path).map_err(|e| state_err(path, e.to_string()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| state_err(path, e.to_string()))
}

/// Commits `trainer`'s adapter and optimizer with `progress` (its `step` is advanced).
pub fn commit(
    state_dir: &Path,
    trainer: &Trainer,
    base_name: &str,
    progress: &mut TrainerProgress,
) -> Result<(), ClusterError> {
    std::fs::create_dir_all(state_dir).map_err(|e| state_err(state_dir, e.to_string()))?;
    progress.step += 1;
    let name = format!("step-{:09}", progress.step);
    let tmp = state_dir.join(format!("{name}.tmp"));
    let dest = state_dir.join(&name);
    for stale in [&tmp, &dest] {
        if stale.exists() {
            // Left by a kill before the pointer moved: never in force.
            std::fs::remove_dir_all(stale).map_err(|e| state_err(stale, e.to_string()))?;
        }
    }
    let adapter = trainer.model().export_adapter(base_name)?;
    adapter.save(&tmp)?;
    trainer.save_state(&tmp.join(OPTIMIZER), &adapter.version_id()?)?;
    let json = serde_json::to_vec(progress).map_err(|e| state_err(&tmp, e.to_string()))?;
    write_synced(&tmp.join(PROGRESS), &json)?;
    // save_state renames into place; make the directory entries durable.
    sync_dir(&tmp)?;
    std::fs::rename(&tmp, &dest).map_err(|e| state_err(&dest, e.to_string()))?;
    let pointer_tmp = state_dir.join(format!("{COMMITTED}.tmp"));
    write_synced(&pointer_tmp, name.as_bytes())?;
    let pointer = state_dir.join(COMMITTED);
    std::fs::rename(&pointer_tmp, &pointer).map_err(|e| state_err(&pointer, e.to_string()))?;
    sync_dir(state_dir)?;
    prune(state_dir, progress.step);
    Ok(())
}

/// Removes commits older than the newest [`KEEP_STEPS`] (best effort).
fn prune(state_dir: &Path, newest: u64) {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if n + (KEEP_STEPS as u64) <= newest {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_ids_count_once_and_survive_a_round_trip() {
        let mut p = TrainerProgress::new("base");
        p.record_applied("a/g1");
        p.record_applied("a/g1");
        p.record_applied("b/g1");
        assert_eq!(p.groups_applied, 2);
        assert!(p.is_applied("a/g1") && !p.is_applied("a/g2"));
        let json = serde_json::to_string(&p).unwrap();
        let mut back: TrainerProgress = serde_json::from_str(&json).unwrap();
        back.reindex();
        assert!(back.is_applied("b/g1"));
        assert_eq!(back, p);
    }

    #[test]
    fn a_bad_pointer_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(TrainerProgress::read_committed(dir.path())
            .unwrap()
            .is_none());
        std::fs::write(dir.path().join(COMMITTED), "../etc").unwrap();
        let e = TrainerProgress::read_committed(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("COMMITTED") && e.contains("not a step"), "{e}");
        std::fs::write(dir.path().join(COMMITTED), "step-000000001").unwrap();
        let e = TrainerProgress::read_committed(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("progress.json"), "{e}");
    }
}
