//! Fuzzing (proptest, sized for CI) of the inputs a server or a user hands the plugin: WAV
//! files (random and mutated), JSON Lines groups (random and mutated lines, hostile numbers)
//! and `POST /v1/chat/completions` bodies (random bytes, mutated valid requests) through the
//! route's own parser. The property is the absence of panics: every input is accepted or
//! refused with an error, and what is accepted satisfies the type's invariants.
//!
//! The number of inputs tried per target is the `cases` of its `ProptestConfig` (the README
//! reports them); the chat targets also print how many inputs were accepted and refused
//! (`-- --nocapture`).

use leaf_plugin::advantage::{EstimatorConfig, LeafConfig};
use leaf_plugin::audio::{decode_wav, wav_seconds, write_wav_pcm16, Audio};
use leaf_plugin::rollout::{Group, Rollout};
use proptest::prelude::*;

/// Inputs per fuzz target.
const CASES: u32 = 2000;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A short valid 16-bit WAV file.
fn valid_wav(samples: usize, rate: u32) -> Vec<u8> {
    let s: Vec<f32> = (0..samples)
        .map(|i| ((i as f32) * 0.05).sin() * 0.5)
        .collect();
    write_wav_pcm16(&Audio::new(s, rate).unwrap()).unwrap()
}

/// Decodes with both entry points; an accepted file has finite samples at a positive rate.
fn check_wav(bytes: &[u8]) {
    let _ = wav_seconds(bytes);
    if let Ok(audio) = decode_wav(bytes, 5.0) {
        assert!(audio.sample_rate() > 0);
        assert!(audio.seconds() <= 5.0 + 1e-9);
        assert!(audio.samples().iter().all(|x| x.is_finite()));
    }
}

/// Splices `edits` (position, byte) into a copy of `bytes`, biased to the 44-byte header.
fn splice(mut bytes: Vec<u8>, edits: &[(usize, u8, bool)], truncate: Option<usize>) -> Vec<u8> {
    for &(pos, b, in_header) in edits {
        let span = if in_header {
            44.min(bytes.len())
        } else {
            bytes.len()
        };
        if span > 0 {
            bytes[pos % span] = b;
        }
    }
    if let Some(t) = truncate {
        let len = bytes.len();
        bytes.truncate(t % (len + 1));
    }
    bytes
}

/// A number as JSON text, including the hostile ones.
fn json_number() -> impl Strategy<Value = String> {
    prop_oneof![
        (-3.0f64..0.0).prop_map(|x| format!("{x}")),
        Just("NaN".to_string()),
        Just("1e999".to_string()),
        Just("-1e999".to_string()),
        Just("0.5".to_string()),
        Just("-0.0".to_string()),
        Just("\"-1\"".to_string()),
        Just("null".to_string()),
        any::<i64>().prop_map(|x| x.to_string()),
    ]
}

/// A JSON Lines group line assembled from hostile parts.
fn group_line() -> impl Strategy<Value = String> {
    let rollout = (
        proptest::collection::vec(
            prop_oneof![
                any::<u32>().prop_map(|t| t.to_string()),
                Just("-1".into()),
                Just("4294967296".into())
            ],
            0..6,
        ),
        proptest::collection::vec(json_number(), 0..6),
        json_number(),
    )
        .prop_map(|(tokens, lps, reward)| {
            format!(
                "{{\"tokens\": [{}], \"logprobs\": [{}], \"reward\": {}}}",
                tokens.join(","),
                lps.join(","),
                reward
            )
        });
    (proptest::collection::vec(rollout, 0..5), "[a-z0-9]{0,6}").prop_map(|(rs, id)| {
        format!(
            "{{\"group_id\": \"{id}\", \"rollouts\": [{}]}}",
            rs.join(",")
        )
    })
}

#[derive(serde::Deserialize)]
struct GroupLine {
    group_id: String,
    rollouts: Vec<Rollout>,
}

