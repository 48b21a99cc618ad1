//! Model families end to end against a real in-process mistral.rs 0.8.1 engine, on tiny random
//! weights written by the test (safetensors, `config.json`, a byte-level tokenizer and its
//! chat template):
//!
//! * per family, the trainer's forward logits equal the logits mistral.rs computes, at every
//!   step of a greedy generation (prefill and cached decode), max abs diff 1e-4;
//! * per family, an adapter trained by leaf's trainer (a few steps, nonzero `B`), saved as PEFT
//!   and loaded by mistral.rs, gives the logits of the merged model (`leaf_adapters::merge`);
//! * the chat format (`leaf_plugin::chat_format`) computes exactly the prompt ids the engine
//!   tokenized, for a ChatML and a Llama-3-style template.
//!
//! Families: Llama (untied, ChatML), Llama 3 (RoPE scaling `llama3`, tied embeddings, Llama-3
//! template, a tokenizer that adds `<|begin_of_text|>` itself), Qwen2 (q/k/v biases), Mistral
//! (sliding window, `head_dim` different from `hidden_size / heads`), Phi-3 (fused `qkv_proj`
//! and `gate_up_proj`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use leaf_adapters::config::RopeScaling;
use leaf_adapters::model::{checkpoint, LlamaModel, LoraOptions, ModelOptions, Pass, Trainable};
use leaf_adapters::store::AdapterStore;
use leaf_adapters::{merge, Family, LlamaConfig, LoraAdapter};
use leaf_integration_tests::BareRequest;
use leaf_plugin::chat_format::{ChatFormat, ChatTurn};
use leaf_plugin::serving::{load_pipeline, ModelDir};
use leaf_plugin::trainer::{TrainConfig, TrainSample, Trainer};
use mistralrs_core::{
    CustomLogitsProcessor, DefaultSchedulerMethod, MessageContent, MistralRs, MistralRsBuilder,
    Request, RequestMessage, Response, SamplingParams, SchedulerConfig,
};
use serde_json::json;

const TOLERANCE: f32 = 1e-4;
/// Factor on the random LM head (or tied embeddings): peaked, discriminating logits.
const HEAD_SCALE: f64 = 20.0;

// ------------------------------------------------------------------------- tokenizers

/// The 256 byte-level symbols of GPT-2's `bytes_to_unicode`, in byte order.
fn byte_symbols() -> Vec<String> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, u32)> = printable.into_iter().zip(chars).collect();
    pairs.sort();
    pairs
        .into_iter()
        .map(|(_, c)| char::from_u32(c).expect("valid char").to_string())
        .collect()
}

/// A byte-level BPE `tokenizer.json` without merges: 256 byte symbols, then `specials` as added
/// special tokens. With `prepend`, a post-processor adds that token in front of every encoding
/// (as Llama 3's tokenizer does with `<|begin_of_text|>`).
fn tokenizer_json(specials: &[&str], prepend: Option<&str>) -> (String, HashMap<String, u32>) {
    let mut vocab: Vec<String> = byte_symbols();
    let mut added = Vec::new();
    for s in specials {
        added.push(
            json!({"id": vocab.len(), "content": s, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
        );
        vocab.push(s.to_string());
    }
    let ids: HashMap<String, u32> = vocab
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), i as u32))
        .collect();
    let post = match prepend {
        None => serde_json::Value::Null,
        Some(tok) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tok, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tok, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tok: {"id": tok, "ids": [ids[tok]], "tokens": [tok]}}
        }),
    };
    let vocab_json: serde_json::Map<String, serde_json::Value> =
        ids.iter().map(|(s, i)| (s.clone(), json!(i))).collect();
    let doc = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
            "use_regex": true},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
            "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab_json, "merges": []}
    });
    (doc.to_string(), ids)
}

/// Which chat template a test model gets.
#[derive(Clone, Copy, PartialEq)]
enum Template {
    /// Qwen-style ChatML (`<|im_start|>` / `<|im_end|>`, default system prompt).
    ChatMl,
    /// Llama 3 instruct (`<|start_header_id|>`, `<|eot_id|>`, BOS written by the template
    /// and added by the tokenizer too).
    Llama3,
    /// Phi-3 (`<|user|>`, `<|end|>`, `<|assistant|>`).
    Phi3,
}

const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

const PHI3_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";

