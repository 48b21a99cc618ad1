//! Server-side caps on the work requests may ask for ([`RequestLimits`]).
//!
//! The HTTP layer ([`super::http`]) checks every chat request against them before any work is
//! spent on it (audio durations are read from the WAV headers), sheds requests beyond
//! [`RequestLimits::max_concurrent_requests`] with a 429, and ends requests that run longer
//! than [`RequestLimits::request_timeout_s`]. In-process callers of
//! [`super::LeafServer::chat`] are trusted and not capped.

use serde::{Deserialize, Serialize};

use super::server::{ChatRequest, Part};

/// Caps on one request and on all requests together. Every error names the field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestLimits {
    /// Most new tokens a request may ask for (`max_tokens`). Default 2048.
    pub max_tokens: usize,
    /// Most messages in a request. Default 64.
    pub max_messages: usize,
    /// Most bytes of text over all text parts of a request. Default 65,536.
    pub max_text_bytes: usize,
    /// Most audio parts (WAV or units) in a request. Default 4.
    pub max_audio_parts: usize,
    /// Most seconds of WAV audio over all parts of a request (each clip is also held to the
    /// front-end's own limit). Default 60.
    pub max_audio_seconds: f64,
    /// Most unit ids over all `units` parts of a request. Default 16,384.
    pub max_units: usize,
    /// Most bytes of `leaf.reference`. Default 4,096.
    pub max_reference_bytes: usize,
    /// Most bytes of `leaf.task`. Default 256.
    pub max_task_bytes: usize,
    /// Most chat requests being read or served at once; more are answered 429. Default 64.
    pub max_concurrent_requests: usize,
    /// Longest a chat request may take, body upload included, in seconds; longer ones are
    /// cancelled and answered 504. Default 300.
    pub request_timeout_s: f64,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_tokens: 2048,
            max_messages: 64,
            max_text_bytes: 64 << 10,
            max_audio_parts: 4,
            max_audio_seconds: 60.0,
            max_units: 16_384,
            max_reference_bytes: 4096,
            max_task_bytes: 256,
            max_concurrent_requests: 64,
            request_timeout_s: 300.0,
        }
    }
}

/// Which cap a request exceeded, and by how much.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{what} is {value}, above the server's limit request_limits.{limit} = {max}")]
pub struct LimitExceeded {
    /// The field of [`RequestLimits`].
    pub limit: &'static str,
    /// What was measured (e.g. `"max_tokens"`, `"audio duration (s)"`).
    pub what: String,
    /// The measured value.
    pub value: String,
    /// The limit.
    pub max: String,
}

/// A request that cannot be checked or is over a cap.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// A cap was exceeded.
    #[error(transparent)]
    Exceeded(#[from] LimitExceeded),
    /// A WAV part's header is unreadable.
    #[error("messages[{message}].content[{part}]: {source}")]
    Audio {
        /// Message index.
        message: usize,
        /// Part index.
        part: usize,
        /// What the WAV reader said.
        source: crate::wav_header::WavHeaderError,
    },
}

fn over<T: std::fmt::Display>(limit: &'static str, what: &str, value: T, max: T) -> LimitExceeded {
    LimitExceeded {
        limit,
        what: what.to_string(),
        value: value.to_string(),
        max: max.to_string(),
    }
}

