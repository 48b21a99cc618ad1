use super::*;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The straightforward reference in `f64`: softmax of `logits / t` by `exp`, the nucleus by
/// a full sort (probability descending, ties by lower id, kept while the mass before is
/// below `top_p`; top-p 1 keeps every token of positive probability), and each kept id's
/// log-prob renormalised. Returns the kept ids (sorted) and their log-probs.
pub(super) fn reference(logits: &[f32], t: f64, top_p: f64) -> (Vec<u32>, Vec<f64>) {
    let z: Vec<f64> = logits.iter().map(|&l| f64::from(l) / t).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let arg = z.iter().position(|&v| v == m).unwrap();
    let p: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let total: f64 = p.iter().sum();
    let mut ids: Vec<u32> = (0..p.len() as u32).collect();
    ids.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
    let mut kept = Vec::new();
    let mut cum = 0.0;
    for id in ids {
        if (top_p < 1.0 && cum >= top_p * total) || p[id as usize] <= 0.0 {
            break;
        }
        cum += p[id as usize];
        kept.push(id);
    }
    kept.sort_unstable();
    // ln(kept mass) with the arg-max's weight 1 apart, for precision when it dominates.
    let others: f64 = kept
        .iter()
        .filter(|&&i| i as usize != arg)
        .map(|&i| p[i as usize])
        .sum();
    let ln_mass = if kept.contains(&(arg as u32)) {
        others.ln_1p()
    } else {
        others.ln()
    };
    let lps = kept
        .iter()
        .map(|&i| (z[i as usize] - m) - ln_mass)
        .collect();
    (kept, lps)
}

fn params(t: f64, top_p: f64) -> SamplingParams {
    SamplingParams::new(t, top_p).unwrap()
}

fn kept_ids(logits: &[f32], p: &SamplingParams) -> Vec<u32> {
    let mut s = Sampler::new();
    let mut d = s.distribution(logits, p).unwrap();
    (0..logits.len() as u32)
        .filter(|&i| d.logprob(i) > f64::NEG_INFINITY)
        .collect()
}

