//! chrF and chrF++, identical to sacreBLEU 2.x `sentence_chrf(hyp, [ref])` and to
//! `CHRF(word_order=2).sentence_score(hyp, [ref])`.
//!
//! sacreBLEU's defaults: character n-grams of order 1..=6, no word n-grams (chrF++ adds
//! word 1- and 2-grams), beta = 2, whitespace removed before character n-grams are taken,
//! case kept, and `eps_smoothing=False`. For one segment:
//!
//! 1. optional `str.lower()` of both sides;
//! 2. character n-grams of the text with all whitespace removed (`"".join(s.split())`);
//! 3. for chrF++, word n-grams over `str.split()` words whose one leading or trailing ASCII
//!    punctuation mark is split off (`"word,"` -> `"word"`, `","`; a one-character word is
//!    kept whole; only one side of a word is split: `"(hi)"` -> `"(hi"`, `")"`);
//! 4. per order: hypothesis n-grams (counted as 0 when the reference has no n-gram of that
//!    order), reference n-grams, clipped matches;
//! 5. precision and recall averaged over the "effective" orders, those where both sides have
//!    n-grams (sacreBLEU's default; `eps_smoothing=True` instead averages per-order
//!    F-scores with 1e-16 for undefined ones, as chrF++.py, Moses and NLTK do);
//! 6. `100 * (1 + beta^2) * P * R / (beta^2 * P + R)`, or 0 when `P + R` is 0.
//!
//! Edge cases as in sacreBLEU: empty (or whitespace-only) hypothesis or reference score 0,
//! and so does a pair of empty strings.

use std::collections::HashMap;
use std::hash::Hash;

use serde::{Deserialize, Serialize};

use super::text;

/// sacreBLEU's `CHRF.CHAR_ORDER`.
pub const CHAR_ORDER: usize = 6;
/// sacreBLEU's `CHRF.BETA`.
pub const BETA: u32 = 2;

/// The 32 ASCII punctuation characters of Python's `string.punctuation`, which chrF++ splits
/// off words.
fn is_chrf_punct(c: char) -> bool {
    c.is_ascii_punctuation()
}

/// Options of [`sentence_chrf`]. The default is chrF (`sentence_chrf`'s defaults);
/// [`ChrfOptions::chrf_plus_plus`] is chrF++.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChrfOptions {
    /// Character n-gram order (6).
    pub char_order: usize,
    /// Word n-gram order (0 for chrF, 2 for chrF++).
    pub word_order: usize,
    /// Weight of recall relative to precision (2).
    pub beta: u32,
    /// Lowercase both sides first (sacreBLEU `lowercase=True`).
    pub lowercase: bool,
    /// Keep whitespace inside character n-grams (sacreBLEU `whitespace=True`; default off).
    pub whitespace: bool,
    /// chrF++.py-style epsilon smoothing instead of effective-order averaging (default off,
    /// as in sacreBLEU 2.x).
    pub eps_smoothing: bool,
}

impl Default for ChrfOptions {
    fn default() -> Self {
        ChrfOptions {
            char_order: CHAR_ORDER,
            word_order: 0,
            beta: BETA,
            lowercase: false,
            whitespace: false,
            eps_smoothing: false,
        }
    }
}

impl ChrfOptions {
    /// chrF++: the chrF defaults plus word 1- and 2-grams.
    pub fn chrf_plus_plus() -> Self {
        ChrfOptions {
            word_order: 2,
            ..ChrfOptions::default()
        }
    }
}

/// Per-order statistics: `[hypothesis n-grams, reference n-grams, matches]`.
pub type OrderStats = [u64; 3];

/// Counts n-grams of order `n` over `items`.
fn ngram_counts<T: Hash + Eq>(items: &[T], n: usize) -> HashMap<&[T], u64> {
    let mut counts = HashMap::with_capacity(items.len());
    if n == 0 {
        return counts;
    }
    for gram in items.windows(n) {
        *counts.entry(gram).or_insert(0) += 1;
    }
    counts
}

/// sacreBLEU's `_get_match_statistics` for one order.
fn match_statistics<T: Hash + Eq>(hyp: &[T], reference: &[T], n: usize) -> OrderStats {
    let hyp_counts = ngram_counts(hyp, n);
    let ref_counts = ngram_counts(reference, n);
    let mut hyp_total = 0u64;
    let mut matches = 0u64;
    for (gram, &count) in &hyp_counts {
        hyp_total += count;
        if let Some(&in_ref) = ref_counts.get(gram) {
            matches += count.min(in_ref);
        }
    }
    let ref_total: u64 = ref_counts.values().sum();
    [
        // Hits are not counted when the reference has no n-gram of this order.
        if ref_counts.is_empty() { 0 } else { hyp_total },
        ref_total,
        matches,
    ]
}

/// chrF++'s word splitting (sacreBLEU `CHRF._remove_punctuation`).
pub fn chrf_words(segment: &str) -> Vec<&str> {
    let mut words = Vec::new();
    for w in text::py_split(segment) {
        let mut chars = w.chars();
        match (chars.next(), chars.next_back()) {
            // At least two characters: split off a trailing, else a leading, punctuation mark.
            (Some(first), Some(last)) => {
                if is_chrf_punct(last) {
                    let cut = w.len() - last.len_utf8();
                    words.extend([&w[..cut], &w[cut..]]);
                } else if is_chrf_punct(first) {
                    let cut = first.len_utf8();
                    words.extend([&w[..cut], &w[cut..]]);
                } else {
                    words.push(w);
                }
            }
            // One character: kept whole.
            _ => words.push(w),
        }
    }
    words
}

