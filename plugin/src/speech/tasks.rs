//! Spoken-digit tasks built from recordings named like the Free Spoken Digit Dataset's,
//! `{digit}_{speaker}_{take}.wav`.
//!
//! An utterance is a few digits spoken by one speaker: the clips are joined with short silences.
//! Each utterance is asked one of eight questions ([`TaskKind`]), reported in six families
//! ([`TaskFamily`]). Three short families have answers of 1-4 words: transcribe 1-4 digits
//! (`asr`), translate them into German (`ast`), or three spoken-QA questions (sum, largest digit,
//! how many digits; `sqa`). Three long families have answers long enough for prefix trees to
//! branch: transcribe a spoken code of 5-10 digits (`asr_long`), translate it into German
//! (`ast_long`), and step-by-step arithmetic over 3-5 digits with the working written out
//! (`arith`, "seven plus five is twelve, minus three is nine"). Takes 0-4 are the test split, the
//! dataset's own convention; everything else is training data, of which the embedded default
//! model keeps takes 5-14 for the live traffic and pretrains on 15 and up
//! ([`DEFAULT_TRAFFIC_TAKES`]). Generation is deterministic given a seed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::numbers;
use super::SpeechError;
use crate::audio::{read_wav, resample, Audio, DEFAULT_MAX_SECONDS, SAMPLE_RATE};

/// Where the recordings are by default, relative to the workspace root.
pub const DEFAULT_DATA_DIR: &str = "../shared/data/fsdd/recordings";

/// Takes below this number are the test split.
pub const FIRST_TRAIN_TAKE: u32 = 5;

/// Training takes that the embedded default model keeps for the live traffic
/// (`FIRST_TRAIN_TAKE..FIRST_TRAIN_TAKE + DEFAULT_TRAFFIC_TAKES`): pretraining never sees
/// them, so the traffic that `leaf run` replays is audio the model never trained on, as a
/// served model's traffic is.
pub const DEFAULT_TRAFFIC_TAKES: u32 = 10;

/// Whether `take` is one of the first `traffic_takes` training takes, the ones kept for the
/// traffic (none when `traffic_takes` is 0).
pub fn is_traffic_take(take: u32, traffic_takes: u32) -> bool {
    (FIRST_TRAIN_TAKE..FIRST_TRAIN_TAKE.saturating_add(traffic_takes)).contains(&take)
}

/// Which half of the data a clip belongs to (decided by its take).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Takes 5 and above.
    Train,
    /// Takes 0-4.
    Test,
}

impl Split {
    /// The split of a take: 0-4 are test, the rest train.
    pub fn of_take(take: u32) -> Split {
        if take < FIRST_TRAIN_TAKE {
            Split::Test
        } else {
            Split::Train
        }
    }
}

impl std::str::FromStr for Split {
    type Err = SpeechError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            other => Err(SpeechError::Config(format!(
                "unknown split {other:?} (expected train or test)"
            ))),
        }
    }
}

/// One recording of one spoken digit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clip {
    /// The digit spoken, 0-9.
    pub digit: u8,
    /// Who spoke it.
    pub speaker: String,
    /// Take number.
    pub take: u32,
    /// The WAV file.
    pub path: PathBuf,
}

impl Clip {
    /// Parses `{digit}_{speaker}_{take}.wav` (the speaker may itself contain underscores);
    /// `None` for any other name.
    pub fn parse_name(file_name: &str) -> Option<(u8, String, u32)> {
        let stem = file_name.strip_suffix(".wav")?;
        let (digit, rest) = stem.split_once('_')?;
        let (speaker, take) = rest.rsplit_once('_')?;
        if digit.len() != 1 || speaker.is_empty() {
            return None;
        }
        let digit = digit.parse::<u8>().ok().filter(|d| *d <= 9)?;
        if take.is_empty() || !take.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((digit, speaker.to_string(), take.parse().ok()?))
    }

    /// The split this clip belongs to.
    pub fn split(&self) -> Split {
        Split::of_take(self.take)
    }
}

/// The recordings of a data directory, optionally decoded into memory.
#[derive(Debug, Clone)]
pub struct Corpus {
    clips: Vec<Clip>,
    index: HashMap<(u8, String, u32), usize>,
    audio: Option<Vec<Arc<Audio>>>,
}