/// Log-probs agree within 1e-6 relative, or 1e-12 absolute for a token of probability so
/// near 1 that its log-prob is below rounding (logits [0, 17.8] at T = 0.05: the reference
/// gives -1.7e-155, the sampler 0).
fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-6 * want.abs() + 1e-12
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The recorded log-prob equals ln softmax(l / T)[c] - ln(nucleus mass) within 1e-6
    /// relative, and the drawn id is in the reference nucleus.
    #[test]
    fn logprob_matches_the_f64_reference(
        logits in proptest::collection::vec(-20.0f32..20.0, 1..1500),
        // At least 0.06, so that no exp of (l - max) / t underflows in f64 (the reference
        // would give such a token probability 0 where the sampler keeps its finite log-prob).
        t in 0.06f64..5.0,
        top_p in prop_oneof![Just(1.0), 0.01f64..1.0],
        seed in 0u64..1000,
    ) {
        let p = params(t, top_p);
        let pick = sample(&logits, &p, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        let (kept, lps) = reference(&logits, t, top_p);
        let ours = kept_ids(&logits, &p);
        if ours != kept {
            // Only when a float sum lands within rounding of the target: then the two
            // nuclei differ by the one boundary token.
            prop_assert!(ours.len().abs_diff(kept.len()) <= 1, "{ours:?} vs {kept:?}");
            return Ok(());
        }
        let at = kept.binary_search(&pick.id);
        prop_assert!(at.is_ok(), "drew {} outside the nucleus {kept:?}", pick.id);
        let want = lps[at.unwrap()];
        prop_assert!(
            close(pick.logprob, want),
            "logprob {} vs reference {want}", pick.logprob
        );
        // Every kept id, not only the drawn one.
        let mut s = Sampler::new();
        let mut d = s.distribution(&logits, &p).unwrap();
        for (&id, &want) in kept.iter().zip(&lps) {
            let got = d.logprob(id);
            prop_assert!(close(got, want), "id {id}: {got} vs {want}");
        }
    }

    /// Full log-probs (before top-p) and the top alternatives against the reference.
    #[test]
    fn full_logprobs_and_top_match_the_reference(
        logits in proptest::collection::vec(-20.0f32..20.0, 1..600),
        t in 0.05f64..5.0,
        k in 1usize..8,
    ) {
        // Every token of positive probability (an exp that underflows in f64 is left out).
        let (all, lps) = reference(&logits, t, 1.0);
        let p = params(t, 0.5);
        let mut s = Sampler::new();
        let mut d = s.distribution(&logits, &p).unwrap();
        for (&i, want) in all.iter().zip(&lps) {
            let got = d.full_logprob(i);
            prop_assert!(close(got, *want), "{got} vs {want}");
        }
        let top = d.top(k);
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        ids.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        prop_assert_eq!(top.iter().map(|x| x.0).collect::<Vec<_>>(), ids[..k.min(logits.len())].to_vec());
        for (id, lp) in top {
            if let Ok(at) = all.binary_search(&id) {
                prop_assert!(close(lp, lps[at]), "{lp} vs {}", lps[at]);
            }
        }
    }

    /// Greedy is the lowest id among the maximal logits, log-prob 0, and draws nothing.
    #[test]
    fn greedy_is_the_lowest_maximal_id(
        logits in proptest::collection::vec(-3i8..3, 1..300),
        t in prop_oneof![Just(0.0), 0.0f64..GREEDY_TEMPERATURE],
        seed in 0u64..100,
    ) {
        let logits: Vec<f32> = logits.iter().map(|&l| f32::from(l)).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let before = rng.clone();
        let pick = sample(&logits, &params(t, 0.3), &mut rng).unwrap();
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        prop_assert_eq!(pick.id as usize, logits.iter().position(|&l| l == max).unwrap());
        prop_assert_eq!(pick.logprob, 0.0);
        prop_assert_eq!(rng, before);
    }

    /// A draw takes exactly one f64 from the RNG, whatever the vocabulary and top-p.
    #[test]
    fn one_uniform_per_draw(
        logits in proptest::collection::vec(-5.0f32..5.0, 1..400),
        top_p in prop_oneof![Just(1.0), 0.01f64..1.0],
        seed in 0u64..100,
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut twin = rng.clone();
        sample(&logits, &params(0.8, top_p), &mut rng).unwrap();
        let _: f64 = twin.random();
        prop_assert_eq!(rng, twin);
    }
}

/// The chi-square critical value at p = 0.001 for the 25-29 degrees of freedom that the pooled
/// draw tests have.
pub(super) fn chi_square_critical_p001(dof: usize) -> f64 {
    match dof {
        29 => 58.30,
        28 => 56.89,
        27 => 55.48,
        26 => 54.05,
        25 => 52.62,
        d => panic!("no critical value for {d} degrees of freedom"),
    }
}

/// Pearson's chi-square of `counts` against probabilities `p` (zero-probability categories
/// must have zero counts).
pub(super) fn chi_square(counts: &[usize], p: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    counts
        .iter()
        .zip(p)
        .map(|(&c, &p)| {
            if p == 0.0 {
                assert_eq!(c, 0, "drew a token of probability 0");
                0.0
            } else {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            }
        })
        .sum()
}

/// Draws follow the renormalised nucleus: chi-square below the 0.1 % critical value, fixed
/// seed, for the whole softmax and for a nucleus, on a vocabulary small enough to count.
#[test]
fn draws_follow_the_distribution() {
    let logits = [1.2f32, -0.3, 2.0, 0.7, 2.0, -1.5, 0.1, f32::NEG_INFINITY];
    // Critical values of chi-square at p = 0.001 for 6 and 3 degrees of freedom.
    for (t, top_p, critical) in [(0.7, 1.0, 22.46), (1.3, 1.0, 22.46), (0.9, 0.8, 16.27)] {
        let p = params(t, top_p);
        check_draws_per_token(&logits, t, top_p, critical, |rng| {
            sample(&logits, &p, rng).unwrap().id
        });
    }
}

