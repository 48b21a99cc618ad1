//! The tokenizer of a GGUF file, rebuilt as a Hugging Face `tokenizer.json` and
//! `tokenizer_config.json`.
//!
//! llama.cpp stores a byte-level BPE tokenizer (`tokenizer.ggml.model = "gpt2"`) as the token
//! strings in id order, the merges as `"left right"` strings in rank order, one type per token
//! (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte) and the name of the
//! pre-tokenizer (`tokenizer.ggml.pre`). [`build_tokenizer`] turns that back into the
//! `tokenizers` pipeline the model was trained with: the pre-tokenizer that the name stands for
//! (llama.cpp's `llama-vocab.cpp` lists its regexes), a BPE model over the same vocabulary and
//! merges, the ByteLevel decoder, and the control tokens as special added tokens (user-defined
//! ones as plain added tokens).

use std::collections::{BTreeMap, HashSet};

use serde_json::{json, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

/// GGUF token type of control (special) tokens.
pub const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF token type of user-defined added tokens.
pub const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The pre-tokenizers leaf rebuilds, by their `tokenizer.ggml.pre` names.
pub const SUPPORTED_PRE: &str = "default, gpt2 (GPT-2 regex), smollm, starcoder, refact \
     (digits split one by one, then the GPT-2 regex)";

/// The tokenizer part of a GGUF file's metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`; only `gpt2` (byte-level BPE) is rebuilt.
    pub model: String,
    /// `tokenizer.ggml.pre`, the pre-tokenizer's name (absent means `default`).
    pub pre: Option<String>,
    /// Token strings in id order.
    pub tokens: Vec<String>,
    /// GGUF token type of each token (same length as `tokens`).
    pub token_types: Vec<i64>,
    /// Merges in rank order, `"left right"`.
    pub merges: Vec<String>,
    /// Beginning-of-sequence id.
    pub bos: Option<u32>,
    /// End-of-sequence id.
    pub eos: Option<u32>,
    /// Unknown-token id.
    pub unk: Option<u32>,
    /// Padding id.
    pub pad: Option<u32>,
    /// Whether the model expects a BOS token in front of every input.
    pub add_bos: bool,
    /// The chat template (Jinja).
    pub chat_template: Option<String>,
}

impl GgufVocab {
    fn token(&self, id: Option<u32>, what: &str) -> Result<Option<&str>, String> {
        match id {
            None => Ok(None),
            Some(i) => self
                .tokens
                .get(i as usize)
                .map(|s| Some(s.as_str()))
                .ok_or_else(|| {
                    format!(
                        "the {what} id {i} is outside the {} tokens",
                        self.tokens.len()
                    )
                }),
        }
    }
}

/// The pre-tokenizer that llama.cpp's name stands for.
fn pre_tokenizer(name: &str) -> Result<PreTokenizerWrapper, String> {
    let byte_level = ByteLevel::new(false, true, true);
    Ok(match name {
        "default" | "gpt2" => PreTokenizerWrapper::ByteLevel(byte_level),
        // llama.cpp: "\p{N}" then the GPT-2 regex, i.e. Digits(individual) + ByteLevel.
        "smollm" | "starcoder" | "refact" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])),
        other => {
            return Err(format!(
                "pre-tokenizer {other:?} is not supported (supported: {SUPPORTED_PRE})"
            ))
        }
    })
}

