//! Every metric against the values sacreBLEU 2.x and jiwer 4 produced for the pairs in
//! `tests/data/rewards/goldens.jsonl` (regenerate with `make_goldens.py` next to it).

use std::path::PathBuf;

use leaf_plugin::reward::{
    self, bleu::BleuOptions, chrf::ChrfOptions, edit::ErrorRateOptions, EditCounts, Metric,
    RewardOptions,
};
use serde::Deserialize;

const TOL: f64 = 1e-6;

#[derive(Deserialize)]
struct Bleu {
    score: f64,
    counts: [u64; 4],
    totals: [u64; 4],
    bp: f64,
    sys_len: u64,
    ref_len: u64,
}

#[derive(Deserialize)]
struct Rate {
    rate: f64,
    hits: u64,
    substitutions: u64,
    deletions: u64,
    insertions: u64,
}

#[derive(Deserialize)]
struct Golden {
    hyp: String,
    #[serde(rename = "ref")]
    reference: String,
    bleu: Bleu,
    bleu_lc: Bleu,
    chrf: f64,
    chrf_lc: f64,
    chrfpp: f64,
    chrfpp_lc: f64,
    wer: Rate,
    cer: Rate,
    wer_lc: Rate,
    cer_lc: Rate,
    exact: f64,
}

fn goldens() -> Vec<Golden> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/rewards/goldens.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1));
        if value.get("meta").is_some() {
            continue;
        }
        rows.push(
            serde_json::from_value(value)
                .unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1)),
        );
    }
    assert!(rows.len() >= 200, "only {} golden pairs", rows.len());
    rows
}

/// Collects mismatches so one run reports all of them.
#[derive(Default)]
struct Report {
    failures: Vec<String>,
    checked: usize,
}

impl Report {
    fn close(&mut self, what: &str, g: &Golden, expected: f64, got: f64) {
        self.checked += 1;
        // Written so that NaN on either side fails.
        let within = (expected - got).abs() <= TOL;
        if !within {
            self.failures.push(format!(
                "{what}: hyp={:?} ref={:?} expected {expected} got {got}",
                g.hyp, g.reference
            ));
        }
    }

    fn equal<T: PartialEq + std::fmt::Debug>(
        &mut self,
        what: &str,
        g: &Golden,
        expected: T,
        got: T,
    ) {
        self.checked += 1;
        if expected != got {
            self.failures.push(format!(
                "{what}: hyp={:?} ref={:?} expected {expected:?} got {got:?}",
                g.hyp, g.reference
            ));
        }
    }

    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} of {} checks failed:\n{}",
            self.failures.len(),
            self.checked,
            self.failures.join("\n")
        );
    }
}

fn check_bleu(report: &mut Report, what: &str, g: &Golden, expected: &Bleu, lowercase: bool) {
    let got = reward::sentence_bleu(&g.hyp, &g.reference, &BleuOptions { lowercase });
    report.close(what, g, expected.score, got.score);
    report.close(&format!("{what}.bp"), g, expected.bp, got.bp);
    report.equal(&format!("{what}.counts"), g, expected.counts, got.counts);
    report.equal(&format!("{what}.totals"), g, expected.totals, got.totals);
    report.equal(&format!("{what}.sys_len"), g, expected.sys_len, got.sys_len);
    report.equal(&format!("{what}.ref_len"), g, expected.ref_len, got.ref_len);
}

fn check_rate(report: &mut Report, what: &str, g: &Golden, expected: &Rate, got: EditCounts) {
    report.close(what, g, expected.rate, got.rate());
    report.equal(
        &format!("{what} (H, S, D, I)"),
        g,
        (
            expected.hits,
            expected.substitutions,
            expected.deletions,
            expected.insertions,
        ),
        (got.hits, got.substitutions, got.deletions, got.insertions),
    );
}

#[test]
fn bleu_matches_sacrebleu() {
    let mut report = Report::default();
    for g in &goldens() {
        check_bleu(&mut report, "bleu", g, &g.bleu, false);
        check_bleu(&mut report, "bleu_lc", g, &g.bleu_lc, true);
    }
    report.finish();
}

