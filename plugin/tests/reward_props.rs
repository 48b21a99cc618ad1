//! Invariants of every reward on arbitrary text.

use leaf_plugin::reward::{self, edit, text, EditCounts, Metric, RewardOptions};
use proptest::prelude::*;

/// Text that mixes words, punctuation, digits, odd whitespace and arbitrary scalar values.
fn messy_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[a-zA-Z]{1,8}",
        2 => "[äöüßÄÖÜéèçñ]{1,3}",
        2 => "[.,!?;:()\"'&<>/-]",
        2 => "[0-9]{1,4}([.,-][0-9]{1,3})?",
        1 => "[ \t\n\u{a0}\u{3000}\u{1c}\u{2028}]{1,3}",
        1 => any::<char>().prop_map(String::from),
        1 => Just("&amp;".to_string()),
        1 => Just("<skipped>".to_string()),
        1 => "[ΑΒΓΣσςαβ]{1,4}",
        1 => "[日本語中文😀👍🏽]{1,3}",
    ];
    prop::collection::vec(piece, 0..24).prop_map(|pieces| pieces.join(" "))
}

/// Any Unicode string at all (every scalar value, including controls and unassigned ones).
fn any_text() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..64).prop_map(|c| c.into_iter().collect())
}

fn both_options() -> [RewardOptions; 2] {
    [
        RewardOptions { lowercase: false },
        RewardOptions { lowercase: true },
    ]
}

fn check_ranges(hyp: &str, reference: &str) -> Result<(), TestCaseError> {
    for options in both_options() {
        for metric in Metric::ALL {
            let r = metric.reward(options).score(hyp, reference);
            prop_assert!(
                r.is_finite() && (0.0..=1.0).contains(&r),
                "{metric} reward {r}"
            );
            let raw = metric.raw_score(hyp, reference, options);
            prop_assert!(raw.is_finite() && raw >= 0.0, "{metric} raw {raw}");
            match metric {
                // sacreBLEU's identical-sentence BLEU is exp(ln 100), a hair above 100.
                Metric::Bleu | Metric::Chrf | Metric::ChrfPlusPlus => {
                    prop_assert!(raw <= 100.0 + 1e-9, "{metric} raw {raw}")
                }
                Metric::Exact => prop_assert!(raw == 0.0 || raw == 1.0),
                Metric::Positional => {
                    prop_assert!(raw <= 1.0);
                    // 1 exactly when the exact match is 1.
                    let exact = Metric::Exact.raw_score(hyp, reference, options);
                    prop_assert_eq!(
                        raw == 1.0,
                        exact == 1.0,
                        "positional {} exact {}",
                        raw,
                        exact
                    );
                }
                Metric::Wer | Metric::Cer => {}
            }
        }
    }
    Ok(())
}

