//! The device sampler on the CPU device against the host kernels.

use super::*;
use crate::sampling::tests::{
    check_draws_per_token, check_pooled_draws, reference, reference_order,
};
use crate::sampling::Sampler;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn params(t: f64, top_p: f64) -> SamplingParams {
    SamplingParams::new(t, top_p).unwrap()
}

fn row(logits: &[f32]) -> Tensor {
    Tensor::new(logits, &Device::Cpu).unwrap()
}

/// The host kernel's kept ids (sorted) and their log-probs.
fn host_kept(logits: &[f32], p: &SamplingParams) -> (Vec<u32>, Vec<f64>) {
    let mut s = Sampler::new();
    let mut d = s.distribution(logits, p).unwrap();
    (0..logits.len() as u32)
        .map(|i| (i, d.logprob(i)))
        .filter(|&(_, lp)| lp > f64::NEG_INFINITY)
        .unzip()
}

/// The device's kept ids (sorted), from its cut.
fn device_kept(logits: &[f32], d: &mut DeviceDistribution) -> Vec<u32> {
    let cut = d.cut().unwrap();
    (0..logits.len() as u32)
        .filter(|&i| {
            let l = logits[i as usize];
            l > f32::NEG_INFINITY && cut.is_none_or(|c| c.contains(l, i))
        })
        .collect()
}

/// Checks the device against the host on one row: the same kept set, except for the
/// documented boundary cases (module docs), and the same log-prob within 1e-5 for every
/// token both keep (all of them at small vocabularies, a spread of them at large ones).
fn check_row(logits: &[f32], t: f64, top_p: f64) -> std::result::Result<(), TestCaseError> {
    let p = params(t, top_p);
    let (host, host_lps) = host_kept(logits, &p);
    let mut d = DeviceDistribution::new(&row(logits), &p).unwrap();
    let dev = device_kept(logits, &mut d);
    if dev != host {
        let (order, before, total) = reference_order(logits, t);
        let z = |i: u32| (f64::from(logits[i as usize]) / t).exp();
        // The host's last kept token in its order: the boundary.
        let last = order
            .iter()
            .copied()
            .take_while(|i| host.binary_search(i).is_ok())
            .last();
        let w_last = last.map_or(0.0, z);
        let diff: Vec<u32> = host
            .iter()
            .filter(|i| dev.binary_search(i).is_err())
            .chain(dev.iter().filter(|i| host.binary_search(i).is_err()))
            .copied()
            .collect();
        prop_assert!(diff.len() <= 4, "{} ids differ", diff.len());
        for id in diff {
            let at = order.iter().position(|&o| o == id).unwrap();
            let near_target = (before[at] - top_p * total).abs() <= 1e-5 * total;
            let tied_weight = (z(id) - w_last).abs() <= 1e-6 * w_last;
            prop_assert!(
                near_target || tied_weight,
                "id {id}: mass before {} vs target {}, weight {} vs boundary {w_last}",
                before[at],
                top_p * total,
                z(id)
            );
        }
        return Ok(());
    }
    let step = (host.len() / 64).max(1);
    for (k, (&id, &want)) in host.iter().zip(&host_lps).enumerate() {
        if k % step != 0 && k + 1 != host.len() {
            continue;
        }
        let got = d.logprob(id).unwrap();
        prop_assert!((got - want).abs() <= 1e-5, "id {id}: {got} vs host {want}");
    }
    // The draw lands in the kept set with the log-prob `logprob` gives it.
    let pick = d.draw(&mut ChaCha8Rng::seed_from_u64(3)).unwrap();
    prop_assert!(host.binary_search(&pick.id).is_ok(), "drew {}", pick.id);
    prop_assert!((pick.logprob - d.logprob(pick.id).unwrap()).abs() <= 1e-12);
    Ok(())
}

