//! `leaf advantages` end to end: the JSON Lines contract, flags, and bad lines.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn leaf(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_leaf"))
        .arg("advantages")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/data/groups.jsonl");

#[test]
fn bundled_example_gives_one_line_per_group_with_a_tree() {
    let out = leaf(&["--input", EXAMPLE], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = lines(&out);
    assert_eq!(v.len(), 3);
    assert_eq!(v[0]["group_id"], "spec-worked-example");
    assert_eq!(v[0]["tree"]["boundaries"], serde_json::json!([3, 9]));
    assert_eq!(v[0]["tree"]["stats"]["fork_fire_rate"], 1.0);
    let adv = v[0]["advantages"].as_array().unwrap();
    assert_eq!(
        adv.iter()
            .map(|a| a.as_array().unwrap().len())
            .collect::<Vec<_>>(),
        vec![12, 12, 8, 10]
    );
    // Full f64 round trip: the printed value parses back to the same bits the library gives.
    let lib = {
        use leaf_plugin::advantage::{AdvantageEstimator, Leaf};
        let line = std::fs::read_to_string(EXAMPLE).unwrap();
        let g: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
        let rollouts = serde_json::from_value(g["rollouts"].clone()).unwrap();
        let group = leaf_plugin::rollout::Group::new("x", rollouts).unwrap();
        Leaf::default().estimate(&group).per_token
    };
    let printed: Vec<Vec<f64>> = serde_json::from_value(v[0]["advantages"].clone()).unwrap();
    assert_eq!(printed, lib);
    // All rewards equal: all zero.
    assert!(v[2]["advantages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| a.as_array().unwrap())
        .all(|x| x == 0.0));
}

#[test]
fn grpo_has_no_tree_and_flags_parse() {
    let out = leaf(&["--input", EXAMPLE, "--estimator", "grpo"], "");
    assert!(out.status.success());
    assert!(lines(&out).iter().all(|l| l.get("tree").is_none()));
    let out = leaf(
        &[
            "--input",
            EXAMPLE,
            "--fork-budget",
            "0",
            "--min-prefix",
            "2",
            "--terms",
            "local",
        ],
        "",
    );
    assert!(out.status.success());
    assert_eq!(lines(&out)[0]["tree"]["boundaries"], serde_json::json!([]));
    let out = leaf(&["--terms", "sideways"], "");
    assert!(!out.status.success());
}

#[test]
fn bad_lines_are_reported_and_the_rest_processed() {
    let good = r#"{"group_id": "ok", "rollouts": [{"tokens": [1, 2], "logprobs": [-0.5, -1.0], "reward": 1.0}, {"tokens": [1, 3], "logprobs": [-0.5, -2.0], "reward": 0.0}]}"#;
    let input = [
        good,
        "{not json",
        r#"{"group_id": "mismatch", "rollouts": [{"tokens": [1, 2], "logprobs": [-0.5], "reward": 1.0}]}"#,
        r#"{"group_id": "positive", "rollouts": [{"tokens": [1], "logprobs": [0.5], "reward": 1.0}]}"#,
        r#"{"group_id": "empty", "rollouts": []}"#,
        r#"{"group_id": "nan", "rollouts": [{"tokens": [1], "logprobs": [NaN], "reward": 1.0}]}"#,
        "",
        good,
    ]
    .join("\n");
    let out = leaf(&[], &input);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(lines(&out).len(), 2);
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "line 2:",
        "line 3:",
        "response 0",
        "logprobs",
        "line 4:",
        "logprobs[0] = 0.5",
        "line 5:",
        "empty",
        "line 6:",
    ] {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
    assert!(!err.contains("panicked"));
}

#[test]
fn missing_input_file_is_a_clear_error() {
    let out = leaf(&["--input", "/nonexistent/groups.jsonl"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/groups.jsonl"));
}
