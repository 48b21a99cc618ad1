//! LEAF and GRPO against LEAF-SPEC.md: the worked example, one hand-computed case per edge,
//! and invariants (proptest).

use leaf_plugin::advantage::{
    synthetic::{synthetic_group, SyntheticSpec},
    AdvantageEstimator, Grpo, Leaf, LeafConfig, Terms,
};
use leaf_plugin::rollout::{Group, Rollout};
use proptest::prelude::*;

fn group(rows: Vec<(Vec<u32>, Vec<f64>, f64)>) -> Group {
    Group::new(
        "g",
        rows.into_iter()
            .map(|(t, l, r)| Rollout::new(t, l, r))
            .collect(),
    )
    .unwrap()
}

fn leaf(b: usize) -> Leaf {
    Leaf::new(LeafConfig {
        fork_budget: b,
        ..LeafConfig::default()
    })
}

/// z-scores `raw` by hand: sample std (n - 1), floored at 1e-6.
fn zscore(raw: &[f64]) -> Vec<f64> {
    let n = raw.len() as f64;
    let m = raw.iter().sum::<f64>() / n;
    let d = if raw.len() > 1 { n - 1.0 } else { 1.0 };
    let sd = (raw.iter().map(|x| (x - m).powi(2)).sum::<f64>() / d)
        .sqrt()
        .max(1e-6);
    raw.iter().map(|x| (x - m) / sd).collect()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "lengths: got {got:?}, want {want:?}");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "index {k}: got {g}, want {w} (got {got:?})"
        );
    }
}

fn lp(len: usize, spikes: &[(usize, f64)]) -> Vec<f64> {
    let mut v = vec![-0.1; len];
    for &(p, l) in spikes {
        v[p] = l;
    }
    v
}

/// The worked example of the spec: K = 4, B = 2, rewards (0.8, 0.6, 0.2, 0.0), boundaries 3
/// and 9, node a = {1, 2, 3} at 3 and node b = {1, 2} at 9.
fn worked_example() -> Group {
    group(vec![
        ((1..=12).collect(), lp(12, &[(3, -5.0), (9, -4.0)]), 0.8),
        (
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 21, 22],
            lp(12, &[]),
            0.6,
        ),
        (vec![1, 2, 3, 30, 31, 32, 33, 34], lp(8, &[]), 0.2),
        ((40..50).collect(), lp(10, &[]), 0.0),
    ])
}

#[test]
fn worked_example_matches_the_spec() {
    let g = worked_example();
    let tree = leaf(2).tree(&g);
    assert_eq!(tree.boundaries, vec![3, 9]);
    assert_eq!(tree.nodes.len(), 2);
    assert_eq!(
        (tree.nodes[0].position, &tree.nodes[0].members[..]),
        (3, &[0, 1, 2][..])
    );
    assert_eq!(
        (tree.nodes[1].position, &tree.nodes[1].members[..]),
        (9, &[0, 1][..])
    );
    let (v0, va, vb) = (0.4, (0.8 + 0.6 + 0.2) / 3.0, 0.7);
    assert!((tree.root_value - v0).abs() < 1e-15);
    assert!((tree.nodes[0].value - va).abs() < 1e-15);
    assert!((tree.nodes[1].value - vb).abs() < 1e-15);

    let s_a = ((va - v0) + (va - v0)) / 3f64.sqrt();
    let s_b = ((vb - v0) + (vb - va)) / 2f64.sqrt();
    let raw = [
        s_a,
        s_b,
        0.4 + 0.1,
        s_a,
        s_b,
        0.2 - 0.1,
        s_a,
        -0.2 + (0.2 - va),
        -0.8,
    ];
    let got_raw: Vec<f64> = tree.spans.iter().flatten().map(|s| s.raw).collect();
    assert_close(&got_raw, &raw, 1e-12);
    // The rounded figures printed in the spec.
    assert_close(
        &got_raw,
        &[
            0.1540, 0.3300, 0.5, 0.1540, 0.3300, 0.1, 0.1540, -0.5333, -0.8,
        ],
        5e-5,
    );

    let z = zscore(&raw);
    let got_z: Vec<f64> = tree.spans.iter().flatten().map(|s| s.normalized).collect();
    assert_close(&got_z, &z, 1e-12);

    let adv = leaf(2).estimate(&g).per_token;
    let expect = |spans: &[(usize, usize, f64)], len: usize| {
        let mut v = vec![0.0; len];
        for &(a, b, x) in spans {
            v[a..b].fill(x);
        }
        v
    };
    assert_close(
        &adv[0],
        &expect(&[(0, 3, z[0]), (3, 9, z[1]), (9, 12, z[2])], 12),
        1e-12,
    );
    assert_close(
        &adv[1],
        &expect(&[(0, 3, z[3]), (3, 9, z[4]), (9, 12, z[5])], 12),
        1e-12,
    );
    assert_close(&adv[2], &expect(&[(0, 3, z[6]), (3, 8, z[7])], 8), 1e-12);
    assert_close(&adv[3], &[z[8]; 10], 1e-12);
}

