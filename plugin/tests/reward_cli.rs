//! `leaf reward` end to end: JSON Lines in and out, bad lines, and the goldens through the
//! binary.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn leaf(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_leaf"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the leaf binary starts");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin.as_bytes())
        .expect("stdin accepts the input");
    child.wait_with_output().expect("the leaf binary finishes")
}

fn scores(out: &Output) -> Vec<f64> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("each output line is JSON");
            v["score"]
                .as_f64()
                .expect("each output line has a numeric score")
        })
        .collect()
}

#[test]
fn scores_each_line() {
    let input = concat!(
        r#"{"hyp": "the cat sat on the mat", "ref": "the cat is on the mat"}"#,
        "\n\n",
        r#"{"hyp": "Guten Morgen", "ref": "Guten Morgen", "id": 7}"#,
        "\n"
    );
    let out = leaf(&["reward", "--metric", "wer"], input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(scores(&out), vec![1.0 / 6.0, 0.0]);

    let out = leaf(&["reward", "--metric", "wer", "--as-reward"], input);
    assert_eq!(scores(&out), vec![5.0 / 6.0, 1.0]);

    let out = leaf(&["reward", "--metric", "chrf++"], input);
    let s = scores(&out);
    assert_eq!(s.len(), 2);
    assert!(
        s[0] > 0.0 && s[0] < 100.0 && (s[1] - 100.0).abs() < 1e-9,
        "{s:?}"
    );

    let out = leaf(
        &["reward", "--metric", "exact", "--lowercase"],
        r#"{"hyp": "JA!", "ref": "ja"}"#,
    );
    assert_eq!(scores(&out), vec![1.0]);
}

#[test]
fn bad_lines_are_reported_and_the_rest_scored() {
    let input = concat!(
        r#"{"hyp": "a b", "ref": "a b"}"#,
        "\n",
        "not json\n",
        r#"{"hyp": "a"}"#,
        "\n",
        r#"{"hyp": 3, "ref": "x"}"#,
        "\n",
        r#"{"hyp": "a b c", "ref": "a b d"}"#,
        "\n"
    );
    let out = leaf(&["reward", "--metric", "cer"], input);
    assert!(!out.status.success());
    assert_eq!(scores(&out), vec![0.0, 0.2]);
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "line 2:",
        "line 3:",
        "missing field `ref`",
        "line 4:",
        "3 line(s) failed",
    ] {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
    assert!(
        !err.contains("line 1:") && !err.contains("line 5:"),
        "{err}"
    );
}

#[test]
fn reads_input_file_and_rejects_unknown_metric() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pairs.jsonl");
    std::fs::write(&path, "{\"hyp\": \"x\", \"ref\": \"x\"}\n").expect("write input");
    let out = leaf(
        &[
            "reward",
            "--metric",
            "bleu",
            "--input",
            path.to_str().expect("utf-8 path"),
        ],
        "",
    );
    assert!(out.status.success());
    let s = scores(&out);
    assert!((s[0] - 100.0).abs() < 1e-9, "{s:?}");

    let out = leaf(&["reward", "--metric", "rouge"], "");
    assert!(!out.status.success());
    let missing = dir.path().join("missing.jsonl");
    let out = leaf(
        &[
            "reward",
            "--metric",
            "bleu",
            "--input",
            missing.to_str().expect("utf-8 path"),
        ],
        "",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open"));
}

/// Reads the expected raw score from a golden row.
type Expected = fn(&serde_json::Value) -> f64;

#[test]
fn goldens_through_the_binary() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/rewards/goldens.jsonl");
    let text = std::fs::read_to_string(&path).expect("goldens.jsonl is readable");
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("golden lines are JSON"))
        .filter(|v: &serde_json::Value| v.get("meta").is_none())
        .collect();
    let input: String = rows
        .iter()
        .map(|r| serde_json::json!({"hyp": r["hyp"], "ref": r["ref"]}).to_string() + "\n")
        .collect();
    let checks: [(&[&str], Expected); 6] = [
        (&["--metric", "bleu"], |r| {
            r["bleu"]["score"].as_f64().unwrap_or(f64::NAN)
        }),
        (&["--metric", "chrf", "--lowercase"], |r| {
            r["chrf_lc"].as_f64().unwrap_or(f64::NAN)
        }),
        (&["--metric", "chrf++"], |r| {
            r["chrfpp"].as_f64().unwrap_or(f64::NAN)
        }),
        (&["--metric", "wer"], |r| {
            r["wer"]["rate"].as_f64().unwrap_or(f64::NAN)
        }),
        (&["--metric", "cer", "--lowercase"], |r| {
            r["cer_lc"]["rate"].as_f64().unwrap_or(f64::NAN)
        }),
        (&["--metric", "exact"], |r| {
            r["exact"].as_f64().unwrap_or(f64::NAN)
        }),
    ];
    for (args, expected) in checks {
        let mut full = vec!["reward"];
        full.extend_from_slice(args);
        let out = leaf(&full, &input);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = scores(&out);
        assert_eq!(got.len(), rows.len(), "{args:?}");
        for (row, g) in rows.iter().zip(got) {
            let e = expected(row);
            assert!(
                (e - g).abs() <= 1e-6,
                "{args:?} on {}: expected {e}, got {g}",
                row["hyp"]
            );
        }
    }
}
