//! A model's own chat format: its chat template and stop tokens, read from
//! `tokenizer_config.json` and `generation_config.json`, rendered and tokenized exactly as
//! mistral.rs 0.8.1 does it, so that training sees the very prompt ids the engine served.
//!
//! What mistral.rs does, and this module repeats (`pipeline/chat_template.rs`,
//! `pipeline/processing.rs`, `pipeline/paths.rs` of mistralrs-core 0.8.1):
//!
//! * the template is `chat_template` (a string, or the `default` entry of a list of named
//!   templates), with `[::-1]` rewritten to `|reverse`, `range(x, -1, -1)` to
//!   `range(x)|reverse`, GLM's `meta` lines and SmolLM3's `{% generation %}` tags removed;
//! * minijinja with `trim_blocks`, `lstrip_blocks`, Python string methods (pycompat),
//!   `raise_exception`, a `tojson` filter that escapes `<`, `>`, `&`, `'`, and `strftime_now`;
//! * the context: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `unk_token`,
//!   `date_string` (today, `"%d, %B, %Y"`, UTC), `enable_thinking` (true),
//!   `reasoning_effort` (`"medium"`);
//! * the rendered text is encoded with `add_special_tokens = true` (so a tokenizer whose
//!   post-processor adds a BOS adds it even when the template wrote one);
//! * stop tokens: `eos_token`, then each of `<|im_end|>`, `<end_of_turn>`, `<|end_of_text|>`,
//!   `<|end|>`, `<|eot_id|>`, `<|message|>`, `<|start|>`, `<|channel|>` that the vocabulary
//!   holds and the template uses, then the ids of `generation_config.json`'s `eos_token_id`
//!   (one id or a list).
//!
//! The files that would make mistral.rs's loader panic (a token missing from the vocabulary, a
//! field of the wrong type, an eos id the tokenizer cannot decode) are errors here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::Tokenizer;

/// `tokenizer_config.json`.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// `generation_config.json`.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Tokens mistral.rs 0.8.1 adds to the stop set when the vocabulary holds them and the
/// template uses them (`SUPPORTED_ALTERNATE_EOS`).
pub const ALTERNATE_EOS: [&str; 8] = [
    "<|im_end|>",
    "<end_of_turn>",
    "<|end_of_text|>",
    "<|end|>",
    "<|eot_id|>",
    "<|message|>",
    "<|start|>",
    "<|channel|>",
];

