//! The text tokenizer: loads in `tokenizers` 0.21.4 from its files, round-trips text and units,
//! keeps the vocabulary small, and builds prompts with exactly the ids mistral.rs computes
//! (its chat template rendered by minijinja with mistral.rs's settings, then encoded with
//! `encode_fast(.., true)` as the engine does).

use leaf_plugin::speech::tasks::{task_texts, TaskKind};
use leaf_plugin::speech::tokenizer::{
    learn_merges, render_chat, unit_token, validate_tokenizer_config, ChatMessage, ContentPart,
    SpeechTokenizer, AUDIO_END, AUDIO_START, BOS, CHAT_TEMPLATE, EOS, IM_END, IM_START, PAD,
    TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
};
use leaf_plugin::speech::{numbers, SpeechError};
use proptest::prelude::*;
use serde_json::json;
use tokenizers::Tokenizer;

static TOK: std::sync::LazyLock<SpeechTokenizer> =
    std::sync::LazyLock::new(|| SpeechTokenizer::for_tasks(128).unwrap());

fn tok() -> SpeechTokenizer {
    TOK.clone()
}

/// Renders like mistral.rs 0.8.1 `apply_chat_template_to`: minijinja with pycompat,
/// lstrip_blocks, trim_blocks, raise_exception, and the same context variables.
fn mistral_render(
    messages: serde_json::Value,
    add_generation_prompt: bool,
) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_lstrip_blocks(true);
    env.set_trim_blocks(true);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat_template", CHAT_TEMPLATE)
        .map_err(|e| e.to_string())?;
    let tmpl = env
        .get_template("chat_template")
        .map_err(|e| e.to_string())?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => Some(BOS.to_string()),
        eos_token => Some(EOS.to_string()),
        unk_token => None::<String>,
        date_string => "28, November, 2026",
        enable_thinking => true,
        reasoning_effort => "medium",
    })
    .map_err(|e| e.to_string())
}

#[test]
fn loads_in_tokenizers_from_its_files() {
    let t = tok();
    let dir = tempfile::tempdir().unwrap();
    t.save(dir.path()).unwrap();
    let hf = Tokenizer::from_file(dir.path().join(TOKENIZER_FILE)).unwrap();
    assert_eq!(hf.get_vocab_size(true), t.vocab_size());
    let ids = t.ids();
    for (tok_str, id) in [
        (PAD, ids.pad),
        (BOS, ids.bos),
        (EOS, ids.eos),
        (IM_START, ids.im_start),
        (IM_END, ids.im_end),
        (AUDIO_START, ids.audio_start),
        (AUDIO_END, ids.audio_end),
    ] {
        assert_eq!(hf.token_to_id(tok_str), Some(id), "{tok_str}");
    }
    for u in [0u32, 1, 64, 127] {
        assert_eq!(hf.token_to_id(&unit_token(u)), t.unit_id(u));
    }
    assert_eq!(t.unit_id(128), None);
    assert_eq!(t.n_units(), 128);
    // Units are the last ids: the model's vocabulary is exactly what the tokenizer can emit.
    assert_eq!(ids.unit_base as usize + 128, t.vocab_size());
    // Small vocabulary: 256 bytes + merges + 7 specials + 128 units.
    assert!(t.vocab_size() <= 1024, "{}", t.vocab_size());
    // Reloading from the directory validates the configuration and gives the same tokenizer.
    let back = SpeechTokenizer::load(dir.path()).unwrap();
    assert_eq!(back.ids(), t.ids());
    assert_eq!(back.json(), t.json());
    // The config is what mistral.rs reads.
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(TOKENIZER_CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["eos_token"], EOS);
    assert_eq!(cfg["bos_token"], BOS);
    assert_eq!(cfg["chat_template"], CHAT_TEMPLATE);
    assert_eq!(t.stop_ids(), [ids.eos, ids.im_end]);
}

#[test]
fn the_build_is_deterministic() {
    assert_eq!(
        SpeechTokenizer::for_tasks(128).unwrap().json(),
        tok().json()
    );
    let m1 = learn_merges(&task_texts(), 384).unwrap();
    let m2 = learn_merges(&task_texts(), 384).unwrap();
    assert_eq!(m1, m2);
}

