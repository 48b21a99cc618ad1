//! Number words in English and German, 0 to 36 (the largest sum of four digits).

/// The largest number with a word in [`english`] and [`german`].
pub const MAX_NUMBER: u32 = 36;

const ENGLISH: [&str; 37] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
    "twenty-one",
    "twenty-two",
    "twenty-three",
    "twenty-four",
    "twenty-five",
    "twenty-six",
    "twenty-seven",
    "twenty-eight",
    "twenty-nine",
    "thirty",
    "thirty-one",
    "thirty-two",
    "thirty-three",
    "thirty-four",
    "thirty-five",
    "thirty-six",
];

const GERMAN: [&str; 37] = [
    "null",
    "eins",
    "zwei",
    "drei",
    "vier",
    "fünf",
    "sechs",
    "sieben",
    "acht",
    "neun",
    "zehn",
    "elf",
    "zwölf",
    "dreizehn",
    "vierzehn",
    "fünfzehn",
    "sechzehn",
    "siebzehn",
    "achtzehn",
    "neunzehn",
    "zwanzig",
    "einundzwanzig",
    "zweiundzwanzig",
    "dreiundzwanzig",
    "vierundzwanzig",
    "fünfundzwanzig",
    "sechsundzwanzig",
    "siebenundzwanzig",
    "achtundzwanzig",
    "neunundzwanzig",
    "dreißig",
    "einunddreißig",
    "zweiunddreißig",
    "dreiunddreißig",
    "vierunddreißig",
    "fünfunddreißig",
    "sechsunddreißig",
];

/// The English word for `n` (`None` above [`MAX_NUMBER`]); compounds are hyphenated
/// ("twenty-one").
pub fn english(n: u32) -> Option<&'static str> {
    ENGLISH.get(n as usize).copied()
}

/// The German word for `n` (`None` above [`MAX_NUMBER`]); 1 is "eins", as when counting.
pub fn german(n: u32) -> Option<&'static str> {
    GERMAN.get(n as usize).copied()
}

/// The number an English word stands for (inverse of [`english`]).
pub fn parse_english(word: &str) -> Option<u32> {
    ENGLISH.iter().position(|w| *w == word).map(|i| i as u32)
}

/// The number a German word stands for (inverse of [`german`]).
pub fn parse_german(word: &str) -> Option<u32> {
    GERMAN.iter().position(|w| *w == word).map(|i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_and_inverse() {
        assert_eq!(english(36), Some("thirty-six"));
        assert_eq!(english(37), None);
        assert_eq!(german(37), None);
        for n in 0..=MAX_NUMBER {
            assert_eq!(parse_english(english(n).unwrap()), Some(n));
            assert_eq!(parse_german(german(n).unwrap()), Some(n));
        }
    }
}
