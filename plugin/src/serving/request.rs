//! The request and reply types of [`LeafServer::chat`], and the path of one chat request:
//! checks, audio front-end, conversion into mistral.rs messages, the reply's log-probs.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use either::Either;
use indexmap::IndexMap;
use mistralrs_core::{
    ChatCompletionResponse, MessageContent, RequestMessage, Response, TopLogprob,
};

use super::audio::AudioPrompt;
use super::config::check_sampling;
use super::engine::{response_error, CancelOnDrop, Finished, InflightGuard, Meta, Plan};
use super::server::LeafServer;
use super::ServeError;
#[cfg(doc)]
use super::{audio::AudioEncoder, config::ServerConfig};
use crate::harvest::{TapConfig, TapRecord};

/// One part of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Text.
    Text(String),
    /// Audio already turned into unit ids.
    Units(Vec<u32>),
    /// Audio as a WAV file; the server's [`AudioEncoder`] turns it into prompt content (needs
    /// [`ServerConfig::audio_encoder`]).
    Wav(Vec<u8>),
}

/// One chat message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The parts, in order.
    pub content: Vec<Part>,
}

impl Message {
    /// A message with one text part.
    pub fn text(role: &str, text: &str) -> Self {
        Message {
            role: role.into(),
            content: vec![Part::Text(text.into())],
        }
    }
}

/// A chat request. `None` fields take the server's [`SamplingDefaults`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Most new tokens.
    pub max_tokens: Option<usize>,
    /// Temperature.
    pub temperature: Option<f64>,
    /// Nucleus mass.
    pub top_p: Option<f64>,
    /// Return the log-prob of each token (natural logs).
    pub logprobs: bool,
    /// Alternatives per position with `logprobs` (at most 20).
    pub top_logprobs: usize,
    /// Seed of the tap's RNG (random when `None`).
    pub seed: Option<u64>,
    /// A reference answer, for the reward.
    pub reference: Option<String>,
    /// A task name, kept with the sample.
    pub task: Option<String>,
}

/// Most alternatives per position a request may ask for with `logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl ChatRequest {
    /// Checks what a request can get wrong on its own, before the server's defaults apply:
    /// at least one message, each with the role `system`, `user` or `assistant`; a given
    /// temperature finite in [0, [`crate::sampling::MAX_TEMPERATURE`]]; a given `top_p` in
    /// (0, 1]; a given `max_tokens` positive; `top_logprobs` at most [`MAX_TOP_LOGPROBS`]. The
    /// error ([`ServeError::Request`]) names the field. [`LeafServer::chat`] runs it first; the
    /// server-side caps are [`super::limits::RequestLimits::check_request`]'s.
    pub fn check(&self) -> Result<(), ServeError> {
        let bad = |m: String| Err(ServeError::Request(m));
        if self.messages.is_empty() {
            return bad("messages is empty".into());
        }
        for (i, m) in self.messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                return bad(format!(
                    "messages[{i}].role {:?} is not system, user or assistant",
                    m.role
                ));
            }
        }
        // Each value on its own: the other one is given a setting that is always valid.
        if let Some(t) = self.temperature {
            check_sampling(t, 1.0)?;
        }
        if let Some(p) = self.top_p {
            check_sampling(1.0, p)?;
        }
        if self.max_tokens == Some(0) {
            return bad("max_tokens must be positive".into());
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return bad(format!(
                "top_logprobs {} must be at most {MAX_TOP_LOGPROBS}",
                self.top_logprobs
            ));
        }
        Ok(())
    }
}

/// The answer to a chat request.
#[derive(Debug, Clone)]
pub struct ChatReply {
    /// The request id (what feedback refers to); also the response's `id`.
    pub request_id: String,
    /// The adapter version that produced the answer.
    pub adapter_version: String,
    /// The engine that served it.
    pub engine_id: String,
    /// The OpenAI-style response; log-probs, when asked for, are natural logs of the
    /// distribution each token was drawn from.
    pub response: ChatCompletionResponse,
    /// The exact generated ids (special tokens included).
    pub completion_ids: Vec<u32>,
    /// Natural-log probability of each generated id under the distribution it was drawn
    /// from (temperature and top-p renormalised), in `f64`.
    pub logprobs: Vec<f64>,
    /// The prompt ids the model saw.
    pub prompt_ids: Vec<u32>,
}