#[test]
fn chrf_matches_sacrebleu() {
    let mut report = Report::default();
    let chrf = ChrfOptions::default();
    let chrfpp = ChrfOptions::chrf_plus_plus();
    let lc = |o: ChrfOptions| ChrfOptions {
        lowercase: true,
        ..o
    };
    for g in &goldens() {
        let (h, r) = (g.hyp.as_str(), g.reference.as_str());
        report.close("chrf", g, g.chrf, reward::sentence_chrf(h, r, &chrf));
        report.close(
            "chrf_lc",
            g,
            g.chrf_lc,
            reward::sentence_chrf(h, r, &lc(chrf)),
        );
        report.close("chrf++", g, g.chrfpp, reward::sentence_chrf(h, r, &chrfpp));
        report.close(
            "chrf++_lc",
            g,
            g.chrfpp_lc,
            reward::sentence_chrf(h, r, &lc(chrfpp)),
        );
    }
    report.finish();
}

#[test]
fn wer_and_cer_match_jiwer() {
    let mut report = Report::default();
    let cased = ErrorRateOptions::default();
    let lc = ErrorRateOptions { lowercase: true };
    for g in &goldens() {
        let (h, r) = (g.hyp.as_str(), g.reference.as_str());
        check_rate(
            &mut report,
            "wer",
            g,
            &g.wer,
            reward::word_errors(h, r, &cased),
        );
        check_rate(
            &mut report,
            "cer",
            g,
            &g.cer,
            reward::char_errors(h, r, &cased),
        );
        check_rate(
            &mut report,
            "wer_lc",
            g,
            &g.wer_lc,
            reward::word_errors(h, r, &lc),
        );
        check_rate(
            &mut report,
            "cer_lc",
            g,
            &g.cer_lc,
            reward::char_errors(h, r, &lc),
        );
    }
    report.finish();
}

#[test]
fn exact_matches_the_python_normalisation() {
    let mut report = Report::default();
    for g in &goldens() {
        let got = if reward::exact_match(&g.hyp, &g.reference) {
            1.0
        } else {
            0.0
        };
        report.close("exact", g, g.exact, got);
    }
    report.finish();
}

/// No character chrF looks at (sacreBLEU removes Python whitespace).
fn blank(s: &str) -> bool {
    s.chars().all(reward::text::is_py_whitespace)
}

#[test]
fn metric_raw_scores_and_rewards_agree_with_goldens() {
    let mut report = Report::default();
    for g in &goldens() {
        for lowercase in [false, true] {
            let options = RewardOptions { lowercase };
            let expected = [
                (
                    Metric::Bleu,
                    if lowercase {
                        g.bleu_lc.score
                    } else {
                        g.bleu.score
                    },
                ),
                (Metric::Chrf, if lowercase { g.chrf_lc } else { g.chrf }),
                (
                    Metric::ChrfPlusPlus,
                    if lowercase { g.chrfpp_lc } else { g.chrfpp },
                ),
                (
                    Metric::Wer,
                    if lowercase { g.wer_lc.rate } else { g.wer.rate },
                ),
                (
                    Metric::Cer,
                    if lowercase { g.cer_lc.rate } else { g.cer.rate },
                ),
                (Metric::Exact, g.exact),
            ];
            for (metric, raw) in expected {
                let what = format!("{metric}{}", if lowercase { " lc" } else { "" });
                report.close(
                    &what,
                    g,
                    raw,
                    metric.raw_score(&g.hyp, &g.reference, options),
                );
                let reward = metric.reward(options).score(&g.hyp, &g.reference);
                let expected_reward = match metric {
                    Metric::Wer | Metric::Cer => 1.0 - raw.min(1.0),
                    Metric::Exact => raw,
                    // raw / 100, except the empty pair, which the raw score puts at 0.
                    Metric::Bleu if g.bleu.sys_len == 0 && g.bleu.ref_len == 0 => 1.0,
                    Metric::Chrf | Metric::ChrfPlusPlus if blank(&g.hyp) && blank(&g.reference) => {
                        1.0
                    }
                    _ => (raw / 100.0).min(1.0),
                };
                report.close(&format!("{what} reward"), g, expected_reward, reward);
            }
        }
    }
    report.finish();
}
