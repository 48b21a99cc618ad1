//! The unit codebook: k-means determinism (bit for bit, whatever the thread count), recovery of
//! well-separated clusters, repeat collapse, save/load, and encoding real recordings.

use std::path::PathBuf;

use leaf_plugin::audio::{Features, FrontEnd, FrontEndConfig};
use leaf_plugin::speech::tasks::{Corpus, Split};
use leaf_plugin::speech::units::{
    collapse, corpus_frames, fit_corpus, Codebook, KMeansConfig, UnitEncoder, CODEBOOK_FILE,
};
use leaf_plugin::speech::SpeechError;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn fsdd_dir() -> PathBuf {
    leaf_plugin::speech::pretrain::default_data_dir().unwrap_or_else(|e| panic!("{e}"))
}

/// `per` points around each of `centres` (dims = centres[0].len()), jitter +-0.1, shuffled.
fn clusters(centres: &[Vec<f32>], per: usize, seed: u64) -> (Features, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dims = centres[0].len();
    let mut pts: Vec<(usize, Vec<f32>)> = Vec::new();
    for (c, centre) in centres.iter().enumerate() {
        for _ in 0..per {
            pts.push((
                c,
                centre
                    .iter()
                    .map(|v| v + rng.random_range(-0.1f32..0.1))
                    .collect(),
            ));
        }
    }
    for i in (1..pts.len()).rev() {
        let j = rng.random_range(0..=i);
        pts.swap(i, j);
    }
    let labels = pts.iter().map(|p| p.0).collect();
    let data = pts.into_iter().flat_map(|p| p.1).collect();
    (Features::new(data, dims).unwrap(), labels)
}

fn small_frontend(dims: usize) -> FrontEndConfig {
    FrontEndConfig {
        n_mels: dims,
        ..FrontEndConfig::default()
    }
}

fn random_frames(n: usize, dims: usize, seed: u64) -> Features {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Features::new(
        (0..n * dims)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect(),
        dims,
    )
    .unwrap()
}