impl Corpus {
    /// Scans `dir` for `{digit}_{speaker}_{take}.wav` files (others are ignored). Fails when the
    /// directory is missing or holds no such file.
    pub fn open(dir: &Path) -> Result<Corpus, SpeechError> {
        let data_err = |reason: String| SpeechError::Data {
            path: dir.to_path_buf(),
            reason,
        };
        let entries = std::fs::read_dir(dir).map_err(|e| {
            data_err(format!(
                "cannot list the recordings directory ({e}); point --data at a folder of \
                 {{digit}}_{{speaker}}_{{take}}.wav files"
            ))
        })?;
        let mut clips = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| data_err(e.to_string()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some((digit, speaker, take)) = Clip::parse_name(name) {
                clips.push(Clip {
                    digit,
                    speaker,
                    take,
                    path: entry.path(),
                });
            }
        }
        if clips.is_empty() {
            return Err(data_err(
                "no files named {digit}_{speaker}_{take}.wav".to_string(),
            ));
        }
        Corpus::from_clips(clips)
    }

    /// Builds a corpus from clips; they are sorted by speaker, digit and take. Fails on a
    /// duplicate (digit, speaker, take).
    pub fn from_clips(mut clips: Vec<Clip>) -> Result<Corpus, SpeechError> {
        clips.sort_by(|a, b| {
            (&a.speaker, a.digit, a.take, &a.path).cmp(&(&b.speaker, b.digit, b.take, &b.path))
        });
        let mut index = HashMap::with_capacity(clips.len());
        for (i, c) in clips.iter().enumerate() {
            if index
                .insert((c.digit, c.speaker.clone(), c.take), i)
                .is_some()
            {
                return Err(SpeechError::Data {
                    path: c.path.clone(),
                    reason: format!(
                        "two recordings of digit {} by {} take {}",
                        c.digit, c.speaker, c.take
                    ),
                });
            }
        }
        Ok(Corpus {
            clips,
            index,
            audio: None,
        })
    }

    /// All clips, sorted by speaker, digit and take.
    pub fn clips(&self) -> &[Clip] {
        &self.clips
    }

    /// Number of clips.
    pub fn len(&self) -> usize {
        self.clips.len()
    }

    /// True when there are no clips.
    pub fn is_empty(&self) -> bool {
        self.clips.is_empty()
    }

    /// The speakers, sorted.
    pub fn speakers(&self) -> Vec<String> {
        let mut s: Vec<String> = self.clips.iter().map(|c| c.speaker.clone()).collect();
        s.dedup();
        s
    }

    /// The clips that satisfy `keep`, as a new corpus (decoded audio is kept).
    pub fn filter(&self, keep: impl Fn(&Clip) -> bool) -> Corpus {
        let picked: Vec<usize> = (0..self.clips.len())
            .filter(|&i| keep(&self.clips[i]))
            .collect();
        let clips: Vec<Clip> = picked.iter().map(|&i| self.clips[i].clone()).collect();
        let index = clips
            .iter()
            .enumerate()
            .map(|(i, c)| ((c.digit, c.speaker.clone(), c.take), i))
            .collect();
        let audio = self
            .audio
            .as_ref()
            .map(|a| picked.iter().map(|&i| a[i].clone()).collect());
        Corpus {
            clips,
            index,
            audio,
        }
    }

    /// The clips of one split.
    pub fn split(&self, split: Split) -> Corpus {
        self.filter(|c| c.split() == split)
    }

    /// Index of the clip of `digit` by `speaker`, take `take`.
    pub fn find(&self, digit: u8, speaker: &str, take: u32) -> Option<usize> {
        self.index.get(&(digit, speaker.to_string(), take)).copied()
    }