/// Logits from a seeded generator: uniform in [-12, 12], or in steps of 0.5 (many ties).
fn random_row(vocab: usize, seed: u64, ties: bool) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..vocab)
        .map(|_| {
            let l = rng.random::<f32>() * 24.0 - 12.0;
            if ties {
                (l * 2.0).round() / 2.0
            } else {
                l
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Small vocabularies: any logits (ties included), every setting of the issue.
    #[test]
    fn matches_the_host_kernel_at_300(
        logits in proptest::collection::vec(-12.0f32..12.0, 300),
        ties in any::<bool>(),
        t in prop_oneof![Just(1.0), Just(0.7)],
        top_p in prop_oneof![Just(1.0), Just(0.9), Just(0.5)],
    ) {
        let logits: Vec<f32> = if ties {
            logits.iter().map(|l| l.round()).collect()
        } else {
            logits
        };
        check_row(&logits, t, top_p)?;
    }

    /// Odd lengths and masked tokens.
    #[test]
    fn matches_the_host_kernel_with_masks(
        logits in proptest::collection::vec(prop_oneof![
            4 => -8.0f32..8.0,
            1 => Just(f32::NEG_INFINITY),
        ], 1..1500),
        t in 0.3f64..2.0,
        top_p in prop_oneof![Just(1.0), 0.05f64..1.0],
    ) {
        prop_assume!(logits.iter().any(|l| l.is_finite()));
        check_row(&logits, t, top_p)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3))]

    /// A real vocabulary size (152,064: Qwen2's), continuous logits or many ties.
    #[test]
    fn matches_the_host_kernel_at_152k(
        seed in 0u64..1_000_000,
        ties in any::<bool>(),
        t in prop_oneof![Just(1.0), Just(0.7)],
        top_p in prop_oneof![Just(1.0), Just(0.9), Just(0.5)],
    ) {
        check_row(&random_row(152_064, seed, ties), t, top_p)?;
    }
}

/// Every setting of the issue at 152k, once each.
#[test]
fn every_setting_at_152k() {
    for (k, (t, top_p)) in [1.0, 0.7]
        .into_iter()
        .flat_map(|t| [1.0, 0.9, 0.5].map(|p| (t, p)))
        .enumerate()
    {
        check_row(&random_row(152_064, 40 + k as u64, false), t, top_p).unwrap();
        check_row(&random_row(152_064, 50 + k as u64, true), t, top_p).unwrap();
    }
}

/// The cut among tied logits takes the lower ids, as on the host, across blocks.
#[test]
fn ties_at_the_cut_take_the_lower_ids() {
    // 2000 equal logits: top-p 0.3 keeps the first 600 ids (mass before id 600 is 600).
    let logits = vec![0.0f32; 2000];
    let mut d = DeviceDistribution::new(&row(&logits), &params(1.0, 0.3)).unwrap();
    assert_eq!(
        d.cut().unwrap(),
        Some(Cut {
            at: 0.0,
            tie_end: Some(600)
        })
    );
    assert!((d.kept_mass().unwrap() - 600.0).abs() < 1e-3);
    assert!((d.logprob(599).unwrap() + 600f64.ln()).abs() < 1e-6);
    assert_eq!(d.logprob(600).unwrap(), f64::NEG_INFINITY);
    let (host, _) = host_kept(&logits, &params(1.0, 0.3));
    assert_eq!(device_kept(&logits, &mut d), host);
    // Hand-checked small rows, as the host's tests.
    for (top_p, want) in [
        (0.25, vec![0, 1, 2]),
        (0.3, vec![0, 1, 2]),
        (0.31, vec![0, 1, 2, 3]),
    ] {
        let logits = [0.0f32; 10];
        let mut d = DeviceDistribution::new(&row(&logits), &params(1.0, top_p)).unwrap();
        assert_eq!(device_kept(&logits, &mut d), want, "top_p {top_p}");
    }
}

#[test]
fn ties_kept_follows_the_host_rule() {
    // above 1.5, weight 1, target 4: ties 0, 1, 2 have 1.5, 2.5, 3.5 before them.
    assert_eq!(ties_kept(1.5, 1.0, 4.0, 10), 3);
    assert_eq!(ties_kept(1.5, 1.0, 4.0, 2), 2);
    // Exactly on the target: the tie with mass before equal to it is out.
    assert_eq!(ties_kept(1.0, 1.0, 3.0, 10), 2);
    assert_eq!(ties_kept(0.0, 0.5, 0.1, 4), 1);
    assert_eq!(ties_kept(0.0, 0.5, 0.1, 0), 0);
}

