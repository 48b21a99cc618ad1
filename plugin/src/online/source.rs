//! Where the learner's groups come from: the [`GroupSource`] seam.
//!
//! `leaf serve --online` and `leaf run` feed the learner from the server's sealed-group queue;
//! `leaf train` feeds it from a [`GroupSource`]: [`JsonlGroupSource`] reads logged groups from
//! a JSON-lines file, and a cluster trainer plugs in a durable broker (a JetStream pull
//! consumer) the same way.
//!
//! The contract that makes training exactly-once on a durable source: the learner acks a
//! group ([`GroupSource::ack`]) only after the update that used it is applied **and** the
//! trainer checkpoint (adapter version + optimizer state) that contains it is saved. A source
//! redelivers what was not acked; the checkpoint remembers the ids of the groups it applied
//! last, so a redelivery of a group whose ack was lost in a crash is acked without being
//! trained on again.
//!
//! A line of the JSON-lines format (the `leaf advantages` input plus the prompt):
//!
//! ```json
//! {"group_id": "g1", "prompt_ids": [1, 2, 3],
//!  "rollouts": [{"tokens": [5, 6], "logprobs": [-0.1, -0.7], "reward": 1.0}, ...],
//!  "adapter_version": "optional: the version that sampled the rollouts"}
//! ```

use std::any::Any;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::OnlineError;
use crate::harvest::SealedGroup;
use crate::rollout::{Group, GroupError, Rollout};

/// An opaque acknowledgement token: what a [`GroupSource`] needs back to ack one group (a
/// line number, a broker message handle). Only the source that made it looks inside.
pub struct GroupReceipt(Box<dyn Any + Send + Sync>);

impl GroupReceipt {
    /// Wraps a source's token.
    pub fn new<T: Any + Send + Sync>(token: T) -> Self {
        GroupReceipt(Box::new(token))
    }

    /// A receipt with nothing to ack (groups from an in-process queue).
    pub fn none() -> Self {
        GroupReceipt::new(())
    }

    /// The token, if it is a `T`.
    pub fn downcast_ref<T: Any>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }

    /// The token by value, if it is a `T`; the receipt back otherwise.
    pub fn downcast<T: Any>(self) -> Result<T, GroupReceipt> {
        self.0.downcast().map(|b| *b).map_err(GroupReceipt)
    }
}

impl fmt::Debug for GroupReceipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GroupReceipt(..)")
    }
}

/// One group as a source delivers it: the K responses to one prompt with their behaviour
/// log-probs and rewards, and the receipt that acks it.
#[derive(Debug)]
pub struct SourcedGroup {
    /// The group's id (unique per source; the checkpoint's duplicate filter keys on it).
    pub id: String,
    /// The prompt ids the responses answer (what the model saw, chat template included).
    pub prompt_ids: Vec<u32>,
    /// The responses. A rollout's `meta.adapter_version`, when set, names the version that
    /// sampled it and overrides [`SourcedGroup::adapter_version`].
    pub rollouts: Vec<Rollout>,
    /// The adapter version that produced the group, if known (used for staleness and
    /// truncated importance weighting).
    pub adapter_version: Option<String>,
    /// The request's reference answer as the ids the model would generate for it, when it
    /// was harvested ([`HarvestedSample::reference_ids`](crate::harvest::HarvestedSample)):
    /// what reference guidance adds to the group.
    pub reference_ids: Option<Vec<u32>>,
    /// What [`GroupSource::ack`] takes back.
    pub receipt: GroupReceipt,
}

impl SourcedGroup {
    /// A group sealed by this process's harvester (its members keep their own versions).
    pub fn from_sealed(group: &SealedGroup, receipt: GroupReceipt) -> Self {
        let first = group.members.first().map(|(s, _)| s);
        let version = first
            .map(|s| s.adapter_version.clone())
            .filter(|v| group.members.iter().all(|(s, _)| &s.adapter_version == v));
        SourcedGroup {
            id: group.id.clone(),
            prompt_ids: first.map(|s| s.prompt_ids.clone()).unwrap_or_default(),
            rollouts: group.rollouts(),
            adapter_version: version,
            reference_ids: group.reference_ids().map(<[u32]>::to_vec),
            receipt,
        }
    }

    /// The validated group for the advantage estimator.
    pub fn to_group(&self) -> Result<Group, GroupError> {
        Group::new(self.id.clone(), self.rollouts.clone())
    }