    /// Decodes every clip into memory (once), so rendering does no file I/O.
    pub fn preload(&mut self) -> Result<(), SpeechError> {
        if self.audio.is_some() {
            return Ok(());
        }
        let audio = self
            .clips
            .iter()
            .map(|c| decode_clip(c).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        self.audio = Some(audio);
        Ok(())
    }

    /// The audio of clip `i` (from memory after [`Corpus::preload`], else read from disk).
    pub fn clip_audio(&self, i: usize) -> Result<Arc<Audio>, SpeechError> {
        let clip = self.clips.get(i).ok_or_else(|| {
            SpeechError::Config(format!("clip index {i} out of range ({})", self.len()))
        })?;
        match &self.audio {
            Some(a) => Ok(a[i].clone()),
            None => decode_clip(clip).map(Arc::new),
        }
    }

    /// The audio of an example: its clips joined by its silences. Clips at one sample rate are
    /// joined at that rate; mixed rates are first resampled to 16 kHz.
    pub fn render(&self, example: &Example) -> Result<Audio, SpeechError> {
        if example.digits.len() != example.takes.len()
            || example.gaps_ms.len() + 1 != example.digits.len()
        {
            return Err(SpeechError::Config(format!(
                "example has {} digits, {} takes and {} gaps",
                example.digits.len(),
                example.takes.len(),
                example.gaps_ms.len()
            )));
        }
        let mut parts = Vec::with_capacity(example.digits.len());
        for (&digit, &take) in example.digits.iter().zip(&example.takes) {
            let i = self.find(digit, &example.speaker, take).ok_or_else(|| {
                SpeechError::MissingClip {
                    digit,
                    speaker: example.speaker.clone(),
                    take,
                }
            })?;
            parts.push(self.clip_audio(i)?);
        }
        let rate = parts[0].sample_rate();
        let same_rate = parts.iter().all(|a| a.sample_rate() == rate);
        let out_rate = if same_rate { rate } else { SAMPLE_RATE };
        let mut samples = Vec::new();
        for (k, part) in parts.iter().enumerate() {
            if k > 0 {
                let gap = (u64::from(example.gaps_ms[k - 1]) * u64::from(out_rate) / 1000) as usize;
                samples.resize(samples.len() + gap, 0.0);
            }
            if same_rate {
                samples.extend_from_slice(part.samples());
            } else {
                samples.extend(resample(part.samples(), part.sample_rate(), out_rate)?);
            }
        }
        Ok(Audio::new(samples, out_rate)?)
    }
}

fn decode_clip(clip: &Clip) -> Result<Audio, SpeechError> {
    read_wav(&clip.path, DEFAULT_MAX_SECONDS).map_err(|source| SpeechError::ClipAudio {
        path: clip.path.clone(),
        source,
    })
}

/// The question asked about an utterance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// "Transcribe the audio." -> "seven three nine".
    Recognition,
    /// "Translate the audio into German." -> "sieben drei neun".
    Translation,
    /// Sum of the digits, in English words ("nineteen").
    Sum,
    /// Largest digit, in English words ("nine").
    Largest,
    /// How many digits, in English words ("three").
    Count,
    /// A spoken code of 5-10 digits, transcribed digit by digit: "four one five five two six".
    CodeRecognition,
    /// A spoken code of 5-10 digits, translated into German digit by digit:
    /// "vier eins fünf fünf zwei sechs".
    CodeTranslation,
    /// Step-by-step arithmetic over 3-5 digits with the working: start from the first digit, add
    /// the next one while the total is below ten, otherwise subtract it, and state every total:
    /// 7, 5, 3 -> "seven plus five is twelve, minus three is nine".
    Arithmetic,
}

/// Task families as the evaluation reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskFamily {
    /// Speech recognition of 1-4 digits.
    Asr,
    /// Speech translation of 1-4 digits.
    Ast,
    /// Spoken question answering.
    Sqa,
    /// Speech recognition of 5-10 digit codes.
    AsrLong,
    /// Speech translation of 5-10 digit codes.
    AstLong,
    /// Spoken arithmetic answered with the working.
    Arith,
}

impl TaskFamily {
    /// All families, the short ones first.
    pub const ALL: [TaskFamily; 6] = [
        TaskFamily::Asr,
        TaskFamily::Ast,
        TaskFamily::Sqa,
        TaskFamily::AsrLong,
        TaskFamily::AstLong,
        TaskFamily::Arith,
    ];

    /// The families whose answers are 1-4 words.
    pub const SHORT: [TaskFamily; 3] = [TaskFamily::Asr, TaskFamily::Ast, TaskFamily::Sqa];

    /// The families whose answers are long enough for prefix trees to branch (5 words and more).
    pub const LONG: [TaskFamily; 3] = [TaskFamily::AsrLong, TaskFamily::AstLong, TaskFamily::Arith];

    /// The family's place in [`TaskFamily::ALL`]: a number that does not depend on which
    /// other families are asked for (evaluation seeds its examples with it).
    pub fn index(self) -> usize {
        TaskFamily::ALL
            .iter()
            .position(|f| *f == self)
            .unwrap_or(TaskFamily::ALL.len())
    }

    /// True for the families in [`TaskFamily::LONG`].
    pub fn is_long(self) -> bool {
        TaskFamily::LONG.contains(&self)
    }

    /// The task kinds of this family.
    pub fn kinds(self) -> &'static [TaskKind] {
        match self {
            TaskFamily::Asr => &[TaskKind::Recognition],
            TaskFamily::Ast => &[TaskKind::Translation],
            TaskFamily::Sqa => &[TaskKind::Sum, TaskKind::Largest, TaskKind::Count],
            TaskFamily::AsrLong => &[TaskKind::CodeRecognition],
            TaskFamily::AstLong => &[TaskKind::CodeTranslation],
            TaskFamily::Arith => &[TaskKind::Arithmetic],
        }
    }

    /// The name reports use: "asr", "ast", "sqa", "asr_long", "ast_long" or "arith".
    pub fn name(self) -> &'static str {
        match self {
            TaskFamily::Asr => "asr",
            TaskFamily::Ast => "ast",
            TaskFamily::Sqa => "sqa",
            TaskFamily::AsrLong => "asr_long",
            TaskFamily::AstLong => "ast_long",
            TaskFamily::Arith => "arith",
        }
    }
}

