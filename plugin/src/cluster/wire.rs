//! [`WireGroup`]: a sealed group as it travels from a replica to the trainer.
//!
//! JSON, one message per group: the replica's name, and the sealed group itself (per member:
//! prompt ids, completion ids, natural-log probs, reward, and the adapter version that served
//! it). With `ids_only` the text and reference fields are stripped before the message leaves
//! the replica, whatever the harvester kept.

use serde::{Deserialize, Serialize};

use super::ClusterError;
use crate::harvest::SealedGroup;

/// The message format's version; a trainer refuses any other.
pub const WIRE_SCHEMA: u32 = 1;

/// Largest group message accepted, bytes (NATS' default max payload is 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// One sealed group on the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireGroup {
    /// [`WIRE_SCHEMA`].
    pub schema: u32,
    /// The replica that harvested it.
    pub replica: String,
    /// The group.
    pub group: SealedGroup,
}

impl WireGroup {
    /// Wraps `group` harvested by `replica`; `ids_only` strips every text field.
    pub fn new(replica: &str, mut group: SealedGroup, ids_only: bool) -> Self {
        if ids_only {
            for (sample, _) in &mut group.members {
                sample.text = None;
                sample.reference = None;
            }
        }
        WireGroup {
            schema: WIRE_SCHEMA,
            replica: replica.to_string(),
            group,
        }
    }

    /// The id the stream deduplicates on (`Nats-Msg-Id`) and the trainer records as applied:
    /// unique across replicas and across restarts of one (each process has its own name).
    pub fn message_id(&self) -> String {
        format!("{}/{}", self.replica, self.group.id)
    }

    /// The message bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ClusterError> {
        let bytes = serde_json::to_vec(self).map_err(|e| ClusterError::BadMessage {
            id: self.message_id(),
            reason: format!("cannot serialise: {e}"),
        })?;
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(ClusterError::BadMessage {
                id: self.message_id(),
                reason: format!(
                    "{} bytes is above the {MAX_MESSAGE_BYTES}-byte message limit",
                    bytes.len()
                ),
            });
        }
        Ok(bytes)
    }

    /// Parses a message; `id` names it in errors.
    pub fn decode(id: &str, bytes: &[u8]) -> Result<Self, ClusterError> {
        let bad = |reason: String| ClusterError::BadMessage {
            id: id.to_string(),
            reason,
        };
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(bad(format!("{} bytes is too large", bytes.len())));
        }
        let wire: WireGroup =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a group: {e}")))?;
        if wire.schema != WIRE_SCHEMA {
            return Err(bad(format!(
                "schema {} (this trainer reads {WIRE_SCHEMA})",
                wire.schema
            )));
        }
        if wire.group.members.is_empty() {
            return Err(bad("the group has no members".into()));
        }
        Ok(wire)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::harvest::{HarvestedSample, SampleOrigin};

    pub(crate) fn group(id: &str, rewards: &[f64]) -> SealedGroup {
        let members = rewards
            .iter()
            .enumerate()
            .map(|(i, &r)| {
                (
                    HarvestedSample {
                        request_id: format!("r{i}"),
                        prompt_key: "k".into(),
                        prompt_ids: vec![1, 2, 3],
                        completion_ids: vec![4 + i as u32, 5],
                        logprobs: vec![-0.5, -0.25],
                        adapter_version: "base".into(),
                        engine_id: "policy@0".into(),
                        origin: SampleOrigin::User,
                        finish_reason: "stop".into(),
                        started_unix_ms: 1,
                        finished_unix_ms: 2,
                        text: Some("secret words".into()),
                        reference: Some("secret reference".into()),
                        reference_ids: None,
                        task: None,
                    },
                    r,
                )
            })
            .collect();
        SealedGroup {
            id: id.into(),
            prompt_key: "k".into(),
            members,
            partial: false,
            sealed_unix_ms: 3,
        }
    }

    #[test]
    fn ids_only_strips_text_and_round_trips() {
        let w = WireGroup::new("replica-a", group("g1-k", &[0.0, 1.0]), true);
        let bytes = w.encode().unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(!text.contains("secret"), "{text}");
        let back = WireGroup::decode("m", &bytes).unwrap();
        assert_eq!(back, w);
        assert_eq!(back.message_id(), "replica-a/g1-k");
        assert_eq!(back.group.members[1].0.logprobs, vec![-0.5, -0.25]);
        assert_eq!(back.group.members[1].1, 1.0);
        // Full mode keeps what the harvester kept.
        let full = WireGroup::new("a", group("g1-k", &[0.0]), false);
        assert!(String::from_utf8(full.encode().unwrap())
            .unwrap()
            .contains("secret words"));
    }

    #[test]
    fn bad_messages_are_named_errors() {
        let e = WireGroup::decode("seq 7", b"{").unwrap_err().to_string();
        assert!(e.contains("seq 7") && e.contains("not a group"), "{e}");
        let mut w = WireGroup::new("a", group("g", &[1.0]), true);
        w.schema = 9;
        let e = WireGroup::decode("m", &serde_json::to_vec(&w).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("schema 9"), "{e}");
        w.schema = WIRE_SCHEMA;
        w.group.members.clear();
        let e = WireGroup::decode("m", &serde_json::to_vec(&w).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no members"), "{e}");
    }
}