/// The per-order statistics of one pair: `char_order` character orders, then `word_order`
/// word orders.
pub fn chrf_statistics(
    hypothesis: &str,
    reference: &str,
    options: &ChrfOptions,
) -> Vec<OrderStats> {
    let hyp = text::lowercase_if(hypothesis, options.lowercase);
    let reference = text::lowercase_if(reference, options.lowercase);
    let char_seq = |s: &str| -> Vec<char> {
        if options.whitespace {
            s.chars().collect()
        } else {
            s.chars().filter(|&c| !text::is_py_whitespace(c)).collect()
        }
    };
    let hyp_chars = char_seq(&hyp);
    let ref_chars = char_seq(&reference);
    let mut stats = Vec::with_capacity(options.char_order + options.word_order);
    for n in 1..=options.char_order {
        stats.push(match_statistics(&hyp_chars, &ref_chars, n));
    }
    if options.word_order > 0 {
        let hyp_words = chrf_words(&hyp);
        let ref_words = chrf_words(&reference);
        for n in 1..=options.word_order {
            stats.push(match_statistics(&hyp_words, &ref_words, n));
        }
    }
    stats
}

/// sacreBLEU's `CHRF._compute_f_score`: the score on the 0-100 scale from per-order
/// statistics.
pub fn f_score(stats: &[OrderStats], beta: u32, eps_smoothing: bool) -> f64 {
    const EPS: f64 = 1e-16;
    let factor = f64::from(beta) * f64::from(beta);
    let mut score = 0.0f64;
    let mut effective_order = 0usize;
    let mut avg_prec = 0.0f64;
    let mut avg_rec = 0.0f64;
    for &[n_hyp, n_ref, n_match] in stats {
        let prec = if n_hyp > 0 {
            n_match as f64 / n_hyp as f64
        } else {
            EPS
        };
        let rec = if n_ref > 0 {
            n_match as f64 / n_ref as f64
        } else {
            EPS
        };
        let denom = factor * prec + rec;
        score += if denom > 0.0 {
            (1.0 + factor) * prec * rec / denom
        } else {
            EPS
        };
        if n_hyp > 0 && n_ref > 0 {
            avg_prec += prec;
            avg_rec += rec;
            effective_order += 1;
        }
    }
    if eps_smoothing {
        if stats.is_empty() {
            return 0.0;
        }
        return 100.0 * score / stats.len() as f64;
    }
    if effective_order == 0 {
        avg_prec = 0.0;
        avg_rec = 0.0;
    } else {
        avg_prec /= effective_order as f64;
        avg_rec /= effective_order as f64;
    }
    if avg_prec + avg_rec != 0.0 {
        let mut score = (1.0 + factor) * avg_prec * avg_rec;
        score /= (factor * avg_prec) + avg_rec;
        100.0 * score
    } else {
        0.0
    }
}

/// chrF (or chrF++, per `options`) of `hypothesis` against one `reference` on the 0-100
/// scale; higher is better. Identical to sacreBLEU 2.x `sentence_chrf` for the default
/// options.
pub fn sentence_chrf(hypothesis: &str, reference: &str, options: &ChrfOptions) -> f64 {
    let stats = chrf_statistics(hypothesis, reference, options);
    f_score(&stats, options.beta, options.eps_smoothing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_splitting_like_sacrebleu() {
        assert_eq!(
            chrf_words("(hi) a, ,b x"),
            vec!["(hi", ")", "a", ",", ",", "b", "x"]
        );
        assert_eq!(chrf_words("äb. «ö» ."), vec!["äb", ".", "«ö»", "."]);
        assert!(chrf_words("").is_empty());
    }

    #[test]
    fn hand_computed_chrf() {
        // hyp "ab" vs ref "abc": 1-grams: a,b vs a,b,c -> P=1, R=2/3;
        // 2-grams: ab vs ab,bc -> P=1, R=1/2; 3-grams: hyp has none -> not effective.
        let p: f64 = 1.0;
        let r: f64 = (2.0 / 3.0 + 0.5) / 2.0;
        let expected = 100.0 * 5.0 * p * r / (4.0 * p + r);
        let got = sentence_chrf("ab", "a b c", &ChrfOptions::default());
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
    }

    #[test]
    fn edge_cases() {
        let o = ChrfOptions::default();
        assert_eq!(sentence_chrf("", "", &o), 0.0);
        assert_eq!(sentence_chrf("abc", "", &o), 0.0);
        assert_eq!(sentence_chrf("", "abc", &o), 0.0);
        assert!((sentence_chrf("Hallo Welt", "Hallo Welt", &o) - 100.0).abs() < 1e-12);
        assert!((sentence_chrf("a", "a", &ChrfOptions::chrf_plus_plus()) - 100.0).abs() < 1e-12);
        let lc = ChrfOptions {
            lowercase: true,
            ..o
        };
        assert!((sentence_chrf("ABC", "abc", &lc) - 100.0).abs() < 1e-12);
        assert_eq!(sentence_chrf("ABC", "abc", &o), 0.0);
    }
}