impl std::fmt::Display for TaskFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TaskFamily {
    type Err = SpeechError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        by_name(&TaskFamily::ALL, TaskFamily::name, "task", s, s)
    }
}

impl std::str::FromStr for TaskKind {
    type Err = SpeechError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        by_name(&TaskKind::ALL, TaskKind::name, "task kind", s, s.trim())
    }
}

/// The entry of `all` whose `name` is `key`; otherwise an error naming the `input` and listing
/// every name (the parsing of [`TaskFamily`] and [`TaskKind`]).
fn by_name<T: Copy>(
    all: &[T],
    name: fn(T) -> &'static str,
    what: &str,
    input: &str,
    key: &str,
) -> Result<T, SpeechError> {
    all.iter()
        .copied()
        .find(|&t| name(t) == key)
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|&t| name(t)).collect();
            SpeechError::Config(format!(
                "unknown {what} {input:?} (expected one of {})",
                names.join(", ")
            ))
        })
}

/// Most digits in one utterance of any kind: ten clips of up to 1.3 s plus nine gaps stay
/// within the audio limit and, at 50 unit frames per second, within the model's positions.
pub const MAX_UTTERANCE_DIGITS: usize = 10;

/// A bound on the answer ids of every reference (the stop token included) under the default
/// tokenizer; evaluation and traffic should allow at least this many new tokens. A test checks
/// every kind's longest reference against it.
pub const MAX_ANSWER_TOKENS: usize = 32;

/// The arithmetic of [`TaskKind::Arithmetic`]: from the first digit, add the next digit while
/// the total is below ten, otherwise subtract it. Returns `(added, digit, total after)` per step
/// after the first digit; totals stay within 0..=18.
pub fn arithmetic_steps(digits: &[u8]) -> Vec<(bool, u8, u32)> {
    let Some((&first, rest)) = digits.split_first() else {
        return Vec::new();
    };
    let mut total = u32::from(first);
    rest.iter()
        .map(|&d| {
            let add = total < 10;
            total = if add {
                total + u32::from(d)
            } else {
                total - u32::from(d).min(total)
            };
            (add, d, total)
        })
        .collect()
}

/// Checks an arithmetic answer: returns the digits it works through when it has exactly the
/// reference format ("seven plus five is twelve, minus three is nine") with the right operator
/// and total at every step, else `None`.
pub fn check_arithmetic(answer: &str) -> Option<Vec<u8>> {
    let digit = |w: &str| {
        numbers::parse_english(w)
            .filter(|&n| n <= 9)
            .map(|n| n as u8)
    };
    let mut steps = answer.split(", ");
    let first_step = steps.next()?;
    let (first, first_rest) = match first_step.split_once(' ') {
        Some((w, rest)) => (w, Some(rest)),
        // A lone digit is the whole working of a one-digit utterance.
        None if answer == first_step => (first_step, None),
        None => return None,
    };
    let mut digits = vec![digit(first)?];
    for step in first_rest.into_iter().chain(steps) {
        let words: Vec<&str> = step.split(' ').collect();
        let &[op, d, is, total] = &words[..] else {
            return None;
        };
        if is != "is" || !matches!(op, "plus" | "minus") {
            return None;
        }
        digits.push(digit(d)?);
        let &(added, _, expect) = arithmetic_steps(&digits).last()?;
        if (op == "plus") != added || numbers::parse_english(total)? != expect {
            return None;
        }
    }
    Some(digits)
}

impl TaskKind {
    /// All kinds.
    pub const ALL: [TaskKind; 8] = [
        TaskKind::Recognition,
        TaskKind::Translation,
        TaskKind::Sum,
        TaskKind::Largest,
        TaskKind::Count,
        TaskKind::CodeRecognition,
        TaskKind::CodeTranslation,
        TaskKind::Arithmetic,
    ];