#[test]
fn greedy_validation_and_top_match_the_host() {
    let logits = [0.1f32, 2.0, 2.0, -1.0, f32::NEG_INFINITY];
    let mut d = DeviceDistribution::new(&row(&logits), &SamplingParams::GREEDY).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let before = rng.clone();
    assert_eq!(
        d.draw(&mut rng).unwrap(),
        Pick {
            id: 1,
            logprob: 0.0
        }
    );
    assert_eq!(rng, before);
    assert_eq!(d.logprob(2).unwrap(), f64::NEG_INFINITY);
    for (t, top_p) in [(0.0, 1.0), (0.8, 0.5), (1.3, 1.0)] {
        let p = params(t, top_p);
        let mut host = Sampler::new();
        let mut h = host.distribution(&logits, &p).unwrap();
        let mut d = DeviceDistribution::new(&row(&logits), &p).unwrap();
        for k in [1, 3, 5, 9] {
            let (a, b) = (h.top(k), d.top(k).unwrap());
            assert_eq!(
                a.iter().map(|x| x.0).collect::<Vec<_>>(),
                b.iter().map(|x| x.0).collect::<Vec<_>>(),
                "k {k}"
            );
            for (x, y) in a.iter().zip(&b) {
                assert!(x.1 == y.1 || (x.1 - y.1).abs() < 1e-6, "{x:?} vs {y:?}");
            }
        }
        for id in 0..6 {
            let (a, b) = (h.full_logprob(id), d.full_logprob(id).unwrap());
            assert!(a == b || (a - b).abs() < 1e-6, "id {id}: {a} vs {b}");
        }
    }
    let p = params(1.0, 1.0);
    let err = |l: &[f32]| {
        DeviceDistribution::new(&row(l), &p)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(err(&[0.0, f32::NAN][..]), "logit 1 is NaN");
    assert_eq!(err(&[0.0, 1.0, f32::INFINITY][..]), "logit 2 is inf");
    assert_eq!(err(&[f32::NEG_INFINITY; 3][..]), "every logit is -inf");
    let empty = Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        DeviceDistribution::new(&empty, &p),
        Err(DeviceSamplingError::Sampling(SamplingError::Empty))
    ));
}

/// Any float dtype and shape: a `[1, V]` bf16 row samples as its `f32` values do.
#[test]
fn reads_bf16_rows_of_any_shape() {
    let logits = random_row(1000, 5, false);
    let t = row(&logits)
        .to_dtype(DType::BF16)
        .unwrap()
        .reshape((1, 1000))
        .unwrap();
    let back: Vec<f32> = t
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let p = params(0.7, 0.9);
    let mut d = DeviceDistribution::new(&t, &p).unwrap();
    assert_eq!(device_kept(&back, &mut d), host_kept(&back, &p).0);
    let hot = one_hot(7, &t).unwrap();
    assert_eq!(
        (hot.dims(), hot.dtype()),
        (&[1usize, 1000][..], DType::BF16)
    );
}

#[test]
fn one_hot_is_zero_at_the_id_and_minus_inf_elsewhere() {
    let like = Tensor::zeros((1, 700), DType::F32, &Device::Cpu).unwrap();
    let v: Vec<f32> = one_hot(513, &like)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(v.len(), 700);
    assert_eq!(v[513], 0.0);
    assert_eq!(v.iter().filter(|&&x| x == f32::NEG_INFINITY).count(), 699);
    assert!(one_hot(700, &like).is_err());
}