impl LeafServer {
    /// Serves one chat request through the current version, harvesting its sample.
    ///
    /// Dropping the returned future (a client that went away) cancels the request through its
    /// tap; the response channel is drained by a task of its own either way.
    pub async fn chat(self: &Arc<Self>, mut req: ChatRequest) -> Result<ChatReply, ServeError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ServeError::ShuttingDown);
        }
        req.check()?;
        // The defaults were checked at start (`ServerConfig::check`).
        let temperature = req.temperature.unwrap_or(self.config.sampling.temperature);
        let top_p = req.top_p.unwrap_or(self.config.sampling.top_p);
        let max_tokens = req.max_tokens.unwrap_or(self.config.sampling.max_tokens);
        let messages = self.encode_audio(std::mem::take(&mut req.messages)).await?;
        let messages = self.to_engine_messages(&messages)?;
        let seed = req.seed.unwrap_or_else(|| self.next_seed());
        let top_n = if req.logprobs { req.top_logprobs } else { 0 };
        let meta = Meta {
            reference: req.reference.clone(),
            reference_ids: None,
            task: req.task.clone(),
            temperature,
            top_p,
            max_tokens,
        };
        self.foreground.fetch_add(1, Ordering::SeqCst);
        let fg = InflightGuard(self.foreground.clone());
        let (run, rx) = self
            .submit(
                RequestMessage::Chat {
                    messages,
                    enable_thinking: None,
                    reasoning_effort: None,
                },
                TapConfig {
                    temperature,
                    top_p,
                    top_logprobs: top_n,
                    stop_token: self.stop_token(),
                    seed,
                    forced: Vec::new(),
                },
                max_tokens,
                req.logprobs,
                None,
                Plan::User,
                meta,
            )
            .await?;
        let mut cancel = CancelOnDrop {
            tap: run.tap.clone(),
            done: false,
            cancelled: self.counters.cancelled.clone(),
        };
        let finished = rx
            .await
            .map_err(|_| ServeError::Aborted(run.request_id.clone()))?;
        cancel.done = true;
        drop(fg);
        let Finished { response, record } = finished;
        let mut resp = match response {
            Response::Done(r) => r,
            other => return Err(response_error(other, &run.request_id)),
        };
        let record = record.unwrap_or_default();
        resp.id = run.request_id.clone();
        if req.logprobs {
            self.rewrite_logprobs(&mut resp, &record);
        }
        Ok(ChatReply {
            request_id: run.request_id,
            adapter_version: run.version,
            engine_id: run.engine_id,
            response: resp,
            completion_ids: record.tokens,
            logprobs: record.logprobs,
            prompt_ids: record.prompt,
        })
    }

    /// Turns every WAV part into prompt content with the server's [`AudioEncoder`], on the
    /// blocking pool: decoding, resampling and feature extraction take milliseconds to seconds
    /// of CPU and must not stall the async workers.
    pub(super) async fn encode_audio(
        &self,
        mut messages: Vec<Message>,
    ) -> Result<Vec<Message>, ServeError> {
        let has_wav = |m: &Vec<Message>| {
            m.iter()
                .any(|m| m.content.iter().any(|p| matches!(p, Part::Wav(_))))
        };
        if !has_wav(&messages) {
            return Ok(messages);
        }
        let enc = self.config.audio_encoder.clone().ok_or_else(|| {
            ServeError::Request(
                "audio input needs an audio encoder (a unit codebook: units.json in the model \
                 directory, or --units)"
                    .into(),
            )
        })?;
        tokio::task::spawn_blocking(move || -> Result<Vec<Message>, ServeError> {
            for part in messages.iter_mut().flat_map(|m| m.content.iter_mut()) {
                if let Part::Wav(wav) = part {
                    *part = match enc.encode(wav).map_err(ServeError::Audio)? {
                        AudioPrompt::Units(u) => Part::Units(u),
                        AudioPrompt::Text(t) => Part::Text(t),
                    };
                }
            }
            Ok(messages)
        })
        .await
        .map_err(|e| ServeError::Engine(format!("audio front-end task failed: {e}")))?
    }

    pub(super) fn to_engine_messages(
        &self,
        messages: &[Message],
    ) -> Result<Vec<IndexMap<String, MessageContent>>, ServeError> {
        // `ChatRequest::check` refused empty conversations and unknown roles before.
        let mut out = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let content = match m.content.as_slice() {
                [Part::Text(t)] => Either::Left(t.clone()),
                parts => {
                    let mut list = Vec::with_capacity(parts.len());
                    for p in parts {
                        let mut part = IndexMap::new();
                        match p {
                            Part::Text(t) => {
                                part.insert("type".to_string(), "text".into());
                                part.insert("text".to_string(), t.clone().into());
                            }
                            Part::Units(u) => {
                                part.insert("type".to_string(), "audio".into());
                                part.insert("units".to_string(), serde_json::json!(u));
                            }
                            Part::Wav(_) => {
                                // `encode_audio` replaced every WAV part before.
                                return Err(ServeError::Request(format!(
                                    "messages[{i}] has an audio part that was not encoded"
                                )));
                            }
                        }
                        list.push(part);
                    }
                    Either::Right(list)
                }
            };
            let mut msg = IndexMap::new();
            msg.insert("role".to_string(), Either::Left(m.role.clone()));
            msg.insert("content".to_string(), content);
            out.push(msg);
        }
        Ok(out)
    }

    /// Replaces the engine's log10 values (meaningless with a tap) by the tap's natural logs.
    pub(super) fn rewrite_logprobs(&self, resp: &mut ChatCompletionResponse, record: &TapRecord) {
        let tok = self.model.tokenizer();
        for choice in &mut resp.choices {
            let Some(lp) = choice.logprobs.as_mut() else {
                continue;
            };
            let Some(content) = lp.content.as_mut() else {
                continue;
            };
            content.truncate(record.tokens.len());
            for (i, entry) in content.iter_mut().enumerate() {
                entry.logprob = record.logprobs[i] as f32;
                entry.top_logprobs = record
                    .top
                    .get(i)
                    .map(|alts| {
                        alts.iter()
                            .map(|&(token, logprob)| TopLogprob {
                                token,
                                logprob: logprob as f32,
                                bytes: tok.decode(&[token], false).ok(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
            }
        }
    }
}