/// Parses a line, builds the group and runs both estimators on it. Returns whether the line
/// became a group.
fn check_group_line(line: &str) -> bool {
    let Ok(parsed) = serde_json::from_str::<GroupLine>(line) else {
        return false;
    };
    match Group::new(parsed.group_id, parsed.rollouts) {
        Ok(group) => {
            for estimator in [
                EstimatorConfig::Leaf(LeafConfig::default()),
                EstimatorConfig::Grpo,
            ] {
                let adv = estimator.build().estimate(&group);
                assert_eq!(adv.per_token.len(), group.rollouts().len());
                for (a, r) in adv.per_token.iter().zip(group.rollouts()) {
                    assert_eq!(a.len(), r.tokens.len());
                    assert!(a.iter().all(|x| x.is_finite()), "{line}");
                }
            }
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

#[test]
fn the_unmutated_inputs_are_accepted() {
    check_wav(&valid_wav(800, 8000));
    assert!(decode_wav(&valid_wav(800, 8000), 5.0).is_ok());
    assert!(check_group_line(
        r#"{"group_id": "g", "rollouts": [{"tokens": [1, 2], "logprobs": [-0.1, -0.2], "reward": 1.0},
                                           {"tokens": [1, 3], "logprobs": [-0.1, -0.9], "reward": 0.0}]}"#
    ));
}

proptest! {
    #![proptest_config(config())]

    /// Random bytes, sometimes behind a RIFF/WAVE magic.
    #[test]
    fn random_wav_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..256), magic in any::<bool>()) {
        if magic && bytes.len() >= 12 {
            bytes[..4].copy_from_slice(b"RIFF");
            bytes[8..12].copy_from_slice(b"WAVE");
        }
        check_wav(&bytes);
    }

    /// A valid WAV file with header-biased byte edits and truncation.
    #[test]
    fn mutated_wav_never_panics(
        samples in 0usize..400,
        rate in prop_oneof![Just(8000u32), Just(16000), Just(44100), Just(1), Just(u32::MAX)],
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<bool>()), 0..6),
        truncate in proptest::option::of(any::<usize>()),
    ) {
        let bytes = match Audio::new(vec![0.25; samples.max(1)], rate) {
            Ok(audio) => write_wav_pcm16(&audio).unwrap_or_default(),
            Err(_) => valid_wav(samples.max(1), 8000),
        };
        check_wav(&splice(bytes, &edits, truncate));
    }

    /// JSON Lines groups with hostile numbers and lengths.
    #[test]
    fn hostile_group_lines_never_panic(line in group_line()) {
        check_group_line(&line);
    }

    /// A valid line with random byte edits (most are malformed JSON).
    #[test]
    fn mutated_group_lines_never_panic(edits in proptest::collection::vec((any::<usize>(), 0u8..128), 1..5)) {
        let mut bytes = br#"{"group_id": "g", "rollouts": [{"tokens": [1, 2], "logprobs": [-0.1, -0.2], "reward": 1.0}, {"tokens": [1, 3], "logprobs": [-0.1, -0.9], "reward": 0.0}]}"#.to_vec();
        for (pos, b) in edits {
            let n = bytes.len();
            bytes[pos % n] = b;
        }
        if let Ok(line) = std::str::from_utf8(&bytes) {
            check_group_line(line);
        }
    }
}

/// `POST /v1/chat/completions` bodies through [`parse_chat_request`], the function the route
/// runs on every body it reads.
#[cfg(feature = "serve")]
mod chat {
    use super::{config, splice, valid_wav, CASES};
    use base64::Engine as _;
    use leaf_plugin::serving::http::parse_chat_request;
    use leaf_plugin::serving::limits::RequestLimits;
    use leaf_plugin::serving::Part;
    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;
    use serde_json::{json, Value};

    /// Where a mutation may put a hostile value (JSON pointers into [`valid_request`]).
    const SPOTS: &[&str] = &[
        "",
        "/model",
        "/messages",
        "/messages/0",
        "/messages/0/role",
        "/messages/0/content",
        "/messages/1/content",
        "/messages/1/content/0",
        "/messages/1/content/0/type",
        "/messages/1/content/0/text",
        "/messages/1/content/1/type",
        "/messages/1/content/1/input_audio",
        "/messages/1/content/1/input_audio/data",
        "/messages/1/content/1/input_audio/format",
        "/messages/1/content/2/units",
        "/messages/1/content/2/units/0",
        "/max_tokens",
        "/max_completion_tokens",
        "/temperature",
        "/top_p",
        "/logprobs",
        "/top_logprobs",
        "/seed",
        "/leaf",
        "/leaf/reference",
        "/leaf/task",
    ];

    /// Objects a mutation may add an unknown field to.
    const OBJECTS: &[&str] = &[
        "",
        "/messages/0",
        "/messages/1/content/0",
        "/messages/1/content/1/input_audio",
        "/leaf",
    ];