#[test]
fn worked_example_is_bit_for_bit_stable() {
    // Bits recorded from the first run; any change to summation order or formula shows here.
    let adv = leaf(2).estimate(&worked_example()).per_token;
    let firsts: Vec<u64> = [
        adv[0][0], adv[0][3], adv[0][9], adv[1][9], adv[2][3], adv[3][0],
    ]
    .iter()
    .map(|x| x.to_bits())
    .collect();
    let again = leaf(2).estimate(&worked_example()).per_token;
    assert_eq!(adv, again);
    assert_eq!(
        firsts,
        GOLDEN_BITS.to_vec(),
        "as f64: {:?}",
        firsts
            .iter()
            .map(|b| f64::from_bits(*b))
            .collect::<Vec<_>>()
    );
}

const GOLDEN_BITS: [u64; 6] = [
    4598349062190221637,
    4604229634601616761,
    4607500480234884031,
    4593966704679719461,
    13832135577541957477,
    13834950127884350219,
];

#[test]
fn empty_responses_group_together_and_get_no_tokens() {
    // r0, r1 empty; r2 = 4 tokens with its surprisals picking boundaries 1 and 3 (delta 2).
    let g = group(vec![
        (vec![], vec![], 1.0),
        (vec![], vec![], 0.0),
        (vec![5, 6, 7, 8], vec![-0.1, -2.0, -0.5, -1.0], 0.2),
    ]);
    let tree = leaf(2).tree(&g);
    assert_eq!(tree.boundaries, vec![1, 3]);
    assert_eq!(
        tree.nodes
            .iter()
            .map(|n| n.members.clone())
            .collect::<Vec<_>>(),
        vec![vec![0, 1], vec![0, 1]]
    );
    let (v0, v) = (0.4, 0.5);
    let a = ((v - v0) + (v - v0)) / 2f64.sqrt();
    let b = ((v - v0) + 0.0) / 2f64.sqrt();
    let z = zscore(&[a, b, a, b, 2.0 * (0.2 - v0)]);
    let adv = leaf(2).estimate(&g).per_token;
    assert!(adv[0].is_empty() && adv[1].is_empty());
    assert_close(&adv[2], &[z[4]; 4], 1e-12);
}

#[test]
fn responses_of_length_at_most_one_use_the_fallback() {
    let g = group(vec![
        (vec![7], vec![-3.0], 1.0),
        (vec![8], vec![-0.5], 0.0),
        (vec![], vec![], 0.5),
    ]);
    let tree = leaf(2).tree(&g);
    assert!(tree.boundaries.is_empty() && tree.nodes.is_empty());
    let adv = leaf(2).estimate(&g).per_token;
    let z = 0.5 / 0.5f64.sqrt();
    assert_close(&adv[0], &[z], 1e-12);
    assert_close(&adv[1], &[-z], 1e-12);
    assert!(adv[2].is_empty());
}

#[test]
fn zero_budget_gives_one_span_per_response() {
    let g = worked_example();
    let tree = leaf(0).tree(&g);
    assert!(tree.boundaries.is_empty());
    let raw: Vec<f64> = tree.spans.iter().flatten().map(|s| s.raw).collect();
    assert_close(&raw, &[0.4, 0.2, -0.2, -0.4], 1e-15);
    let z = zscore(&raw);
    let adv = leaf(0).estimate(&g).per_token;
    for (i, row) in adv.iter().enumerate() {
        assert_close(row, &vec![z[i]; row.len()], 1e-12);
    }
}

