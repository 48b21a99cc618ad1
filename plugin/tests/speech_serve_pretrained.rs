//! A directory written by `leaf pretrain` serves in mistral.rs 0.8.1: a tiny run, loaded from the
//! directory through `load_model_from_hf` with the directory as the model id, answers a chat
//! request whose audio part carries units, with the prompt ids our tokenizer computes and the
//! same greedy answer our own decoder generates from the same weights.
//!
//! Needs the `serve` feature; run it in release (mistralrs is slow to build in debug):
//! `cargo test --release -p leaf-plugin --test speech_serve_pretrained`.
#![cfg(feature = "serve")]

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use either::Either;
use indexmap::IndexMap;
use leaf_adapters::model::{LlamaModel, ModelOptions, Trainable};
use leaf_plugin::speech::eval::{answer_text, generate_completions, Decoding};
use leaf_plugin::speech::pretrain::{load_encoder, pretrain, ModelShape, PretrainConfig};
use leaf_plugin::speech::tasks::link_recordings;
use leaf_plugin::speech::tasks::{generate, Corpus, Split, TaskConfig, TaskKind};
use mistralrs_core::{
    Constraint, DefaultSchedulerMethod, DeviceMapSetting, MessageContent, MistralRsBuilder,
    ModelDType, NormalLoaderBuilder, NormalLoaderType, NormalRequest, NormalSpecificConfig,
    Pipeline, Request, RequestMessage, Response, SamplingParams, SchedulerConfig, TokenSource,
    TokenizationRequest,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc, Mutex};

fn fsdd_dir() -> PathBuf {
    leaf_plugin::speech::pretrain::default_data_dir().unwrap_or_else(|e| panic!("{e}"))
}

