//! The text tokenizer of the speech LM: byte-level BPE with the chat and unit tokens added.
//!
//! Files written next to the model, in the Hugging Face layout mistral.rs 0.8.1 loads:
//! - `tokenizer.json`: ByteLevel pre-tokenizer and decoder, a BPE model whose vocabulary is the
//!   256 byte symbols, the merges learned from the task texts, then the special tokens
//!   (`<|pad|>`, `<|bos|>`, `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|audio_start|>`,
//!   `<|audio_end|>`) and one `<|unit_N|>` per unit, all of them also added special tokens;
//! - `tokenizer_config.json`: `bos_token`, `eos_token`, `pad_token` and [`CHAT_TEMPLATE`], a
//!   ChatML template that renders an audio content part (`{"type": "audio", "units": [..]}`) as
//!   `<|audio_start|><|unit_a|><|unit_b|>..<|audio_end|>` where the part sits in the message.
//!
//! mistral.rs stops on `eos_token` plus `<|im_end|>` (the template uses it). Encoding goes
//! through the `tokenizers` crate (=0.21.4, the one mistral.rs uses) with the same call the
//! engine makes, so [`SpeechTokenizer::chat_prompt_ids`] are the ids the engine computes.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

use super::SpeechError;

/// Padding token.
pub const PAD: &str = "<|pad|>";
/// Beginning of a sequence; the chat template starts with it.
pub const BOS: &str = "<|bos|>";
/// End of a sequence (the name llguidance's token trie recognises as end of sequence).
pub const EOS: &str = "<|endoftext|>";
/// Opens a chat turn.
pub const IM_START: &str = "<|im_start|>";
/// Closes a chat turn; the model ends its answer with it.
pub const IM_END: &str = "<|im_end|>";
/// Opens the unit tokens of an audio clip.
pub const AUDIO_START: &str = "<|audio_start|>";
/// Closes the unit tokens of an audio clip.
pub const AUDIO_END: &str = "<|audio_end|>";

/// The special tokens in id order (they follow the byte symbols and merges).
pub const SPECIAL_TOKENS: [&str; 7] = [PAD, BOS, EOS, IM_START, IM_END, AUDIO_START, AUDIO_END];

/// Default cap on learned merges.
pub const DEFAULT_MERGES: usize = 384;

/// File names in a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// File name of the tokenizer configuration (chat template, bos/eos).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// The chat template (Jinja, rendered by minijinja in mistral.rs with `trim_blocks` and
/// `lstrip_blocks`). Every piece is an explicit expression with whitespace control, so the
/// rendering does not depend on those settings. [`render_chat`] is its Rust twin.
pub const CHAT_TEMPLATE: &str = concat!(
    "{{- bos_token -}}",
    "{%- for message in messages -%}",
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}",
    "{%- if message['content'] is string -%}",
    "{{- message['content'] -}}",
    "{%- else -%}",
    "{%- for part in message['content'] -%}",
    "{%- if part['type'] == 'text' -%}",
    "{{- part['text'] -}}",
    "{%- elif part['type'] == 'audio' -%}",
    "{{- '<|audio_start|>' -}}",
    "{%- for unit in part['units'] -%}",
    "{{- '<|unit_' ~ unit ~ '|>' -}}",
    "{%- endfor -%}",
    "{{- '<|audio_end|>' -}}",
    "{%- else -%}",
    "{{- raise_exception('unsupported content part type: ' ~ part['type']) -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- endif -%}",
    "{{- '<|im_end|>\\n' -}}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}",
    "{{- '<|im_start|>assistant\\n' -}}",
    "{%- endif -%}",
);

/// The token of unit `u`.
pub fn unit_token(u: u32) -> String {
    format!("<|unit_{u}|>")
}

/// One part of a message's content, serialised as mistral.rs content parts:
/// `{"type": "text", "text": ..}` or `{"type": "audio", "units": [..]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// Plain text.
    Text {
        /// The text.
        text: String,
    },
    /// An audio clip as its (collapsed) units.
    Audio {
        /// Unit ids, each below the tokenizer's unit count.
        units: Vec<u32>,
    },
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The parts, in order.
    pub content: Vec<ContentPart>,
}

