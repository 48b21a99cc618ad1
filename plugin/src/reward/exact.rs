//! Exact match after normalisation ([`text::normalize_for_exact`]).

use super::text;

/// Whether `hypothesis` and `reference` are equal after [`text::normalize_for_exact`]
/// (NFKC, lowercasing, punctuation deletion, whitespace collapse). Two strings that
/// normalise to the empty string (`""`, `"  "`, `"?!"`) match.
pub fn exact_match(hypothesis: &str, reference: &str) -> bool {
    text::normalize_for_exact(hypothesis) == text::normalize_for_exact(reference)
}

#[cfg(test)]
mod tests {
    use super::*;

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
