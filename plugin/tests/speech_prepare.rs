//! Examples to model inputs: deterministic per seed whatever the thread count, augmentation
//! changes the units but not the answer, and the prompt carries the units and instruction.

use std::path::PathBuf;

use leaf_plugin::audio::{FrontEnd, FrontEndConfig};
use leaf_plugin::speech::prepare::example_seed;
use leaf_plugin::speech::tasks::{generate, Corpus, Split, TaskConfig, TaskKind};
use leaf_plugin::speech::units::{fit_corpus, KMeansConfig};
use leaf_plugin::speech::{AugmentConfig, Augmenter, ExampleEncoder, SpeechTokenizer, UnitEncoder};

fn fsdd_dir() -> PathBuf {
    leaf_plugin::speech::pretrain::default_data_dir().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn examples_encode_deterministically() {
    let corpus = Corpus::open(&fsdd_dir())
        .unwrap()
        .filter(|c| c.speaker == "jackson" && c.take < 15);
    let fe = FrontEnd::new(FrontEndConfig::default()).unwrap();
    let cb = fit_corpus(
        &corpus.split(Split::Train),
        &fe,
        2,
        &KMeansConfig {
            k: 16,
            ..KMeansConfig::default()
        },
    )
    .unwrap();
    let units = UnitEncoder::new(cb).unwrap();
    let tok = SpeechTokenizer::for_tasks(16).unwrap();
    let examples = generate(
        &corpus,
        Split::Test,
        &TaskKind::ALL,
        40,
        5,
        &TaskConfig::default(),
    )
    .unwrap();

    let plain = ExampleEncoder::new(units.clone(), tok.clone(), None).unwrap();
    let a = plain.encode_all(&corpus, &examples, 0, 1).unwrap();
    for (e, x) in examples.iter().zip(&a) {
        assert_eq!(x.units, units.units(&corpus.render(e).unwrap()).unwrap());
        assert_eq!(
            x.prompt,
            tok.chat_prompt_ids(&e.instruction, &x.units).unwrap()
        );
        assert_eq!(tok.decode(&x.answer, true).unwrap(), e.reference);
        assert_eq!(x.answer.last(), Some(&tok.ids().im_end));
        let text = tok.decode(&x.prompt, true).unwrap();
        assert!(text.contains(&e.instruction), "{text}");
    }

    let aug = Augmenter::new(AugmentConfig::default()).unwrap();
    let augmented = ExampleEncoder::new(units.clone(), tok.clone(), Some(aug)).unwrap();
    let b1 = augmented.encode_all(&corpus, &examples, 9, 1).unwrap();
    let b2 = augmented.encode_all(&corpus, &examples, 9, 2).unwrap();
    let b3 = augmented.encode_all(&corpus, &examples, 10, 2).unwrap();
    assert_eq!(b1, b2, "thread count must not change the result");
    assert_ne!(b1, b3, "another seed augments differently");
    assert_eq!(
        b1[7],
        augmented
            .encode(&corpus, &examples[7], example_seed(9, 7))
            .unwrap()
    );
    let changed = a
        .iter()
        .zip(&b1)
        .filter(|(x, y)| x.units != y.units)
        .count();
    assert!(changed > 30, "augmentation changed only {changed} of 40");
    assert!(a.iter().zip(&b1).all(|(x, y)| x.answer == y.answer));

    // A codebook with more units than the tokenizer has tokens is refused.
    assert!(ExampleEncoder::new(units, SpeechTokenizer::for_tasks(8).unwrap(), None).is_err());
    assert_ne!(example_seed(1, 2), example_seed(2, 1));
}
