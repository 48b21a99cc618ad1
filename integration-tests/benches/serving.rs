//! Serving benchmarks on one engine in one run; prints one JSON object.
//!
//! * plugin vs bare engine: requests/s and generated tokens/s for the same prompts, the same
//!   concurrency and the same sampling (temperature 1, top-p 0.9), through `LeafServer::chat`
//!   (tap, harvest, groups) and straight into the same mistral.rs engine (its own sampler);
//! * harvest cost: one tap step (O(V) softmax, nucleus, draw, record) at real vocabulary sizes;
//! * hot-swap latency: publish to the first response served by the new version.
//!
//! `cargo bench -p leaf-integration-tests --bench serving` (env `LEAF_BENCH_REQUESTS`,
//! default 96).

use std::sync::Arc;
use std::time::Instant;

use leaf_adapters::store::AdapterStore;
use leaf_integration_tests::{random_adapter, tiny_model_sized};
use leaf_plugin::harvest::reward::FeedbackOnly;
use leaf_plugin::harvest::{SamplingTap, TapConfig};
use leaf_plugin::serving::{ChatRequest, LeafServer, Message, ServerConfig};
use mistralrs_core::{
    Constraint, NormalRequest, Request, RequestMessage, Response, SamplingParams,
};

const MAX_TOKENS: usize = 32;
const CONCURRENCY: usize = 16;

fn prompt(i: usize) -> String {
    format!("Question number {i}: what comes next?")
}

async fn plugin_run(server: &Arc<LeafServer>, n: usize) -> (f64, usize) {
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut hs = Vec::new();
    for i in 0..n {
        let server = server.clone();
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        hs.push(tokio::spawn(async move {
            let r = server
                .chat(ChatRequest {
                    messages: vec![Message::text("user", &prompt(i))],
                    max_tokens: Some(MAX_TOKENS),
                    temperature: Some(1.0),
                    top_p: Some(0.9),
                    seed: Some(i as u64),
                    ..ChatRequest::default()
                })
                .await
                .expect("plugin request");
            drop(permit);
            r.response.usage.completion_tokens
        }));
    }
    let mut tokens = 0;
    for h in hs {
        tokens += h.await.expect("task");
    }
    (t0.elapsed().as_secs_f64(), tokens)
}

async fn bare_run(server: &Arc<LeafServer>, n: usize) -> (f64, usize) {
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut hs = Vec::new();
    let engine = server.status().engine_id;
    for i in 0..n {
        let mistral = server.mistral().clone();
        let engine = engine.clone();
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        hs.push(tokio::spawn(async move {
            let (tx, mut rx) = tokio::sync::mpsc::channel(16);
            let mut params = SamplingParams::neutral();
            params.temperature = Some(1.0);
            params.top_p = Some(0.9);
            params.max_len = Some(MAX_TOKENS);
            let req = NormalRequest {
                messages: RequestMessage::Completion {
                    text: format!(
                        "<|bos|><|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
                        prompt(i)
                    ),
                    echo_prompt: false,
                    best_of: None,
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
                model_id: Some(engine.clone()),
                truncate_sequence: false,
            };
            mistral
                .get_sender(Some(&engine))
                .expect("sender")
                .send(Request::Normal(Box::new(req)))
                .await
                .expect("send");
            let mut tokens = 0;
            while let Some(r) = rx.recv().await {
                if let Response::CompletionDone(c) = r {
                    tokens = c.usage.completion_tokens;
                }
            }
            drop(permit);
            tokens
        }));
    }
    let mut tokens = 0;
    for h in hs {
        tokens += h.await.expect("task");
    }
    (t0.elapsed().as_secs_f64(), tokens)
}

fn tap_cost_us(vocab: usize, top_p: f64) -> f64 {
    let mut state = 7u64;
    let logits: Vec<f32> = (0..vocab)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 20.0 - 10.0
        })
        .collect();
    let tap = SamplingTap::new(TapConfig {
        temperature: 1.0,
        top_p,
        top_logprobs: 0,
        stop_token: 0,
        seed: 1,
        forced: Vec::new(),
    })
    .expect("tap");
    let ctx = [1u32, 2, 3];
    for _ in 0..5 {
        tap.step(&logits, &ctx).expect("step");
    }
    let n = 100;
    let t0 = Instant::now();
    for _ in 0..n {
        tap.step(&logits, &ctx).expect("step");
    }
    t0.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("LEAF_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let m = tiny_model_sized(1, 256, 1024)?;
        let store_dir = m.tmp.path().join("store");
        let mut cfg = ServerConfig::new(&m.dir);
        cfg.store_dir = Some(store_dir.clone());
        cfg.max_batch = CONCURRENCY;
        let (server, rx) = LeafServer::start(cfg, Arc::new(FeedbackOnly)).await?;
        std::thread::spawn(move || while rx.recv().is_ok() {});
        // Warm-up, then alternate to share any drift.
        plugin_run(&server, 8).await;
        bare_run(&server, 8).await;
        let (tb1, kb1) = bare_run(&server, n / 2).await;
        let (tp1, kp1) = plugin_run(&server, n / 2).await;
        let (tp2, kp2) = plugin_run(&server, n / 2).await;
        let (tb2, kb2) = bare_run(&server, n / 2).await;
        let (tb, kb, tp, kp) = (tb1 + tb2, kb1 + kb2, tp1 + tp2, kp1 + kp2);
        let nn = (n / 2 * 2) as f64;
        // Hot-swap latency: publish -> first response on the new version.
        let store = AdapterStore::open(&store_dir)?;
        let mut swaps = Vec::new();
        for s in 0..5u64 {
            let t0 = Instant::now();
            let id = store.publish(&random_adapter(&m.config, 100 + s, 0.2)?, Default::default())?;
            let report = server.promote(id.as_str()).await?;
            let r = server
                .chat(ChatRequest {
                    messages: vec![Message::text("user", "x")],
                    max_tokens: Some(1),
                    ..ChatRequest::default()
                })
                .await?;
            assert_eq!(r.adapter_version, id.to_string());
            swaps.push((t0.elapsed().as_secs_f64() * 1e3, report.load_ms, report.remove_ms));
        }
        let out = serde_json::json!({
            "model": {"hidden": 256, "intermediate": 1024, "layers": 2, "vocab": m.config.vocab_size},
            "requests": nn, "concurrency": CONCURRENCY, "max_tokens": MAX_TOKENS,
            "bare": {"seconds": tb, "requests_per_s": nn / tb, "tokens_per_s": kb as f64 / tb, "tokens": kb},
            "plugin": {"seconds": tp, "requests_per_s": nn / tp, "tokens_per_s": kp as f64 / tp, "tokens": kp},
            "plugin_over_bare_tokens_per_s": (kp as f64 / tp) / (kb as f64 / tb),
            "plugin_over_bare_requests_per_s": tb / tp,
            "tap_step_us": {
                "vocab_300_top_p_0.9": tap_cost_us(300, 0.9),
                "vocab_152k_top_p_1": tap_cost_us(152_064, 1.0),
                "vocab_152k_top_p_0.9": tap_cost_us(152_064, 0.9),
                "vocab_262k_top_p_0.9": tap_cost_us(262_144, 0.9),
            },
            "swap_publish_to_first_response_ms": swaps.iter().map(|s| s.0).collect::<Vec<_>>(),
            "swap_load_ms": swaps.iter().map(|s| s.1).collect::<Vec<_>>(),
            "swap_remove_ms": swaps.iter().map(|s| s.2).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        anyhow::Ok(())
    })
}
