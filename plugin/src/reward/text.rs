//! Text normalisation shared by every metric.
//!
//! The reference implementations are Python programs, so the helpers here reproduce the
//! Python string operations they rely on, character for character:
//!
//! * [`is_py_whitespace`] is `str.isspace()`, which is also what `str.split()`,
//!   `str.strip()` and the regex class `\s` use. It is Rust's `char::is_whitespace` plus the
//!   four ASCII information separators U+001C..U+001F, written out as an explicit list so
//!   the answer does not move with the Unicode version of the Rust toolchain.
//! * [`py_split`], [`py_strip`], [`py_rstrip`] are `str.split()`, `str.strip()`,
//!   `str.rstrip()` without arguments.
//! * [`lowercase`] is `str.lower()`: the full Unicode lowercase mapping, including the
//!   context-dependent final sigma and one-to-many mappings such as `İ` -> `i̇`.
//!
//! Every helper takes any `&str` (empty, whitespace-only, megabytes long, any scalar value)
//! and never panics: nothing here slices a string at a byte offset that was not produced by
//! `char_indices` or a `char` search.

use std::borrow::Cow;
use std::sync::LazyLock;

use unicode_normalization::UnicodeNormalization;

/// Whether `c` is whitespace for Python (`str.isspace()`, regex `\s`, `str.split()`).
pub fn is_py_whitespace(c: char) -> bool {
    matches!(
        c,
        '\u{09}'..='\u{0D}'
            | '\u{1C}'..='\u{20}'
            | '\u{85}'
            | '\u{A0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200A}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}'
    )
}

/// The words of `s` as Python's `s.split()` returns them: maximal runs of
/// non-[whitespace](is_py_whitespace) characters, with no empty words.
pub fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_whitespace).filter(|w| !w.is_empty())
}

/// Python's `s.strip()`: `s` without leading and trailing [whitespace](is_py_whitespace).
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_whitespace)
}

/// Python's `s.rstrip()`: `s` without trailing [whitespace](is_py_whitespace).
pub fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(is_py_whitespace)
}

/// Python's `s.lower()`: full Unicode lowercasing (final sigma included). Borrows when `s`
/// has nothing to lowercase.
pub fn lowercase(s: &str) -> Cow<'_, str> {
    // Fast path: ASCII without capitals, or text whose lowercase is itself.
    if s.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()) {
        return Cow::Borrowed(s);
    }
    let lower = s.to_lowercase();
    if lower == s {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(lower)
    }
}

/// [`lowercase`] when `enabled`, else `s` unchanged.
pub fn lowercase_if(s: &str, enabled: bool) -> Cow<'_, str> {
    if enabled {
        lowercase(s)
    } else {
        Cow::Borrowed(s)
    }
}

/// `s` with every [whitespace](is_py_whitespace) character removed (`"".join(s.split())`).
pub fn remove_whitespace(s: &str) -> String {
    s.chars().filter(|&c| !is_py_whitespace(c)).collect()
}

/// Words of `s` joined by single spaces, no leading or trailing space
/// (`" ".join(s.split())`).
pub fn collapse_whitespace(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for word in py_split(s) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Unicode compatibility composition (NFKC): folds full-width forms, ligatures,
/// superscripts and composed/decomposed accents to one spelling.
pub fn nfkc(s: &str) -> String {
    s.nfkc().collect()
}

/// Canonical composition (NFC): composed and decomposed accents become one spelling,
/// nothing else changes.
pub fn nfc(s: &str) -> String {
    s.nfc().collect()
}

/// Every character of Unicode general category P (punctuation: Pc, Pd, Ps, Pe, Pi, Pf, Po).
static UNICODE_PUNCTUATION: LazyLock<regex::Regex> = LazyLock::new(|| {
    // A constant pattern, covered by the tests: it cannot fail at run time.
    regex::Regex::new(r"\p{P}").expect("constant regex compiles")
});

/// Whether `c` is punctuation: Unicode general category `P*`, or one of the 32 ASCII
/// punctuation characters of Python's `string.punctuation`
/// (``!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~``, which adds the ASCII symbols `$+<=>^`|~`).
pub fn is_punctuation(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_punctuation();
    }
    let mut buf = [0u8; 4];
    let encoded: &str = c.encode_utf8(&mut buf);
    UNICODE_PUNCTUATION.is_match(encoded)
}