    /// The kind's name in configurations and on the command line: `recognition`,
    /// `translation`, `sum`, `largest`, `count`, `code_recognition`, `code_translation` or
    /// `arithmetic` (its serde name).
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Recognition => "recognition",
            TaskKind::Translation => "translation",
            TaskKind::Sum => "sum",
            TaskKind::Largest => "largest",
            TaskKind::Count => "count",
            TaskKind::CodeRecognition => "code_recognition",
            TaskKind::CodeTranslation => "code_translation",
            TaskKind::Arithmetic => "arithmetic",
        }
    }

    /// Fewest and most digits of this kind's utterances by default (see [`TaskConfig::digits`]).
    pub fn digit_range(self) -> (usize, usize) {
        match self {
            TaskKind::Recognition
            | TaskKind::Translation
            | TaskKind::Sum
            | TaskKind::Largest
            | TaskKind::Count => (1, 4),
            TaskKind::CodeRecognition | TaskKind::CodeTranslation => (5, MAX_UTTERANCE_DIGITS),
            TaskKind::Arithmetic => (3, 5),
        }
    }

    /// Most digits this kind has a reference for: 4 for the sum (its number words end at 36),
    /// [`MAX_UTTERANCE_DIGITS`] otherwise.
    pub fn max_digits(self) -> usize {
        match self {
            TaskKind::Sum => 4,
            _ => MAX_UTTERANCE_DIGITS,
        }
    }

    /// The instruction given with the audio.
    pub fn instruction(self) -> &'static str {
        match self {
            TaskKind::Recognition => "Transcribe the audio.",
            TaskKind::Translation => "Translate the audio into German.",
            TaskKind::Sum => "What is the sum of the digits in the audio?",
            TaskKind::Largest => "What is the largest digit in the audio?",
            TaskKind::Count => "How many digits are in the audio?",
            TaskKind::CodeRecognition => "Transcribe the spoken code digit by digit.",
            TaskKind::CodeTranslation => "Translate the spoken code into German digit by digit.",
            TaskKind::Arithmetic => {
                "Work through the digits: add the next digit while the total is below ten, \
                 otherwise subtract it, and say each total."
            }
        }
    }

    /// The family this kind is reported under.
    pub fn family(self) -> TaskFamily {
        match self {
            TaskKind::Recognition => TaskFamily::Asr,
            TaskKind::Translation => TaskFamily::Ast,
            TaskKind::Sum | TaskKind::Largest | TaskKind::Count => TaskFamily::Sqa,
            TaskKind::CodeRecognition => TaskFamily::AsrLong,
            TaskKind::CodeTranslation => TaskFamily::AstLong,
            TaskKind::Arithmetic => TaskFamily::Arith,
        }
    }

    /// The reference answer for an utterance of `digits`. Fails on an empty list, a value above
    /// 9, or more digits than [`TaskKind::max_digits`].
    pub fn reference(self, digits: &[u8]) -> Result<String, SpeechError> {
        let bad = || SpeechError::Config(format!("no {self:?} reference for digits {digits:?}"));
        if digits.is_empty() || digits.len() > self.max_digits() || digits.iter().any(|&d| d > 9) {
            return Err(bad());
        }
        let words = |f: fn(u32) -> Option<&'static str>| -> Result<String, SpeechError> {
            let w: Option<Vec<&str>> = digits.iter().map(|&d| f(u32::from(d))).collect();
            Ok(w.ok_or_else(bad)?.join(" "))
        };
        match self {
            TaskKind::Recognition | TaskKind::CodeRecognition => words(numbers::english),
            TaskKind::Translation | TaskKind::CodeTranslation => words(numbers::german),
            TaskKind::Arithmetic => {
                let english = |n: u32| numbers::english(n).ok_or_else(bad);
                let mut out = english(u32::from(digits[0]))?.to_string();
                for (k, (added, d, total)) in arithmetic_steps(digits).into_iter().enumerate() {
                    if k > 0 {
                        out.push(',');
                    }
                    let op = if added { "plus" } else { "minus" };
                    out.push_str(&format!(
                        " {op} {} is {}",
                        english(u32::from(d))?,
                        english(total)?
                    ));
                }
                Ok(out)
            }
            TaskKind::Sum => {
                let sum: u32 = digits.iter().map(|&d| u32::from(d)).sum();
                numbers::english(sum).map(str::to_string).ok_or_else(bad)
            }
            TaskKind::Largest => {
                let max = digits.iter().copied().max().unwrap_or(0);
                numbers::english(u32::from(max))
                    .map(str::to_string)
                    .ok_or_else(bad)
            }
            TaskKind::Count => numbers::english(digits.len() as u32)
                .map(str::to_string)
                .ok_or_else(bad),
        }
    }
}

