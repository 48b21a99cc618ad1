//! Sentence BLEU, identical to sacreBLEU 2.x `sentence_bleu(hyp, [ref])` with its defaults.
//!
//! sacreBLEU's `sentence_bleu` builds `BLEU(tokenize='13a', smooth_method='exp',
//! effective_order=True, lowercase=False)` and scores one segment:
//!
//! 1. preprocessing of hypothesis and reference: optional `str.lower()`, then `str.rstrip()`,
//!    then the 13a tokenizer ([`tokenize_13a`]), then `str.split()`;
//! 2. clipped n-gram matches `correct[n]` and hypothesis n-gram counts `total[n]` for
//!    n = 1..=4;
//! 3. if no n-gram of any order matches, the score is 0;
//! 4. precision of order n: `100 * correct / total`; when `correct` is 0 the `exp`
//!    smoothing (NIST's, "method 3" of Chen and Cherry 2014) uses
//!    `100 / (2^k * total)`, k counting the zero-match orders seen so far;
//! 5. effective order: orders are used up to (not including) the first one for which the
//!    hypothesis has no n-grams at all (a 2-word hypothesis is scored on 1- and 2-grams);
//! 6. brevity penalty `exp(1 - ref_len / hyp_len)` when the hypothesis is shorter;
//! 7. score `bp * exp(mean(ln p_n))` on the 0-100 scale.
//!
//! Edge cases as in sacreBLEU: an empty hypothesis or an empty reference scores 0, and so
//! does a pair of empty strings.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::text;

/// Highest n-gram order, sacreBLEU's `MAX_NGRAM_ORDER`.
pub const MAX_NGRAM_ORDER: usize = 4;

/// Options of [`sentence_bleu`]; the default is sacreBLEU's `sentence_bleu` default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BleuOptions {
    /// Lowercase hypothesis and reference first (sacreBLEU `lowercase=True`, `-lc`).
    #[serde(default)]
    pub lowercase: bool,
}

/// A sentence BLEU score with the statistics behind it (sacreBLEU's `BLEUScore`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BleuScore {
    /// BLEU on the 0-100 scale; higher is better.
    pub score: f64,
    /// Clipped matching n-grams of each order (1..=4).
    pub counts: [u64; MAX_NGRAM_ORDER],
    /// Hypothesis n-grams of each order (1..=4).
    pub totals: [u64; MAX_NGRAM_ORDER],
    /// Smoothed precisions on the 0-100 scale; 0 for orders past the effective order and
    /// all 0 when nothing matched (as sacreBLEU reports them).
    pub precisions: [f64; MAX_NGRAM_ORDER],
    /// Brevity penalty in [0, 1].
    pub bp: f64,
    /// Hypothesis length in 13a tokens.
    pub sys_len: u64,
    /// Reference length in 13a tokens.
    pub ref_len: u64,
}

/// Whether `c` is in the class of the 13a tokenizer's first rule,
/// ``[\{-\~\[-\` -\&\(-\+\:-\@\/]``: ASCII punctuation and symbols except `'`, `,`, `-`, `.`
/// (and the space, which the rule also pads harmlessly).
fn is_13a_symbol(c: char) -> bool {
    matches!(
        c,
        '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/'
    )
}