/// What went wrong reading or rendering a chat format.
#[derive(Debug, thiserror::Error)]
pub enum ChatFormatError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is malformed or names something the tokenizer lacks.
    #[error("{file}: {reason}")]
    Invalid {
        /// The file (or a short name for in-memory text).
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The template failed to render these messages.
    #[error("chat template: {0}")]
    Render(String),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// One chat message (`role` and text `content`) as the template sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTurn {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatTurn {
    /// A message of `role` with `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatTurn {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Mirrors the field types of mistral.rs 0.8.1's `ChatTemplate`, whose deserialisation panics
/// inside the loader when one of them has another type.
#[allow(dead_code)]
#[derive(Deserialize)]
struct EngineTokenizerConfig {
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    added_tokens_decoder: Option<HashMap<String, EngineAddedToken>>,
    additional_special_tokens: Option<Vec<String>>,
    clean_up_tokenization_spaces: Option<bool>,
    device_map: Option<String>,
    legacy: Option<bool>,
    model_max_length: Option<f64>,
    sp_model_kwargs: Option<HashMap<String, String>>,
    spaces_between_special_tokens: Option<bool>,
    tokenizer_class: Option<String>,
    truncation_size: Option<String>,
    use_default_system_prompt: Option<bool>,
}

#[allow(dead_code)]
#[derive(Deserialize)]
struct EngineAddedToken {
    content: String,
    lstrip: bool,
    normalized: bool,
    rstrip: bool,
    single_word: bool,
    special: Option<bool>,
}

/// A model's chat format: template, special tokens and stop ids, with the tokenizer that turns
/// a rendered prompt into ids.
#[derive(Debug, Clone)]
pub struct ChatFormat {
    template: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    unk_token: Option<String>,
    stop_ids: Vec<u32>,
    tokenizer: Arc<Tokenizer>,
}

impl ChatFormat {
    /// Reads `tokenizer_config.json` (required, with a `chat_template`) and
    /// `generation_config.json` (optional) from a model directory.
    pub fn from_dir(dir: &Path, tokenizer: Arc<Tokenizer>) -> Result<Self, ChatFormatError> {
        let read = |path: PathBuf| {
            std::fs::read_to_string(&path).map_err(|source| ChatFormatError::Io { path, source })
        };
        let cfg_path = dir.join(TOKENIZER_CONFIG_FILE);
        let cfg = read(cfg_path.clone())?;
        let gen_path = dir.join(GENERATION_CONFIG_FILE);
        let generation = if gen_path.is_file() {
            Some(read(gen_path.clone())?)
        } else {
            None
        };
        Self::from_json(&cfg, generation.as_deref(), tokenizer).map_err(|e| match e {
            ChatFormatError::Invalid { file, reason } => ChatFormatError::Invalid {
                file: dir.join(file).display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Builds the format from the text of `tokenizer_config.json` and, if the model has one,
    /// `generation_config.json`.
    pub fn from_json(
        tokenizer_config: &str,
        generation_config: Option<&str>,
        tokenizer: Arc<Tokenizer>,
    ) -> Result<Self, ChatFormatError> {
        let bad = |file: &str, reason: String| ChatFormatError::Invalid {
            file: file.to_string(),
            reason,
        };
        let cfg_bad = |reason: String| bad(TOKENIZER_CONFIG_FILE, reason);
        let doc: Value =
            serde_json::from_str(tokenizer_config).map_err(|e| cfg_bad(e.to_string()))?;
        if !doc.is_object() {
            return Err(cfg_bad("not a JSON object".into()));
        }
        serde_json::from_value::<EngineTokenizerConfig>(doc.clone())
            .map_err(|e| cfg_bad(format!("mistral.rs cannot read it: {e}")))?;
        let vocab = tokenizer.get_vocab(true);
        let token = |key: &str| -> Result<Option<String>, ChatFormatError> {
            let s = match doc.get(key) {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    _ => return Err(cfg_bad(format!("{key} has no string content"))),
                },
                Some(_) => return Err(cfg_bad(format!("{key} is neither a string nor an object"))),
            };
            Ok(Some(s))
        };
        let bos_token = token("bos_token")?;
        let eos_token = token("eos_token")?;
        let unk_token = token("unk_token")?;
        token("pad_token")?;
        let template = select_template(doc.get("chat_template")).map_err(cfg_bad)?;

        // The stop set, in mistral.rs's order.
        let mut stop_tokens: Vec<String> = eos_token.iter().cloned().collect();
        for alt in ALTERNATE_EOS {
            if vocab.contains_key(alt) && template.contains(alt) {
                stop_tokens.push(alt.to_string());
            }
        }
        if let Some(text) = generation_config {
            let gen_bad = |reason: String| bad(GENERATION_CONFIG_FILE, reason);
            let gen: Value = serde_json::from_str(text).map_err(|e| gen_bad(e.to_string()))?;
            let ids = match gen.get("eos_token_id") {
                None | Some(Value::Null) => Vec::new(),
                Some(v) => serde_json::from_value::<OneOrMany>(v.clone())
                    .map_err(|_| gen_bad("eos_token_id must be an id or a list of ids".into()))?
                    .into_vec(),
            };
            for id in ids {
                if tokenizer.id_to_token(id).is_none() {
                    return Err(gen_bad(format!(
                        "eos_token_id {id} is not in the vocabulary"
                    )));
                }
                let s = tokenizer
                    .decode(&[id], false)
                    .map_err(|e| gen_bad(format!("eos_token_id {id} cannot be decoded: {e}")))?;
                if !stop_tokens.contains(&s) {
                    stop_tokens.push(s);
                }
            }
        }
        let mut stop_ids = Vec::with_capacity(stop_tokens.len());
        for s in &stop_tokens {
            let id = *vocab
                .get(s)
                .ok_or_else(|| cfg_bad(format!("stop token {s:?} is not in the vocabulary")))?;
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        if stop_ids.is_empty() {
            return Err(cfg_bad(
                "no stop token: give eos_token (or eos_token_id in generation_config.json)".into(),
            ));
        }
        let format = ChatFormat {
            template,
            bos_token,
            eos_token,
            unk_token,
            stop_ids,
            tokenizer,
        };
        // A template that does not compile is an error now, not at the first request.
        format.environment()?;
        Ok(format)
    }

    /// The template as rendered (after mistral.rs's rewrites).
    pub fn template(&self) -> &str {
        &self.template
    }

    /// `bos_token`, if the config names one.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// `eos_token`, if the config names one.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The ids that end generation, in mistral.rs's order (the first is `eos_token`'s).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    fn environment(&self) -> Result<minijinja::Environment<'static>, ChatFormatError> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_lstrip_blocks(true);
        env.set_trim_blocks(true);
        env.add_template_owned("chat_template", self.template.clone())
            .map_err(|e| ChatFormatError::Render(e.to_string()))?;
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_filter("tojson", tojson);
        env.add_function(
            "strftime_now",
            |fmt: String| -> Result<String, minijinja::Error> { strftime(&fmt, now_utc()) },
        );
        Ok(env)
    }

    /// The prompt text for `messages`, as mistral.rs renders it.
    pub fn render(
        &self,
        messages: &[ChatTurn],
        add_generation_prompt: bool,
    ) -> Result<String, ChatFormatError> {
        let env = self.environment()?;
        let tmpl = env
            .get_template("chat_template")
            .map_err(|e| ChatFormatError::Render(e.to_string()))?;
        let date_string = strftime("%d, %B, %Y", now_utc())
            .map_err(|e| ChatFormatError::Render(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            unk_token => self.unk_token,
            date_string => date_string,
            enable_thinking => true,
            reasoning_effort => "medium",
        })
        .map_err(|e| ChatFormatError::Render(format!("{e:#}")))
    }

    /// The prompt ids mistral.rs computes for `messages` (the rendered text encoded with
    /// special tokens added).
    pub fn prompt_ids(
        &self,
        messages: &[ChatTurn],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, ChatFormatError> {
        let text = self.render(messages, add_generation_prompt)?;
        self.encode(&text, true)
    }

    /// `text` encoded by the model's tokenizer, with or without its special tokens added.
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ChatFormatError> {
        let enc = self
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|e| ChatFormatError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The ids the model generates when it answers `answer`: the assistant turn that the
    /// template renders for it, cut after its first stop id (the answer's tokens in the
    /// context the template puts them in, then the end of the turn). Rendered as the
    /// difference between a one-turn conversation with and without the answer; when the
    /// template does not extend the prompt that way, the answer encoded on its own plus the
    /// first stop id.
    pub fn answer_ids(&self, answer: &str) -> Result<Vec<u32>, ChatFormatError> {
        let user = [ChatTurn::new("user", "?")];
        let both = [
            ChatTurn::new("user", "?"),
            ChatTurn::new("assistant", answer),
        ];
        let prompt = self.prompt_ids(&user, true)?;
        let full = self.prompt_ids(&both, false)?;
        let stop = |id: &u32| self.stop_ids.contains(id);
        let mut ids = match full.strip_prefix(prompt.as_slice()) {
            Some(tail) if tail.iter().any(stop) => tail.to_vec(),
            _ => self.encode(answer, false)?,
        };
        match ids.iter().position(stop) {
            Some(end) => ids.truncate(end + 1),
            None => ids.extend(self.stop_ids.first()),
        }
        Ok(ids)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(id) => vec![id],
            OneOrMany::Many(ids) => ids,
        }
    }
}

/// The template mistral.rs picks without tools (a string, or the `default` entry of a list of
/// named templates), with its rewrites applied.
fn select_template(value: Option<&Value>) -> Result<String, String> {
    let raw = match value {
        None | Some(Value::Null) => return Err("chat_template is missing".into()),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(list)) => {
            let mut found = None;
            for entry in list {
                let obj = entry
                    .as_object()
                    .ok_or("chat_template list entries must be objects")?;
                let text = |key: &str| obj.get(key).and_then(Value::as_str).map(str::to_string);
                if let Some(name) = obj.get("name").and_then(Value::as_str) {
                    found = text("template");
                    if name == "default" {
                        break;
                    }
                } else if let Some(t) = text("default") {
                    found = Some(t);
                    break;
                }
            }
            found.ok_or("chat_template has no \"default\" template")?
        }
        Some(_) => return Err("chat_template must be a string or a list".into()),
    };
    let mut t = reverse_ranges(&raw.replace("[::-1]", "|reverse"));
    if t.contains("{{ meta }}") {
        t = t.replace("{%- set meta = message.get(\"metadata\", \"\") %}", "");
        t = t.replace("{{ meta }}", "");
    }
    if t.contains("{% generation %}") && t.contains("{% endgeneration %}") {
        t = t.replace("{% generation %}", "");
        t = t.replace("{% endgeneration %}", "");
    }
    Ok(t)
}

/// mistral.rs's rewrite of `range(EXPR, -1, -1)` (regex
/// `range\((?P<expr>[^,]+),\s*-1,\s*-1\)`) into `range(EXPR)|reverse`.
fn reverse_ranges(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    let mut rest = t;
    while let Some(pos) = rest.find("range(") {
        let after = &rest[pos + "range(".len()..];
        let matched = after.find(',').filter(|&c| c > 0).and_then(|comma| {
            let expr = &after[..comma];
            let tail = after[comma + 1..].trim_start();
            let tail = tail.strip_prefix("-1,")?.trim_start();
            let tail = tail.strip_prefix("-1)")?;
            Some((expr, after.len() - tail.len()))
        });
        match matched {
            Some((expr, consumed)) => {
                out.push_str(&rest[..pos]);
                out.push_str(&format!("range({expr})|reverse"));
                rest = &after[consumed..];
            }
            None => {
                out.push_str(&rest[..pos + 1]);
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// mistral.rs's `tojson` filter: JSON (pretty with `indent`), then `<`, `>`, `&`, `'` escaped.
fn tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> Result<minijinja::Value, minijinja::Error> {
    let err = |e: String| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            "cannot serialize to JSON",
        )
        .with_source(std::io::Error::other(e))
    };
    let text = if let Ok(indent) = kwargs.get::<usize>("indent") {
        let mut buf = Vec::new();
        let pad = b" ".repeat(indent);
        let formatter = serde_json::ser::PrettyFormatter::with_indent(&pad);
        let mut ser = serde_json::Serializer::with_formatter(&mut buf, formatter);
        value.serialize(&mut ser).map_err(|e| err(e.to_string()))?;
        String::from_utf8(buf).map_err(|e| err(e.to_string()))?
    } else {
        serde_json::to_string(&value).map_err(|e| err(e.to_string()))?
    };
    let mut rv = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => rv.push_str("\\u003c"),
            '>' => rv.push_str("\\u003e"),
            '&' => rv.push_str("\\u0026"),
            '\'' => rv.push_str("\\u0027"),
            _ => rv.push(c),
        }
    }
    Ok(minijinja::Value::from_safe_string(rv))
}

/// A UTC time of day and date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UtcTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

fn now_utc() -> UtcTime {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    utc_from_unix(secs)
}

/// Civil date from Unix seconds (Howard Hinnant's `civil_from_days`).
fn utc_from_unix(secs: i64) -> UtcTime {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    UtcTime {
        year,
        month,
        day,
        hour: (tod / 3600) as u32,
        minute: (tod % 3600 / 60) as u32,
        second: (tod % 60) as u32,
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// The subset of chrono's `strftime` that chat templates use (`%d %m %Y %y %B %b %H %M %S %e
/// %%`); any other specifier is an error.
fn strftime(fmt: &str, t: UtcTime) -> Result<String, minijinja::Error> {
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let month = MONTHS[(t.month - 1) as usize];
        match chars.next() {
            Some('d') => out.push_str(&format!("{:02}", t.day)),
            Some('e') => out.push_str(&format!("{:>2}", t.day)),
            Some('m') => out.push_str(&format!("{:02}", t.month)),
            Some('Y') => out.push_str(&t.year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", t.year.rem_euclid(100))),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('H') => out.push_str(&format!("{:02}", t.hour)),
            Some('M') => out.push_str(&format!("{:02}", t.minute)),
            Some('S') => out.push_str(&format!("{:02}", t.second)),
            Some('%') => out.push('%'),
            other => {
                return Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported format %{}", other.unwrap_or(' ')),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_ranges_matches_the_engine_regex() {
        assert_eq!(
            reverse_ranges("{% for i in range(messages|length - 1, -1, -1) %}"),
            "{% for i in range(messages|length - 1)|reverse %}"
        );
        assert_eq!(
            reverse_ranges("range(3, -1,  -1) range(2)"),
            "range(3)|reverse range(2)"
        );
        assert_eq!(reverse_ranges("range(a, b, -1)"), "range(a, b, -1)");
        assert_eq!(reverse_ranges("range(, -1, -1)"), "range(, -1, -1)");
    }

    #[test]
    fn civil_dates() {
        let t = utc_from_unix(0);
        assert_eq!((t.year, t.month, t.day), (1970, 1, 1));
        // 2024-02-29 12:34:56 UTC
        let t = utc_from_unix(1_709_210_096);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2024, 2, 29, 12, 34, 56)
        );
        assert_eq!(strftime("%d, %B, %Y", t).unwrap(), "29, February, 2024");
        assert_eq!(strftime("%d %b %Y", t).unwrap(), "29 Feb 2024");
        assert!(strftime("%Q", t).is_err());
    }

    /// The speech workload's tokenizer and the chat format read from the directory it saves.
    #[cfg(feature = "speech")]
    fn speech_chatml() -> (crate::speech::tokenizer::SpeechTokenizer, ChatFormat) {
        let tok = crate::speech::tokenizer::SpeechTokenizer::build(&[], 8).unwrap();
        let dir = tempfile::tempdir().unwrap();
        tok.save(dir.path()).unwrap();
        let format = ChatFormat::from_dir(dir.path(), Arc::new(tok.inner().clone())).unwrap();
        (tok, format)
    }

    #[cfg(feature = "speech")]
    #[test]
    fn the_speech_workloads_chatml_renders_like_its_own_renderer() {
        use crate::speech::tokenizer::ChatMessage;
        let (tok, format) = speech_chatml();
        let turns = [
            ChatTurn::new("system", "Be brief."),
            ChatTurn::new("user", "Say <|unit_3|> seven."),
        ];
        let theirs: Vec<ChatMessage> = turns
            .iter()
            .map(|t| ChatMessage::text(&t.role, &t.content))
            .collect();
        for gen in [true, false] {
            assert_eq!(
                format.prompt_ids(&turns, gen).unwrap(),
                tok.chat_ids(&theirs, gen).unwrap()
            );
        }
        assert_eq!(format.stop_ids(), [tok.ids().eos, tok.ids().im_end]);
    }

    #[cfg(feature = "speech")]
    #[test]
    fn answer_ids_are_what_the_model_is_trained_to_generate() {
        let (tok, format) = speech_chatml();
        for answer in [
            "seven three nine",
            "nineteen",
            "sieben plus fünf ist zwölf",
            "",
        ] {
            assert_eq!(
                format.answer_ids(answer).unwrap(),
                tok.answer_ids(answer).unwrap(),
                "{answer:?}"
            );
        }
        // A template that ignores the assistant turn: the answer encoded alone, then the
        // first stop id (eos here).
        let plain = ChatFormat::from_json(
            &json_text(
                &[("eos_token", "\"<|endoftext|>\"")],
                "{{ messages[0]['content'] }}",
            ),
            None,
            Arc::new(tok.inner().clone()),
        )
        .unwrap();
        let mut expect = tok.encode_text("seven").unwrap();
        expect.push(tok.ids().eos);
        assert_eq!(plain.answer_ids("seven").unwrap(), expect);
    }

    #[cfg(feature = "speech")]
    #[test]
    fn bad_configs_are_errors_not_panics() {
        use crate::speech::tokenizer::SpeechTokenizer;
        let tok = Arc::new(SpeechTokenizer::build(&[], 4).unwrap().inner().clone());
        let t = "{{ messages[0]['content'] }}";
        let cases = [
            (
                json_text(&[("eos_token", "\"<|nope|>\"")], t),
                None,
                "not in the vocabulary",
            ),
            (
                json_text(&[("eos_token", "3")], t),
                None,
                "neither a string",
            ),
            (
                json_text(
                    &[
                        ("eos_token", "\"<|endoftext|>\""),
                        ("model_max_length", "\"x\""),
                    ],
                    t,
                ),
                None,
                "mistral.rs cannot read",
            ),
            (
                "{\"eos_token\": \"<|endoftext|>\"}".to_string(),
                None,
                "chat_template is missing",
            ),
            (
                json_text(&[("eos_token", "\"<|endoftext|>\"")], "{% for %}"),
                None,
                "chat template",
            ),
            (json_text(&[], t), None, "no stop token"),
            (
                json_text(&[], t),
                Some("{\"eos_token_id\": \"x\"}"),
                "eos_token_id",
            ),
            (
                json_text(&[], t),
                Some("{\"eos_token_id\": 99999}"),
                "99999",
            ),
        ];
        for (cfg, gen, want) in cases {
            let err = ChatFormat::from_json(&cfg, gen, tok.clone())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
        // generation_config.json alone can name the stop tokens.
        let f = ChatFormat::from_json(
            &json_text(&[], t),
            Some("{\"eos_token_id\": [97, 98]}"),
            tok,
        )
        .unwrap();
        assert_eq!(f.stop_ids(), [97, 98]);
    }

    fn json_text(fields: &[(&str, &str)], template: &str) -> String {
        let mut s = format!(
            "{{\"chat_template\": {}",
            serde_json::to_string(template).unwrap()
        );
        for (k, v) in fields {
            s.push_str(&format!(", \"{k}\": {v}"));
        }
        s.push('}');
        s
    }

    #[test]
    fn named_template_lists_pick_default() {
        let v = serde_json::json!([
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"}
        ]);
        assert_eq!(select_template(Some(&v)).unwrap(), "D");
        assert!(select_template(None).is_err());
        assert!(select_template(Some(&serde_json::json!(3))).is_err());
    }
}