/// Draws 60,000 tokens with `draw` (RNG seeded 42) and checks their counts, token by token,
/// against the exact nucleus of `logits` at `t`, `top_p`: chi-square below `critical`.
pub(super) fn check_draws_per_token(
    logits: &[f32],
    t: f64,
    top_p: f64,
    critical: f64,
    mut draw: impl FnMut(&mut ChaCha8Rng) -> u32,
) {
    let (kept, lps) = reference(logits, t, top_p);
    let mut probs = vec![0.0; logits.len()];
    for (&i, &lp) in kept.iter().zip(&lps) {
        probs[i as usize] = lp.exp();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..60_000 {
        counts[draw(&mut rng) as usize] += 1;
    }
    let chi = chi_square(&counts, &probs);
    assert!(
        chi < critical,
        "t {t} top_p {top_p}: chi-square {chi} ({counts:?} vs {probs:?})"
    );
}

/// The same over a vocabulary of several blocks, heavy tokens spread across them (counts of
/// the light tail pooled into one category).
#[test]
fn draws_across_blocks_follow_the_distribution() {
    let mut logits = vec![-4.0f32; 3 * BLOCK + 17];
    for (i, &l) in [(5usize, 1.0f32), (300, 1.5), (511, 0.5), (770, 1.5)]
        .iter()
        .map(|(i, l)| (i, l))
    {
        logits[*i] = l;
    }
    let heavy = [5usize, 300, 511, 770];
    for top_p in [1.0, 0.97] {
        let (kept, lps) = reference(&logits, 1.0, top_p);
        let mut probs = vec![0.0; heavy.len() + 1];
        for (&i, &lp) in kept.iter().zip(&lps) {
            let slot = heavy
                .iter()
                .position(|&h| h == i as usize)
                .unwrap_or(heavy.len());
            probs[slot] += lp.exp();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut counts = vec![0usize; heavy.len() + 1];
        let p = params(1.0, top_p);
        let mut sampler = Sampler::new();
        for _ in 0..60_000 {
            let id = sampler.sample(&logits, &p, &mut rng).unwrap().id as usize;
            let slot = heavy.iter().position(|&h| h == id).unwrap_or(heavy.len());
            counts[slot] += 1;
        }
        // 4 degrees of freedom (3 when the tail is cut off entirely).
        let chi = chi_square(&counts, &probs);
        assert!(
            chi < 18.47,
            "top_p {top_p}: chi-square {chi} ({counts:?} vs {probs:?})"
        );
    }
}

#[test]
fn hand_checked_nucleus_and_logprobs() {
    // p = [0.5, 0.3, 0.15, 0.05]; top_p 0.79 keeps ids 0, 1 -> 0.625, 0.375 (0.8 would sit on
    // the boundary, where rounding decides).
    let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    let mut s = Sampler::new();
    let mut d = s.distribution(&logits, &params(1.0, 0.79)).unwrap();
    assert!((d.logprob(0) - 0.625f64.ln()).abs() < 1e-7);
    assert!((d.logprob(1) - 0.375f64.ln()).abs() < 1e-7);
    assert_eq!(d.logprob(2), f64::NEG_INFINITY);
    assert_eq!(d.logprob(9), f64::NEG_INFINITY);
    assert!((d.full_logprob(3) - 0.05f64.ln()).abs() < 1e-7);
    // A one-token nucleus: log-prob exactly 0.
    let mut d = s.distribution(&logits, &params(1.0, 0.2)).unwrap();
    let pick = d.draw(&mut ChaCha8Rng::seed_from_u64(0));
    assert_eq!((pick.id, pick.logprob), (0, 0.0));
}

#[test]
fn equal_logits_tie_to_lower_ids() {
    let logits = [0.0f32; 10];
    assert_eq!(kept_ids(&logits, &params(1.0, 0.25)), vec![0, 1, 2]);
    assert_eq!(kept_ids(&logits, &params(1.0, 0.3)), vec![0, 1, 2]);
    assert_eq!(kept_ids(&logits, &params(1.0, 0.31)), vec![0, 1, 2, 3]);
}

#[test]
fn bad_settings_and_logits_are_errors() {
    for (t, p) in [
        (-1.0, 0.9),
        (f64::NAN, 0.9),
        (f64::INFINITY, 0.9),
        (100.5, 0.9),
        (1.0, 0.0),
        (1.0, 1.5),
        (1.0, f64::NAN),
    ] {
        assert!(SamplingParams::new(t, p).is_err(), "{t} {p}");
    }
    assert_eq!(
        SamplingParams::new(-1.0, 0.5).unwrap_err().to_string(),
        "temperature -1 must be in [0, 100]"
    );
    assert_eq!(
        SamplingParams::new(1.0, 0.0).unwrap_err().to_string(),
        "top_p 0 must be in (0, 1]"
    );
    let p = params(1.0, 1.0);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    assert_eq!(sample(&[], &p, &mut rng), Err(SamplingError::Empty));
    assert_eq!(
        sample(&[0.0, f32::NAN], &p, &mut rng)
            .unwrap_err()
            .to_string(),
        "logit 1 is NaN"
    );
    assert!(sample(&[f32::INFINITY, 0.0], &p, &mut rng).is_err());
    assert_eq!(
        sample(&[f32::NEG_INFINITY; 3], &p, &mut rng),
        Err(SamplingError::AllMasked)
    );
    // Greedy validates the same way.
    assert!(sample(&[0.0, f32::NAN], &SamplingParams::GREEDY, &mut rng).is_err());
}

#[test]
fn masked_tokens_are_never_drawn() {
    let mut logits = vec![f32::NEG_INFINITY; 1000];
    logits[700] = -3.0;
    logits[3] = -3.0;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for top_p in [1.0, 0.9, 0.4] {
        for _ in 0..200 {
            let pick = sample(&logits, &params(2.0, top_p), &mut rng).unwrap();
            assert!(pick.id == 3 || pick.id == 700);
        }
    }
    // top_p 0.4 keeps only the lower id of the two equal ones.
    let pick = sample(&logits, &params(2.0, 0.4), &mut rng).unwrap();
    assert_eq!((pick.id, pick.logprob), (3, 0.0));
}

#[test]
fn reentrant_with_sampler_falls_back_to_a_fresh_one() {
    let p = params(1.0, 0.9);
    let id = with_sampler(|_| sample(&[0.0, 5.0], &p, &mut ChaCha8Rng::seed_from_u64(1)));
    assert!(id.is_ok());
}

/// The reference nucleus's order (probability descending, ties by lower id) and the mass
/// before each position, in `f64`.
pub(super) fn reference_order(logits: &[f32], t: f64) -> (Vec<u32>, Vec<f64>, f64) {
    let z: Vec<f64> = logits.iter().map(|&l| f64::from(l) / t).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let total: f64 = p.iter().sum();
    let mut ids: Vec<u32> = (0..p.len() as u32).collect();
    ids.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
    let mut before = Vec::with_capacity(ids.len());
    let mut cum = 0.0;
    for &id in &ids {
        before.push(cum);
        cum += p[id as usize];
    }
    (ids, before, total)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The fast nucleus (packed candidates, histogram, selection) against the sorted
    /// reference on rows of several blocks, with ties (whole-number logits) or without: the
    /// same nucleus and the same log-probs within 1e-6. The nuclei may differ only where
    /// the reference's mass before a boundary token is within rounding of the target (the
    /// sampler's weights are `f32`), and a draw lands in the nucleus with the log-prob that
    /// [`Distribution::logprob`] gives it.
    #[test]
    fn fast_nucleus_matches_the_sorted_reference(
        raw in proptest::collection::vec(-12.0f32..12.0, 1..6000),
        ties in any::<bool>(),
        t in 0.2f64..3.0,
        top_p in 0.05f64..0.99,
        seed in 0u64..1000,
    ) {
        let logits: Vec<f32> = if ties {
            raw.iter().map(|l| l.round()).collect()
        } else {
            raw
        };
        let p = params(t, top_p);
        let (kept, lps) = reference(&logits, t, top_p);
        let ours = kept_ids(&logits, &p);
        if ours != kept {
            let (short, long) = if ours.len() < kept.len() { (&ours, &kept) } else { (&kept, &ours) };
            prop_assert!(short.iter().all(|i| long.binary_search(i).is_ok()), "{ours:?} vs {kept:?}");
            let (order, before, total) = reference_order(&logits, t);
            for at in short.len()..long.len() {
                prop_assert!(long.binary_search(&order[at]).is_ok());
                prop_assert!(
                    (before[at] - top_p * total).abs() <= 1e-6 * total,
                    "position {at}: mass before {} vs target {}", before[at], top_p * total
                );
            }
            return Ok(());
        }
        let mut s = Sampler::new();
        let mut d = s.distribution(&logits, &p).unwrap();
        for (&id, &want) in kept.iter().zip(&lps) {
            let got = d.logprob(id);
            prop_assert!((got - want).abs() <= 1e-6, "id {id}: {got} vs {want}");
        }
        let pick = d.draw(&mut ChaCha8Rng::seed_from_u64(seed));
        prop_assert!(kept.binary_search(&pick.id).is_ok(), "drew {} outside the nucleus", pick.id);
        prop_assert_eq!(pick.logprob, d.logprob(pick.id));
    }
}

/// Draws over a vocabulary of thousands (odd length: the packing's remainder lanes, many
/// blocks and bins) follow the exact nucleus distribution: chi-square over categories that
/// are the ten most likely tokens one by one and the rest pooled by id range (so that a draw
/// biased along the id order inside a bin would show), below the 0.1 % critical value, and a
/// total variation below 0.01; nothing is drawn outside the nucleus.
#[test]
fn draws_at_scale_follow_the_nucleus() {
    const V: usize = 4099;
    let mut state = 11u64;
    let logits: Vec<f32> = (0..V)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 12.0 - 6.0
        })
        .collect();
    for (t, top_p) in [(0.9, 0.8), (1.0, 0.3)] {
        let p = params(t, top_p);
        let mut sampler = Sampler::new();
        check_pooled_draws(&logits, t, top_p, |rng| {
            sampler.sample(&logits, &p, rng).unwrap().id
        });
    }
}