    /// Marks the spot a raw JSON text replaces after serialising.
    const HOLE: &str = "@@leaf-fuzz-hole@@";

    /// A valid request using every part kind: text, a base64 WAV and units.
    fn valid_request() -> Value {
        let wav = base64::engine::general_purpose::STANDARD.encode(valid_wav(800, 8000));
        json!({
            "model": "leaf",
            "messages": [
                {"role": "system", "content": "Answer with a digit."},
                {"role": "user", "content": [
                    {"type": "text", "text": "Which digit is this?"},
                    {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
                    {"type": "audio", "units": [1, 2, 3]}
                ]}
            ],
            "max_tokens": 8,
            "temperature": 0.7,
            "top_p": 0.9,
            "logprobs": true,
            "top_logprobs": 2,
            "seed": 7,
            "leaf": {"reference": "seven", "task": "digits"}
        })
    }

    /// A JSON text (or near-JSON: `NaN`, unclosed nesting) a client could put anywhere.
    fn hostile_value() -> impl Strategy<Value = String> {
        const FIXED: &[&str] = &[
            "null",
            "true",
            "0",
            "-1",
            "-0.0",
            "0.5",
            "1e999",
            "-1e999",
            "1e-400",
            "NaN",
            "Infinity",
            "-Infinity",
            "\"NaN\"",
            "\"-Infinity\"",
            "\"1e999\"",
            "18446744073709551616",
            "4294967296",
            "340282366920938463463374607431768211456",
            "\"\"",
            "[]",
            "{}",
            "[null]",
            "\"\\ud800\"",
            "\"\\u0000\"",
            "\"wav\"",
            "\"mp3\"",
            "\"user\"",
            "\"tool\"",
            "\"text\"",
            "\"audio\"",
            "\"input_audio\"",
        ];
        prop_oneof![
            4 => proptest::sample::select(FIXED).prop_map(str::to_string),
            2 => any::<i64>().prop_map(|x| x.to_string()),
            1 => any::<u64>().prop_map(|x| x.to_string()),
            2 => any::<f64>().prop_map(|x| format!("{x}")),
            1 => (1usize..1500).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d))),
            1 => (1usize..1500).prop_map(|d| format!("{}1{}", "{\"a\":".repeat(d), "}".repeat(d))),
            1 => (1usize..1500).prop_map(|d| "[".repeat(d)),
            2 => "\\PC{0,24}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            1 => proptest::collection::vec(any::<u32>(), 0..8)
                .prop_map(|v| serde_json::to_string(&v).unwrap()),
            1 => Just(format!("\"{}\"", "x".repeat(70_000))),
        ]
    }

    /// The `data` of an `input_audio` part: garbage that is still base64, mutated WAV files,
    /// broken base64, any text.
    fn audio_data() -> impl Strategy<Value = String> {
        let b64 = |b: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(b);
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512).prop_map(b64),
            (
                proptest::collection::vec((any::<usize>(), any::<u8>(), any::<bool>()), 1..6),
                proptest::option::of(any::<usize>()),
            )
                .prop_map(move |(edits, cut)| b64(splice(
                    valid_wav(800, 8000),
                    &edits,
                    cut
                ))),
            "[A-Za-z0-9+/=]{0,64}",
            "\\PC{0,32}",
        ]
    }

    /// One change to the valid request.
    #[derive(Debug, Clone)]
    enum Edit {
        /// Replace the value at `SPOTS[spot]` by a raw JSON text.
        Replace(usize, String),
        /// Add a field (a random name) to `OBJECTS[at]`.
        Unknown(usize, String, String),
        /// Replace the WAV part's base64 data.
        Audio(String),
        /// Remove the value at `SPOTS[spot]` from its object or array.
        Remove(usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            4 => (0..SPOTS.len(), hostile_value()).prop_map(|(s, v)| Edit::Replace(s, v)),
            1 => (0..OBJECTS.len(), "[a-z_]{1,12}", hostile_value())
                .prop_map(|(o, k, v)| Edit::Unknown(o, k, v)),
            2 => audio_data().prop_map(Edit::Audio),
            1 => (1..SPOTS.len()).prop_map(Edit::Remove),
        ]
    }

    /// The valid request with `edits` applied, then cut and byte-edited as text.
    fn mutate(edits: &[Edit], cut: Option<usize>, bytes: &[(usize, u8)]) -> Vec<u8> {
        let mut v = valid_request();
        let mut raw = Vec::new();
        for e in edits {
            match e {
                Edit::Replace(spot, text) => {
                    if let Some(slot) = v.pointer_mut(SPOTS[*spot]) {
                        *slot = json!(format!("{HOLE}{}", raw.len()));
                        raw.push(text.clone());
                    }
                }
                Edit::Unknown(at, key, text) => {
                    if let Some(Value::Object(map)) = v.pointer_mut(OBJECTS[*at]) {
                        map.insert(key.clone(), json!(format!("{HOLE}{}", raw.len())));
                        raw.push(text.clone());
                    }
                }
                Edit::Audio(data) => {
                    if let Some(slot) = v.pointer_mut("/messages/1/content/1/input_audio/data") {
                        *slot = json!(data);
                    }
                }
                Edit::Remove(spot) => {
                    let path = SPOTS[*spot];
                    let (parent, last) = path.rsplit_once('/').unwrap_or(("", path));
                    match v.pointer_mut(parent) {
                        Some(Value::Object(map)) => {
                            map.remove(last);
                        }
                        Some(Value::Array(list)) => {
                            if let Ok(i) = last.parse::<usize>() {
                                if i < list.len() {
                                    list.remove(i);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        let mut text = v.to_string();
        // Later holes first, so that `HOLE1` is not found inside `HOLE10`.
        for (i, r) in raw.iter().enumerate().rev() {
            text = text.replace(&format!("\"{HOLE}{i}\""), r);
        }
        let mut out = text.into_bytes();
        for &(pos, b) in bytes {
            let n = out.len();
            if n > 0 {
                out[pos % n] = b;
            }
        }
        if let Some(c) = cut {
            let n = out.len();
            out.truncate(c % (n + 1));
        }
        out
    }

    /// Parses one body. An accepted request passes the checks again and holds what its body
    /// said; a refused one is a 4xx naming what was wrong, whose status is returned.
    fn check_body(body: &[u8], limits: &RequestLimits) -> Result<(), u16> {
        match parse_chat_request(body, limits) {
            Ok(req) => {
                assert!(req.check().is_ok(), "{req:?}");
                assert!(limits.check_request(&req).is_ok(), "{req:?}");
                assert!(req
                    .messages
                    .iter()
                    .flat_map(|m| &m.content)
                    .all(|p| match p {
                        Part::Wav(w) => leaf_plugin::audio::wav_seconds(w).is_ok(),
                        _ => true,
                    }));
                Ok(())
            }
            Err(e) => {
                assert!(
                    e.status().is_client_error(),
                    "{e} for {:?}",
                    String::from_utf8_lossy(body)
                );
                assert!(!e.message().is_empty(), "{e}");
                Err(e.status().as_u16())
            }
        }
    }

    /// Runs `cases` inputs of `strategy` through [`check_body`] and prints the outcomes;
    /// returns (accepted, refused).
    fn run<S: Strategy<Value = Vec<u8>>>(name: &str, strategy: S) -> (usize, usize) {
        let limits = RequestLimits::default();
        let accepted = std::cell::Cell::new(0usize);
        let refused = std::cell::RefCell::new(std::collections::BTreeMap::<u16, usize>::new());
        let mut runner = TestRunner::new(config());
        runner
            .run(&strategy, |body| {
                match check_body(&body, &limits) {
                    Ok(()) => accepted.set(accepted.get() + 1),
                    Err(status) => *refused.borrow_mut().entry(status).or_default() += 1,
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (a, by_status) = (accepted.get(), refused.into_inner());
        let r: usize = by_status.values().sum();
        println!(
            "{name}: {} inputs, {a} accepted, {r} refused (by status: {by_status:?}), 0 panics",
            a + r
        );
        (a, r)
    }

    #[test]
    fn the_valid_request_is_accepted_and_errors_have_their_status() {
        let limits = RequestLimits::default();
        let body = valid_request().to_string();
        let req = parse_chat_request(body.as_bytes(), &limits).expect("the valid request");
        assert_eq!(req.messages.len(), 2);
        assert!(matches!(req.messages[1].content[1], Part::Wav(_)));
        assert_eq!(req.messages[1].content[2], Part::Units(vec![1, 2, 3]));
        assert_eq!(req.max_tokens, Some(8));
        assert_eq!(req.reference.as_deref(), Some("seven"));
        let status = |body: &[u8]| {
            let e = parse_chat_request(body, &limits).expect_err("refused");
            (e.status().as_u16(), e.message().to_string())
        };
        assert_eq!(status(b"{not json").0, 400);
        assert_eq!(status(br#"{"messages": 3}"#).0, 422);
        assert_eq!(status(br#"{"messages": [], "seed": -1}"#).0, 422);
        let (s, m) = status(br#"{"messages": []}"#);
        assert_eq!(s, 400);
        assert!(m.contains("messages is empty"), "{m}");
        let one = |extra: &str| {
            format!(r#"{{"messages": [{{"role": "user", "content": "hi"}}]{extra}}}"#).into_bytes()
        };
        assert!(parse_chat_request(&one(""), &limits).is_ok());
        assert!(parse_chat_request(&one(r#", "unknown": {"a": [1]}"#), &limits).is_ok());
        let (s, m) = status(&one(r#", "top_p": 7.0"#));
        assert_eq!(s, 400);
        assert!(m.contains("top"), "{m}");
        let (s, m) = status(&one(r#", "max_tokens": 0"#));
        assert_eq!(s, 400);
        assert!(m.contains("max_tokens"), "{m}");
        let (s, m) = status(&one(r#", "max_tokens": 4096"#));
        assert_eq!(s, 400);
        assert!(m.contains("request_limits.max_tokens"), "{m}");
        let (s, m) = status(&one(r#", "top_logprobs": 21"#));
        assert_eq!(s, 400);
        assert!(m.contains("top_logprobs"), "{m}");
        let (s, m) = status(br#"{"messages": [{"role": "tool", "content": "x"}]}"#);
        assert_eq!(s, 400);
        assert!(m.contains("messages[0].role"), "{m}");
        let req = parse_chat_request(&one(r#", "leaf": {"reference": "r"}"#), &limits).unwrap();
        assert_eq!(req.reference.as_deref(), Some("r"));
        let audio = |data: &str| {
            format!(
                r#"{{"messages": [{{"role": "user", "content": [{{"type": "input_audio", "input_audio": {{"data": "{data}"}}}}]}}]}}"#
            )
            .into_bytes()
        };
        let (s, m) = status(&audio("%%%"));
        assert_eq!(s, 400);
        assert!(m.contains("messages[0].content[0]: bad base64"), "{m}");
        let (s, m) = status(&audio("AAAA"));
        assert_eq!(s, 400);
        assert!(m.contains("messages[0].content[0]"), "{m}");
        // Deep nesting stops at serde_json's recursion limit, also inside an ignored field.
        for (at, want) in [("messages", 422), ("unknown", 400)] {
            let deep = format!(
                r#"{{"{at}": {}{}, "messages": []}}"#,
                "[".repeat(5000),
                "]".repeat(5000)
            );
            let (s, m) = status(deep.as_bytes());
            assert_eq!(s, want, "{at}: {m}");
        }
        let big = format!(
            r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#,
            "x".repeat(70_000)
        );
        let (s, m) = status(big.as_bytes());
        assert_eq!(s, 413);
        assert!(m.contains("request_limits.max_text_bytes"), "{m}");
    }

    /// Random bytes, half of them behind the start of a request.
    #[test]
    fn random_chat_bodies_never_panic() {
        let strategy = (
            proptest::collection::vec(any::<u8>(), 0..512),
            any::<bool>(),
        )
            .prop_map(|(bytes, prefix)| {
                let mut out = if prefix {
                    br#"{"messages": [{"role": "user", "content": "#.to_vec()
                } else {
                    Vec::new()
                };
                out.extend(bytes);
                out
            });
        let (_, refused) = run("random chat bodies", strategy);
        assert!(refused > 0);
    }

    /// The valid request with hostile values, unknown and removed fields, garbage audio, and
    /// then (sometimes) truncated or byte-edited.
    #[test]
    fn mutated_chat_requests_never_panic() {
        let strategy = (
            proptest::collection::vec(edit(), 0..4),
            proptest::option::weighted(0.2, any::<usize>()),
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..2),
        )
            .prop_map(|(edits, cut, bytes)| mutate(&edits, cut, &bytes));
        let (accepted, refused) = run("mutated chat requests", strategy);
        // Both outcomes occur, so neither path is left unexercised.
        assert!(
            accepted > 0 && refused > 0,
            "{accepted} accepted, {refused} refused"
        );
        assert_eq!(accepted + refused, CASES as usize);
    }
}