/// Device draws follow the renormalised nucleus: chi-square below the 0.1 % critical value,
/// fixed seed (the host test's rows and settings).
#[test]
fn draws_follow_the_distribution() {
    let logits = [1.2f32, -0.3, 2.0, 0.7, 2.0, -1.5, 0.1, f32::NEG_INFINITY];
    for (t, top_p, critical) in [(0.7, 1.0, 22.46), (1.3, 1.0, 22.46), (0.9, 0.8, 16.27)] {
        let (kept, lps) = reference(&logits, t, top_p);
        let mut d = DeviceDistribution::new(&row(&logits), &params(t, top_p)).unwrap();
        check_draws_per_token(&logits, t, top_p, critical, |rng| {
            let pick = d.draw(rng).unwrap();
            let want = lps[kept.binary_search(&pick.id).unwrap()];
            assert!((pick.logprob - want).abs() < 1e-5);
            pick.id
        });
    }
}

/// The same at 4,099 tokens (several blocks): the ten most likely tokens one by one and the
/// rest pooled by id range, chi-square below the 0.1 % critical value and total variation
/// below 0.01; nothing drawn outside the nucleus.
#[test]
fn draws_at_scale_follow_the_nucleus() {
    let logits = random_row(4099, 11, false);
    for (t, top_p) in [(0.9, 0.8), (1.0, 0.3), (1.0, 1.0)] {
        let mut d = DeviceDistribution::new(&row(&logits), &params(t, top_p)).unwrap();
        check_pooled_draws(&logits, t, top_p, |rng| d.draw(rng).unwrap().id);
    }
}

/// With top-p 1 both walk the ids in order: the same uniform draws the same token.
#[test]
fn same_uniform_same_token_without_a_nucleus() {
    let logits = random_row(20_000, 8, false);
    let p = params(0.8, 1.0);
    let mut d = DeviceDistribution::new(&row(&logits), &p).unwrap();
    let mut host = Sampler::new();
    let (mut r1, mut r2) = (ChaCha8Rng::seed_from_u64(77), ChaCha8Rng::seed_from_u64(77));
    for _ in 0..200 {
        let a = host.sample(&logits, &p, &mut r1).unwrap();
        let b = d.draw(&mut r2).unwrap();
        assert_eq!(a.id, b.id);
        assert!((a.logprob - b.logprob).abs() < 1e-5);
    }
}

/// Logits crowded towards 0 on a geometric scale: the value search either isolates the cut
/// (and agrees with the host) or gives up with `NoConvergence`, before drawing anything.
#[test]
fn crowded_logits_converge_or_give_up_cleanly() {
    let logits: Vec<f32> = (0..149).map(|k| -(2f32.powi(-k))).collect();
    let p = params(1.0, 0.05);
    let mut d = DeviceDistribution::new(&row(&logits), &p).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let before = rng.clone();
    match d.draw(&mut rng) {
        Ok(pick) => {
            // Every logit above -2^-24 has weight exactly 1 in f32: the host breaks that tie
            // by id, the device by logit (case (b) of the module docs), so compare the pick
            // with a host-kept token of the same weight.
            let (host, lps) = host_kept(&logits, &p);
            let w = |i: u32| (f64::from(logits[i as usize])).exp() as f32;
            let same = host.iter().position(|&h| w(h) == w(pick.id));
            let at = same.expect("a host-kept token of the same weight");
            assert!((pick.logprob - lps[at]).abs() <= 1e-5);
        }
        Err(e) => {
            assert!(e.use_host_instead(), "{e}");
            assert_eq!(rng, before);
        }
    }
    assert!(d.work().rounds <= MAX_ROUNDS);
}

#[test]
fn cut_contains_and_next_down() {
    let c = Cut {
        at: 1.0,
        tie_end: Some(5),
    };
    assert!(c.contains(1.5, 9) && c.contains(1.0, 4));
    assert!(!c.contains(1.0, 5) && !c.contains(0.5, 0));
    let c = Cut {
        at: 1.0,
        tie_end: None,
    };
    assert!(c.contains(1.0, 99) && !c.contains(0.99, 0));
    assert!(next_down(1.0) < 1.0 && next_down(-1.0) < -1.0 && next_down(0.0) < 0.0);
    assert_eq!(next_down(1.0).to_bits() + 1, 1f32.to_bits());
}