/// Draws 100,000 tokens with `draw` (RNG seeded 2024) and checks them against the exact
/// nucleus of `logits` at `t`, `top_p`: nothing outside it; over categories that are the ten
/// most likely tokens one by one and the rest pooled into 20 id ranges, chi-square below the
/// 0.1 % critical value and total variation below 0.01.
pub(super) fn check_pooled_draws(
    logits: &[f32],
    t: f64,
    top_p: f64,
    mut draw: impl FnMut(&mut ChaCha8Rng) -> u32,
) {
    const RANGES: usize = 20;
    let v = logits.len();
    let (kept, lps) = reference(logits, t, top_p);
    let (order, _, _) = reference_order(logits, t);
    let heavy: Vec<u32> = order[..10].to_vec();
    let slot = |id: u32| -> usize {
        heavy
            .iter()
            .position(|&h| h == id)
            .unwrap_or_else(|| heavy.len() + id as usize * RANGES / v)
    };
    let mut probs = vec![0.0; heavy.len() + RANGES];
    for (&i, &lp) in kept.iter().zip(&lps) {
        probs[slot(i)] += lp.exp();
    }
    let n = 100_000;
    let mut counts = vec![0usize; probs.len()];
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    for _ in 0..n {
        let id = draw(&mut rng);
        assert!(
            kept.binary_search(&id).is_ok(),
            "drew {id} outside the nucleus"
        );
        counts[slot(id)] += 1;
    }
    let dof = probs.iter().filter(|&&q| q > 0.0).count() - 1;
    let critical = chi_square_critical_p001(dof);
    let chi = chi_square(&counts, &probs);
    assert!(
        chi < critical,
        "t {t} top_p {top_p}: chi-square {chi} ({counts:?} vs {probs:?})"
    );
    let tv: f64 = counts
        .iter()
        .zip(&probs)
        .map(|(&c, &q)| (c as f64 / n as f64 - q).abs())
        .sum::<f64>()
        / 2.0;
    assert!(tv < 0.01, "t {t} top_p {top_p}: total variation {tv}");
}
