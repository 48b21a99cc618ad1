//! Word and character error rates, identical to jiwer 4 `wer` / `cer` with their default
//! transforms.
//!
//! jiwer's default transforms (`jiwer.transformations.wer_default` / `cer_default`):
//!
//! * WER: `RemoveMultipleSpaces` (every run of two or more whitespace characters, regex
//!   `\s\s+`, becomes one space), `Strip` (`str.strip()`), then the words are the non-empty
//!   pieces of `str.split(" ")`. A single non-space whitespace character (a lone tab, a lone
//!   no-break space) therefore stays *inside* a word, exactly as in jiwer.
//! * CER: `Strip`, then every character (Unicode scalar value) including inner spaces.
//! * With `lowercase` (not a jiwer default) jiwer's `ToLowerCase` (`str.lower()`) runs first.
//!
//! The error counts come from a Levenshtein alignment of reference and hypothesis with unit
//! costs: `rate = (S + D + I) / N` where N is the reference length (`H + S + D`). The
//! breakdown into substitutions, deletions and insertions follows the alignment rapidfuzz
//! (which jiwer calls) recovers: common prefix and suffix stripped, then Hyyrö's backtrace
//! preferring deletion, then insertion, then the diagonal. Different optimal alignments can
//! split the same total differently; ours matches jiwer's for inputs up to [`MAX_CELLS`]
//! dynamic-programming cells. Longer pairs are split Hirschberg-style first, which keeps the
//! total (and so the rate) exact but may break ties differently.
//!
//! Empty reference: jiwer 4 returns the number of insertions (the hypothesis length) as the
//! "rate", which we keep for the raw score, so an empty pair has rate 0 and a non-empty
//! hypothesis for an empty reference has rate >= 1. As a reward (`1 - min(1, rate)`) that is
//! 1 for an empty hypothesis and 0 otherwise.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::text;

/// Largest `(reference_len + 1) * (hypothesis_len + 1)` aligned with a full matrix (16 MiB
/// of `u32`); larger pairs are first split in half (Hirschberg).
pub const MAX_CELLS: usize = 1 << 22;

/// Options of the error rates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRateOptions {
    /// Lowercase both sides first (jiwer's `ToLowerCase` before the default transform).
    #[serde(default)]
    pub lowercase: bool,
}

/// Counts of one alignment of a hypothesis against a reference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EditCounts {
    /// Reference units (words or characters) aligned to identical hypothesis units.
    pub hits: u64,
    /// Reference units replaced by a different hypothesis unit.
    pub substitutions: u64,
    /// Reference units missing from the hypothesis.
    pub deletions: u64,
    /// Hypothesis units with no reference counterpart.
    pub insertions: u64,
}

impl EditCounts {
    /// The Levenshtein distance: `S + D + I`.
    pub fn errors(&self) -> u64 {
        self.substitutions + self.deletions + self.insertions
    }

    /// Reference length `H + S + D`.
    pub fn reference_len(&self) -> u64 {
        self.hits + self.substitutions + self.deletions
    }

    /// Hypothesis length `H + S + I`.
    pub fn hypothesis_len(&self) -> u64 {
        self.hits + self.substitutions + self.insertions
    }

    /// The error rate as jiwer reports it: `(S + D + I) / (H + S + D)`; lower is better,
    /// 0 is perfect and it is unbounded above (insertions). For an empty reference jiwer
    /// returns the insertion count, and so does this.
    pub fn rate(&self) -> f64 {
        let n = self.reference_len();
        if n == 0 {
            self.insertions as f64
        } else {
            self.errors() as f64 / n as f64
        }
    }

    /// `1 - min(1, rate)`: in [0, 1], higher is better.
    pub fn reward(&self) -> f64 {
        1.0 - self.rate().min(1.0)
    }
}

/// jiwer's `RemoveMultipleSpaces`: every run of two or more whitespace characters becomes
/// one space; single whitespace characters are kept as they are.
fn remove_multiple_spaces(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut run = String::new();
    for c in s.chars() {
        if text::is_py_whitespace(c) {
            run.push(c);
            continue;
        }
        flush_run(&mut out, &mut run);
        out.push(c);
    }
    flush_run(&mut out, &mut run);
    out
}