impl ChatMessage {
    /// A user turn: the audio, then the instruction.
    pub fn user_audio(instruction: &str, units: &[u32]) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: vec![
                ContentPart::Audio {
                    units: units.to_vec(),
                },
                ContentPart::Text {
                    text: instruction.into(),
                },
            ],
        }
    }

    /// A text-only turn.
    pub fn text(role: &str, text: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: vec![ContentPart::Text { text: text.into() }],
        }
    }
}

/// Renders messages exactly as [`CHAT_TEMPLATE`] does.
pub fn render_chat(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let mut s = String::from(BOS);
    for m in messages {
        s.push_str(IM_START);
        s.push_str(&m.role);
        s.push('\n');
        for part in &m.content {
            match part {
                ContentPart::Text { text } => s.push_str(text),
                ContentPart::Audio { units } => {
                    s.push_str(AUDIO_START);
                    for u in units {
                        // Writing to a String cannot fail.
                        let _ = write!(s, "<|unit_{u}|>");
                    }
                    s.push_str(AUDIO_END);
                }
            }
        }
        s.push_str(IM_END);
        s.push('\n');
    }
    if add_generation_prompt {
        s.push_str(IM_START);
        s.push_str("assistant\n");
    }
    s
}

/// Ids of the special tokens and where the units start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialIds {
    /// `<|pad|>`.
    pub pad: u32,
    /// `<|bos|>`.
    pub bos: u32,
    /// `<|endoftext|>`.
    pub eos: u32,
    /// `<|im_start|>`.
    pub im_start: u32,
    /// `<|im_end|>`.
    pub im_end: u32,
    /// `<|audio_start|>`.
    pub audio_start: u32,
    /// `<|audio_end|>`.
    pub audio_end: u32,
    /// Id of `<|unit_0|>`; unit `u` is `unit_base + u`.
    pub unit_base: u32,
    /// Number of unit tokens.
    pub n_units: u32,
}

/// GPT-2's byte-to-character table used by the ByteLevel pre-tokenizer.
pub fn byte_to_char() -> [char; 256] {
    let mut printable: Vec<u8> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.iter().map(|&b| u32::from(b)).collect();
    let mut n = 0;
    for b in 0..=255u8 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = ['\0'; 256];
    for (b, c) in printable.into_iter().zip(chars) {
        // All values are below 0x200, valid scalar values.
        table[usize::from(b)] = char::from_u32(c).unwrap_or('\0');
    }
    table
}

fn byte_level_words(text: &str) -> Result<Vec<String>, SpeechError> {
    let mut pts = PreTokenizedString::from(text);
    ByteLevel::new(false, true, true)
        .pre_tokenize(&mut pts)
        .map_err(|e| SpeechError::Tokenizer(format!("pre-tokenizing {text:?}: {e}")))?;
    Ok(pts
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_string())
        .collect())
}

