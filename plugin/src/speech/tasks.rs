//! Spoken-digit tasks built from recordings named like the Free Spoken Digit Dataset's,
//! `{digit}_{speaker}_{take}.wav`.
//!
//! An utterance is 1 to 4 digits spoken by one speaker: the clips are joined with short
//! silences. Each utterance is asked one of five questions ([`TaskKind`]): transcribe it, translate
//! it into German, or three spoken-QA questions (sum, largest digit, how many digits). Takes 0-4
//! are the test split, the dataset's own convention; everything else is training data.
//! Generation is deterministic given a seed.

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
}

/// Task families as the evaluation reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskFamily {
    /// Speech recognition.
    Asr,
    /// Speech translation.
    Ast,
    /// Spoken question answering.
    Sqa,
}

impl TaskFamily {
    /// All families.
    pub const ALL: [TaskFamily; 3] = [TaskFamily::Asr, TaskFamily::Ast, TaskFamily::Sqa];

    /// The task kinds of this family.
    pub fn kinds(self) -> &'static [TaskKind] {
        match self {
            TaskFamily::Asr => &[TaskKind::Recognition],
            TaskFamily::Ast => &[TaskKind::Translation],
            TaskFamily::Sqa => &[TaskKind::Sum, TaskKind::Largest, TaskKind::Count],
        }
    }

    /// "asr", "ast" or "sqa".
    pub fn name(self) -> &'static str {
        match self {
            TaskFamily::Asr => "asr",
            TaskFamily::Ast => "ast",
            TaskFamily::Sqa => "sqa",
        }
    }
}

impl std::str::FromStr for TaskFamily {
    type Err = SpeechError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskFamily::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                SpeechError::Config(format!("unknown task {s:?} (expected asr, ast or sqa)"))
            })
    }
}

impl TaskKind {
    /// All kinds.
    pub const ALL: [TaskKind; 5] = [
        TaskKind::Recognition,
        TaskKind::Translation,
        TaskKind::Sum,
        TaskKind::Largest,
        TaskKind::Count,
    ];

    /// The instruction given with the audio.
    pub fn instruction(self) -> &'static str {
        match self {
            TaskKind::Recognition => "Transcribe the audio.",
            TaskKind::Translation => "Translate the audio into German.",
            TaskKind::Sum => "What is the sum of the digits in the audio?",
            TaskKind::Largest => "What is the largest digit in the audio?",
            TaskKind::Count => "How many digits are in the audio?",
        }
    }

    /// The family this kind is reported under.
    pub fn family(self) -> TaskFamily {
        match self {
            TaskKind::Recognition => TaskFamily::Asr,
            TaskKind::Translation => TaskFamily::Ast,
            TaskKind::Sum | TaskKind::Largest | TaskKind::Count => TaskFamily::Sqa,
        }
    }

    /// The reference answer for an utterance of `digits`. Fails on an empty list, a value above
    /// 9, or more digits than there are number words for.
    pub fn reference(self, digits: &[u8]) -> Result<String, SpeechError> {
        let bad = || SpeechError::Config(format!("no reference for digits {digits:?}"));
        if digits.is_empty() || digits.iter().any(|&d| d > 9) {
            return Err(bad());
        }
        let words = |f: fn(u32) -> Option<&'static str>| -> Result<String, SpeechError> {
            let w: Option<Vec<&str>> = digits.iter().map(|&d| f(u32::from(d))).collect();
            Ok(w.ok_or_else(bad)?.join(" "))
        };
        match self {
            TaskKind::Recognition => words(numbers::english),
            TaskKind::Translation => words(numbers::german),
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
    /// Fewest digits per utterance (at least 1).
    pub min_digits: usize,
    /// Most digits per utterance (at most 4, so sums stay within the number words).
    pub max_digits: usize,
    /// Shortest and longest silence between clips, in milliseconds.
    pub gap_ms: (u32, u32),
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            min_digits: 1,
            max_digits: 4,
            gap_ms: (50, 250),
        }
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
/// the split, a length uniformly in `min_digits..=max_digits`, each digit uniformly among the
/// digits that speaker recorded, and for each a take uniformly among that speaker's takes of that
/// digit in the split.
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
    if config.min_digits == 0
        || config.min_digits > config.max_digits
        || config.max_digits > 4
        || config.gap_ms.0 > config.gap_ms.1
    {
        return Err(SpeechError::Config(format!(
            "need 1 <= min_digits <= max_digits <= 4 and gap_ms.0 <= gap_ms.1, got {config:?}"
        )));
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
        let len = rng.random_range(config.min_digits..=config.max_digits);
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
/// words), for learning the text tokenizer's merges. Fixed order.
pub fn task_texts() -> Vec<String> {
    let mut texts: Vec<String> = ["system\n", "user\n", "assistant\n"]
        .iter()
        .map(|s| s.to_string())
        .chain(TaskKind::ALL.iter().map(|k| k.instruction().to_string()))
        .collect();
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
    }

    #[test]
    fn split_by_take() {
        assert_eq!(Split::of_take(0), Split::Test);
        assert_eq!(Split::of_take(4), Split::Test);
        assert_eq!(Split::of_take(5), Split::Train);
        assert_eq!(Split::of_take(49), Split::Train);
    }
}
