//! Spoken-digit tasks: number words against a hand-checked table, deterministic generation, the
//! split by take, references that follow from the digits, the answer lengths of the short and
//! long families under the real tokenizer, the longest utterance against the model's positions,
//! and audio rendered from real recordings (and from a synthetic folder with other names, rates
//! and gaps).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use leaf_plugin::audio::FrontEndConfig;
use leaf_plugin::audio::{write_wav_pcm16, Audio};
use leaf_plugin::speech::augment::AugmentConfig;
use leaf_plugin::speech::numbers::{english, german, parse_english, MAX_NUMBER};
use leaf_plugin::speech::pretrain::ModelShape;
use leaf_plugin::speech::tasks::{
    check_arithmetic, generate, task_texts, Clip, Corpus, Example, Split, TaskConfig, TaskFamily,
    TaskKind, MAX_ANSWER_TOKENS, MAX_UTTERANCE_DIGITS,
};
use leaf_plugin::speech::units::{DEFAULT_POOL, DEFAULT_UNITS};
use leaf_plugin::speech::{SpeechError, SpeechTokenizer};

fn fsdd_dir() -> PathBuf {
    leaf_plugin::speech::pretrain::default_data_dir().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn number_words_hand_checked() {
    let table: [(u32, &str, &str); 37] = [
        (0, "zero", "null"),
        (1, "one", "eins"),
        (2, "two", "zwei"),
        (3, "three", "drei"),
        (4, "four", "vier"),
        (5, "five", "fünf"),
        (6, "six", "sechs"),
        (7, "seven", "sieben"),
        (8, "eight", "acht"),
        (9, "nine", "neun"),
        (10, "ten", "zehn"),
        (11, "eleven", "elf"),
        (12, "twelve", "zwölf"),
        (13, "thirteen", "dreizehn"),
        (14, "fourteen", "vierzehn"),
        (15, "fifteen", "fünfzehn"),
        (16, "sixteen", "sechzehn"),
        (17, "seventeen", "siebzehn"),
        (18, "eighteen", "achtzehn"),
        (19, "nineteen", "neunzehn"),
        (20, "twenty", "zwanzig"),
        (21, "twenty-one", "einundzwanzig"),
        (22, "twenty-two", "zweiundzwanzig"),
        (23, "twenty-three", "dreiundzwanzig"),
        (24, "twenty-four", "vierundzwanzig"),
        (25, "twenty-five", "fünfundzwanzig"),
        (26, "twenty-six", "sechsundzwanzig"),
        (27, "twenty-seven", "siebenundzwanzig"),
        (28, "twenty-eight", "achtundzwanzig"),
        (29, "twenty-nine", "neunundzwanzig"),
        (30, "thirty", "dreißig"),
        (31, "thirty-one", "einunddreißig"),
        (32, "thirty-two", "zweiunddreißig"),
        (33, "thirty-three", "dreiunddreißig"),
        (34, "thirty-four", "vierunddreißig"),
        (35, "thirty-five", "fünfunddreißig"),
        (36, "thirty-six", "sechsunddreißig"),
    ];
    for (n, en, de) in table {
        assert_eq!(english(n), Some(en));
        assert_eq!(german(n), Some(de));
    }
    assert_eq!(MAX_NUMBER, 36);
    assert_eq!(english(37), None);
    assert_eq!(parse_english("nineteen"), Some(19));
    assert_eq!(parse_english("Nineteen"), None);
}

#[test]
fn the_issue_examples() {
    let d = [7, 3, 9];
    let cases = [
        (
            TaskKind::Recognition,
            "Transcribe the audio.",
            "seven three nine",
        ),
        (
            TaskKind::Translation,
            "Translate the audio into German.",
            "sieben drei neun",
        ),
        (
            TaskKind::Sum,
            "What is the sum of the digits in the audio?",
            "nineteen",
        ),
        (
            TaskKind::Largest,
            "What is the largest digit in the audio?",
            "nine",
        ),
        (
            TaskKind::Count,
            "How many digits are in the audio?",
            "three",
        ),
        (
            TaskKind::CodeRecognition,
            "Transcribe the spoken code digit by digit.",
            "seven three nine",
        ),
        (
            TaskKind::CodeTranslation,
            "Translate the spoken code into German digit by digit.",
            "sieben drei neun",
        ),
        (
            TaskKind::Arithmetic,
            "Work through the digits: add the next digit while the total is below ten, \
             otherwise subtract it, and say each total.",
            "seven plus three is ten, minus nine is one",
        ),
    ];
    for (kind, instruction, reference) in cases {
        assert_eq!(kind.instruction(), instruction);
        assert_eq!(kind.reference(&d).unwrap(), reference);
    }
    assert_eq!(
        TaskKind::Recognition.reference(&[1, 0]).unwrap(),
        "one zero"
    );
    assert_eq!(
        TaskKind::Translation.reference(&[1, 0]).unwrap(),
        "eins null"
    );
    assert_eq!(TaskKind::Sum.reference(&[0]).unwrap(), "zero");
    assert_eq!(TaskKind::Count.reference(&[5, 5, 5, 5]).unwrap(), "four");
    assert_eq!("sqa".parse::<TaskFamily>().unwrap().kinds().len(), 3);
    assert!("asr2".parse::<TaskFamily>().is_err());
    // The issue's own example of arithmetic with the working.
    assert_eq!(
        TaskKind::Arithmetic.reference(&[7, 5, 3]).unwrap(),
        "seven plus five is twelve, minus three is nine"
    );
    // A phone number, in English and German.
    let phone = [0, 1, 7, 6, 2, 4, 8, 3, 9, 5];
    assert_eq!(
        TaskKind::CodeRecognition.reference(&phone).unwrap(),
        "zero one seven six two four eight three nine five"
    );
    assert_eq!(
        TaskKind::CodeTranslation.reference(&phone).unwrap(),
        "null eins sieben sechs zwei vier acht drei neun fünf"
    );
    // Arithmetic totals above nine: twelve, eighteen, and back down.
    assert_eq!(
        TaskKind::Arithmetic.reference(&[8, 4, 2, 9, 9]).unwrap(),
        "eight plus four is twelve, minus two is ten, minus nine is one, plus nine is ten"
    );
    assert_eq!(
        TaskKind::Arithmetic.reference(&[9, 9, 0]).unwrap(),
        "nine plus nine is eighteen, minus zero is eighteen"
    );
    assert_eq!(
        check_arithmetic("nine plus nine is eighteen, minus zero is eighteen"),
        Some(vec![9, 9, 0])
    );
    assert_eq!(
        check_arithmetic("nine plus nine is eighteen, plus zero is eighteen"),
        None
    );
    assert_eq!(
        TaskFamily::SHORT.len() + TaskFamily::LONG.len(),
        TaskFamily::ALL.len()
    );
    assert!(TaskFamily::LONG.iter().all(|f| f.is_long()));
    assert!(!TaskFamily::SHORT.iter().any(|f| f.is_long()));
}

fn check_example(e: &Example, corpus: &Corpus, split: Split) {
    let (lo, hi) = e.kind.digit_range();
    assert!((lo..=hi).contains(&e.digits.len()), "{e:?}");
    assert_eq!(e.takes.len(), e.digits.len());
    assert_eq!(e.gaps_ms.len() + 1, e.digits.len());
    assert!(e.gaps_ms.iter().all(|g| (50..=250).contains(g)));
    assert_eq!(e.reference, e.kind.reference(&e.digits).unwrap());
    assert_eq!(e.instruction, e.kind.instruction());
    for (&d, &t) in e.digits.iter().zip(&e.takes) {
        assert_eq!(Split::of_take(t), split, "{e:?}");
        assert!(corpus.find(d, &e.speaker, t).is_some(), "{e:?}");
    }
}

#[test]
fn generation_is_deterministic_and_split_by_take() {
    let corpus = Corpus::open(&fsdd_dir()).unwrap();
    assert_eq!(corpus.len(), 2500);
    assert_eq!(
        corpus.speakers(),
        ["george", "jackson", "lucas", "nicolas", "yweweler"]
    );
    let cfg = TaskConfig::default();
    let a = generate(&corpus, Split::Train, &TaskKind::ALL, 300, 42, &cfg).unwrap();
    let b = generate(&corpus, Split::Train, &TaskKind::ALL, 300, 42, &cfg).unwrap();
    let c = generate(&corpus, Split::Train, &TaskKind::ALL, 300, 43, &cfg).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    // A longer run with the same seed starts with the same examples.
    let longer = generate(&corpus, Split::Train, &TaskKind::ALL, 400, 42, &cfg).unwrap();
    assert_eq!(&longer[..300], &a[..]);
    for e in &a {
        check_example(e, &corpus, Split::Train);
    }
    let test = generate(&corpus, Split::Test, &TaskKind::ALL, 300, 42, &cfg).unwrap();
    for e in &test {
        check_example(e, &corpus, Split::Test);
        assert!(e.takes.iter().all(|&t| t < 5));
    }
    // Every kind, speaker and length shows up.
    let kinds: BTreeSet<TaskKind> = a.iter().map(|e| e.kind).collect();
    assert_eq!(kinds.len(), 8);
    let speakers: BTreeSet<&str> = a.iter().map(|e| e.speaker.as_str()).collect();
    assert_eq!(speakers.len(), 5);
    let lens = |family: TaskFamily| -> BTreeSet<usize> {
        a.iter()
            .filter(|e| e.kind.family() == family)
            .map(|e| e.digits.len())
            .collect()
    };
    assert_eq!(lens(TaskFamily::Asr), (1..=4).collect());
    assert_eq!(lens(TaskFamily::Arith), (3..=5).collect());
    let long = generate(
        &corpus,
        Split::Train,
        TaskFamily::AsrLong.kinds(),
        300,
        42,
        &cfg,
    )
    .unwrap();
    let long_lens: BTreeSet<usize> = long.iter().map(|e| e.digits.len()).collect();
    assert_eq!(long_lens, (5..=10).collect());
    // Long examples are split by take too.
    let long_test = generate(
        &corpus,
        Split::Test,
        TaskFamily::LONG
            .iter()
            .flat_map(|f| f.kinds())
            .copied()
            .collect::<Vec<_>>()
            .as_slice(),
        200,
        5,
        &cfg,
    )
    .unwrap();
    for e in &long_test {
        check_example(e, &corpus, Split::Test);
        assert!(e.kind.family().is_long());
    }
    // Adding the long kinds leaves the short kinds' draws as they were: a short kind's example
    // depends only on the seed and the kind list.
    let short = generate(&corpus, Split::Train, &TaskKind::ALL[..5], 50, 42, &cfg).unwrap();
    let forced = TaskConfig {
        digits: Some((1, 4)),
        ..TaskConfig::default()
    };
    let same = generate(&corpus, Split::Train, &TaskKind::ALL[..5], 50, 42, &forced).unwrap();
    assert_eq!(short, same);
    // One family only.
    let asr = generate(&corpus, Split::Test, TaskFamily::Asr.kinds(), 50, 1, &cfg).unwrap();
    assert!(asr.iter().all(|e| e.kind == TaskKind::Recognition));
    // Examples serialise with everything needed to reproduce them.
    let line = serde_json::to_string(&a[0]).unwrap();
    let back: Example = serde_json::from_str(&line).unwrap();
    assert_eq!(back, a[0]);
}

#[test]
fn rendered_audio_is_the_clips_and_the_gaps() {
    let mut corpus = Corpus::open(&fsdd_dir()).unwrap();
    let holdout = corpus.filter(|c| c.speaker == "lucas");
    let ex = generate(
        &holdout,
        Split::Test,
        &[TaskKind::Recognition],
        5,
        3,
        &TaskConfig::default(),
    )
    .unwrap();
    for e in &ex {
        assert_eq!(e.speaker, "lucas");
        let audio = holdout.render(e).unwrap();
        assert_eq!(audio.sample_rate(), 8000);
        let mut expect = Vec::new();
        for (k, (&d, &t)) in e.digits.iter().zip(&e.takes).enumerate() {
            if k > 0 {
                expect.resize(expect.len() + e.gaps_ms[k - 1] as usize * 8, 0.0);
            }
            let i = holdout.find(d, "lucas", t).unwrap();
            expect.extend_from_slice(holdout.clip_audio(i).unwrap().samples());
        }
        assert_eq!(audio.samples(), &expect[..]);
    }
    // Preloading changes nothing but speed.
    let e = &ex[0];
    let lazy = corpus.render(e).unwrap();
    corpus.preload().unwrap();
    assert_eq!(corpus.render(e).unwrap(), lazy);
    // An example naming a clip the corpus lacks is a typed error.
    let mut bad = e.clone();
    bad.takes[0] = 999;
    assert!(matches!(
        corpus.render(&bad),
        Err(SpeechError::MissingClip { take: 999, .. })
    ));
}

fn write_clip(dir: &Path, name: &str, rate: u32, seconds: f64, freq: f64) {
    let n = (f64::from(rate) * seconds) as usize;
    let samples = (0..n)
        .map(|i| {
            (0.3 * (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin()) as f32
        })
        .collect();
    let bytes = write_wav_pcm16(&Audio::new(samples, rate).unwrap()).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

#[test]
fn any_folder_of_fsdd_style_names_works() {
    let dir = tempfile::tempdir().unwrap();
    // Speaker "ann_b" has digits 1 and 2 only; "bo" records at 16 kHz. Other files are ignored.
    write_clip(dir.path(), "1_ann_b_0.wav", 8000, 0.1, 300.0);
    write_clip(dir.path(), "2_ann_b_1.wav", 8000, 0.1, 500.0);
    write_clip(dir.path(), "1_ann_b_7.wav", 8000, 0.1, 300.0);
    write_clip(dir.path(), "3_bo_2.wav", 16000, 0.05, 700.0);
    write_clip(dir.path(), "4_bo_9.wav", 16000, 0.05, 700.0);
    std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
    std::fs::write(dir.path().join("x_y.wav"), "not parsed").unwrap();
    let corpus = Corpus::open(dir.path()).unwrap();
    assert_eq!(corpus.len(), 5);
    assert_eq!(corpus.speakers(), ["ann_b", "bo"]);
    let test = generate(
        &corpus,
        Split::Test,
        &TaskKind::ALL,
        200,
        9,
        &TaskConfig::default(),
    )
    .unwrap();
    for e in &test {
        check_example(e, &corpus, Split::Test);
        let allowed: &[u8] = if e.speaker == "bo" { &[3] } else { &[1, 2] };
        assert!(e.digits.iter().all(|d| allowed.contains(d)), "{e:?}");
        let audio = corpus.render(e).unwrap();
        let rate = if e.speaker == "bo" { 16000 } else { 8000 };
        assert_eq!(audio.sample_rate(), rate);
        // Every clip holds 800 samples (0.1 s at 8 kHz, 0.05 s at 16 kHz).
        let gaps: usize = e.gaps_ms.iter().map(|&g| (g * rate / 1000) as usize).sum();
        assert_eq!(audio.len(), 800 * e.digits.len() + gaps);
    }
    // Mixed rates in one example are resampled to 16 kHz.
    let clips = vec![
        Clip {
            digit: 1,
            speaker: "m".into(),
            take: 0,
            path: dir.path().join("1_ann_b_0.wav"),
        },
        Clip {
            digit: 3,
            speaker: "m".into(),
            take: 0,
            path: dir.path().join("3_bo_2.wav"),
        },
    ];
    let mixed = Corpus::from_clips(clips).unwrap();
    let e = Example {
        kind: TaskKind::Count,
        speaker: "m".into(),
        digits: vec![1, 3],
        takes: vec![0, 0],
        gaps_ms: vec![100],
        instruction: TaskKind::Count.instruction().into(),
        reference: "two".into(),
    };
    let audio = mixed.render(&e).unwrap();
    assert_eq!(audio.sample_rate(), 16000);
    assert_eq!(audio.len(), 1600 + 1600 + 800);

    // Errors: missing folder, folder without recordings, duplicate clips, bad settings.
    assert!(matches!(
        Corpus::open(&dir.path().join("nope")),
        Err(SpeechError::Data { .. })
    ));
    let empty = tempfile::tempdir().unwrap();
    let err = Corpus::open(empty.path()).unwrap_err().to_string();
    assert!(err.contains("{digit}_{speaker}_{take}.wav"), "{err}");
    let dup = Clip {
        digit: 1,
        speaker: "a".into(),
        take: 0,
        path: "x.wav".into(),
    };
    assert!(Corpus::from_clips(vec![dup.clone(), dup]).is_err());
    let only_train = corpus.split(Split::Train);
    assert!(generate(
        &only_train,
        Split::Test,
        &TaskKind::ALL,
        1,
        0,
        &TaskConfig::default()
    )
    .is_err());
    assert!(generate(&corpus, Split::Test, &[], 1, 0, &TaskConfig::default()).is_err());
    // Sums have number words up to 36 (four nines); codes end at ten digits; no empty range.
    for (digits, kinds) in [
        ((1, 5), &[TaskKind::Sum][..]),
        ((1, 11), &[TaskKind::CodeRecognition][..]),
        ((0, 3), &[TaskKind::Recognition][..]),
        ((4, 3), &[TaskKind::Arithmetic][..]),
    ] {
        let cfg = TaskConfig {
            digits: Some(digits),
            ..TaskConfig::default()
        };
        let err = generate(&corpus, Split::Test, kinds, 1, 0, &cfg)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("{:?}", kinds[0])), "{err}");
    }
    let wide = TaskConfig {
        digits: Some((1, 5)),
        ..TaskConfig::default()
    };
    assert!(generate(&corpus, Split::Test, &[TaskKind::Count], 1, 0, &wide).is_ok());
}

#[test]
fn task_texts_cover_every_answer() {
    let texts = task_texts();
    for kind in TaskKind::ALL {
        assert!(texts.iter().any(|t| t == kind.instruction()));
    }
    for n in 0..=MAX_NUMBER {
        assert!(texts.iter().any(|t| t == english(n).unwrap()));
        assert!(texts.iter().any(|t| t == german(n).unwrap()));
    }
    for word in ["x plus", "x minus", "x is", "x,"] {
        assert!(texts.iter().any(|t| t == word), "{word}");
    }
}

// Mean answer tokens per family, measured with the default tokenizer (see
// `long_families_answer_with_many_tokens`).
const MEASURED_ASR: f64 = 2.474;
const MEASURED_AST: f64 = 2.474;
const MEASURED_SQA: f64 = 1.068;
const MEASURED_ASR_LONG: f64 = 7.518;
const MEASURED_AST_LONG: f64 = 7.518;
const MEASURED_ARITH: f64 = 14.810;

/// Mean answer tokens (the reference without the stop token) per family under the default
/// tokenizer, over `n` test-split examples per family.
fn mean_answer_tokens(
    corpus: &Corpus,
    tok: &SpeechTokenizer,
    n: usize,
) -> Vec<(TaskFamily, f64, usize)> {
    TaskFamily::ALL
        .iter()
        .map(|&f| {
            let ex = generate(
                corpus,
                Split::Test,
                f.kinds(),
                n,
                11,
                &TaskConfig::default(),
            )
            .unwrap();
            let lens: Vec<usize> = ex
                .iter()
                .map(|e| tok.encode_text(&e.reference).unwrap().len())
                .collect();
            let mean = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
            (f, mean, *lens.iter().max().unwrap())
        })
        .collect()
}

#[test]
fn long_families_answer_with_many_tokens() {
    let corpus = Corpus::open(&fsdd_dir()).unwrap();
    let tok = SpeechTokenizer::for_tasks(DEFAULT_UNITS).unwrap();
    let stats = mean_answer_tokens(&corpus, &tok, 2000);
    for (f, mean, max) in &stats {
        eprintln!("{:>8}: mean {mean:.3} answer tokens, max {max}", f.name());
    }
    // Measured with this tokenizer (2,000 test examples per family, seed 11).
    let expected = [
        (TaskFamily::Asr, MEASURED_ASR),
        (TaskFamily::Ast, MEASURED_AST),
        (TaskFamily::Sqa, MEASURED_SQA),
        (TaskFamily::AsrLong, MEASURED_ASR_LONG),
        (TaskFamily::AstLong, MEASURED_AST_LONG),
        (TaskFamily::Arith, MEASURED_ARITH),
    ];
    for ((f, mean, _), (g, want)) in stats.iter().zip(expected) {
        assert_eq!(*f, g);
        assert!(
            (mean - want).abs() < 0.05,
            "{}: {mean:.3} (measured {want})",
            f.name()
        );
    }
    // At least one family answers with 12 tokens or more on average; every long family is
    // longer than every short one.
    assert!(stats.iter().any(|(_, mean, _)| *mean >= 12.0));
    let longest_short = stats
        .iter()
        .filter(|s| !s.0.is_long())
        .map(|s| s.1)
        .fold(0.0, f64::max);
    assert!(stats
        .iter()
        .filter(|s| s.0.is_long())
        .all(|s| s.1 > longest_short));
    // Every kind's longest answer, the stop token included, fits the default generation budget.
    for kind in TaskKind::ALL {
        let (_, hi) = kind.digit_range();
        for d in 0..10u8 {
            let digits = vec![d; hi];
            let ids = tok.answer_ids(&kind.reference(&digits).unwrap()).unwrap();
            assert!(
                ids.len() <= MAX_ANSWER_TOKENS,
                "{kind:?} {digits:?}: {}",
                ids.len()
            );
        }
    }
    // The answer words are single tokens (the merges cover them).
    for w in [
        "seven",
        " seven",
        " plus",
        " minus",
        " is",
        " eighteen",
        " fünf",
        " zwölf",
    ] {
        assert_eq!(tok.encode_text(w).unwrap().len(), 1, "{w:?}");
    }
}

#[test]
fn the_longest_utterance_fits_the_model() {
    // Ten repeats of the corpus's longest clip, the widest gaps, slowed by the strongest speed
    // perturbation: its unit frames (before collapsing repeats, which only shortens them), the
    // prompt around them and the longest answer must fit the default model's positions.
    let corpus = Corpus::open(&fsdd_dir()).unwrap();
    let longest = corpus
        .clips()
        .iter()
        .map(|c| {
            let a = leaf_plugin::audio::read_wav(&c.path, 30.0).unwrap();
            a.len() as f64 / f64::from(a.sample_rate())
        })
        .fold(0.0, f64::max);
    let gap = f64::from(TaskConfig::default().gap_ms.1) / 1000.0;
    let n = MAX_UTTERANCE_DIGITS as f64;
    let seconds = (n * longest + (n - 1.0) * gap) / AugmentConfig::default().speed_range.0;
    assert!(seconds < FrontEndConfig::default().max_seconds, "{seconds}");
    let fe = FrontEndConfig::default();
    let frames = 1 + ((seconds * f64::from(fe.sample_rate)) as usize).div_ceil(fe.hop_length);
    let units = frames.div_ceil(DEFAULT_POOL);
    let tok = SpeechTokenizer::for_tasks(DEFAULT_UNITS).unwrap();
    let prompt = tok
        .chat_prompt_ids(TaskKind::CodeTranslation.instruction(), &vec![0; units])
        .unwrap()
        .len();
    let total = prompt + MAX_ANSWER_TOKENS;
    eprintln!("longest utterance {seconds:.2} s: {units} units, {total} positions");
    assert!(total <= ModelShape::default().max_positions, "{total}");
}