impl RequestLimits {
    /// Checks the limits themselves: every cap positive, the times finite.
    pub fn check(&self) -> Result<(), String> {
        let counts = [
            ("max_tokens", self.max_tokens),
            ("max_messages", self.max_messages),
            ("max_text_bytes", self.max_text_bytes),
            ("max_audio_parts", self.max_audio_parts),
            ("max_units", self.max_units),
            ("max_reference_bytes", self.max_reference_bytes),
            ("max_task_bytes", self.max_task_bytes),
            ("max_concurrent_requests", self.max_concurrent_requests),
        ];
        if let Some((name, _)) = counts.iter().find(|(_, v)| *v == 0) {
            return Err(format!("request_limits.{name} must be positive"));
        }
        for (name, v) in [
            ("max_audio_seconds", self.max_audio_seconds),
            ("request_timeout_s", self.request_timeout_s),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!(
                    "request_limits.{name} {v} must be a positive number"
                ));
            }
        }
        Ok(())
    }

    /// The request timeout.
    pub fn request_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.request_timeout_s)
    }

    /// Checks one request against every per-request cap, cheapest first. WAV parts are only
    /// read up to their headers.
    pub fn check_request(&self, req: &ChatRequest) -> Result<(), LimitError> {
        if let Some(n) = req.max_tokens {
            if n > self.max_tokens {
                return Err(over("max_tokens", "max_tokens", n, self.max_tokens).into());
            }
        }
        if req.messages.len() > self.max_messages {
            let n = req.messages.len();
            return Err(over(
                "max_messages",
                "the number of messages",
                n,
                self.max_messages,
            )
            .into());
        }
        let bytes = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        if bytes(&req.reference) > self.max_reference_bytes {
            let n = bytes(&req.reference);
            let max = self.max_reference_bytes;
            return Err(over("max_reference_bytes", "leaf.reference (bytes)", n, max).into());
        }
        if bytes(&req.task) > self.max_task_bytes {
            let n = bytes(&req.task);
            return Err(over(
                "max_task_bytes",
                "leaf.task (bytes)",
                n,
                self.max_task_bytes,
            )
            .into());
        }
        let parts = req
            .messages
            .iter()
            .enumerate()
            .flat_map(|(i, m)| m.content.iter().enumerate().map(move |(j, p)| (i, j, p)));
        let (mut text, mut audio_parts, mut units) = (0usize, 0usize, 0usize);
        let mut wavs = Vec::new();
        for (i, j, p) in parts {
            match p {
                Part::Text(t) => text += t.len(),
                Part::Units(u) => {
                    audio_parts += 1;
                    units += u.len();
                }
                Part::Wav(w) => {
                    audio_parts += 1;
                    wavs.push((i, j, w));
                }
            }
        }
        if text > self.max_text_bytes {
            let max = self.max_text_bytes;
            return Err(over("max_text_bytes", "the text (bytes)", text, max).into());
        }
        if audio_parts > self.max_audio_parts {
            let max = self.max_audio_parts;
            let what = "the number of audio parts";
            return Err(over("max_audio_parts", what, audio_parts, max).into());
        }
        if units > self.max_units {
            return Err(over("max_units", "the number of unit ids", units, self.max_units).into());
        }
        let mut seconds = 0.0;
        for (message, part, wav) in wavs {
            seconds += crate::wav_header::wav_seconds(wav).map_err(|source| LimitError::Audio {
                message,
                part,
                source,
            })?;
        }
        if seconds > self.max_audio_seconds {
            let what = "the audio duration (s)";
            return Err(over(
                "max_audio_seconds",
                what,
                format!("{seconds:.2}"),
                format!("{}", self.max_audio_seconds),
            )
            .into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::Message;

    fn wav(seconds: f64) -> Part {
        let n = (seconds * 8000.0) as usize;
        Part::Wav(crate::wav_header::pcm16_silence(n, 8000))
    }

    fn request(parts: Vec<Part>) -> ChatRequest {
        ChatRequest {
            messages: vec![Message {
                role: "user".into(),
                content: parts,
            }],
            ..Default::default()
        }
    }

    fn exceeded(r: Result<(), LimitError>) -> &'static str {
        match r {
            Err(LimitError::Exceeded(e)) => e.limit,
            other => panic!("expected a limit error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_zero_caps_are_not() {
        assert_eq!(RequestLimits::default().check(), Ok(()));
        let l = RequestLimits {
            max_audio_parts: 0,
            ..Default::default()
        };
        assert!(l.check().unwrap_err().contains("max_audio_parts"));
        let l = RequestLimits {
            request_timeout_s: f64::NAN,
            ..Default::default()
        };
        assert!(l.check().unwrap_err().contains("request_timeout_s"));
    }

    #[test]
    fn each_cap_is_named_when_exceeded() {
        let l = RequestLimits {
            max_tokens: 10,
            max_messages: 2,
            max_text_bytes: 8,
            max_audio_parts: 2,
            max_audio_seconds: 1.0,
            max_units: 5,
            max_reference_bytes: 4,
            max_task_bytes: 3,
            ..Default::default()
        };
        let ok = request(vec![Part::Text("hi".into())]);
        assert!(l.check_request(&ok).is_ok());
        let mut r = ok.clone();
        r.max_tokens = Some(11);
        assert_eq!(exceeded(l.check_request(&r)), "max_tokens");
        let mut r = ok.clone();
        r.messages = vec![r.messages[0].clone(); 3];
        assert_eq!(exceeded(l.check_request(&r)), "max_messages");
        let r = request(vec![Part::Text("123456789".into())]);
        assert_eq!(exceeded(l.check_request(&r)), "max_text_bytes");
        let r = request(vec![Part::Units(vec![1]); 3]);
        assert_eq!(exceeded(l.check_request(&r)), "max_audio_parts");
        let r = request(vec![Part::Units(vec![1; 6])]);
        assert_eq!(exceeded(l.check_request(&r)), "max_units");
        let r = request(vec![wav(0.75), wav(0.5)]);
        assert_eq!(exceeded(l.check_request(&r)), "max_audio_seconds");
        assert!(l.check_request(&request(vec![wav(0.5), wav(0.5)])).is_ok());
        let mut r = ok.clone();
        r.reference = Some("12345".into());
        assert_eq!(exceeded(l.check_request(&r)), "max_reference_bytes");
        let mut r = ok;
        r.task = Some("abcd".into());
        let e = l.check_request(&r).unwrap_err().to_string();
        assert!(e.contains("request_limits.max_task_bytes = 3"), "{e}");
        let r = request(vec![Part::Wav(b"RIFF....".to_vec())]);
        let e = l.check_request(&r).unwrap_err();
        assert!(
            matches!(
                e,
                LimitError::Audio {
                    message: 0,
                    part: 0,
                    ..
                }
            ),
            "{e}"
        );
    }
}