fn flush_run(out: &mut String, run: &mut String) {
    if run.chars().nth(1).is_some() {
        out.push(' ');
    } else {
        out.push_str(run);
    }
    run.clear();
}

/// The words jiwer's default WER transform produces (after optional lowercasing).
pub fn wer_words(s: &str, options: &ErrorRateOptions) -> Vec<String> {
    let lowered = text::lowercase_if(s, options.lowercase);
    let collapsed = remove_multiple_spaces(&lowered);
    text::py_strip(&collapsed)
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The characters jiwer's default CER transform produces (after optional lowercasing).
pub fn cer_chars(s: &str, options: &ErrorRateOptions) -> Vec<char> {
    let lowered = text::lowercase_if(s, options.lowercase);
    text::py_strip(&lowered).chars().collect()
}

/// Word-level counts of `hypothesis` against `reference` (jiwer `process_words`).
pub fn word_errors(hypothesis: &str, reference: &str, options: &ErrorRateOptions) -> EditCounts {
    let reference = wer_words(reference, options);
    let hypothesis = wer_words(hypothesis, options);
    // Words become integers, as in jiwer's `_word2int`, so the alignment compares numbers.
    let mut ids: HashMap<&str, u32> = HashMap::new();
    let r = intern(&mut ids, &reference);
    let h = intern(&mut ids, &hypothesis);
    align(&r, &h)
}

/// Maps each word to a small integer, the same one for equal words.
fn intern<'a>(ids: &mut HashMap<&'a str, u32>, words: &'a [String]) -> Vec<u32> {
    words
        .iter()
        .map(|w| {
            let next = ids.len() as u32;
            *ids.entry(w.as_str()).or_insert(next)
        })
        .collect()
}

/// Character-level counts of `hypothesis` against `reference` (jiwer `process_characters`).
pub fn char_errors(hypothesis: &str, reference: &str, options: &ErrorRateOptions) -> EditCounts {
    let r: Vec<u32> = cer_chars(reference, options)
        .into_iter()
        .map(u32::from)
        .collect();
    let h: Vec<u32> = cer_chars(hypothesis, options)
        .into_iter()
        .map(u32::from)
        .collect();
    align(&r, &h)
}

/// Word error rate as jiwer 4 `wer(reference, hypothesis)` reports it; lower is better.
pub fn wer(hypothesis: &str, reference: &str, options: &ErrorRateOptions) -> f64 {
    word_errors(hypothesis, reference, options).rate()
}

/// Character error rate as jiwer 4 `cer(reference, hypothesis)` reports it; lower is better.
pub fn cer(hypothesis: &str, reference: &str, options: &ErrorRateOptions) -> f64 {
    char_errors(hypothesis, reference, options).rate()
}