/// `s` with every [punctuation](is_punctuation) character deleted (not replaced by a space:
/// `"don't"` becomes `"dont"`, `"1,000"` becomes `"1000"`).
pub fn remove_punctuation(s: &str) -> String {
    s.chars().filter(|&c| !is_punctuation(c)).collect()
}

/// The normalisation behind exact match, in this order:
///
/// 1. NFKC ([`nfkc`]): `ﬁ` = `fi`, full-width `Ａ` = `A`, `é` composed = decomposed;
/// 2. Unicode lowercasing ([`lowercase`]): `STRASSE` = `strasse`, `ΟΔΟΣ` = `οδος`;
///    (lowercasing, not case folding: `Straße` and `STRASSE` stay different);
/// 3. punctuation deletion ([`remove_punctuation`]): `"U.S.A."` = `"usa"`;
/// 4. whitespace collapse ([`collapse_whitespace`]): trimmed, single spaces.
///
/// This is SQuAD's answer normalisation without its English-only article removal.
pub fn normalize_for_exact(s: &str) -> String {
    let composed = nfkc(s);
    let lower = lowercase(&composed);
    collapse_whitespace(&remove_punctuation(&lower))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_whitespace_set() {
        // The complete list printed by Python 3.11: [c for c in range(0x110000) if chr(c).isspace()].
        let expected: Vec<u32> = vec![
            0x9, 0xa, 0xb, 0xc, 0xd, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x85, 0xa0, 0x1680, 0x2000,
            0x2001, 0x2002, 0x2003, 0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200a, 0x2028,
            0x2029, 0x202f, 0x205f, 0x3000,
        ];
        let got: Vec<u32> = (0u32..=0x10FFFF)
            .filter_map(char::from_u32)
            .filter(|&c| is_py_whitespace(c))
            .map(u32::from)
            .collect();
        assert_eq!(got, expected);
        // Zero-width space and BOM are not whitespace for Python.
        assert!(!is_py_whitespace('\u{200B}'));
        assert!(!is_py_whitespace('\u{FEFF}'));
    }

    #[test]
    fn split_strip_like_python() {
        let s = "\u{1c} a\u{a0}b\tc\u{3000} ";
        assert_eq!(py_split(s).collect::<Vec<_>>(), vec!["a", "b", "c"]);
        assert_eq!(py_strip(s), "a\u{a0}b\tc");
        assert_eq!(py_rstrip(s), "\u{1c} a\u{a0}b\tc");
        assert_eq!(py_split("").count(), 0);
        assert_eq!(py_split(" \u{2028} ").count(), 0);
        assert_eq!(collapse_whitespace("  a  \n b "), "a b");
        assert_eq!(remove_whitespace(" a b\u{85}c "), "abc");
    }

    #[test]
    fn lowercase_like_python() {
        assert_eq!(lowercase("abc"), "abc");
        assert!(matches!(lowercase("abc"), Cow::Borrowed(_)));
        assert_eq!(lowercase("ÄÖÜ STRASSE"), "äöü strasse");
        // Final sigma, as Python's str.lower() does it.
        assert_eq!(lowercase("ΟΔΟΣ ΟΔΟΣ."), "οδος οδος.");
        // One-to-many mapping: U+0130 -> i + U+0307.
        assert_eq!(lowercase("İ"), "i\u{307}");
        assert_eq!(lowercase_if("ABC", false), "ABC");
    }

    #[test]
    fn punctuation_classes() {
        for c in [
            '.', ',', '!', '$', '+', '~', '¿', '«', '»', '„', '“', '—', '…', '、', '。',
        ] {
            assert!(is_punctuation(c), "{c:?} should be punctuation");
        }
        for c in ['a', 'ß', '7', ' ', '€', '©', '😀', '\u{301}'] {
            assert!(!is_punctuation(c), "{c:?} should not be punctuation");
        }
    }

    #[test]
    fn exact_normalisation() {
        assert_eq!(
            normalize_for_exact("  The U.S.A.,  right?! "),
            "the usa right"
        );
        assert_eq!(normalize_for_exact("ﬁne Ａ"), "fine a");
        assert_eq!(
            normalize_for_exact("Cafe\u{301}"),
            normalize_for_exact("Café")
        );
        assert_eq!(normalize_for_exact("„Grüße“ — sagte er."), "grüße sagte er");
        assert_eq!(normalize_for_exact(""), "");
        assert_eq!(normalize_for_exact("..."), "");
    }
}
