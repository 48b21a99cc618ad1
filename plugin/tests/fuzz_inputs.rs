//! Fuzzing (proptest, sized for CI) of the inputs a server or a user hands the plugin: WAV
//! files (random and mutated) and JSON Lines groups (random and mutated lines, hostile
//! numbers). The property is the absence of panics: every input is accepted or refused with
//! an error, and what is accepted satisfies the type's invariants.
//!
//! The number of inputs tried per target is the `cases` of its `ProptestConfig` (the README
//! reports them).

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