#[test]
fn text_round_trips() {
    let t = tok();
    for text in [
        "seven three nine",
        "sieben drei neun",
        "Transcribe the audio.",
        "fünfunddreißig, zwölf und dreißig",
        "twenty-one",
        "  leading and trailing spaces  ",
        "line one\nline two\n\n\ttab",
        "emoji \u{1F600} and CJK \u{4E2D}\u{6587}",
        "",
    ] {
        let ids = t.encode_text(text).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), text, "{ids:?}");
        assert_eq!(t.decode(&ids, true).unwrap(), text);
    }
}

#[test]
fn task_answers_are_short() {
    let t = tok();
    // Every number word learned as one token, with or without a leading space.
    for n in 0..=numbers::MAX_NUMBER {
        for w in [numbers::english(n).unwrap(), numbers::german(n).unwrap()] {
            let alone = t.encode_text(w).unwrap();
            let inner = t.encode_text(&format!(" {w}")).unwrap();
            assert!(
                alone.len() <= 3 && inner.len() <= 3,
                "{w}: {alone:?} {inner:?}"
            );
        }
    }
    let ids = t
        .encode_text(&TaskKind::Recognition.reference(&[7, 3, 9]).unwrap())
        .unwrap();
    assert_eq!(ids.len(), 3, "{ids:?}");
    let ans = t.answer_ids("seven three nine").unwrap();
    assert_eq!(ans.last(), Some(&t.ids().im_end));
    assert_eq!(&ans[..3], &ids[..]);
}

#[test]
fn units_round_trip() {
    let t = tok();
    let units = [0u32, 5, 5, 127, 64];
    let ids: Vec<u32> = units.iter().map(|&u| t.unit_id(u).unwrap()).collect();
    let back: Vec<u32> = ids.iter().map(|&i| t.unit_of(i).unwrap()).collect();
    assert_eq!(back, units);
    assert_eq!(
        t.decode(&ids, false).unwrap(),
        "<|unit_0|><|unit_5|><|unit_5|><|unit_127|><|unit_64|>"
    );
    // Special tokens are dropped when skipping, as in mistral.rs responses.
    assert_eq!(t.decode(&ids, true).unwrap(), "");
    // A unit token written in text is one id.
    assert_eq!(
        t.encode_text("<|unit_17|>x").unwrap()[0],
        t.unit_id(17).unwrap()
    );
    assert_eq!(t.unit_of(t.ids().eos), None);
    assert!(matches!(
        t.decode(&[t.vocab_size() as u32], false),
        Err(SpeechError::Tokenizer(_))
    ));
}

#[test]
fn prompt_ids_equal_what_mistral_rs_computes() {
    let t = tok();
    let hf: Tokenizer = t.json().parse().unwrap();
    let cases: Vec<(Vec<ChatMessage>, bool)> = vec![
        (
            vec![ChatMessage::user_audio(
                "Transcribe the audio.",
                &[3, 17, 3, 127],
            )],
            true,
        ),
        (
            vec![ChatMessage::user_audio(
                "Translate the audio into German.",
                &[],
            )],
            true,
        ),
        (
            vec![
                ChatMessage::text("system", "You answer briefly."),
                ChatMessage::user_audio("What is the sum of the digits in the audio?", &[1, 2]),
                ChatMessage::text("assistant", "three"),
            ],
            false,
        ),
        (
            vec![ChatMessage {
                role: "user".into(),
                content: vec![
                    ContentPart::Text {
                        text: "Before ".into(),
                    },
                    ContentPart::Audio {
                        units: vec![9, 9, 8],
                    },
                    ContentPart::Text {
                        text: " after\n".into(),
                    },
                    ContentPart::Audio { units: vec![0] },
                ],
            }],
            true,
        ),
    ];
    for (messages, gen) in cases {
        let json = serde_json::to_value(&messages).unwrap();
        let rendered = mistral_render(json, gen).unwrap();
        assert_eq!(rendered, render_chat(&messages, gen));
        let engine_ids = hf.encode_fast(rendered, true).unwrap().get_ids().to_vec();
        assert_eq!(t.chat_ids(&messages, gen).unwrap(), engine_ids);
    }
    // A plain string content renders the same as one text part.
    let rendered = mistral_render(json!([{"role": "user", "content": "hi"}]), true).unwrap();
    assert_eq!(
        rendered,
        render_chat(&[ChatMessage::text("user", "hi")], true)
    );

    // The task prompt: bos, turn header, audio span, instruction, turn end, assistant header.
    let ids = t
        .chat_prompt_ids("Transcribe the audio.", &[3, 17])
        .unwrap();
    let s = t.ids();
    assert_eq!(&ids[..2], &[s.bos, s.im_start]);
    let a = ids.iter().position(|&i| i == s.audio_start).unwrap();
    assert_eq!(
        &ids[a..a + 4],
        &[
            s.audio_start,
            t.unit_id(3).unwrap(),
            t.unit_id(17).unwrap(),
            s.audio_end
        ]
    );
    assert_eq!(ids.iter().filter(|&&i| i == s.im_end).count(), 1);
    let last = ids.iter().rposition(|&i| i == s.im_start).unwrap();
    assert_eq!(t.decode(&ids[last + 1..], false).unwrap(), "assistant\n");
    assert!(
        ids.len() - last <= 3,
        "role header should be merged: {:?}",
        &ids[last..]
    );
    // Units beyond the vocabulary are refused, not rendered into unknown text.
    assert!(matches!(
        t.chat_prompt_ids("x", &[128]),
        Err(SpeechError::Tokenizer(_))
    ));
    // An unknown part type makes the template raise, as it would in mistral.rs.
    let err = mistral_render(
        json!([{"role": "user", "content": [{"type": "image", "url": "x"}]}]),
        true,
    )
    .unwrap_err();
    assert!(err.contains("unsupported content part type"), "{err}");
}