#[test]
fn surprisal_ties_break_by_response_then_position() {
    // Surprisal 3.0 at (r0, p4) and (r1, p1): r0 comes first although p1 < p4.
    let g = group(vec![
        (vec![1, 2, 3, 4, 5, 6], lp(6, &[(4, -3.0)]), 1.0),
        (vec![1, 9, 3, 4, 5, 6], lp(6, &[(1, -3.0)]), 0.0),
    ]);
    assert_eq!(leaf(1).tree(&g).boundaries, vec![4]);
    // Within one response, the lower position wins.
    let g = group(vec![
        (vec![1, 2, 3, 4, 5, 6], lp(6, &[(2, -3.0), (4, -3.0)]), 1.0),
        (vec![1, 2, 3, 4, 5, 7], lp(6, &[]), 0.0),
    ]);
    assert_eq!(leaf(1).tree(&g).boundaries, vec![2]);
    // delta = max(2, 6 / 3) = 2: with B = 2 both 2 and 4 fit.
    assert_eq!(leaf(2).tree(&g).boundaries, vec![2, 4]);
    // Separation: 3 is within delta of 2, so the next best far-enough position is taken.
    let g = group(vec![
        (
            vec![1, 2, 3, 4, 5, 6],
            lp(6, &[(2, -3.0), (3, -2.9), (5, -1.0)]),
            1.0,
        ),
        (vec![1, 2, 3, 4, 5, 7], lp(6, &[]), 0.0),
    ]);
    assert_eq!(leaf(2).tree(&g).boundaries, vec![2, 5]);
}

#[test]
fn responses_shorter_than_a_boundary() {
    // r2, r3 = [1, 2] end before both boundaries (3 and 7); their keys are the whole response,
    // so they form a node at each boundary; the second internal span maps to no token.
    let long = |last| vec![1, 2, 3, 4, 5, 6, 7, last];
    let g = group(vec![
        (long(8), lp(8, &[(3, -4.0), (7, -5.0)]), 1.0),
        (long(9), lp(8, &[]), 0.5),
        (vec![1, 2], lp(2, &[]), 0.0),
        (vec![1, 2], lp(2, &[]), 0.5),
    ]);
    let tree = leaf(2).tree(&g);
    assert_eq!(tree.delta, Some(2));
    assert_eq!(tree.boundaries, vec![3, 7]);
    let members: Vec<_> = tree
        .nodes
        .iter()
        .map(|n| (n.position, n.members.clone()))
        .collect();
    assert_eq!(
        members,
        vec![
            (3, vec![0, 1]),
            (3, vec![2, 3]),
            (7, vec![0, 1]),
            (7, vec![2, 3])
        ]
    );
    let (v0, vh, vl) = (0.5, 0.75, 0.25);
    let r = 2f64.sqrt();
    let raw = [
        2.0 * (vh - v0) / r,
        (vh - v0) / r,
        0.5 + 0.25, // r0
        2.0 * (vh - v0) / r,
        (vh - v0) / r,
        0.0 - 0.25, // r1
        2.0 * (vl - v0) / r,
        (vl - v0) / r, // r2
        2.0 * (vl - v0) / r,
        (vl - v0) / r, // r3
    ];
    let z = zscore(&raw);
    let adv = leaf(2).estimate(&g).per_token;
    assert_close(
        &adv[0],
        &[z[0], z[0], z[0], z[1], z[1], z[1], z[1], z[2]],
        1e-12,
    );
    assert_close(
        &adv[1],
        &[z[3], z[3], z[3], z[4], z[4], z[4], z[4], z[5]],
        1e-12,
    );
    assert_close(&adv[2], &[z[6], z[6]], 1e-12);
    assert_close(&adv[3], &[z[8], z[8]], 1e-12);
}