/// Levenshtein distance with unit costs between two sequences, in O(min) memory.
pub fn levenshtein<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let (a, b) = if a.len() < b.len() { (b, a) } else { (a, b) };
    // `row[j]`: distance between the current prefix of `a` and b[..j].
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut diag = i;
        row[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let next = if x == y {
                diag
            } else {
                diag.min(row[j]).min(row[j + 1]) + 1
            };
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Aligns `hypothesis` against `reference` and counts hits, substitutions, deletions and
/// insertions the way rapidfuzz's `Levenshtein.editops(reference, hypothesis)` splits them.
pub fn align<T: PartialEq>(reference: &[T], hypothesis: &[T]) -> EditCounts {
    let mut counts = EditCounts::default();
    align_into(reference, hypothesis, &mut counts);
    counts
}

fn align_into<T: PartialEq>(s1: &[T], s2: &[T], counts: &mut EditCounts) {
    // rapidfuzz's common_affix: the prefix first, then the suffix of what is left.
    let prefix = s1.iter().zip(s2).take_while(|(a, b)| a == b).count();
    let (s1, s2) = (&s1[prefix..], &s2[prefix..]);
    let suffix = s1
        .iter()
        .rev()
        .zip(s2.iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let (s1, s2) = (&s1[..s1.len() - suffix], &s2[..s2.len() - suffix]);
    counts.hits += (prefix + suffix) as u64;

    let cells = (s1.len() + 1).saturating_mul(s2.len() + 1);
    if s1.is_empty() || s2.is_empty() || cells <= MAX_CELLS {
        backtrace_full(s1, s2, counts);
    } else if s2.len() == 1 || s1.len() == 1 {
        align_single(s1, s2, counts);
    } else {
        // Hirschberg: split s2 in half and s1 where the two halves' costs sum to the minimum.
        let mid = s2.len() / 2;
        let forward = last_costs(s1.iter(), s2[..mid].iter());
        let backward = last_costs(s1.iter().rev(), s2[mid..].iter().rev());
        let n = s1.len();
        let split = (0..=n)
            .min_by_key(|&i| forward[i] + backward[n - i])
            .unwrap_or(0);
        align_into(&s1[..split], &s2[..mid], counts);
        align_into(&s1[split..], &s2[mid..], counts);
    }
}

/// Alignment when one side has exactly one element (no common prefix or suffix left, so
/// it cannot equal the other side's first or last element).
fn align_single<T: PartialEq>(s1: &[T], s2: &[T], counts: &mut EditCounts) {
    if s2.len() == 1 {
        if s1.contains(&s2[0]) {
            counts.hits += 1;
        } else {
            counts.substitutions += 1;
        }
        counts.deletions += s1.len() as u64 - 1;
    } else {
        if s2.contains(&s1[0]) {
            counts.hits += 1;
        } else {
            counts.substitutions += 1;
        }
        counts.insertions += s2.len() as u64 - 1;
    }
}

/// `D(i, |b|)` for every prefix length i of `a`: the last column of the edit-distance
/// matrix, in O(|a|) memory.
fn last_costs<'a, T: PartialEq + 'a>(
    a: impl Iterator<Item = &'a T> + Clone,
    b: impl Iterator<Item = &'a T>,
) -> Vec<usize> {
    let a: Vec<&T> = a.collect();
    // col[i] = D(i, j) for the current j.
    let mut col: Vec<usize> = (0..=a.len()).collect();
    for (j, y) in b.enumerate() {
        let mut diag = col[0];
        col[0] = j + 1;
        for (i, x) in a.iter().enumerate() {
            let next = if *x == y {
                diag
            } else {
                diag.min(col[i]).min(col[i + 1]) + 1
            };
            diag = col[i + 1];
            col[i + 1] = next;
        }
    }
    col
}

/// Full-matrix alignment with rapidfuzz's backtrace (Hyyrö 2004 as rapidfuzz implements
/// it): from the end, delete while `D(i, j) - D(i-1, j) = +1`; else step to row `j-1` and
/// insert if `D(i, j-1) - D(i-1, j-1) = -1`; else take the diagonal.
fn backtrace_full<T: PartialEq>(s1: &[T], s2: &[T], counts: &mut EditCounts) {
    let (n1, n2) = (s1.len(), s2.len());
    if n1 == 0 || n2 == 0 {
        counts.deletions += n1 as u64;
        counts.insertions += n2 as u64;
        return;
    }
    let width = n2 + 1;
    // d[i * width + j] = D(i, j): distance between s1[..i] and s2[..j].
    let mut d = vec![0u32; (n1 + 1) * width];
    for (j, cell) in d.iter_mut().take(width).enumerate() {
        *cell = j as u32;
    }
    for i in 1..=n1 {
        d[i * width] = i as u32;
        for j in 1..=n2 {
            let diag = d[(i - 1) * width + j - 1];
            d[i * width + j] = if s1[i - 1] == s2[j - 1] {
                diag
            } else {
                diag.min(d[(i - 1) * width + j]).min(d[i * width + j - 1]) + 1
            };
        }
    }
    let at = |i: usize, j: usize| i64::from(d[i * width + j]);
    let (mut col, mut row) = (n1, n2);
    while row != 0 && col != 0 {
        if at(col, row) - at(col - 1, row) == 1 {
            counts.deletions += 1;
            col -= 1;
        } else {
            row -= 1;
            if row != 0 && at(col, row) - at(col - 1, row) == -1 {
                counts.insertions += 1;
            } else {
                col -= 1;
                if s1[col] == s2[row] {
                    counts.hits += 1;
                } else {
                    counts.substitutions += 1;
                }
            }
        }
    }
    counts.deletions += col as u64;
    counts.insertions += row as u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o() -> ErrorRateOptions {
        ErrorRateOptions::default()
    }

    #[test]
    fn jiwer_transforms() {
        assert_eq!(wer_words("  a  b\tc \t d ", &o()), vec!["a", "b\tc", "d"]);
        assert_eq!(wer_words("", &o()), Vec::<String>::new());
        assert_eq!(cer_chars(" a b ", &o()), vec!['a', ' ', 'b']);
        assert_eq!(
            wer_words("Ä B", &ErrorRateOptions { lowercase: true }),
            vec!["ä", "b"]
        );
    }

    #[test]
    fn hand_computed_counts() {
        // ref: the cat sat on the mat ; hyp: the cat sit on mat
        // sat->sit (S), "the" deleted (D): 2 errors / 6 words.
        let c = word_errors("the cat sit on mat", "the cat sat on the mat", &o());
        assert_eq!(c.reference_len(), 6);
        assert_eq!(
            (c.substitutions, c.deletions, c.insertions, c.hits),
            (1, 1, 0, 4)
        );
        assert!((c.rate() - 2.0 / 6.0).abs() < 1e-15);
        assert!((c.reward() - 4.0 / 6.0).abs() < 1e-15);
        // With "today" appended, S+D+I (=3) and 3 S tie; jiwer (rapidfuzz) reports 3 S.
        let c = word_errors("the cat sit on mat today", "the cat sat on the mat", &o());
        assert_eq!((c.substitutions, c.deletions, c.insertions), (3, 0, 0));
        assert!((c.rate() - 0.5).abs() < 1e-15);
        // rapidfuzz's example: editops("qabxcd", "abycdf") = delete, replace, insert.
        let q: Vec<char> = "qabxcd".chars().collect();
        let a: Vec<char> = "abycdf".chars().collect();
        let c = align(&q, &a);
        assert_eq!(
            (c.substitutions, c.deletions, c.insertions, c.hits),
            (1, 1, 1, 4)
        );
    }

    #[test]
    fn empty_sides() {
        let c = word_errors("a b", "", &o());
        assert_eq!((c.insertions, c.rate(), c.reward()), (2, 2.0, 0.0));
        let c = word_errors("", "", &o());
        assert_eq!((c.rate(), c.reward()), (0.0, 1.0));
        let c = char_errors("", "ab", &o());
        assert_eq!((c.deletions, c.rate(), c.reward()), (2, 1.0, 0.0));
    }

    #[test]
    fn distance_agrees_with_alignment() {
        let pairs = [
            ("kitten", "sitting"),
            ("", "abc"),
            ("flaw", "lawn"),
            ("abc", "abc"),
            ("ab", "ba"),
        ];
        for (x, y) in pairs {
            let x: Vec<char> = x.chars().collect();
            let y: Vec<char> = y.chars().collect();
            let c = align(&x, &y);
            assert_eq!(c.errors() as usize, levenshtein(&x, &y));
            assert_eq!(c.reference_len() as usize, x.len());
            assert_eq!(c.hypothesis_len() as usize, y.len());
        }
        assert_eq!(levenshtein(&['k', 'i', 't'], &['s', 'i', 't', 's']), 2);
    }

    #[test]
    fn hirschberg_keeps_the_total() {
        // Long enough to exceed MAX_CELLS: 2100 x 2100 cells.
        let a: Vec<u32> = (0..2100u32).map(|i| (i * 7919) % 13).collect();
        let b: Vec<u32> = (0..2100u32).map(|i| (i * 104_729 + 3) % 11).collect();
        assert!((a.len() + 1) * (b.len() + 1) > MAX_CELLS);
        let c = align(&a, &b);
        assert_eq!(c.errors() as usize, levenshtein(&a, &b));
        assert_eq!(c.reference_len() as usize, a.len());
        assert_eq!(c.hypothesis_len() as usize, b.len());
    }
}