#[test]
fn same_seed_same_centroids_bit_for_bit_whatever_the_threads() {
    let frames = random_frames(9000, 16, 3);
    let fit = |seed, threads| {
        Codebook::fit(
            &frames,
            small_frontend(16),
            1,
            &KMeansConfig {
                k: 32,
                seed,
                threads,
                max_iters: 15,
                ..KMeansConfig::default()
            },
        )
        .unwrap()
    };
    let a = fit(11, 1);
    let b = fit(11, 3);
    let c = fit(11, 2);
    let bits = |cb: &Codebook| {
        cb.centroids()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(bits(&a), bits(&c));
    assert_eq!(a.report(), b.report());
    let d = fit(12, 1);
    assert_ne!(bits(&a), bits(&d), "another seed should start elsewhere");
}

#[test]
fn recovers_well_separated_clusters() {
    let centres: Vec<Vec<f32>> = (0..6)
        .map(|c| {
            (0..4)
                .map(|d| {
                    if d == c % 4 {
                        5.0 * (1 + c / 4) as f32
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    let (frames, labels) = clusters(&centres, 50, 1);
    let cb = Codebook::fit(
        &frames,
        small_frontend(4),
        1,
        &KMeansConfig {
            k: 6,
            seed: 5,
            ..KMeansConfig::default()
        },
    )
    .unwrap();
    // Every true cluster maps to exactly one unit and no two clusters share one.
    let mut unit_of = vec![None; 6];
    for (i, &l) in labels.iter().enumerate() {
        let u = cb.nearest(frames.row(i)).unwrap();
        match unit_of[l] {
            None => unit_of[l] = Some(u),
            Some(prev) => assert_eq!(prev, u, "cluster {l} split"),
        }
    }
    let mut units: Vec<u32> = unit_of.into_iter().flatten().collect();
    units.sort_unstable();
    units.dedup();
    assert_eq!(units.len(), 6);
    // Jitter is uniform in +-0.1 per dimension: mean squared distance about 4 * 0.01 / 3.
    let report = cb.report().unwrap();
    assert!(report.inertia < 0.02, "{report:?}");
    assert!(report.converged);
}

#[test]
fn bad_fits_are_errors() {
    let frames = random_frames(10, 4, 0);
    let fit = |k| {
        Codebook::fit(
            &frames,
            small_frontend(4),
            1,
            &KMeansConfig {
                k,
                ..KMeansConfig::default()
            },
        )
    };
    assert!(matches!(fit(11), Err(SpeechError::Codebook(_))));
    assert!(matches!(fit(0), Err(SpeechError::Config(_))));
    // Fewer distinct frames than units.
    let same = Features::new(vec![1.0; 40], 4).unwrap();
    let r = Codebook::fit(
        &same,
        small_frontend(4),
        1,
        &KMeansConfig {
            k: 2,
            ..KMeansConfig::default()
        },
    );
    assert!(matches!(r, Err(SpeechError::Codebook(_))));
    // Frames that do not match the front-end's band count.
    let r = Codebook::fit(&frames, small_frontend(8), 1, &KMeansConfig::default());
    assert!(matches!(r, Err(SpeechError::Codebook(_))));
}

#[test]
fn collapse_drops_only_consecutive_repeats() {
    assert_eq!(collapse(&[5, 5, 5, 1, 1, 5, 2, 2]), vec![5, 1, 5, 2]);
    assert_eq!(collapse(&[0, 0, 0]), vec![0]);
}

proptest! {
    #[test]
    fn collapse_invariants(units in prop::collection::vec(0u32..4, 0..60)) {
        let c = collapse(&units);
        prop_assert!(c.windows(2).all(|w| w[0] != w[1]));
        prop_assert_eq!(collapse(&c), c.clone());
        prop_assert!(c.len() <= units.len());
        // Expanding runs back gives the input: the collapsed sequence is the run heads.
        let heads: Vec<u32> = units
            .iter()
            .enumerate()
            .filter(|(i, u)| *i == 0 || units[i - 1] != **u)
            .map(|(_, u)| *u)
            .collect();
        prop_assert_eq!(c, heads);
    }
}

#[test]
fn save_and_load_round_trip_bit_exact() {
    let frames = random_frames(500, 8, 9);
    let cb = Codebook::fit(
        &frames,
        small_frontend(8),
        2,
        &KMeansConfig {
            k: 10,
            seed: 4,
            ..KMeansConfig::default()
        },
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(CODEBOOK_FILE);
    cb.save(&path).unwrap();
    let back = Codebook::load(&path).unwrap();
    assert_eq!(back, cb);
    assert_eq!(back.pool(), 2);
    assert_eq!(back.frontend_config().n_mels, 8);

    // Damaged files are typed errors naming the file.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"format\":\"leaf-units\"}").unwrap();
    let e = Codebook::load(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.json"), "{e}");
    let text = std::fs::read_to_string(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut short = v.clone();
    short["centroids"].as_array_mut().unwrap().pop();
    std::fs::write(&bad, short.to_string()).unwrap();
    assert!(matches!(
        Codebook::load(&bad),
        Err(SpeechError::Codebook(_))
    ));
    assert!(matches!(
        Codebook::load(&dir.path().join("missing.json")),
        Err(SpeechError::Io { .. })
    ));
}

#[test]
fn encodes_real_recordings() {
    let corpus = Corpus::open(&fsdd_dir()).unwrap();
    // One speaker's training takes keep this test fast.
    let train = corpus
        .split(Split::Train)
        .filter(|c| c.speaker == "george" && c.take < 15);
    assert_eq!(train.len(), 100);
    let fe = FrontEnd::new(FrontEndConfig::default()).unwrap();
    let config = KMeansConfig {
        k: 16,
        seed: 1,
        ..KMeansConfig::default()
    };
    let a = fit_corpus(&train, &fe, 2, &config).unwrap();
    let b = fit_corpus(&train, &fe, 2, &config).unwrap();
    assert_eq!(a, b);
    let frames = corpus_frames(&train, &fe, 2, 1).unwrap();
    assert_eq!(a.report().unwrap().frames, frames.frames());

    let enc = UnitEncoder::new(a).unwrap();
    let i = corpus.find(7, "george", 0).unwrap();
    let bytes = std::fs::read(&corpus.clips()[i].path).unwrap();
    let units = enc.units_from_wav(&bytes).unwrap();
    let frame_units = enc.frame_units(&corpus.clip_audio(i).unwrap()).unwrap();
    assert_eq!(units, collapse(&frame_units));
    assert!(!units.is_empty() && units.iter().all(|&u| u < 16));
    // One unit frame per two 10 ms frames.
    let audio = corpus.clip_audio(i).unwrap();
    let n16 = (audio.len() as u64 * 16000).div_ceil(u64::from(audio.sample_rate())) as usize;
    assert_eq!(frame_units.len(), fe.frames_for(n16).div_ceil(2));
    // Not a WAV: a typed error.
    assert!(matches!(
        enc.units_from_wav(b"nonsense"),
        Err(SpeechError::Audio(_))
    ));
}

#[test]
fn units_cli_fits_and_encodes() {
    // A small folder: george's digits 0-9, takes 0-9 (takes 5-9 are the training split).
    let data = tempfile::tempdir().unwrap();
    let src = fsdd_dir();
    for d in 0..10 {
        for t in 0..10 {
            let name = format!("{d}_george_{t}.wav");
            std::fs::copy(src.join(&name), data.path().join(&name)).unwrap();
        }
    }
    let out = tempfile::tempdir().unwrap();
    let book = out.path().join(CODEBOOK_FILE);
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_leaf"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "leaf {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let data_arg = data.path().to_str().unwrap();
    let book_arg = book.to_str().unwrap();
    let fit = run(&[
        "units", "fit", "--data", data_arg, "--out", book_arg, "--k", "8", "--seed", "3",
    ]);
    assert_eq!(fit["k"], 8);
    assert_eq!(fit["clips"], 50);
    let first = std::fs::read(&book).unwrap();
    run(&[
        "units",
        "fit",
        "--data",
        data_arg,
        "--out",
        book_arg,
        "--k",
        "8",
        "--seed",
        "3",
        "--threads",
        "1",
    ]);
    assert_eq!(std::fs::read(&book).unwrap(), first, "same seed, same file");

    let wav = src.join("4_george_2.wav");
    let enc = run(&[
        "units",
        "encode",
        wav.to_str().unwrap(),
        "--codebook",
        book_arg,
    ]);
    let units: Vec<u32> = serde_json::from_value(enc["units"].clone()).unwrap();
    let expect = UnitEncoder::load(&book)
        .unwrap()
        .units_from_wav(&std::fs::read(&wav).unwrap())
        .unwrap();
    assert_eq!(units, expect);
    let raw = run(&[
        "units",
        "encode",
        wav.to_str().unwrap(),
        "--codebook",
        book_arg,
        "--no-collapse",
    ]);
    assert_eq!(
        raw["units"].as_array().unwrap().len() as u64,
        enc["frames"].as_u64().unwrap()
    );

    // A missing folder fails with a message naming it.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_leaf"))
        .args([
            "units",
            "fit",
            "--data",
            "/nonexistent/recordings",
            "--out",
            book_arg,
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/recordings"));
}