#[test]
fn identical_responses_share_every_node() {
    let t = vec![1, 2, 3, 4, 5, 6];
    let l = vec![-0.1, -2.0, -0.1, -3.0, -0.1, -0.1];
    let g = group(vec![
        (t.clone(), l.clone(), 1.0),
        (t.clone(), l.clone(), 0.0),
        (t, l, 0.5),
    ]);
    let tree = leaf(2).tree(&g);
    assert_eq!(tree.boundaries, vec![1, 3]);
    assert_eq!(tree.nodes.len(), 2);
    // Spans: [0,1) and [1,3) are 0 for everyone; tails 2 (r - 0.5): 1, -1, 0. Std = 0.5.
    let adv = leaf(2).estimate(&g).per_token;
    assert_close(&adv[0], &[0.0, 0.0, 0.0, 2.0, 2.0, 2.0], 1e-12);
    assert_close(&adv[1], &[0.0, 0.0, 0.0, -2.0, -2.0, -2.0], 1e-12);
    assert_close(&adv[2], &[0.0; 6], 1e-12);
}

#[test]
fn a_single_response_gets_zero() {
    let g = group(vec![(vec![1, 2, 3, 4], vec![-0.2, -3.0, -0.1, -1.0], 0.7)]);
    assert_eq!(leaf(2).estimate(&g).per_token, vec![vec![0.0; 4]]);
    assert_eq!(Grpo.estimate(&g).per_token, vec![vec![0.0; 4]]);
}

#[test]
fn equal_rewards_give_zero_advantages() {
    let mut rows: Vec<_> = worked_example().into_rollouts();
    rows.iter_mut().for_each(|r| r.reward = 0.25);
    let g = Group::new("g", rows).unwrap();
    for est in [&leaf(2) as &dyn AdvantageEstimator, &Grpo] {
        assert!(est
            .estimate(&g)
            .per_token
            .iter()
            .flatten()
            .all(|&a| a == 0.0));
    }
}

#[test]
fn terms_switch_selects_global_or_local() {
    let g = worked_example();
    let (v0, va, vb) = (0.4, (0.8 + 0.6 + 0.2) / 3.0, 0.7);
    let tree = |terms| {
        Leaf::new(LeafConfig {
            terms,
            ..LeafConfig::default()
        })
        .tree(&g)
    };
    let raw = |t: &leaf_plugin::advantage::LeafTree| {
        t.spans.iter().flatten().map(|s| s.raw).collect::<Vec<_>>()
    };
    let (s3, s2) = (3f64.sqrt(), 2f64.sqrt());
    let global = [
        (va - v0) / s3,
        (vb - v0) / s2,
        0.4,
        (va - v0) / s3,
        (vb - v0) / s2,
        0.2,
        (va - v0) / s3,
        -0.2,
        -0.4,
    ];
    let local = [
        (va - v0) / s3,
        (vb - va) / s2,
        0.1,
        (va - v0) / s3,
        (vb - va) / s2,
        -0.1,
        (va - v0) / s3,
        0.2 - va,
        -0.4,
    ];
    assert_close(&raw(&tree(Terms::Global)), &global, 1e-12);
    assert_close(&raw(&tree(Terms::Local)), &local, 1e-12);
}

#[test]
fn grpo_matches_its_formula() {
    let g = worked_example();
    let adv = Grpo.estimate(&g).per_token;
    let m = 0.4;
    let sd = ((0.16 + 0.04 + 0.04 + 0.16) / 3.0f64).sqrt(); // 0.365 > 1/3
    let want = [0.8, 0.6, 0.2, 0.0].map(|r| (r - m) / (sd + 1e-6));
    for (row, w) in adv.iter().zip(want) {
        assert!(row.iter().all(|a| (a - w).abs() < 1e-12));
    }
    // A small spread is floored at 1/3.
    let g = group(vec![(vec![1], vec![-1.0], 0.5), (vec![2], vec![-1.0], 0.6)]);
    let a = Grpo.estimate(&g).per_token;
    assert!((a[0][0] - (-0.05 / (1.0 / 3.0 + 1e-6))).abs() < 1e-12);
}