    /// The version that sampled response `i`: its own, else the group's, else `""` (unknown:
    /// with importance weighting on stale samples, an unknown version counts as stale).
    pub fn behaviour_version(&self, i: usize) -> &str {
        self.rollouts
            .get(i)
            .and_then(|r| r.meta.as_ref())
            .map(|m| m.adapter_version.as_str())
            .or(self.adapter_version.as_deref())
            .unwrap_or("")
    }
}

/// A source of groups for the learner (see the module docs for the ack contract).
#[async_trait::async_trait]
pub trait GroupSource: Send {
    /// Up to `max` groups; an empty `Vec` means the source is exhausted (an offline file). May
    /// wait for groups to arrive.
    async fn next_groups(&mut self, max: usize) -> crate::Result<Vec<SourcedGroup>>;

    /// Acknowledges groups. Called only after the update that used these groups is applied
    /// AND the trainer checkpoint holding it is saved (exactly-once training on a durable
    /// source). Groups that were consumed but not trained on (invalid, all rewards equal, or
    /// an update the gate rolled back) are acked too: they must not come back.
    async fn ack(&mut self, receipts: Vec<GroupReceipt>) -> crate::Result<()>;

    /// A short description for logs and reports (`groups.jsonl`, `nats://host/stream`).
    fn describe(&self) -> String;
}

/// Settings of [`JsonlGroupSource`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct JsonlSourceOptions {
    /// Log and skip malformed lines instead of failing on the first one.
    pub skip_malformed: bool,
    /// Refuse token ids at or above this (the model's vocabulary size).
    pub vocab_size: Option<usize>,
    /// Where acks record the position in the file; a later open of the same file resumes
    /// after the last acked line. `None`: always read from the first line.
    pub cursor_file: Option<PathBuf>,
    /// Longest line read, in bytes (a longer one is malformed).
    pub max_line_bytes: usize,
}

impl Default for JsonlSourceOptions {
    fn default() -> Self {
        JsonlSourceOptions {
            skip_malformed: false,
            vocab_size: None,
            cursor_file: None,
            max_line_bytes: 64 << 20,
        }
    }
}

/// The receipt token of a [`JsonlGroupSource`] group: its 1-based line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JsonlLine(u64);

/// The cursor file of a [`JsonlGroupSource`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct JsonlCursor {
    /// The groups file (canonical path).
    groups: PathBuf,
    /// The first line not yet acked (1-based).
    next_line: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupLine {
    group_id: String,
    prompt_ids: Vec<u32>,
    rollouts: Vec<RolloutLine>,
    #[serde(default)]
    adapter_version: Option<String>,
    #[serde(default)]
    reference_ids: Option<Vec<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutLine {
    tokens: Vec<u32>,
    logprobs: Vec<f64>,
    reward: f64,
}

/// Groups read from a JSON-lines file, one per line (the format is in the module docs).
/// Blank lines are ignored. A malformed line is an error naming the line and the field
/// ([`OnlineError::GroupLine`]), or, with [`JsonlSourceOptions::skip_malformed`], a warning
/// and a count ([`JsonlGroupSource::skipped`]). Reads are small and blocking.
pub struct JsonlGroupSource {
    path: PathBuf,
    reader: BufReader<std::fs::File>,
    options: JsonlSourceOptions,
    /// Lines read so far.
    line: u64,
    skipped: u64,
    canonical: PathBuf,
    acked_through: u64,
    exhausted: bool,
}

impl fmt::Debug for JsonlGroupSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonlGroupSource")
            .field("path", &self.path)
            .field("line", &self.line)
            .field("skipped", &self.skipped)
            .finish()
    }
}

impl JsonlGroupSource {
    /// Opens `path`. With a cursor file that names the same file, reading resumes after its
    /// last acked line.
    pub fn open(path: &Path, options: JsonlSourceOptions) -> crate::Result<Self> {
        let file = std::fs::File::open(path).map_err(OnlineError::io(path))?;
        let canonical = std::fs::canonicalize(path).map_err(OnlineError::io(path))?;
        let mut source = JsonlGroupSource {
            path: path.to_path_buf(),
            reader: BufReader::new(file),
            options,
            line: 0,
            skipped: 0,
            canonical,
            acked_through: 0,
            exhausted: false,
        };
        if let Some(cursor) = source.read_cursor()? {
            // Skip the acked lines unparsed (a malformed one among them was skipped before).
            let mut discard = Vec::new();
            while source.line + 1 < cursor.next_line {
                discard.clear();
                let n = source
                    .reader
                    .read_until(b'\n', &mut discard)
                    .map_err(OnlineError::io(path))?;
                if n == 0 {
                    break;
                }
                source.line += 1;
            }
            source.acked_through = source.line;
            if source.line > 0 {
                tracing::info!(
                    path = %source.path.display(),
                    line = source.line,
                    "groups file: resuming after the last acked line"
                );
            }
        }
        Ok(source)
    }