fn check_counts(c: EditCounts, ref_len: usize, hyp_len: usize) -> Result<(), TestCaseError> {
    prop_assert_eq!(c.reference_len() as usize, ref_len);
    prop_assert_eq!(c.hypothesis_len() as usize, hyp_len);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn identical_strings_score_perfectly(s in messy_text()) {
        for options in both_options() {
            for metric in Metric::ALL {
                let r = metric.reward(options).score(&s, &s);
                prop_assert_eq!(r, 1.0, "{} on {:?}", metric, s);
            }
            // Raw scales: 100 for BLEU/chrF whenever there is something to score, rate 0.
            prop_assert_eq!(Metric::Wer.raw_score(&s, &s, options), 0.0);
            prop_assert_eq!(Metric::Cer.raw_score(&s, &s, options), 0.0);
            prop_assert_eq!(Metric::Exact.raw_score(&s, &s, options), 1.0);
            let bleu = reward::sentence_bleu(&s, &s, &reward::BleuOptions { lowercase: options.lowercase });
            if bleu.sys_len > 0 {
                prop_assert!((bleu.score - 100.0).abs() < 1e-9, "bleu {}", bleu.score);
            }
            if !s.chars().all(text::is_py_whitespace) {
                let chrf = Metric::Chrf.raw_score(&s, &s, options);
                prop_assert!((chrf - 100.0).abs() < 1e-9, "chrf {}", chrf);
            }
        }
    }

    #[test]
    fn scores_in_range_on_messy_text(hyp in messy_text(), reference in messy_text()) {
        check_ranges(&hyp, &reference)?;
    }

    #[test]
    fn no_panic_on_arbitrary_unicode(hyp in any_text(), reference in any_text()) {
        check_ranges(&hyp, &reference)?;
        check_ranges(&hyp, &hyp)?;
        let _ = text::normalize_for_exact(&hyp);
        let _ = reward::bleu::tokenize_13a(&hyp);
        let _ = reward::chrf::chrf_words(&hyp);
    }

    #[test]
    fn error_counts_are_a_valid_alignment(hyp in messy_text(), reference in messy_text()) {
        let o = edit::ErrorRateOptions::default();
        let w = reward::word_errors(&hyp, &reference, &o);
        check_counts(w, edit::wer_words(&reference, &o).len(), edit::wer_words(&hyp, &o).len())?;
        let r_chars = edit::cer_chars(&reference, &o);
        let h_chars = edit::cer_chars(&hyp, &o);
        let c = reward::char_errors(&hyp, &reference, &o);
        check_counts(c, r_chars.len(), h_chars.len())?;
        prop_assert_eq!(c.errors() as usize, edit::levenshtein(&r_chars, &h_chars));
    }

    #[test]
    fn alignment_is_optimal_on_small_alphabets(
        a in prop::collection::vec(0u8..4, 0..40),
        b in prop::collection::vec(0u8..4, 0..40),
    ) {
        let c = edit::align(&a, &b);
        prop_assert_eq!(c.errors() as usize, edit::levenshtein(&a, &b));
        check_counts(c, a.len(), b.len())?;
    }

    #[test]
    fn positional_accuracy_counts_places(
        reference in prop::collection::vec(0usize..10, 1..12),
        wrong in prop::collection::vec(any::<bool>(), 12),
        cut in 0usize..12,
    ) {
        const W: [&str; 10] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];
        let n = reference.len();
        let r: Vec<&str> = reference.iter().map(|&d| W[d]).collect();
        // Same length, k places right: k / n.
        let h: Vec<&str> = reference.iter().zip(&wrong).map(|(&d, &w)| if w { W[(d + 1) % 10] } else { W[d] }).collect();
        let k = h.iter().zip(&r).filter(|(a, b)| a == b).count();
        let score = reward::positional_accuracy(&h.join(" "), &r.join(" "));
        prop_assert!((score - k as f64 / n as f64).abs() < 1e-12, "{score} for {k} of {n}");
        // Leaving words out never pays more than saying them wrong: the answer cut to its
        // first j words scores at most j / n, and no more than the full answer with those
        // words replaced by wrong ones.
        let j = cut.min(n);
        let short = r[..j].join(" ");
        let cut_score = reward::positional_accuracy(&short, &r.join(" "));
        prop_assert!((cut_score - j as f64 / n as f64).abs() < 1e-12);
        let padded: Vec<&str> = r.iter().enumerate().map(|(i, &w)| if i < j { w } else if w == "zero" { "one" } else { "zero" }).collect();
        let sub_score = reward::positional_accuracy(&padded.join(" "), &r.join(" "));
        prop_assert!((cut_score - sub_score).abs() < 1e-12);
        // An extra word lowers a right answer.
        let extra = format!("{} zero", r.join(" "));
        prop_assert!(reward::positional_accuracy(&extra, &r.join(" ")) < 1.0);
    }

    #[test]
    fn symmetric_metrics_stay_in_range_when_swapped(hyp in messy_text(), reference in messy_text()) {
        check_ranges(&reference, &hyp)?;
        // Exact match is symmetric.
        prop_assert_eq!(reward::exact_match(&hyp, &reference), reward::exact_match(&reference, &hyp));
    }
}

#[test]
fn very_long_strings() {
    // ~100k characters each: everything must finish and stay in range.
    let sentence = "Der schnelle braune Fuchs springt über den faulen Hund, 3.5 km weit! ";
    let hyp: String = sentence.repeat(1500);
    let reference: String = sentence.replace("Fuchs", "Wolf").repeat(1500);
    for metric in [
        Metric::Bleu,
        Metric::Chrf,
        Metric::ChrfPlusPlus,
        Metric::Wer,
        Metric::Exact,
    ] {
        let r = metric
            .reward(RewardOptions::default())
            .score(&hyp, &reference);
        assert!((0.0..=1.0).contains(&r), "{metric}: {r}");
    }
    // CER on 10k characters aligns through the Hirschberg split.
    let hyp: String = hyp.chars().take(10_000).collect();
    let reference: String = reference.chars().take(10_000).collect();
    let o = edit::ErrorRateOptions::default();
    let c = reward::char_errors(&hyp, &reference, &o);
    let (h, r) = (edit::cer_chars(&hyp, &o), edit::cer_chars(&reference, &o));
    assert!(h.len() > 9_990 && r.len() > 9_990);
    assert_eq!(c.reference_len() as usize, r.len());
    assert_eq!(c.hypothesis_len() as usize, h.len());
    assert_eq!(c.errors() as usize, edit::levenshtein(&r, &h));
    assert!(c.rate() > 0.0 && c.rate() < 0.2, "{}", c.rate());
}