/// One spoken-digit example: what was said, by whom, which takes, the question and the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// The question asked.
    pub kind: TaskKind,
    /// Who spoke every digit.
    pub speaker: String,
    /// The digits, in order.
    pub digits: Vec<u8>,
    /// The take of each digit's clip.
    pub takes: Vec<u32>,
    /// Silence between consecutive clips, in milliseconds (`digits.len() - 1` values).
    pub gaps_ms: Vec<u32>,
    /// The instruction text.
    pub instruction: String,
    /// The reference answer.
    pub reference: String,
}

/// Shape of generated utterances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskConfig {
    /// Fewest and most digits per utterance for every kind; `None` (the default) gives each kind
    /// its own range ([`TaskKind::digit_range`]: 1-4 for the short kinds, 5-10 for codes, 3-5
    /// for arithmetic). An explicit range must start at 1 or more and fit every kind generated
    /// ([`TaskKind::max_digits`]).
    pub digits: Option<(usize, usize)>,
    /// Shortest and longest silence between clips, in milliseconds.
    pub gap_ms: (u32, u32),
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            digits: None,
            gap_ms: (50, 250),
        }
    }
}

impl TaskConfig {
    /// Fewest and most digits of `kind`'s utterances under this configuration.
    pub fn digits_of(&self, kind: TaskKind) -> (usize, usize) {
        self.digits.unwrap_or_else(|| kind.digit_range())
    }
}

/// Builds a smaller recordings folder in `to`: every digit of `speakers` for `takes`, linked
/// from `from` (copied where symbolic links are unavailable). Any folder of
/// `{digit}_{speaker}_{take}.wav` files works as `--data`, so a subset like this keeps quick
/// experiments and tests fast. Fails, naming the file, when one is missing from `from`.
pub fn link_recordings(
    from: &Path,
    to: &Path,
    speakers: &[&str],
    takes: std::ops::Range<u32>,
) -> Result<PathBuf, SpeechError> {
    let data_err = |path: &Path, reason: String| SpeechError::Data {
        path: path.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(to).map_err(|e| data_err(to, format!("cannot create: {e}")))?;
    for speaker in speakers {
        for digit in 0..10 {
            for take in takes.clone() {
                let name = format!("{digit}_{speaker}_{take}.wav");
                let (src, dst) = (from.join(&name), to.join(&name));
                if !src.is_file() {
                    return Err(data_err(&src, "recording missing".into()));
                }
                #[cfg(unix)]
                let linked = std::os::unix::fs::symlink(&src, &dst);
                #[cfg(not(unix))]
                let linked = std::fs::copy(&src, &dst).map(|_| ());
                linked.map_err(|e| data_err(&dst, format!("cannot link: {e}")))?;
            }
        }
    }
    Ok(to.to_path_buf())
}

/// Generates `n` examples from the clips of `split`, deterministic given `seed`.
///
/// Per example: a kind drawn uniformly from `kinds`, a speaker uniformly from those with clips in
/// the split, a length uniformly in the kind's digit range ([`TaskConfig::digits_of`]), each
/// digit uniformly among the digits that speaker recorded, and for each a take uniformly among
/// that speaker's takes of that digit in the split. The short kinds draw exactly as they did
/// before the long kinds existed, so their examples for a seed are unchanged.
pub fn generate(
    corpus: &Corpus,
    split: Split,
    kinds: &[TaskKind],
    n: usize,
    seed: u64,
    config: &TaskConfig,
) -> Result<Vec<Example>, SpeechError> {
    if kinds.is_empty() {
        return Err(SpeechError::Config("no task kinds to generate".into()));
    }
    if config.gap_ms.0 > config.gap_ms.1 {
        return Err(SpeechError::Config(format!(
            "need gap_ms.0 <= gap_ms.1, got {config:?}"
        )));
    }
    for &kind in kinds {
        let (lo, hi) = config.digits_of(kind);
        if lo == 0 || lo > hi || hi > kind.max_digits() {
            return Err(SpeechError::Config(format!(
                "{kind:?} needs 1 <= fewest <= most <= {} digits, got {lo}..={hi}",
                kind.max_digits()
            )));
        }
    }
    // speaker -> digit -> takes (ordered maps, so iteration order is fixed).
    let mut avail: BTreeMap<&str, BTreeMap<u8, Vec<u32>>> = BTreeMap::new();
    for c in corpus.clips().iter().filter(|c| c.split() == split) {
        avail
            .entry(c.speaker.as_str())
            .or_default()
            .entry(c.digit)
            .or_default()
            .push(c.take);
    }
    if avail.is_empty() {
        return Err(SpeechError::Config(format!(
            "no {split:?} clips to build tasks from"
        )));
    }
    // Per speaker: (digit, sorted takes) for every digit recorded.
    type Recorded = Vec<(u8, Vec<u32>)>;
    let speakers: Vec<(&str, Recorded)> = avail
        .into_iter()
        .map(|(s, m)| {
            let mut digits: Recorded = m.into_iter().collect();
            digits.iter_mut().for_each(|(_, t)| t.sort_unstable());
            (s, digits)
        })
        .collect();

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = kinds[rng.random_range(0..kinds.len())];
        let (speaker, digits_avail) = &speakers[rng.random_range(0..speakers.len())];
        let (lo, hi) = config.digits_of(kind);
        let len = rng.random_range(lo..=hi);
        let mut digits = Vec::with_capacity(len);
        let mut takes = Vec::with_capacity(len);
        for _ in 0..len {
            let (d, t) = &digits_avail[rng.random_range(0..digits_avail.len())];
            digits.push(*d);
            takes.push(t[rng.random_range(0..t.len())]);
        }
        let gaps_ms = (1..len)
            .map(|_| rng.random_range(config.gap_ms.0..=config.gap_ms.1))
            .collect();
        out.push(Example {
            kind,
            speaker: speaker.to_string(),
            reference: kind.reference(&digits)?,
            instruction: kind.instruction().to_string(),
            digits,
            takes,
            gaps_ms,
        });
    }
    Ok(out)
}