    /// Lines read so far (1-based number of the last one).
    pub fn lines_read(&self) -> u64 {
        self.line
    }

    /// Malformed lines skipped (only with `skip_malformed`).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The last line whose group was acked (0: none).
    pub fn acked_through(&self) -> u64 {
        self.acked_through
    }

    fn read_cursor(&self) -> crate::Result<Option<JsonlCursor>> {
        let Some(path) = &self.options.cursor_file else {
            return Ok(None);
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(OnlineError::io(path)(e).into()),
        };
        let cursor: JsonlCursor =
            serde_json::from_str(&text).map_err(|e| OnlineError::Checkpoint {
                path: path.clone(),
                reason: format!("not a groups-file cursor: {e}"),
            })?;
        Ok((cursor.groups == self.canonical).then_some(cursor))
    }

    /// The next line's text, `None` at the end of the file.
    fn read_line(&mut self) -> crate::Result<Option<String>> {
        let mut buf = Vec::new();
        let limit = self.options.max_line_bytes as u64 + 1;
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut buf)
            .map_err(OnlineError::io(&self.path))?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        if buf.len() as u64 >= limit && buf.last() != Some(&b'\n') {
            // Skip the rest of the over-long line so the next read starts on a line boundary.
            let mut rest = Vec::new();
            self.reader
                .read_until(b'\n', &mut rest)
                .map_err(OnlineError::io(&self.path))?;
            return Err(self
                .malformed(
                    "(line)",
                    format!("longer than {} bytes", self.options.max_line_bytes),
                )
                .into());
        }
        String::from_utf8(buf)
            .map(Some)
            .map_err(|_| self.malformed("(line)", "not valid UTF-8".into()).into())
    }

    fn malformed(&self, field: &str, reason: String) -> OnlineError {
        OnlineError::GroupLine {
            path: self.path.clone(),
            line: self.line,
            field: field.to_string(),
            reason,
        }
    }

    /// Parses and validates the current line.
    fn parse(&self, text: &str) -> Result<SourcedGroup, OnlineError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let parsed: GroupLine = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "(line)".into() } else { path };
            self.malformed(&field, e.into_inner().to_string())
        })?;
        de.end()
            .map_err(|e| self.malformed("(line)", e.to_string()))?;
        if parsed.group_id.trim().is_empty() {
            return Err(self.malformed("group_id", "is empty".into()));
        }
        if parsed.prompt_ids.is_empty() {
            return Err(self.malformed("prompt_ids", "is empty".into()));
        }
        if let Some(vocab) = self.options.vocab_size {
            let outside = |ids: &[u32]| ids.iter().position(|&t| t as usize >= vocab);
            if let Some(j) = outside(&parsed.prompt_ids) {
                return Err(self.malformed(
                    &format!("prompt_ids[{j}]"),
                    format!(
                        "token id {} is outside the vocabulary of {vocab}",
                        parsed.prompt_ids[j]
                    ),
                ));
            }
            if let Some(ids) = &parsed.reference_ids {
                if let Some(j) = outside(ids) {
                    return Err(self.malformed(
                        &format!("reference_ids[{j}]"),
                        format!("token id {} is outside the vocabulary of {vocab}", ids[j]),
                    ));
                }
            }
            for (i, r) in parsed.rollouts.iter().enumerate() {
                if let Some(j) = outside(&r.tokens) {
                    return Err(self.malformed(
                        &format!("rollouts[{i}].tokens[{j}]"),
                        format!(
                            "token id {} is outside the vocabulary of {vocab}",
                            r.tokens[j]
                        ),
                    ));
                }
            }
        }
        let rollouts: Vec<Rollout> = parsed
            .rollouts
            .into_iter()
            .map(|r| Rollout::new(r.tokens, r.logprobs, r.reward))
            .collect();
        if let Err(e) = Group::new(parsed.group_id.clone(), rollouts.clone()) {
            let field = match &e {
                GroupError::Empty { .. } => "rollouts".to_string(),
                GroupError::LengthMismatch { response, .. } => {
                    format!("rollouts[{response}].logprobs")
                }
                GroupError::BadLogprob {
                    response, position, ..
                } => format!("rollouts[{response}].logprobs[{position}]"),
                GroupError::BadReward { response, .. } => format!("rollouts[{response}].reward"),
                GroupError::MixedPrompts { response, .. } => format!("rollouts[{response}]"),
            };
            return Err(self.malformed(&field, e.to_string()));
        }
        Ok(SourcedGroup {
            id: parsed.group_id,
            prompt_ids: parsed.prompt_ids,
            rollouts,
            adapter_version: parsed.adapter_version.filter(|v| !v.is_empty()),
            reference_ids: parsed.reference_ids.filter(|ids| !ids.is_empty()),
            receipt: GroupReceipt::new(JsonlLine(self.line)),
        })
    }

    fn write_cursor(&self, path: &Path) -> crate::Result<()> {
        let cursor = JsonlCursor {
            groups: self.canonical.clone(),
            next_line: self.acked_through + 1,
        };
        let text = serde_json::to_string(&cursor).map_err(|e| OnlineError::Checkpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        super::checkpoint::write_atomic(path, text.as_bytes())
    }
}

