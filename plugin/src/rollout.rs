//! Rollouts and groups: what the harvester produces and the advantage estimators consume.
//!
//! A [`Group`] is the K responses sampled for one prompt. Building one validates every
//! response, so everything downstream may assume finite rewards, finite non-positive
//! log-probs and matching lengths.

use serde::{Deserialize, Serialize};

/// One sampled response with what training needs from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Generated token ids, cut after the first end-of-sequence token (which is kept).
    pub tokens: Vec<u32>,
    /// Natural-log probability of each token under the distribution it was drawn from.
    pub logprobs: Vec<f64>,
    /// Scalar reward of the whole response.
    pub reward: f64,
    /// Serving metadata; absent for offline groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<RolloutMeta>,
}

/// Where a rollout came from, as recorded by the harvester.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutMeta {
    /// The request that produced it.
    pub request_id: String,
    /// The prompt it answers (all members of a group share it).
    pub prompt_id: String,
    /// The adapter version that sampled it.
    pub adapter_version: String,
}

impl Rollout {
    /// A rollout without serving metadata.
    pub fn new(tokens: Vec<u32>, logprobs: Vec<f64>, reward: f64) -> Self {
        Rollout {
            tokens,
            logprobs,
            reward,
            meta: None,
        }
    }

    /// Number of generated tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the response is empty.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Why a group was rejected; names the response (0-based) and the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GroupError {
    /// The group has no responses.
    #[error("group {group_id:?} is empty")]
    Empty {
        /// The group.
        group_id: String,
    },
    /// `tokens` and `logprobs` differ in length.
    #[error("group {group_id:?}, response {response}: tokens has {tokens} entries but logprobs has {logprobs}")]
    LengthMismatch {
        /// The group.
        group_id: String,
        /// Index of the response in the group.
        response: usize,
        /// Length of `tokens`.
        tokens: usize,
        /// Length of `logprobs`.
        logprobs: usize,
    },
    /// A log-prob is NaN, infinite or positive.
    #[error("group {group_id:?}, response {response}: logprobs[{position}] = {value} is not a log-probability (must be finite and <= 0)")]
    BadLogprob {
        /// The group.
        group_id: String,
        /// Index of the response in the group.
        response: usize,
        /// Token position.
        position: usize,
        /// The offending value.
        value: f64,
    },
    /// The reward is NaN or infinite.
    #[error("group {group_id:?}, response {response}: reward {value} is not finite")]
    BadReward {
        /// The group.
        group_id: String,
        /// Index of the response in the group.
        response: usize,
        /// The offending value.
        value: f64,
    },
    /// Members of one group answer different prompts.
    #[error("group {group_id:?}, response {response}: prompt_id {found:?} differs from the group's {expected:?}")]
    MixedPrompts {
        /// The group.
        group_id: String,
        /// Index of the response in the group.
        response: usize,
        /// The group's prompt (from its first member with metadata).
        expected: String,
        /// This member's prompt.
        found: String,
    },
}

/// A validated group of K responses to one prompt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Group {
    id: String,
    rollouts: Vec<Rollout>,
}

impl Group {
    /// Validates and builds a group.
    pub fn new(id: impl Into<String>, rollouts: Vec<Rollout>) -> Result<Self, GroupError> {
        let id = id.into();
        if rollouts.is_empty() {
            return Err(GroupError::Empty { group_id: id });
        }
        let mut prompt: Option<&str> = None;
        for (i, r) in rollouts.iter().enumerate() {
            if r.tokens.len() != r.logprobs.len() {
                return Err(GroupError::LengthMismatch {
                    group_id: id,
                    response: i,
                    tokens: r.tokens.len(),
                    logprobs: r.logprobs.len(),
                });
            }
            if let Some(p) = r
                .logprobs
                .iter()
                .position(|&l| !(l.is_finite() && l <= 0.0))
            {
                return Err(GroupError::BadLogprob {
                    group_id: id,
                    response: i,
                    position: p,
                    value: r.logprobs[p],
                });
            }
            if !r.reward.is_finite() {
                return Err(GroupError::BadReward {
                    group_id: id,
                    response: i,
                    value: r.reward,
                });
            }
            if let Some(meta) = &r.meta {
                match prompt {
                    None => prompt = Some(&meta.prompt_id),
                    Some(p) if p != meta.prompt_id => {
                        return Err(GroupError::MixedPrompts {
                            expected: p.to_string(),
                            found: meta.prompt_id.clone(),
                            group_id: id,
                            response: i,
                        })
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(Group { id, rollouts })
    }

    /// The group's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The responses, in sampling order.
    pub fn rollouts(&self) -> &[Rollout] {
        &self.rollouts
    }

    /// Number of responses K.
    pub fn len(&self) -> usize {
        self.rollouts.len()
    }

    /// Always false: a group has at least one response.
    pub fn is_empty(&self) -> bool {
        self.rollouts.is_empty()
    }

    /// Consumes the group, returning its responses.
    pub fn into_rollouts(self) -> Vec<Rollout> {
        self.rollouts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_each_bad_field_by_name() {
        assert!(matches!(
            Group::new("g", vec![]),
            Err(GroupError::Empty { .. })
        ));
        let ok = Rollout::new(vec![1, 2], vec![-0.1, -0.2], 0.5);
        let err =
            Group::new("g", vec![ok.clone(), Rollout::new(vec![1], vec![], 0.0)]).unwrap_err();
        assert_eq!(
            err,
            GroupError::LengthMismatch {
                group_id: "g".into(),
                response: 1,
                tokens: 1,
                logprobs: 0
            }
        );
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.5] {
            let err =
                Group::new("g", vec![Rollout::new(vec![1, 2], vec![-0.1, bad], 0.0)]).unwrap_err();
            assert!(
                matches!(
                    err,
                    GroupError::BadLogprob {
                        response: 0,
                        position: 1,
                        ..
                    }
                ),
                "{bad}"
            );
            assert!(err.to_string().contains("logprobs[1]"));
        }
        let err = Group::new(
            "g",
            vec![ok.clone(), Rollout::new(vec![], vec![], f64::NAN)],
        )
        .unwrap_err();
        assert!(matches!(err, GroupError::BadReward { response: 1, .. }));
        let meta = |p: &str| RolloutMeta {
            request_id: "r".into(),
            prompt_id: p.into(),
            adapter_version: "v".into(),
        };
        let a = Rollout {
            meta: Some(meta("p1")),
            ..ok.clone()
        };
        let b = Rollout {
            meta: Some(meta("p2")),
            ..ok.clone()
        };
        assert!(matches!(
            Group::new("g", vec![a, b]),
            Err(GroupError::MixedPrompts { response: 1, .. })
        ));
        assert_eq!(Group::new("g", vec![ok.clone(), ok]).unwrap().len(), 2);
    }

    #[test]
    fn zero_logprob_and_empty_response_are_valid() {
        let g = Group::new(
            "g",
            vec![
                Rollout::new(vec![7], vec![0.0], 1.0),
                Rollout::new(vec![], vec![], 0.0),
            ],
        );
        assert!(g.is_ok());
    }
}
