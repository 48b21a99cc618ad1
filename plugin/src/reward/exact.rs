//! Exact match after normalisation ([`text::normalize_for_exact`]), and its partial-credit
//! form: word accuracy by position.

use super::text;

/// Whether `hypothesis` and `reference` are equal after [`text::normalize_for_exact`]
/// (NFKC, lowercasing, punctuation deletion, whitespace collapse). Two strings that
/// normalise to the empty string (`""`, `"  "`, `"?!"`) match.
pub fn exact_match(hypothesis: &str, reference: &str) -> bool {
    text::normalize_for_exact(hypothesis) == text::normalize_for_exact(reference)
}

/// The words of a normalised text (single spaces between them).
fn words(s: &str) -> Vec<&str> {
    s.split(' ').filter(|w| !w.is_empty()).collect()
}

/// Word accuracy by position: after [`text::normalize_for_exact`], the words equal at the same
/// position, over the longer of the two word counts (two empty sides score 1).
///
/// Unlike BLEU and WER, a missing word costs exactly as much as a wrong one and nothing is
/// realigned: for a reference of n words, an answer of n words with k of them right scores
/// k / n, the same answer cut to its first j words scores at most j / n, and an extra word
/// lowers the score. 1 only for an exact match. Meant for answers whose words have fixed
/// places (digit strings, codes, lists), where sentence BLEU pays for leaving out an uncertain
/// word (see the README's "What the reward pays for").
pub fn positional_accuracy(hypothesis: &str, reference: &str) -> f64 {
    let (h, r) = (
        text::normalize_for_exact(hypothesis),
        text::normalize_for_exact(reference),
    );
    let (hw, rw) = (words(&h), words(&r));
    let longest = hw.len().max(rw.len());
    if longest == 0 {
        return 1.0;
    }
    let same = hw.iter().zip(&rw).filter(|(a, b)| a == b).count();
    same as f64 / longest as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positional_accuracy_hand_checked() {
        let r = "zero five two two";
        assert_eq!(positional_accuracy("zero five two two", r), 1.0);
        assert_eq!(positional_accuracy("Zero, five two two.", r), 1.0);
        // One wrong word, one missing word, one extra word: each costs one of four places.
        assert_eq!(positional_accuracy("zero five two three", r), 0.75);
        assert_eq!(positional_accuracy("zero five two", r), 0.75);
        assert_eq!(positional_accuracy("zero five two two two", r), 0.8);
        // No realignment: a word dropped early shifts the rest out of place.
        assert_eq!(
            positional_accuracy("two three four", "one two three four"),
            0.0
        );
        assert_eq!(positional_accuracy("", r), 0.0);
        assert_eq!(positional_accuracy("", " ?! "), 1.0);
        assert_eq!(positional_accuracy("seven", ""), 0.0);
    }

    #[test]
    fn matches_after_normalisation() {
        assert!(exact_match("Paris.", "  paris "));
        assert!(exact_match("Straße!", "STRAßE"));
        assert!(exact_match("“Ja”, sagte sie", "ja sagte sie"));
        assert!(exact_match("", "?!"));
        assert!(!exact_match("Paris", "Pariss"));
        assert!(!exact_match("1 000", "1000"));
        assert!(exact_match("1,000", "1000"));
        assert!(!exact_match("Straße", "STRASSE"));
    }
}