/// Learns up to `max_merges` BPE merges from `texts` (ByteLevel pre-tokenised; every distinct
/// word counted once per occurrence). Each step merges the most frequent adjacent pair, ties
/// broken by the lexicographically smallest pair, so the result is deterministic.
pub fn learn_merges(
    texts: &[String],
    max_merges: usize,
) -> Result<Vec<(String, String)>, SpeechError> {
    let mut words: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    for t in texts {
        for w in byte_level_words(t)? {
            let symbols: Vec<String> = w.chars().map(String::from).collect();
            *words.entry(symbols).or_default() += 1;
        }
    }
    let mut words: Vec<(Vec<String>, u64)> = words.into_iter().collect();
    let mut merges = Vec::new();
    while merges.len() < max_merges {
        let best: Option<(String, String)> = {
            let mut pairs: BTreeMap<(&str, &str), u64> = BTreeMap::new();
            for (w, c) in &words {
                for p in w.windows(2) {
                    *pairs.entry((&p[0], &p[1])).or_default() += c;
                }
            }
            // Highest count; among equals the first (smallest) pair in BTreeMap order.
            let mut best: Option<((&str, &str), u64)> = None;
            for (&p, &c) in &pairs {
                if best.is_none_or(|(_, bc)| c > bc) {
                    best = Some((p, c));
                }
            }
            best.map(|((a, b), _)| (a.to_string(), b.to_string()))
        };
        let Some((a, b)) = best else { break };
        let joined = format!("{a}{b}");
        for (w, _) in &mut words {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == a && w[i + 1] == b {
                    w[i] = joined.clone();
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
        merges.push((a, b));
    }
    Ok(merges)
}

/// The tokenizer plus the ids the trainer and the prompt builder need.
#[derive(Clone)]
pub struct SpeechTokenizer {
    inner: Tokenizer,
    json: String,
    ids: SpecialIds,
}

impl std::fmt::Debug for SpeechTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpeechTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("ids", &self.ids)
            .finish_non_exhaustive()
    }
}

fn tok_err(what: &str) -> impl Fn(tokenizers::Error) -> SpeechError + '_ {
    move |e| SpeechError::Tokenizer(format!("{what}: {e}"))
}