#[test]
fn fork_stats_count_the_tree() {
    let tree = leaf(2).tree(&worked_example());
    let s = tree.stats;
    assert_eq!(
        (
            s.boundaries,
            s.fired_boundaries,
            s.nodes,
            s.usable_nodes,
            s.node_members
        ),
        (2, 2, 2, 2, 5)
    );
    assert_eq!(s.fork_fire_rate(), Some(1.0));
    assert_eq!(s.mean_node_size(), Some(2.5));
    assert_eq!(s.max_depth, 2);
}

fn spec_strategy() -> impl Strategy<Value = (SyntheticSpec, u64)> {
    (1usize..10, 1usize..40, 1u32..6, 0u32..4, any::<u64>()).prop_map(
        |(k, len, vocab, levels, seed)| {
            (
                SyntheticSpec {
                    responses: k,
                    mean_len: len,
                    vocab,
                    reward_levels: levels,
                },
                seed,
            )
        },
    )
}

proptest! {
    #[test]
    fn normalised_spans_have_zero_mean((spec, seed) in spec_strategy(), b in 0usize..4) {
        let tree = leaf(b).tree(&synthetic_group("g", spec, seed));
        let z: Vec<f64> = tree.spans.iter().flatten().map(|s| s.normalized).collect();
        if !z.is_empty() {
            let scale = 1.0 + z.iter().map(|x| x.abs()).fold(0.0, f64::max);
            prop_assert!((z.iter().sum::<f64>() / z.len() as f64).abs() < 1e-9 * scale);
        }
    }

    #[test]
    fn equal_rewards_are_all_zero((spec, seed) in spec_strategy(), r in 0.0f64..1.0) {
        let mut rows = synthetic_group("g", spec, seed).into_rollouts();
        rows.iter_mut().for_each(|x| x.reward = r);
        let g = Group::new("g", rows).unwrap();
        prop_assert!(leaf(2).estimate(&g).per_token.iter().flatten().all(|&a| a == 0.0));
        prop_assert!(Grpo.estimate(&g).per_token.iter().flatten().all(|&a| a == 0.0));
    }

    #[test]
    fn relabelling_permutes_the_output((spec, seed) in spec_strategy(), rot in 0usize..10) {
        // Make every surprisal distinct so the tie-break plays no part.
        let mut rows = synthetic_group("g", spec, seed).into_rollouts();
        let mut k = 0.0;
        for r in rows.iter_mut() {
            for l in r.logprobs.iter_mut() {
                k += 1.0;
                *l -= k * 1e-7;
            }
        }
        let n = rows.len();
        let perm: Vec<usize> = (0..n).map(|i| (i + rot) % n).collect();
        let permuted: Vec<Rollout> = perm.iter().map(|&i| rows[i].clone()).collect();
        let a = leaf(2).estimate(&Group::new("g", rows).unwrap()).per_token;
        let b = leaf(2).estimate(&Group::new("g", permuted).unwrap()).per_token;
        for (j, &i) in perm.iter().enumerate() {
            prop_assert_eq!(a[i].len(), b[j].len());
            for (x, y) in a[i].iter().zip(&b[j]) {
                prop_assert!((x - y).abs() < 1e-9, "response {} moved to {}: {} vs {}", i, j, x, y);
            }
        }
    }

    #[test]
    fn deterministic_to_the_bit((spec, seed) in spec_strategy()) {
        let g = synthetic_group("g", spec, seed);
        let a = leaf(2).estimate(&g);
        let b = leaf(2).estimate(&synthetic_group("g", spec, seed));
        prop_assert_eq!(&a, &b);
        let bits = |x: &[Vec<f64>]| x.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&a.per_token), bits(&b.per_token));
    }

    #[test]
    fn one_advantage_per_token((spec, seed) in spec_strategy(), b in 0usize..4) {
        let g = synthetic_group("g", spec, seed);
        for est in [&leaf(b) as &dyn AdvantageEstimator, &Grpo] {
            let adv = est.estimate(&g).per_token;
            prop_assert_eq!(adv.len(), g.len());
            for (row, r) in adv.iter().zip(g.rollouts()) {
                prop_assert_eq!(row.len(), r.len());
                prop_assert!(row.iter().all(|a| a.is_finite()));
            }
        }
    }
}