/// Writes `tokenizer.json`, `tokenizer_config.json` and (Llama 3) `generation_config.json`;
/// returns the vocabulary size.
fn write_tokenizer(dir: &Path, template: Template) -> Result<usize> {
    let (specials, prepend, cfg, generation): (Vec<&str>, _, _, _) = match template {
        Template::ChatMl => (
            vec!["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            None,
            json!({"bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "chat_template": CHATML_TEMPLATE, "model_max_length": 512.0}),
            None,
        ),
        Template::Llama3 => (
            vec![
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
            Some("<|begin_of_text|>"),
            json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                   "chat_template": LLAMA3_TEMPLATE}),
            Some(json!({"bos_token_id": 256, "eos_token_id": [257, 260]})),
        ),
        Template::Phi3 => (
            vec![
                "<s>",
                "</s>",
                "<|system|>",
                "<|user|>",
                "<|assistant|>",
                "<|end|>",
            ],
            None,
            json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": PHI3_TEMPLATE,
                   "added_tokens_decoder": {"256": {"content": "<s>", "lstrip": false,
                       "normalized": false, "rstrip": false, "single_word": false,
                       "special": true}}}),
            Some(json!({"eos_token_id": [261, 257]})),
        ),
    };
    let (tok, ids) = tokenizer_json(&specials, prepend);
    std::fs::write(dir.join("tokenizer.json"), tok)?;
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string())?;
    if let Some(g) = generation {
        std::fs::write(dir.join("generation_config.json"), g.to_string())?;
    }
    Ok(ids.len())
}

// ------------------------------------------------------------------------- models

/// One family's tiny model.
#[derive(Clone, Copy, PartialEq)]
enum Case {
    Llama,
    Llama3,
    Qwen2,
    Mistral,
    Phi3,
}

impl Case {
    const ALL: [Case; 5] = [
        Case::Llama,
        Case::Llama3,
        Case::Qwen2,
        Case::Mistral,
        Case::Phi3,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::Llama => "llama",
            Case::Llama3 => "llama3",
            Case::Qwen2 => "qwen2",
            Case::Mistral => "mistral",
            Case::Phi3 => "phi3",
        }
    }

    fn template(self) -> Template {
        match self {
            Case::Llama3 => Template::Llama3,
            Case::Phi3 => Template::Phi3,
            _ => Template::ChatMl,
        }
    }

    fn config(self, vocab: usize) -> LlamaConfig {
        let family = match self {
            Case::Llama | Case::Llama3 => Family::Llama,
            Case::Qwen2 => Family::Qwen2,
            Case::Mistral => Family::Mistral,
            Case::Phi3 => Family::Phi3,
        };
        let mut c = LlamaConfig {
            architectures: vec![family.architecture().into()],
            model_type: family.model_type().into(),
            hidden_size: 64,
            intermediate_size: 96,
            vocab_size: vocab + 3,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            max_position_embeddings: 256,
            ..LlamaConfig::default()
        };
        match self {
            Case::Llama => {}
            Case::Llama3 => {
                c.rope_theta = 500_000.0;
                c.tie_word_embeddings = true;
                c.rope_scaling = Some(RopeScaling {
                    rope_type: "llama3".into(),
                    factor: Some(8.0),
                    low_freq_factor: Some(1.0),
                    high_freq_factor: Some(4.0),
                    original_max_position_embeddings: Some(64),
                });
            }
            Case::Qwen2 => {
                c.rope_theta = 1_000_000.0;
                c.rms_norm_eps = 1e-6;
                c.sliding_window = Some(256);
            }
            Case::Mistral => {
                c.sliding_window = Some(4096);
                c.head_dim = Some(32);
            }
            Case::Phi3 => {
                c.original_max_position_embeddings = Some(256);
                c.sliding_window = Some(255);
            }
        }
        c
    }
}

/// A tiny model directory that lives as long as this value.
struct Tiny {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    dir: PathBuf,
    config: LlamaConfig,
}