fn small_data(root: &Path) -> PathBuf {
    link_recordings(
        &fsdd_dir(),
        &root.join("recordings"),
        &["george", "jackson"],
        0..10,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Loads the directory on a fresh thread (mistral.rs keeps LoRA state in a thread-local).
fn load(dir: &Path) -> Arc<Mutex<dyn Pipeline + Send + Sync>> {
    let id = dir.to_string_lossy().into_owned();
    std::thread::spawn(move || {
        let loader = NormalLoaderBuilder::new(
            NormalSpecificConfig::default(),
            None,
            None,
            Some(id),
            false,
            None,
        )
        .build(Some(NormalLoaderType::Llama))
        .expect("loader");
        loader
            .load_model_from_hf(
                None,
                TokenSource::None,
                &ModelDType::F32,
                &Device::Cpu,
                true,
                DeviceMapSetting::dummy(),
                None,
                None,
            )
            .expect("mistral.rs loads the pretrained directory")
    })
    .join()
    .expect("loader thread")
}

fn audio_message(units: &[u32], instruction: &str) -> Vec<IndexMap<String, MessageContent>> {
    let mut audio = IndexMap::new();
    audio.insert("type".to_string(), serde_json::json!("audio"));
    audio.insert("units".to_string(), serde_json::json!(units));
    let mut text = IndexMap::new();
    text.insert("type".to_string(), serde_json::json!("text"));
    text.insert("text".to_string(), serde_json::json!(instruction));
    let mut msg = IndexMap::new();
    msg.insert("role".to_string(), Either::Left("user".to_string()));
    msg.insert("content".to_string(), Either::Right(vec![audio, text]));
    vec![msg]
}

#[test]
fn mistralrs_serves_a_pretrained_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_data(tmp.path());
    let dir = tmp.path().join("model");
    let config = PretrainConfig {
        steps: 200,
        max_seconds: 0.0,
        batch_size: 8,
        traffic_takes: 2,
        augment: None,
        shape: ModelShape {
            layers: 1,
            hidden: 64,
            heads: 2,
            kv_heads: 1,
            intermediate: 128,
            max_positions: 512,
        },
        units: 32,
        kmeans_iters: 5,
        eval_samples: 0,
        ..PretrainConfig::default()
    };
    pretrain(&config, &data, &dir, &mut |_| {}).unwrap();

    // Our side: the prompt of one test utterance and the greedy answer of our decoder.
    let encoder = load_encoder(&dir).unwrap();
    let tok = encoder.tokenizer();
    let mut corpus = Corpus::open(&data).unwrap();
    corpus.preload().unwrap();
    let examples = generate(
        &corpus,
        Split::Test,
        &[TaskKind::Recognition],
        3,
        11,
        &TaskConfig::default(),
    )
    .unwrap();
    let encoded = encoder.encode_all(&corpus, &examples, 0, 1).unwrap();
    let model = LlamaModel::load(
        &dir,
        &ModelOptions {
            trainable: Trainable::Nothing,
            ..ModelOptions::default()
        },
    )
    .unwrap();
    let prompts: Vec<Vec<u32>> = encoded.iter().map(|e| e.prompt.clone()).collect();
    let ours = generate_completions(
        &model,
        &prompts,
        &tok.stop_ids(),
        &Decoding::Greedy,
        12,
        8,
        &mut ChaCha8Rng::seed_from_u64(0),
    )
    .unwrap();

    // The comparison means something only if the model says something.
    assert!(
        ours.iter().any(|o| o.len() > 1),
        "the tiny model only ever stops: {ours:?}"
    );

    let pipeline = load(&dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mistral = MistralRsBuilder::new(
            pipeline,
            SchedulerConfig::DefaultScheduler {
                method: DefaultSchedulerMethod::Fixed(NonZeroUsize::new(4).unwrap()),
            },
            false,
            None,
        )
        .with_model_id("pretrained".to_string())
        .with_no_prefix_cache(true)
        .build()
        .await;
        let sender = mistral.get_sender(None).unwrap();
        for (i, e) in encoded.iter().enumerate() {
            let messages = audio_message(&e.units, &examples[i].instruction);

            // The chat template puts the units where the audio part was: same ids as ours.
            let (ttx, mut trx) = mpsc::channel(1);
            sender
                .send(Request::Tokenize(TokenizationRequest {
                    text: Either::Left(messages.clone()),
                    tools: None,
                    add_generation_prompt: true,
                    add_special_tokens: true,
                    enable_thinking: None,
                    reasoning_effort: None,
                    response: ttx,
                }))
                .await
                .unwrap();
            let ids = trx.recv().await.expect("tokenize reply").unwrap();
            assert_eq!(ids, e.prompt, "prompt ids of example {i}");

            // A greedy chat request answers what our decoder answers.
            let (tx, mut rx) = mpsc::channel::<Response>(16);
            let mut params = SamplingParams::deterministic();
            params.max_len = Some(12);
            let request = NormalRequest {
                messages: RequestMessage::Chat {
                    messages,
                    enable_thinking: None,
                    reasoning_effort: None,
                },
                sampling_params: params,
                response: tx,
                return_logprobs: false,
                is_streaming: false,
                id: mistral.next_request_id(),
                constraint: Constraint::None,
                suffix: None,
                tools: None,
                tool_choice: None,
                logits_processors: None,
                return_raw_logits: false,
                web_search_options: None,
                model_id: None,
                truncate_sequence: false,
            };
            sender
                .send(Request::Normal(Box::new(request)))
                .await
                .unwrap();
            // Drain to the final response; the receiver lives until then.
            let done = loop {
                match rx.recv().await {
                    Some(Response::Done(r)) => break r,
                    Some(Response::Chunk(_)) => continue,
                    Some(Response::InternalError(e)) => panic!("internal error: {e}"),
                    Some(Response::ValidationError(e)) => panic!("validation error: {e}"),
                    Some(Response::ModelError(m, _)) => panic!("model error: {m}"),
                    Some(_) => panic!("unexpected response"),
                    None => panic!("the request was dropped"),
                }
            };
            let text = done.choices[0].message.content.clone().unwrap_or_default();
            let expected = answer_text(tok, &ours[i]).unwrap();
            eprintln!("example {i}: mistral.rs {text:?}, ours {expected:?}");
            assert_eq!(text.trim(), expected, "answer to example {i}");
            let stopped = ours[i].last().is_some_and(|t| tok.stop_ids().contains(t));
            if stopped {
                assert_eq!(done.choices[0].finish_reason, "stop");
                assert_eq!(done.usage.completion_tokens, ours[i].len());
            }
        }
    });
}