#[test]
fn bad_tokenizer_configs_are_errors() {
    let t = tok();
    let good: serde_json::Value = serde_json::from_str(&t.tokenizer_config_json()).unwrap();
    validate_tokenizer_config(&good.to_string(), t.inner()).unwrap();
    let with = |key: &str, v: serde_json::Value| {
        let mut c = good.clone();
        c[key] = v;
        validate_tokenizer_config(&c.to_string(), t.inner())
    };
    assert!(with("eos_token", json!("</s>")).is_err());
    assert!(with("eos_token", json!(null)).is_err());
    assert!(with("bos_token", json!(7)).is_err());
    assert!(with("pad_token", json!("<nope>")).is_err());
    assert!(with("chat_template", json!(null)).is_err());
    assert!(with("chat_template", json!("{{ messages }}")).is_err());
    // The object form HF writes is accepted.
    with("eos_token", json!({"content": EOS, "special": true})).unwrap();
    assert!(validate_tokenizer_config("{not json", t.inner()).is_err());
    // Loading a directory with a broken config fails instead of handing it to mistral.rs.
    let dir = tempfile::tempdir().unwrap();
    t.save(dir.path()).unwrap();
    std::fs::write(
        dir.path().join(TOKENIZER_CONFIG_FILE),
        "{\"eos_token\": \"</s>\"}",
    )
    .unwrap();
    assert!(SpeechTokenizer::load(dir.path()).is_err());
}

#[test]
fn merges_learned_and_applied_agree() {
    // Every word of the corpus encodes to the segmentation the learner ended with: a single
    // token for short corpora, since merges are learned until words are whole or the cap hits.
    let texts: Vec<String> = ["aaab aab ab b", "ba ab"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let merges = learn_merges(&texts, 100).unwrap();
    let t = SpeechTokenizer::build(&merges, 2).unwrap();
    for w in ["aaab", " aab", " ab", " b", "ba"] {
        assert_eq!(t.encode_text(w).unwrap().len(), 1, "{w}");
    }
    assert!(SpeechTokenizer::build(&[("q".into(), "zz".into())], 2).is_err());
    assert!(SpeechTokenizer::build(&merges, 0).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_text_round_trips(text in "\\PC{0,40}") {
        let t = tok();
        let ids = t.encode_text(&text).unwrap();
        // Text holding a special-token string legitimately maps it to the special id; skip those.
        prop_assume!(!text.contains("<|"));
        prop_assert_eq!(t.decode(&ids, false).unwrap(), text);
    }

    #[test]
    fn prompt_matches_template_for_any_units(units in prop::collection::vec(0u32..128, 0..50)) {
        let t = tok();
        let msgs = vec![ChatMessage::user_audio("How many digits are in the audio?", &units)];
        let rendered = mistral_render(serde_json::to_value(&msgs).unwrap(), true).unwrap();
        let ids = t.chat_prompt_ids("How many digits are in the audio?", &units).unwrap();
        prop_assert_eq!(t.encode_text(&rendered).unwrap(), ids.clone());
        let got: Vec<u32> = ids.iter().filter_map(|&i| t.unit_of(i)).collect();
        prop_assert_eq!(got, units);
    }
}
