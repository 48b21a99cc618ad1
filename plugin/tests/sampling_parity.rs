//! Evaluation decodes exactly as the server samples: given the same seed and logits, the
//! serving tap and the evaluator's `pick_token` choose the same ids with the same log-probs,
//! token after token, for any temperature (greedy included) and top-p.

use leaf_plugin::harvest::{SamplingTap, TapConfig};
use leaf_plugin::speech::eval::{pick_token, Decoding};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn rows() -> impl Strategy<Value = Vec<Vec<f32>>> {
    (1usize..1200).prop_flat_map(|vocab| {
        proptest::collection::vec(
            proptest::collection::vec(
                prop_oneof![
                    8 => -12.0f32..12.0,
                    1 => Just(f32::NEG_INFINITY),
                    1 => (-3i8..3).prop_map(f32::from),
                ],
                vocab,
            ),
            1..12,
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn tap_and_evaluator_pick_the_same_tokens_and_logprobs(
        rows in rows(),
        temperature in prop_oneof![Just(0.0), 1e-9f64..1e-7, 0.05f64..3.0],
        top_p in prop_oneof![Just(1.0), 0.01f64..1.0],
        seed in any::<u64>(),
    ) {
        prop_assume!(rows.iter().all(|r| r.iter().any(|&l| l > f32::NEG_INFINITY)));
        let tap = SamplingTap::new(TapConfig {
            temperature,
            top_p,
            top_logprobs: 0,
            stop_token: 0,
            seed,
            forced: Vec::new(),
        })
        .unwrap();
        let decoding = Decoding::Sample { temperature, top_p };
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut picks = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let served = tap.step(row, &[1, 2]).unwrap();
            let evaluated = pick_token(row, &decoding, &mut rng).unwrap();
            prop_assert_eq!(served, evaluated.id, "row {}", i);
            picks.push(evaluated);
        }
        let rec = tap.take_record(rows.len());
        for (lp, pick) in rec.logprobs.iter().zip(&picks) {
            prop_assert_eq!(lp.to_bits(), pick.logprob.to_bits());
        }
    }

    #[test]
    fn tap_and_evaluator_refuse_the_same_settings(
        temperature in prop_oneof![-1.0f64..0.0, 99.0f64..101.0, Just(f64::NAN), 0.0f64..2.0],
        top_p in prop_oneof![-0.5f64..0.0, 0.9f64..1.1, Just(f64::NAN)],
    ) {
        let tap = SamplingTap::new(TapConfig {
            temperature,
            top_p,
            top_logprobs: 0,
            stop_token: 0,
            seed: 0,
            forced: Vec::new(),
        });
        let eval = Decoding::Sample { temperature, top_p }.validate();
        prop_assert_eq!(tap.is_ok(), eval.is_ok());
        if let (Err(a), Err(b)) = (tap, eval) {
            prop_assert!(b.to_string().contains(&a), "{} vs {}", a, b);
        }
    }
}
