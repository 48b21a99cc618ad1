//! Cross-check: LEAF and GRPO against `benches/leaf_reference.py`, a literal pure-Python
//! implementation of LEAF-SPEC.md (full stable sort, prefix-tuple dictionaries), on a few
//! hundred synthetic groups covering ties, shared prefixes, empty and short responses.

use std::io::Write;
use std::process::{Command, Stdio};

use leaf_plugin::advantage::synthetic::{synthetic_group, SyntheticSpec};
use leaf_plugin::advantage::{AdvantageEstimator, Grpo, Leaf, LeafConfig, Terms};
use leaf_plugin::rollout::{Group, Rollout};

fn groups() -> Vec<Group> {
    let mut out = Vec::new();
    for seed in 0..300u64 {
        let spec = SyntheticSpec {
            responses: 1 + (seed % 9) as usize,
            mean_len: [0, 1, 2, 5, 12, 40][(seed % 6) as usize],
            vocab: 1 + (seed % 4) as u32,
            reward_levels: (seed % 4) as u32,
        };
        let g = synthetic_group(format!("g{seed}"), spec, seed);
        // Every third group: quantise log-probs so surprisal ties are common.
        if seed % 3 == 0 {
            let rows: Vec<Rollout> = g
                .into_rollouts()
                .into_iter()
                .map(|mut r| {
                    r.logprobs
                        .iter_mut()
                        .for_each(|l| *l = (*l * 2.0).round() / 2.0);
                    r
                })
                .collect();
            out.push(Group::new(format!("g{seed}"), rows).unwrap());
        } else {
            out.push(g);
        }
    }
    out
}

fn python(args: &[&str], groups: &[Group]) -> Vec<Vec<Vec<f64>>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/leaf_reference.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("this test needs python3 on PATH (the reference implementation is Python)");
    let mut stdin = child.stdin.take().unwrap();
    for g in groups {
        writeln!(
            stdin,
            "{}",
            serde_json::json!({"group_id": g.id(), "rollouts": g.rollouts()})
        )
        .unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "reference failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| serde_json::from_value(v["advantages"].clone()).unwrap())
        .collect()
}

fn compare(est: &dyn AdvantageEstimator, args: &[&str]) {
    let gs = groups();
    let want = python(args, &gs);
    assert_eq!(want.len(), gs.len());
    for (g, w) in gs.iter().zip(&want) {
        let got = est.estimate(g).per_token;
        assert_eq!(got.len(), w.len(), "{}", g.id());
        for (i, (a, b)) in got.iter().zip(w).enumerate() {
            assert_eq!(a.len(), b.len(), "{} response {i}", g.id());
            for (t, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-9 * (1.0 + y.abs()),
                    "{} response {i} token {t} ({args:?}): rust {x}, python {y}",
                    g.id()
                );
            }
        }
    }
}

#[test]
fn leaf_matches_the_python_reference() {
    compare(&Leaf::default(), &[]);
    for b in [0usize, 1, 3] {
        let cfg = LeafConfig {
            fork_budget: b,
            ..LeafConfig::default()
        };
        compare(&Leaf::new(cfg), &["--fork-budget", &b.to_string()]);
    }
    let cfg = LeafConfig {
        min_prefix: 3,
        terms: Terms::Local,
        ..LeafConfig::default()
    };
    compare(&Leaf::new(cfg), &["--min-prefix", "3", "--terms", "local"]);
    let cfg = LeafConfig {
        terms: Terms::Global,
        ..LeafConfig::default()
    };
    compare(&Leaf::new(cfg), &["--terms", "global"]);
}

#[test]
fn grpo_matches_the_python_reference() {
    compare(&Grpo, &["--estimator", "grpo"]);
}