/// Builds the `tokenizers` tokenizer of `vocab`. The reason is returned on failure.
pub fn build_tokenizer(vocab: &GgufVocab) -> Result<Tokenizer, String> {
    if vocab.model != "gpt2" {
        return Err(format!(
            "tokenizer model {:?} is not supported (only \"gpt2\", byte-level BPE)",
            vocab.model
        ));
    }
    if vocab.tokens.is_empty() {
        return Err("tokenizer.ggml.tokens is empty".into());
    }
    if vocab.token_types.len() != vocab.tokens.len() {
        return Err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            vocab.token_types.len(),
            vocab.tokens.len()
        ));
    }
    let pre = pre_tokenizer(vocab.pre.as_deref().unwrap_or("default"))?;
    let mut seen = HashSet::with_capacity(vocab.tokens.len());
    for (i, t) in vocab.tokens.iter().enumerate() {
        if !seen.insert(t.as_str()) {
            return Err(format!("token {t:?} (id {i}) appears twice"));
        }
    }
    let map: Vocab = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = vocab
        .merges
        .iter()
        .enumerate()
        .map(|(rank, m)| {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| format!("merge {rank} {m:?} is not \"left right\""))?;
            if !seen.contains(a) || !seen.contains(b) || !seen.contains(format!("{a}{b}").as_str())
            {
                return Err(format!(
                    "merge {rank} {m:?} uses or makes a token outside the vocabulary"
                ));
            }
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(map, merges)
        .build()
        .map_err(|e| format!("cannot build the BPE model: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
    let special: Vec<AddedToken> = vocab
        .tokens
        .iter()
        .zip(&vocab.token_types)
        .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL)
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    let user: Vec<AddedToken> = vocab
        .tokens
        .iter()
        .zip(&vocab.token_types)
        .filter(|(_, &ty)| ty == TOKEN_TYPE_USER_DEFINED)
        .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    tokenizer.add_special_tokens(&special);
    tokenizer.add_tokens(&user);
    // Added tokens keep their ids (they are already in the vocabulary).
    for t in special.iter().chain(&user) {
        let want = vocab.tokens.iter().position(|s| *s == t.content);
        if tokenizer.token_to_id(&t.content).map(|i| i as usize) != want {
            return Err(format!("added token {:?} changed its id", t.content));
        }
    }
    Ok(tokenizer)
}

/// `tokenizer_config.json` of `vocab`: the special tokens, the added tokens' decoder table,
/// the chat template, and `model_max_length`.
pub fn tokenizer_config(vocab: &GgufVocab, model_max_length: usize) -> Result<Value, String> {
    let bos = vocab.token(vocab.bos, "bos")?;
    let eos = vocab.token(vocab.eos, "eos")?;
    let unk = vocab.token(vocab.unk, "unknown-token")?;
    let pad = vocab.token(vocab.pad, "padding")?;
    let named: HashSet<&str> = [bos, eos, unk, pad].into_iter().flatten().collect();
    let mut decoder = BTreeMap::new();
    let mut additional = Vec::new();
    for (id, (t, &ty)) in vocab.tokens.iter().zip(&vocab.token_types).enumerate() {
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            let special = ty == TOKEN_TYPE_CONTROL;
            decoder.insert(
                id,
                json!({
                    "content": t,
                    "lstrip": false,
                    "normalized": false,
                    "rstrip": false,
                    "single_word": false,
                    "special": special,
                }),
            );
            if special && !named.contains(t.as_str()) {
                additional.push(t.clone());
            }
        }
    }
    // JSON object keys are strings; BTreeMap<usize> keeps them in id order.
    let decoder: serde_json::Map<String, Value> = decoder
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    Ok(json!({
        "add_bos_token": vocab.add_bos,
        "add_eos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": additional,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "chat_template": vocab.chat_template,
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of the byte symbols for "a", "b", "Ġ", digits, two merges and two control
    /// tokens.
    fn small() -> GgufVocab {
        let mut tokens: Vec<String> = ["<|end|>", "<|start|>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut types = vec![TOKEN_TYPE_CONTROL; 2];
        for t in ["a", "b", "Ġ", "1", "2", "ab", "Ġab", "!"] {
            tokens.push(t.to_string());
            types.push(1);
        }
        GgufVocab {
            model: "gpt2".into(),
            pre: Some("smollm".into()),
            tokens,
            token_types: types,
            merges: vec!["a b".into(), "Ġ ab".into()],
            bos: Some(1),
            eos: Some(0),
            unk: None,
            pad: Some(0),
            add_bos: false,
            chat_template: Some("{{ messages }}".into()),
        }
    }

    #[test]
    fn rebuilt_tokenizer_encodes_with_merges_digits_and_specials() {
        let tok = build_tokenizer(&small()).unwrap();
        let enc = tok.encode("ab ab12<|end|>", false).unwrap();
        let names: Vec<&str> = enc.get_tokens().iter().map(String::as_str).collect();
        // Digits are split one by one (smollm), merges apply, the control token is one id.
        assert_eq!(names, ["ab", "Ġab", "1", "2", "<|end|>"]);
        assert_eq!(enc.get_ids(), [7, 8, 5, 6, 0]);
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), "ab ab12<|end|>");
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "ab ab12");
    }

    #[test]
    fn gpt2_pre_tokenizer_keeps_digit_runs() {
        let mut v = small();
        v.pre = Some("gpt2".into());
        v.tokens.push("12".into());
        v.token_types.push(1);
        v.merges.push("1 2".into());
        let tok = build_tokenizer(&v).unwrap();
        let enc = tok.encode("12", false).unwrap();
        assert_eq!(enc.get_tokens(), ["12"]);
    }

    #[test]
    fn bad_vocabularies_are_refused_with_the_reason() {
        let mut v = small();
        v.model = "llama".into();
        assert!(build_tokenizer(&v).unwrap_err().contains("\"llama\""));
        let mut v = small();
        v.pre = Some("qwen2".into());
        assert!(build_tokenizer(&v).unwrap_err().contains("qwen2"));
        let mut v = small();
        v.merges.push("a zz".into());
        assert!(build_tokenizer(&v).unwrap_err().contains("merge 2"));
        let mut v = small();
        v.tokens.push("a".into());
        v.token_types.push(1);
        assert!(build_tokenizer(&v).unwrap_err().contains("twice"));
        let mut v = small();
        v.token_types.pop();
        assert!(build_tokenizer(&v).unwrap_err().contains("token_type"));
        let mut v = small();
        v.eos = Some(99);
        assert!(tokenizer_config(&v, 8).unwrap_err().contains("eos id 99"));
    }

    #[test]
    fn tokenizer_config_names_the_special_tokens() {
        let cfg = tokenizer_config(&small(), 8192).unwrap();
        assert_eq!(cfg["bos_token"], "<|start|>");
        assert_eq!(cfg["eos_token"], "<|end|>");
        assert_eq!(cfg["pad_token"], "<|end|>");
        assert!(cfg["unk_token"].is_null());
        assert_eq!(cfg["chat_template"], "{{ messages }}");
        assert_eq!(cfg["added_tokens_decoder"]["1"]["content"], "<|start|>");
        assert_eq!(cfg["added_tokens_decoder"]["1"]["special"], true);
        assert_eq!(cfg["model_max_length"], 8192);
    }
}