/// Every text a task prompt or answer can contain (chat role headers, instructions and all answer
/// words, the arithmetic's operators included), for learning the text tokenizer's merges. Fixed
/// order.
pub fn task_texts() -> Vec<String> {
    let mut texts: Vec<String> = ["system\n", "user\n", "assistant\n"]
        .iter()
        .map(|s| s.to_string())
        .chain(TaskKind::ALL.iter().map(|k| k.instruction().to_string()))
        .collect();
    // The arithmetic's working: operators, "is" and the comma between steps, each as it follows
    // a space (the comma follows a word directly).
    for word in ["plus", "minus", "is"] {
        texts.push(format!("x {word}"));
    }
    texts.push("x,".to_string());
    for n in 0..=numbers::MAX_NUMBER {
        for word in [numbers::english(n), numbers::german(n)]
            .into_iter()
            .flatten()
        {
            texts.push(word.to_string());
            // Inside an answer every word but the first follows a space.
            texts.push(format!("x {word}"));
        }
    }
    texts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_subset_links_every_digit_and_names_a_missing_file() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("all");
        std::fs::create_dir_all(&src).unwrap();
        for digit in 0..10 {
            for take in 0..3 {
                std::fs::write(src.join(format!("{digit}_ann_{take}.wav")), b"x").unwrap();
            }
        }
        let sub = link_recordings(&src, &tmp.path().join("sub"), &["ann"], 1..3).unwrap();
        assert_eq!(std::fs::read_dir(&sub).unwrap().count(), 20);
        assert!(sub.join("9_ann_2.wav").is_file());
        let err = link_recordings(&src, &tmp.path().join("more"), &["ann"], 2..4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("0_ann_3.wav") && err.contains("missing"),
            "{err}"
        );
    }

    #[test]
    fn names_parse() {
        assert_eq!(
            Clip::parse_name("7_george_12.wav"),
            Some((7, "george".into(), 12))
        );
        assert_eq!(
            Clip::parse_name("0_mary_ann_3.wav"),
            Some((0, "mary_ann".into(), 3))
        );
        for bad in [
            "10_george_1.wav",
            "7_george_.wav",
            "7__1.wav",
            "7_george_1.mp3",
            "x_george_1.wav",
            "7_george_-1.wav",
            "README.md",
        ] {
            assert_eq!(Clip::parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn kind_names_parse_back_and_match_serde() {
        for kind in TaskKind::ALL {
            assert_eq!(kind.name().parse::<TaskKind>().unwrap(), kind);
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::json!(kind.name())
            );
        }
        assert_eq!(
            " sum".parse::<TaskKind>().unwrap(),
            TaskKind::Sum,
            "surrounding space is trimmed"
        );
        let err = "recognise".parse::<TaskKind>().unwrap_err().to_string();
        assert!(
            err.contains("\"recognise\"") && err.contains("code_translation"),
            "{err}"
        );
    }

    #[test]
    fn references() {
        assert_eq!(
            TaskKind::Recognition.reference(&[7, 3, 9]).unwrap(),
            "seven three nine"
        );
        assert_eq!(
            TaskKind::Translation.reference(&[7, 3, 9]).unwrap(),
            "sieben drei neun"
        );
        assert_eq!(TaskKind::Sum.reference(&[7, 3, 9]).unwrap(), "nineteen");
        assert_eq!(TaskKind::Largest.reference(&[7, 3, 9]).unwrap(), "nine");
        assert_eq!(TaskKind::Count.reference(&[7, 3, 9]).unwrap(), "three");
        assert_eq!(
            TaskKind::Sum.reference(&[9, 9, 9, 9]).unwrap(),
            "thirty-six"
        );
        assert!(TaskKind::Sum.reference(&[]).is_err());
        assert!(TaskKind::Recognition.reference(&[10]).is_err());
        // Sums end at thirty-six; codes at ten digits.
        assert!(TaskKind::Sum.reference(&[9; 5]).is_err());
        assert!(TaskKind::CodeRecognition.reference(&[1; 11]).is_err());
    }

    #[test]
    fn long_references_hand_checked() {
        let code = [4, 1, 5, 5, 5, 2, 6, 7, 0, 9];
        assert_eq!(
            TaskKind::CodeRecognition.reference(&code).unwrap(),
            "four one five five five two six seven zero nine"
        );
        assert_eq!(
            TaskKind::CodeTranslation.reference(&code).unwrap(),
            "vier eins fünf fünf fünf zwei sechs sieben null neun"
        );
        for (digits, working) in [
            (
                &[7, 5, 3][..],
                "seven plus five is twelve, minus three is nine",
            ),
            (
                &[5, 5, 7][..],
                "five plus five is ten, minus seven is three",
            ),
            (&[0, 0, 0][..], "zero plus zero is zero, plus zero is zero"),
            (
                &[2, 3, 4, 1][..],
                "two plus three is five, plus four is nine, plus one is ten",
            ),
            (
                &[9, 9, 9, 9, 9][..],
                "nine plus nine is eighteen, minus nine is nine, plus nine is eighteen, \
                 minus nine is nine",
            ),
            (&[6][..], "six"),
        ] {
            assert_eq!(TaskKind::Arithmetic.reference(digits).unwrap(), working);
            assert_eq!(check_arithmetic(working).as_deref(), Some(digits));
        }
    }

    #[test]
    fn arithmetic_checker_refuses_wrong_working() {
        for bad in [
            "",
            "seven plus five is eleven, minus three is nine",
            "seven minus five is two",
            "seven plus five is twelve, plus three is fifteen",
            "seven plus five is twelve minus three is nine",
            "seven plus five twelve",
            "ten plus five is fifteen",
            "seven plus five is twelve,",
            "seven, plus five is twelve",
            "seven plus  five is twelve",
        ] {
            assert_eq!(check_arithmetic(bad), None, "{bad}");
        }
        // Every total stays within 0..=18 for any digits.
        for a in 0..10u8 {
            for b in 0..10u8 {
                for c in 0..10u8 {
                    for (_, _, t) in arithmetic_steps(&[a, b, c, 9, 0]) {
                        assert!(t <= 18);
                    }
                }
            }
        }
    }

    #[test]
    fn families_short_and_long() {
        assert_eq!(TaskFamily::ALL.len(), 6);
        for f in TaskFamily::ALL {
            assert_eq!(f.is_long(), !TaskFamily::SHORT.contains(&f));
            assert_eq!(f.name().parse::<TaskFamily>().unwrap(), f);
            assert!(f.kinds().iter().all(|k| k.family() == f));
        }
        for k in TaskKind::ALL {
            assert!(TaskFamily::ALL.iter().any(|f| f.kinds().contains(&k)));
            let (lo, hi) = k.digit_range();
            assert!(1 <= lo && lo <= hi && hi <= k.max_digits(), "{k:?}");
            // Long families are the kinds whose utterances have 3 digits or more.
            assert_eq!(k.family().is_long(), lo >= 3, "{k:?}");
        }
        let err = "asr2".parse::<TaskFamily>().unwrap_err().to_string();
        assert!(err.contains("asr_long") && err.contains("arith"), "{err}");
    }

    #[test]
    fn traffic_takes_are_the_first_training_takes() {
        assert!(!is_traffic_take(4, 10));
        assert!(is_traffic_take(5, 10));
        assert!(is_traffic_take(14, 10));
        assert!(!is_traffic_take(15, 10));
        assert!(!is_traffic_take(5, 0));
        assert!(!is_traffic_take(u32::MAX, u32::MAX));
    }

    #[test]
    fn split_by_take() {
        assert_eq!(Split::of_take(0), Split::Test);
        assert_eq!(Split::of_take(4), Split::Test);
        assert_eq!(Split::of_take(5), Split::Train);
        assert_eq!(Split::of_take(49), Split::Train);
    }
}