impl SpeechTokenizer {
    /// Builds the tokenizer: byte symbols, `merges`, special tokens, `n_units` unit tokens.
    pub fn build(merges: &[(String, String)], n_units: usize) -> Result<Self, SpeechError> {
        if n_units == 0 {
            return Err(SpeechError::Tokenizer("need at least one unit".into()));
        }
        let table = byte_to_char();
        let mut vocab: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        let mut index: HashMap<String, u32> = vocab
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        let mut merge_list = Vec::with_capacity(merges.len());
        for (a, b) in merges {
            if !index.contains_key(a) || !index.contains_key(b) {
                return Err(SpeechError::Tokenizer(format!(
                    "merge ({a:?}, {b:?}) uses a symbol not in the vocabulary"
                )));
            }
            let joined = format!("{a}{b}");
            if !index.contains_key(&joined) {
                index.insert(joined.clone(), vocab.len() as u32);
                vocab.push(joined);
            }
            merge_list.push(json!([a, b]));
        }
        let mut added = Vec::new();
        let specials = SPECIAL_TOKENS
            .iter()
            .map(|s| s.to_string())
            .chain((0..n_units as u32).map(unit_token));
        for tok in specials {
            let id = vocab.len() as u32;
            if index.insert(tok.clone(), id).is_some() {
                return Err(SpeechError::Tokenizer(format!("{tok} is already a token")));
            }
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
            vocab.push(tok);
        }
        let vocab_json: serde_json::Map<String, Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), json!(i)))
            .collect();
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {
                "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                "use_regex": true
            },
            "post_processor": null,
            "decoder": {
                "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                "use_regex": true
            },
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab_json, "merges": merge_list
            }
        });
        let json = serde_json::to_string_pretty(&doc)
            .map_err(|e| SpeechError::Tokenizer(format!("serialising: {e}")))?;
        Self::from_json(&json)
    }

    /// The tokenizer of the spoken-digit tasks: merges learned from
    /// [`super::tasks::task_texts`] (at most [`DEFAULT_MERGES`]) and `n_units` units.
    pub fn for_tasks(n_units: usize) -> Result<Self, SpeechError> {
        let merges = learn_merges(&super::tasks::task_texts(), DEFAULT_MERGES)?;
        Self::build(&merges, n_units)
    }

    /// Parses a `tokenizer.json` and finds the special and unit tokens (units must be
    /// contiguous ids starting at `<|unit_0|>`).
    pub fn from_json(json: &str) -> Result<Self, SpeechError> {
        let inner: Tokenizer = json.parse().map_err(tok_err("parsing tokenizer.json"))?;
        let vocab = inner.get_vocab(true);
        let id = |tok: &str| {
            vocab
                .get(tok)
                .copied()
                .ok_or_else(|| SpeechError::Tokenizer(format!("tokenizer.json has no {tok} token")))
        };
        let unit_base = id(&unit_token(0))?;
        let mut n_units = 0u32;
        while let Some(&i) = vocab.get(&unit_token(n_units)) {
            if i != unit_base + n_units {
                return Err(SpeechError::Tokenizer(format!(
                    "{} has id {i}, expected {} (unit ids must be contiguous)",
                    unit_token(n_units),
                    unit_base + n_units
                )));
            }
            n_units += 1;
        }
        let ids = SpecialIds {
            pad: id(PAD)?,
            bos: id(BOS)?,
            eos: id(EOS)?,
            im_start: id(IM_START)?,
            im_end: id(IM_END)?,
            audio_start: id(AUDIO_START)?,
            audio_end: id(AUDIO_END)?,
            unit_base,
            n_units,
        };
        Ok(Self {
            inner,
            json: json.to_string(),
            ids,
        })
    }

    /// The `tokenizer_config.json` mistral.rs reads (bos/eos/pad and the chat template).
    pub fn tokenizer_config_json(&self) -> String {
        let doc = json!({
            "add_bos_token": false,
            "add_eos_token": false,
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": false,
            "model_max_length": 4096,
            "tokenizer_class": "PreTrainedTokenizerFast"
        });
        // A json! value always serialises.
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), SpeechError> {
        for (name, text) in [
            (TOKENIZER_FILE, self.json.clone()),
            (TOKENIZER_CONFIG_FILE, self.tokenizer_config_json()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|source| SpeechError::Io { path, source })?;
        }
        Ok(())
    }

    /// Reads both files from `dir` and validates the configuration against the vocabulary
    /// (see [`validate_tokenizer_config`]).
    pub fn load(dir: &Path) -> Result<Self, SpeechError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| SpeechError::Io { path, source })
        };
        let tok = Self::from_json(&read(TOKENIZER_FILE)?)?;
        validate_tokenizer_config(&read(TOKENIZER_CONFIG_FILE)?, &tok.inner)?;
        Ok(tok)
    }

    /// The `tokenizer.json` text.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Special token ids and the unit range.
    pub fn ids(&self) -> &SpecialIds {
        &self.ids
    }

    /// Number of ids (bytes, merges, specials and units).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Number of unit tokens.
    pub fn n_units(&self) -> usize {
        self.ids.n_units as usize
    }

    /// Id of unit `u` (`None` when `u >= n_units`).
    pub fn unit_id(&self, u: u32) -> Option<u32> {
        (u < self.ids.n_units).then(|| self.ids.unit_base + u)
    }

    /// The unit an id stands for, if it is a unit token.
    pub fn unit_of(&self, id: u32) -> Option<u32> {
        id.checked_sub(self.ids.unit_base)
            .filter(|u| *u < self.ids.n_units)
    }

    /// Ids of `text` exactly as mistral.rs encodes a rendered prompt (`encode_fast`, special
    /// tokens on): special-token strings in the text become their single ids.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, SpeechError> {
        Ok(self
            .inner
            .encode_fast(text, true)
            .map_err(tok_err("encoding"))?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`; with `skip_special` the special and unit tokens are left out (as in
    /// mistral.rs responses). Fails on an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, SpeechError> {
        let n = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= n) {
            return Err(SpeechError::Tokenizer(format!(
                "id {bad} is outside the vocabulary of {n}"
            )));
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(tok_err("decoding"))
    }

    /// Ids of a rendered chat (see [`render_chat`]). Fails on a unit beyond the vocabulary.
    pub fn chat_ids(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, SpeechError> {
        for m in messages {
            for part in &m.content {
                if let ContentPart::Audio { units } = part {
                    if let Some(u) = units.iter().find(|&&u| u >= self.ids.n_units) {
                        return Err(SpeechError::Tokenizer(format!(
                            "unit {u} is outside the {} unit tokens",
                            self.ids.n_units
                        )));
                    }
                }
            }
        }
        self.encode_text(&render_chat(messages, add_generation_prompt))
    }

    /// The prompt of one task: a user turn holding the audio units then the instruction, and the
    /// assistant header; the ids mistral.rs computes for the same chat request.
    pub fn chat_prompt_ids(
        &self,
        instruction: &str,
        units: &[u32],
    ) -> Result<Vec<u32>, SpeechError> {
        self.chat_ids(&[ChatMessage::user_audio(instruction, units)], true)
    }

    /// The ids the model should generate after the prompt: the answer, then `<|im_end|>`.
    pub fn answer_ids(&self, answer: &str) -> Result<Vec<u32>, SpeechError> {
        let mut ids = self.encode_text(answer)?;
        ids.push(self.ids.im_end);
        Ok(ids)
    }

    /// The ids that end generation in mistral.rs: `eos_token` and `<|im_end|>`.
    pub fn stop_ids(&self) -> [u32; 2] {
        [self.ids.eos, self.ids.im_end]
    }
}

/// Checks a `tokenizer_config.json` the way mistral.rs's loader would need it, so a bad file is
/// an error here instead of a panic there: valid JSON, a string `chat_template` that uses
/// `<|im_end|>`, and `bos_token`, `eos_token` (and `pad_token` if given) present in the vocabulary
/// (as strings or `{"content": ..}` objects).
pub fn validate_tokenizer_config(
    config_json: &str,
    tokenizer: &Tokenizer,
) -> Result<(), SpeechError> {
    let bad = |reason: String| SpeechError::Tokenizer(format!("tokenizer_config.json: {reason}"));
    let doc: Value = serde_json::from_str(config_json).map_err(|e| bad(e.to_string()))?;
    let vocab = tokenizer.get_vocab(true);
    let token = |key: &str, required: bool| -> Result<(), SpeechError> {
        let v = match doc.get(key) {
            None | Some(Value::Null) if !required => return Ok(()),
            None | Some(Value::Null) => return Err(bad(format!("{key} is missing"))),
            Some(v) => v,
        };
        let s = match v {
            Value::String(s) => s.as_str(),
            Value::Object(o) => o
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("{key} has no string content")))?,
            _ => return Err(bad(format!("{key} is neither a string nor an object"))),
        };
        if !vocab.contains_key(s) {
            return Err(bad(format!("{key} {s:?} is not in the vocabulary")));
        }
        Ok(())
    };
    token("bos_token", true)?;
    token("eos_token", true)?;
    token("pad_token", false)?;
    let template = doc
        .get("chat_template")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("chat_template is missing or not a string".into()))?;
    if !template.contains(IM_END) || !vocab.contains_key(IM_END) {
        return Err(bad(format!("the chat template must use {IM_END}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_matches_tokenizers_alphabet() {
        let table = byte_to_char();
        let ours: std::collections::HashSet<char> = table.iter().copied().collect();
        let theirs: std::collections::HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        assert_eq!(ours, theirs);
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'a' as usize], 'a');
    }

    #[test]
    fn merges_hand_checked() {
        // "aab aab ab": words "aab", "Ġaab", "Ġab". Pairs: (a,a) 2, (a,b) 3, (Ġ,a) 2.
        let m = learn_merges(&["aab aab ab".to_string()], 2).unwrap();
        assert_eq!(m[0], ("a".to_string(), "b".to_string()));
        // Then: "a ab" x1, "Ġ a ab" x1, "Ġ ab" x1 -> (a,ab) 2, (Ġ,a) 1, (Ġ,ab) 1.
        assert_eq!(m[1], ("a".to_string(), "ab".to_string()));
    }

    #[test]
    fn render_hand_checked() {
        let s = render_chat(&[ChatMessage::user_audio("Hi.", &[3, 17])], true);
        assert_eq!(
            s,
            "<|bos|><|im_start|>user\n<|audio_start|><|unit_3|><|unit_17|><|audio_end|>Hi.\
             <|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