/// Writes `case`'s model: random weights (deterministic in `seed`), the head scaled.
fn tiny(case: Case, seed: u64) -> Result<Tiny> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().to_path_buf();
    let dir = root.join(case.name());
    std::fs::create_dir_all(&dir)?;
    let vocab = write_tokenizer(&dir, case.template())?;
    let config = case.config(vocab);
    config.check().map_err(anyhow::Error::msg)?;
    let model = LlamaModel::random(
        &config,
        seed,
        &ModelOptions {
            trainable: Trainable::Nothing,
            ..ModelOptions::default()
        },
    )?;
    let head = if config.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    let tensors = model
        .base_tensors()
        .into_iter()
        .map(|(n, t)| {
            let t = if n == head { (t * HEAD_SCALE)? } else { t };
            Ok((n, t))
        })
        .collect::<Result<Vec<_>>>()?;
    checkpoint::save_dir(&dir, &config, tensors)?;
    Ok(Tiny {
        _tmp: tmp,
        root,
        dir,
        config,
    })
}

// ------------------------------------------------------------------------- the engine

/// Records every call's context and logits; returns the logits unchanged.
#[derive(Default)]
struct Observer(Mutex<Vec<(Vec<u32>, Vec<f32>)>>);

impl CustomLogitsProcessor for Observer {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        let v: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((context.to_vec(), v));
        Ok(logits.clone())
    }
}

/// An engine on `dir` (plus a PEFT adapter), loaded the way the server loads it.
async fn engine(dir: &Path, adapter: Option<&Path>) -> Result<Arc<MistralRs>> {
    let model = ModelDir::open(dir)?;
    let adapter = adapter.map(Path::to_path_buf);
    let pipeline =
        tokio::task::spawn_blocking(move || load_pipeline(&model, adapter.as_deref())).await??;
    let sched = SchedulerConfig::DefaultScheduler {
        method: DefaultSchedulerMethod::Fixed(std::num::NonZeroUsize::MIN),
    };
    Ok(MistralRsBuilder::new(pipeline, sched, false, None)
        .with_model_id("tiny".to_string())
        .with_no_prefix_cache(true)
        .build()
        .await)
}

/// Sends one greedy request of `max_len` tokens with an observer; returns every call's
/// `(context, logits)`.
async fn observe(
    mistral: &MistralRs,
    message: RequestMessage,
    max_len: usize,
) -> Result<Vec<(Vec<u32>, Vec<f32>)>> {
    let observer = Arc::new(Observer::default());
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let mut params = SamplingParams::neutral();
    params.temperature = Some(0.0);
    params.max_len = Some(max_len);
    let req = BareRequest {
        messages: message,
        params,
        processors: Some(vec![observer.clone()]),
        return_logprobs: false,
        model_id: None,
    }
    .build(mistral.next_request_id(), tx);
    mistral
        .get_sender(None)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .send(Request::Normal(Box::new(req)))
        .await?;
    // Read to the end of the channel (never drop the receiver early).
    let mut completed = None;
    while let Some(r) = rx.recv().await {
        match r {
            Response::CompletionDone(c) => {
                completed.get_or_insert(c.usage.completion_tokens);
            }
            Response::Done(c) => {
                completed.get_or_insert(c.usage.completion_tokens);
            }
            Response::InternalError(e) => anyhow::bail!("engine: {e}"),
            Response::ValidationError(e) => anyhow::bail!("engine: {e}"),
            Response::ModelError(e, _) => anyhow::bail!("engine: {e}"),
            Response::CompletionModelError(e, _) => anyhow::bail!("engine: {e}"),
            _ => {}
        }
    }
    let n = completed.context("no final response")?;
    let mut calls = observer.0.lock().unwrap().clone();
    // The engine may run a sequence on after its final response: keep its own calls.
    calls.truncate(n);
    ensure!(!calls.is_empty(), "the engine made no call");
    Ok(calls)
}

fn chat(turns: &[ChatTurn]) -> RequestMessage {
    let messages = turns
        .iter()
        .map(|t| {
            let mut m: indexmap::IndexMap<String, MessageContent> = indexmap::IndexMap::new();
            m.insert("role".into(), either::Either::Left(t.role.clone()));
            m.insert("content".into(), either::Either::Left(t.content.clone()));
            m
        })
        .collect();
    RequestMessage::Chat {
        messages,
        enable_thinking: None,
        reasoning_effort: None,
    }
}