/// The mteval-v13a tokenizer exactly as sacreBLEU's `Tokenizer13a` applies it; returns the
/// tokens (what `tokenizer(line).split()` gives in sacreBLEU).
///
/// Steps, each on the result of the previous one:
/// 1. remove `<skipped>`, remove `-\n`, turn `\n` into a space;
/// 2. unescape `&quot;`, `&amp;`, `&lt;`, `&gt;` (in this order, each in one pass);
/// 3. pad the line with a space on both sides; pad every character of the class
///    ``{|}~[\]^_` !"#$%&()*+:;<=>?@/`` with spaces;
/// 4. `([^0-9])([\.,])` -> `\1 \2 ` (a period or comma after a non-digit);
/// 5. `([\.,])([^0-9])` -> ` \1 \2` (a period or comma before a non-digit);
/// 6. `([0-9])(-)` -> `\1 \2 ` (a dash after a digit);
/// 7. split on whitespace.
///
/// Rules 4-6 are regular-expression substitutions with Python's semantics: matches are
/// found left to right and never overlap, so in `"a.."` only the first period is split off
/// by rule 4. "Digit" means the ASCII digits only.
pub fn tokenize_13a(line: &str) -> Vec<String> {
    let mut s = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if s.contains('&') {
        s = s
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }

    // Rule 3 on f" {line} ".
    let mut chars: Vec<char> = Vec::with_capacity(s.len() + 8);
    chars.push(' ');
    for c in s.chars() {
        if is_13a_symbol(c) {
            chars.extend([' ', c, ' ']);
        } else {
            chars.push(c);
        }
    }
    chars.push(' ');

    let is_period_or_comma = |c: char| c == '.' || c == ',';
    // Rule 4: ([^0-9])([\.,]) -> "\1 \2 ".
    let chars = substitute_pairs(
        &chars,
        |a, b| !a.is_ascii_digit() && is_period_or_comma(b),
        |a, b, out| out.extend([a, ' ', b, ' ']),
    );
    // Rule 5: ([\.,])([^0-9]) -> " \1 \2".
    let chars = substitute_pairs(
        &chars,
        |a, b| is_period_or_comma(a) && !b.is_ascii_digit(),
        |a, b, out| out.extend([' ', a, ' ', b]),
    );
    // Rule 6: ([0-9])(-) -> "\1 \2 ".
    let chars = substitute_pairs(
        &chars,
        |a, b| a.is_ascii_digit() && b == '-',
        |a, b, out| out.extend([a, ' ', b, ' ']),
    );

    let mut tokens = Vec::new();
    let mut current = String::new();
    for c in chars {
        if text::is_py_whitespace(c) {
            if !current.is_empty() {
                tokens.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    if !current.is_empty() {
        tokens.push(current);
    }
    tokens
}

/// Python's `re.sub` for a pattern matching exactly two characters: scans left to right,
/// replaces each non-overlapping match and resumes after it.
fn substitute_pairs(
    chars: &[char],
    matches: impl Fn(char, char) -> bool,
    replace: impl Fn(char, char, &mut Vec<char>),
) -> Vec<char> {
    let mut out = Vec::with_capacity(chars.len() + chars.len() / 4 + 4);
    let mut i = 0;
    while i < chars.len() {
        match (chars.get(i), chars.get(i + 1)) {
            (Some(&a), Some(&b)) if matches(a, b) => {
                replace(a, b, &mut out);
                i += 2;
            }
            (Some(&a), _) => {
                out.push(a);
                i += 1;
            }
            (None, _) => break,
        }
    }
    out
}

/// sacreBLEU's `_preprocess_segment` followed by the tokenizer: optional lowercasing,
/// `rstrip()`, 13a.
pub fn preprocess(segment: &str, options: &BleuOptions) -> Vec<String> {
    let lowered = text::lowercase_if(segment, options.lowercase);
    tokenize_13a(text::py_rstrip(&lowered))
}

/// Counts of every n-gram of order 1..=4 of `tokens`.
fn ngram_counts(tokens: &[String]) -> HashMap<&[String], u64> {
    let mut counts = HashMap::with_capacity(tokens.len() * MAX_NGRAM_ORDER);
    for n in 1..=MAX_NGRAM_ORDER.min(tokens.len()) {
        for gram in tokens.windows(n) {
            *counts.entry(gram).or_insert(0) += 1;
        }
    }
    counts
}

/// Sentence BLEU of `hypothesis` against one `reference`, as sacreBLEU 2.x
/// `sentence_bleu(hypothesis, [reference], lowercase=options.lowercase)` computes it.
pub fn sentence_bleu(hypothesis: &str, reference: &str, options: &BleuOptions) -> BleuScore {
    let hyp = preprocess(hypothesis, options);
    let reference = preprocess(reference, options);
    bleu_from_tokens(&hyp, &reference)
}

/// Sentence BLEU of already tokenized segments (see [`preprocess`]).
pub fn bleu_from_tokens(hyp: &[String], reference: &[String]) -> BleuScore {
    let ref_counts = ngram_counts(reference);
    let hyp_counts = ngram_counts(hyp);
    let mut counts = [0u64; MAX_NGRAM_ORDER];
    let mut totals = [0u64; MAX_NGRAM_ORDER];
    for (gram, &count) in &hyp_counts {
        let order = gram.len() - 1;
        totals[order] += count;
        if let Some(&in_ref) = ref_counts.get(gram) {
            counts[order] += count.min(in_ref);
        }
    }
    compute_bleu(counts, totals, hyp.len() as u64, reference.len() as u64)
}

/// sacreBLEU's `BLEU.compute_bleu` with `smooth_method='exp'` and `effective_order=True`,
/// from sufficient statistics.
pub fn compute_bleu(
    counts: [u64; MAX_NGRAM_ORDER],
    totals: [u64; MAX_NGRAM_ORDER],
    sys_len: u64,
    ref_len: u64,
) -> BleuScore {
    let bp = if sys_len < ref_len {
        if sys_len > 0 {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut precisions = [0.0f64; MAX_NGRAM_ORDER];
    let mut result = BleuScore {
        score: 0.0,
        counts,
        totals,
        precisions,
        bp,
        sys_len,
        ref_len,
    };
    // Early stop when nothing matches (sacreBLEU issue #141).
    if counts.iter().all(|&c| c == 0) {
        return result;
    }
    let mut smooth_mteval = 1.0f64;
    let mut eff_order = MAX_NGRAM_ORDER;
    for n in 0..MAX_NGRAM_ORDER {
        if totals[n] == 0 {
            break;
        }
        eff_order = n + 1;
        precisions[n] = if counts[n] == 0 {
            smooth_mteval *= 2.0;
            100.0 / (smooth_mteval * totals[n] as f64)
        } else {
            100.0 * counts[n] as f64 / totals[n] as f64
        };
    }
    // sacreBLEU's my_log floors log(0) at -9999999999; with exp smoothing no used precision
    // is 0, but keep the floor so the formula is the same everywhere.
    let log_sum: f64 = precisions[..eff_order]
        .iter()
        .map(|&p| if p == 0.0 { -9_999_999_999.0 } else { p.ln() })
        .sum();
    result.score = bp * (log_sum / eff_order as f64).exp();
    result.precisions = precisions;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> String {
        tokenize_13a(s).join(" ")
    }

    #[test]
    fn tokenizer_13a_cases() {
        // Expected strings printed by sacrebleu.tokenizers.tokenizer_13a.Tokenizer13a()(s).
        assert_eq!(toks("Hello, world!"), "Hello , world !");
        assert_eq!(
            toks("It costs $3.50, i.e. 3,50 EUR."),
            "It costs $ 3.50 , i . e . 3,50 EUR ."
        );
        assert_eq!(toks("a.."), "a . .");
        assert_eq!(toks("a..b"), "a . . b");
        assert_eq!(toks("10-20 well-known"), "10 - 20 well-known");
        assert_eq!(toks("don't"), "don't");
        assert_eq!(toks("x&amp;lt;y &quot;q&quot;"), "x < y \" q \"");
        assert_eq!(toks("<skipped> a-\nb\nc"), "ab c");
        assert_eq!(toks(""), "");
        assert_eq!(toks("   "), "");
        assert_eq!(toks("1.5.2,3"), "1.5.2,3");
        assert_eq!(toks(".5 ,5 5. 5,"), ". 5 , 5 5 . 5 ,");
    }

    #[test]
    fn hand_computed_bleu() {
        // hyp: the cat sat on the mat (6) ; ref: the cat is on the mat (6)
        // 1-grams: the,cat,sat,on,the,mat: matches the x2 (ref has 2), cat, on, mat = 5/6
        // 2-grams: the cat, cat sat, sat on, on the, the mat: matches the cat, on the, the mat = 3/5
        // 3-grams: the cat sat, cat sat on, sat on the, on the mat: on the mat = 1/4
        // 4-grams: the cat sat on, cat sat on the, sat on the mat: 0/3 -> exp smoothing 100/(2*3)
        let s = sentence_bleu(
            "the cat sat on the mat",
            "the cat is on the mat",
            &BleuOptions::default(),
        );
        assert_eq!(s.counts, [5, 3, 1, 0]);
        assert_eq!(s.totals, [6, 5, 4, 3]);
        let expected = ((100.0f64 * 5.0 / 6.0).ln()
            + (100.0f64 * 3.0 / 5.0).ln()
            + (100.0f64 / 4.0).ln()
            + (100.0f64 / 6.0).ln())
            / 4.0;
        assert!((s.score - expected.exp()).abs() < 1e-12, "{}", s.score);
        assert_eq!(s.bp, 1.0);
    }

    #[test]
    fn effective_order_and_brevity() {
        // hyp "a b" (2 tokens) vs ref "a b c d": orders 1 and 2 only, bp = exp(1 - 4/2).
        let s = sentence_bleu("a b", "a b c d", &BleuOptions::default());
        assert_eq!(s.totals, [2, 1, 0, 0]);
        let expected = (1.0f64 - 2.0).exp() * 100.0;
        assert!((s.score - expected).abs() < 1e-9, "{}", s.score);
        // Nothing matches: 0 whatever the lengths.
        assert_eq!(
            sentence_bleu("x y", "a b", &BleuOptions::default()).score,
            0.0
        );
        assert_eq!(sentence_bleu("", "", &BleuOptions::default()).score, 0.0);
        assert_eq!(sentence_bleu("a", "", &BleuOptions::default()).score, 0.0);
    }

    #[test]
    fn casing() {
        let cased = sentence_bleu("The Cat", "the cat", &BleuOptions::default());
        assert_eq!(cased.score, 0.0);
        let lc = sentence_bleu("The Cat", "the cat", &BleuOptions { lowercase: true });
        assert!((lc.score - 100.0).abs() < 1e-9);
    }
}