#[async_trait::async_trait]
impl GroupSource for JsonlGroupSource {
    async fn next_groups(&mut self, max: usize) -> crate::Result<Vec<SourcedGroup>> {
        let mut out = Vec::new();
        while out.len() < max && !self.exhausted {
            let text = match self.read_line() {
                Ok(Some(t)) => t,
                Ok(None) => {
                    self.exhausted = true;
                    break;
                }
                Err(e) if self.options.skip_malformed => {
                    tracing::warn!(error = %e, "malformed group line skipped");
                    metrics::counter!("leaf_groups_invalid_total").increment(1);
                    self.skipped += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if text.trim().is_empty() {
                continue;
            }
            match self.parse(&text) {
                Ok(g) => out.push(g),
                Err(e) if self.options.skip_malformed => {
                    tracing::warn!(error = %e, "malformed group line skipped");
                    metrics::counter!("leaf_groups_invalid_total").increment(1);
                    self.skipped += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    async fn ack(&mut self, receipts: Vec<GroupReceipt>) -> crate::Result<()> {
        let mut last = self.acked_through;
        for r in receipts {
            match r.downcast_ref::<JsonlLine>() {
                Some(JsonlLine(line)) => last = last.max(*line),
                None => {
                    return Err(OnlineError::Source {
                        source_name: self.describe(),
                        reason: "ack got a receipt of another source".into(),
                    }
                    .into())
                }
            }
        }
        self.acked_through = last;
        if let Some(path) = self.options.cursor_file.clone() {
            self.write_cursor(&path)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, lines: &[&str]) -> PathBuf {
        let p = dir.join("groups.jsonl");
        std::fs::write(&p, lines.join("\n")).unwrap();
        p
    }

    const GOOD: &str = r#"{"group_id": "a", "prompt_ids": [1, 2], "rollouts": [{"tokens": [3, 4], "logprobs": [-0.1, -0.2], "reward": 1.0}, {"tokens": [5], "logprobs": [-0.3], "reward": 0.0}]}"#;

    fn block<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn first_error(line: &str, options: JsonlSourceOptions) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), &[GOOD, "", line]);
        let mut s = JsonlGroupSource::open(&p, options).unwrap();
        let e = block(s.next_groups(10)).unwrap_err();
        e.to_string()
    }

    #[test]
    fn reads_groups_in_batches_then_reports_exhaustion() {
        let dir = tempfile::tempdir().unwrap();
        let second = GOOD.replace("\"a\"", "\"b\"");
        let p = write(dir.path(), &[GOOD, "  ", &second]);
        let mut s = JsonlGroupSource::open(&p, JsonlSourceOptions::default()).unwrap();
        let got = block(s.next_groups(1)).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, "a");
        assert_eq!(got[0].prompt_ids, vec![1, 2]);
        assert_eq!(got[0].rollouts[1].tokens, vec![5]);
        assert_eq!(got[0].behaviour_version(0), "");
        let got = block(s.next_groups(5)).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, "b");
        assert!(block(s.next_groups(5)).unwrap().is_empty());
    }

    #[test]
    fn malformed_lines_name_their_line_and_field() {
        let o = JsonlSourceOptions::default;
        let e = first_error(r#"{"group_id": "x", "rollouts": []}"#, o());
        assert!(e.contains("line 3") && e.contains("prompt_ids"), "{e}");
        let e = first_error(
            r#"{"group_id": "x", "prompt_ids": [1], "rollouts": [{"tokens": [1], "logprobs": ["a"], "reward": 1}]}"#,
            o(),
        );
        assert!(e.contains("line 3: rollouts[0].logprobs[0]"), "{e}");
        let e = first_error(
            r#"{"group_id": "x", "prompt_ids": [1], "rollouts": [{"tokens": [1, 2], "logprobs": [-1], "reward": 1}]}"#,
            o(),
        );
        assert!(e.contains("rollouts[0].logprobs"), "{e}");
        let e = first_error(
            r#"{"group_id": "x", "prompt_ids": [1], "rollouts": [{"tokens": [1], "logprobs": [0.5], "reward": 1}]}"#,
            o(),
        );
        assert!(e.contains("rollouts[0].logprobs[0]"), "{e}");
        let e = first_error(
            r#"{"group_id": "x", "prompt_ids": [1], "rollouts": [{"tokens": [1], "logprobs": [-1]}]}"#,
            o(),
        );
        assert!(e.contains("rollouts[0]") && e.contains("reward"), "{e}");
        let e = first_error(
            r#"{"group_id": "x", "prompt_ids": [1], "rollouts": [], "extra": 1}"#,
            o(),
        );
        assert!(e.contains("extra"), "{e}");
        let e = first_error(
            r#"{"group_id": "x", "prompt_ids": [1], "rollouts": []}"#,
            o(),
        );
        assert!(e.contains("line 3: rollouts"), "{e}");
        let e = first_error("not json", o());
        assert!(e.contains("line 3: (line)"), "{e}");
        let e = first_error(
            r#"{"group_id": "x", "prompt_ids": [1, 99], "rollouts": [{"tokens": [1], "logprobs": [-1], "reward": 1}]}"#,
            JsonlSourceOptions {
                vocab_size: Some(50),
                ..o()
            },
        );
        assert!(
            e.contains("prompt_ids[1]") && e.contains("vocabulary"),
            "{e}"
        );
        let e = first_error(
            r#"{"group_id": "x", "prompt_ids": [1], "rollouts": [{"tokens": [1], "logprobs": [-1], "reward": 1}], "reference_ids": [3, 77]}"#,
            JsonlSourceOptions {
                vocab_size: Some(50),
                ..o()
            },
        );
        assert!(
            e.contains("reference_ids[1]") && e.contains("vocabulary"),
            "{e}"
        );
        let long = format!(r#"{{"group_id": "{}"}}"#, "x".repeat(500));
        let e = first_error(
            &long,
            JsonlSourceOptions {
                max_line_bytes: 300,
                ..o()
            },
        );
        assert!(e.contains("line 3: (line): longer than 300 bytes"), "{e}");
        let e = first_error(&format!("{GOOD} trailing"), o());
        assert!(
            e.contains("line 3: (line)") && e.contains("trailing"),
            "{e}"
        );
    }

    #[test]
    fn skip_malformed_counts_and_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), &[GOOD, "{oops", GOOD]);
        let mut s = JsonlGroupSource::open(
            &p,
            JsonlSourceOptions {
                skip_malformed: true,
                ..JsonlSourceOptions::default()
            },
        )
        .unwrap();
        assert_eq!(block(s.next_groups(10)).unwrap().len(), 2);
        assert_eq!(s.skipped(), 1);
    }

    #[test]
    fn acks_move_the_cursor_and_a_reopen_resumes_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let lines: Vec<String> = (0..5)
            .map(|i| GOOD.replace("\"a\"", &format!("\"g{i}\"")))
            .collect();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let p = write(dir.path(), &refs);
        let options = JsonlSourceOptions {
            cursor_file: Some(dir.path().join("cursor.json")),
            ..JsonlSourceOptions::default()
        };
        let mut s = JsonlGroupSource::open(&p, options.clone()).unwrap();
        let got = block(s.next_groups(3)).unwrap();
        // Only the first two are acked (the third's update never finished).
        let receipts: Vec<GroupReceipt> = got.into_iter().take(2).map(|g| g.receipt).collect();
        block(s.ack(receipts)).unwrap();
        assert_eq!(s.acked_through(), 2);
        drop(s);
        let mut s = JsonlGroupSource::open(&p, options).unwrap();
        let ids: Vec<String> = block(s.next_groups(10))
            .unwrap()
            .into_iter()
            .map(|g| g.id)
            .collect();
        assert_eq!(ids, ["g2", "g3", "g4"]);
        // A receipt of another source is refused.
        let e = block(s.ack(vec![GroupReceipt::none()])).unwrap_err();
        assert!(e.to_string().contains("another source"), "{e}");
    }
}