/// Max abs difference between the engine's logits and `model`'s at every observed call.
fn max_diff(model: &LlamaModel, calls: &[(Vec<u32>, Vec<f32>)], pass: &Pass) -> Result<f32> {
    let mut worst = 0f32;
    for (context, engine) in calls {
        let input = Tensor::new(context.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward(&input, pass)?.squeeze(0)?;
        let row: Vec<f32> = logits.get(context.len() - 1)?.to_vec1()?;
        ensure!(
            row.len() == engine.len(),
            "vocabulary {} vs engine {}",
            row.len(),
            engine.len()
        );
        for (a, b) in row.iter().zip(engine) {
            worst = worst.max((a - b).abs());
        }
    }
    Ok(worst)
}

fn spread(calls: &[(Vec<u32>, Vec<f32>)]) -> f32 {
    let row = &calls[0].1;
    let max = row.iter().cloned().fold(f32::MIN, f32::max);
    let min = row.iter().cloned().fold(f32::MAX, f32::min);
    max - min
}

fn conversation() -> Vec<ChatTurn> {
    vec![
        ChatTurn::new("system", "Answer briefly."),
        ChatTurn::new("user", "What is two plus two?"),
        ChatTurn::new("assistant", "  Four.  "),
        ChatTurn::new("user", "And three?"),
    ]
}

// ------------------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainer_logits_equal_engine_logits_per_family() -> Result<()> {
    for (i, case) in Case::ALL.into_iter().enumerate() {
        let m = tiny(case, 40 + i as u64)?;
        let mistral = engine(&m.dir, None).await?;
        let turns = [ChatTurn::new("user", "Count to five.")];
        let calls = observe(&mistral, chat(&turns), 8).await?;
        ensure!(
            calls.len() >= 2,
            "{}: only {} calls",
            case.name(),
            calls.len()
        );
        let model = LlamaModel::load(
            &m.dir,
            &ModelOptions {
                trainable: Trainable::Nothing,
                ..ModelOptions::default()
            },
        )?;
        let diff = max_diff(&model, &calls, &Pass::BASE)?;
        println!(
            "{}: {} calls, logit spread {:.2}, max |trainer - engine| = {diff:.2e}",
            case.name(),
            calls.len(),
            spread(&calls)
        );
        ensure!(
            diff <= TOLERANCE,
            "{}: trainer vs engine logits differ by {diff}",
            case.name()
        );
        ensure!(spread(&calls) > 1.0, "{}: flat logits", case.name());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_format_gives_the_engines_prompt_ids() -> Result<()> {
    for case in [Case::Llama, Case::Llama3, Case::Phi3] {
        let m = tiny(case, 7)?;
        let dir = ModelDir::open(&m.dir)?;
        let format: &ChatFormat = dir.chat_format();
        let mistral = engine(&m.dir, None).await?;
        for turns in [vec![ChatTurn::new("user", "Hi there!")], conversation()] {
            let calls = observe(&mistral, chat(&turns), 1).await?;
            let engine_prompt = &calls[0].0;
            let ours = format.prompt_ids(&turns, true)?;
            ensure!(
                &ours == engine_prompt,
                "{}: leaf {:?}\n engine {:?}",
                case.name(),
                ours,
                engine_prompt
            );
        }
        // Stop tokens: the engine's order (eos_token, template alternates, generation config).
        let vocab = dir.tokenizer().get_vocab(true);
        let want: Vec<u32> = match case {
            Case::Llama3 => vec![vocab["<|end_of_text|>"], vocab["<|eot_id|>"]],
            Case::Phi3 => vec![vocab["</s>"], vocab["<|end|>"]],
            _ => vec![vocab["<|im_end|>"]],
        };
        ensure!(
            format.stop_ids() == want.as_slice(),
            "{}: stop ids {:?}, expected {want:?}",
            case.name(),
            format.stop_ids()
        );
        if case == Case::Llama3 {
            // The template writes a BOS and the tokenizer adds one: the engine serves both.
            let bos = vocab["<|begin_of_text|>"];
            let ids = format.prompt_ids(&conversation(), true)?;
            ensure!(
                ids[..2] == [bos, bos],
                "expected a doubled BOS: {:?}",
                &ids[..4]
            );
        }
    }
    Ok(())
}

/// A few steps of leaf's trainer on `m`: rank-4 LoRA on every projection, a large learning
/// rate so `B` moves well away from zero.
fn train_adapter(m: &Tiny) -> Result<(LoraAdapter, LlamaModel)> {
    let config = TrainConfig {
        learning_rate: 5e-2,
        warmup_fraction: 0.0,
        total_steps: 10,
        kl_beta: 0.0,
        micro_batch_size: 2,
        lora: LoraOptions {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            seed: 5,
            ..LoraOptions::default()
        },
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::from_base(&m.dir, config, DType::F32, &Device::Cpu)?;
    let dir = ModelDir::open(&m.dir)?;
    let prompt = dir
        .chat_format()
        .prompt_ids(&[ChatTurn::new("user", "Say yes.")], true)?;
    let text = |s: &str| -> Result<Vec<u32>> {
        Ok(dir
            .tokenizer()
            .encode(s, false)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec())
    };
    let samples = vec![
        TrainSample {
            prompt: prompt.clone(),
            completion: text("yes")?,
            advantages: vec![1.0; 3],
            behaviour_logprobs: Vec::new(),
            behaviour_version: String::new(),
            demonstration: false,
        },
        TrainSample {
            prompt,
            completion: text("no!")?,
            advantages: vec![-1.0; 3],
            behaviour_logprobs: Vec::new(),
            behaviour_version: String::new(),
            demonstration: false,
        },
    ];
    for _ in 0..3 {
        trainer.step(&samples)?;
    }
    let adapter = trainer
        .model()
        .export_adapter(m.dir.to_string_lossy().as_ref())?;
    let b_norm: f32 = adapter
        .tensors
        .iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .map(|(_, t)| {
            t.sqr()
                .and_then(|s| s.sum_all())
                .and_then(|s| s.to_scalar::<f32>())
        })
        .sum::<candle_core::Result<f32>>()?;
    ensure!(b_norm > 1e-6, "training left B at zero");
    let want: Vec<&str> = m.config.lora_targets().to_vec();
    ensure!(
        adapter.config.target_modules == want,
        "targets {:?}, expected {want:?}",
        adapter.config.target_modules
    );
    Ok((adapter, trainer.into_model()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trained_adapter_served_by_the_engine_equals_the_merged_model() -> Result<()> {
    for (i, case) in Case::ALL.into_iter().enumerate() {
        let m = tiny(case, 70 + i as u64)?;
        let (adapter, trained) = train_adapter(&m)?;
        // Saved as PEFT through the store, as the online trainer publishes it.
        let store = AdapterStore::open(&m.root.join("store"))?;
        let id = store.publish(&adapter, Default::default())?;
        let adapter_dir = store.path(&id)?;
        ModelDir::open(&m.dir)?.validate_adapter(&adapter_dir, &Default::default())?;
        let mistral = engine(&m.dir, Some(&adapter_dir)).await?;
        let calls = observe(&mistral, chat(&[ChatTurn::new("user", "Say yes.")]), 6).await?;
        // The merged model, loaded without LoRA.
        let merged_dir = m.root.join("merged");
        let report =
            merge::merge_model_dir(&m.dir, &LoraAdapter::load(&adapter_dir)?, &merged_dir)?;
        ensure!(!report.merged.is_empty());
        let merged = LlamaModel::load(
            &merged_dir,
            &ModelOptions {
                trainable: Trainable::Nothing,
                ..ModelOptions::default()
            },
        )?;
        let diff = max_diff(&merged, &calls, &Pass::BASE)?;
        // The trainer's own LoRA forward (unmerged) gives the same logits.
        let policy = max_diff(&trained, &calls, &Pass::POLICY)?;
        // The base model differs: the adapter matters.
        let base = LlamaModel::load(
            &m.dir,
            &ModelOptions {
                trainable: Trainable::Nothing,
                ..ModelOptions::default()
            },
        )?;
        let moved = max_diff(&base, &calls, &Pass::BASE)?;
        println!(
            "{}: max |merged - engine| = {diff:.2e}, |trainer policy - engine| = {policy:.2e}; \
             base vs adapted engine {moved:.2e}; merged {} weights",
            case.name(),
            report.merged.len()
        );
        ensure!(
            policy <= TOLERANCE,
            "{}: trainer policy vs engine logits differ by {policy}",
            case.name()
        );
        ensure!(
            diff <= TOLERANCE,
            "{}: merged vs engine logits differ by {diff}",
            case.name()
        );
        ensure!(moved > 1e-3, "{}: the adapter changed nothing", case.name());
    }
    Ok(())
}
