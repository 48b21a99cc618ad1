//! The HTTP API end to end over a real socket, auth included.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use leaf_adapters::store::AdapterStore;
use leaf_integration_tests::{random_adapter, start, tiny_model};
use leaf_plugin::audio::{write_wav_pcm16, Audio};
use leaf_plugin::harvest::reward::FeedbackOnly;
use leaf_plugin::harvest::{RewardContext, RewardSource};
use leaf_plugin::serving::http::{router, HttpConfig};
use leaf_plugin::serving::limits::RequestLimits;
use leaf_plugin::serving::{LeafServer, ServerConfig};
use serde_json::{json, Value};

/// One HTTP/1.1 request with `Connection: close`; returns the status and the body.
fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    call_with(addr, method, path, &auth, body)
}

/// One HTTP/1.1 request with `Connection: close` and extra header lines (each ending in CRLF).
fn call_with(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    read_response(s)
}

/// Reads a whole response off a connection the server closes: the status and the body.
fn read_response(mut s: TcpStream) -> (u16, String) {
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let status = out[9..12].parse().expect("status");
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn http(
    addr: std::net::SocketAddr,
    method: &'static str,
    path: &'static str,
    token: Option<&'static str>,
    body: String,
) -> (u16, Value) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    http_with(addr, method, path, auth, body).await
}

/// [`http`] with extra header lines (each ending in CRLF).
async fn http_with(
    addr: std::net::SocketAddr,
    method: &'static str,
    path: &'static str,
    headers: String,
    body: String,
) -> (u16, Value) {
    let (status, text) =
        tokio::task::spawn_blocking(move || call_with(addr, method, path, &headers, &body))
            .await
            .expect("client task");
    parse_body(status, text)
}

/// The JSON of a response body (a JSON string of the raw text when it is not JSON).
fn parse_body(status: u16, text: String) -> (u16, Value) {
    // Chunked bodies: keep the JSON between the first '{' or '[' and the last '}' or ']'.
    let json = match (text.find(['{', '[']), text.rfind(['}', ']'])) {
        (Some(a), Some(b)) if b >= a => &text[a..=b],
        _ => text.as_str(),
    };
    (
        status,
        serde_json::from_str(json).unwrap_or(Value::String(text.clone())),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_end_to_end_with_auth() -> anyhow::Result<()> {
    let m = tiny_model(12)?;
    let store_dir = m.tmp.path().join("store");
    let store = AdapterStore::open(&store_dir)?;
    let v1 = store.publish(&random_adapter(&m.config, 51, 0.2)?, Default::default())?;
    let root = m.tmp.path().join("adapters");
    let inside = root.join("v2");
    random_adapter(&m.config, 52, 0.2)?.save(&inside)?;
    let outside = m.tmp.path().join("elsewhere");
    random_adapter(&m.config, 53, 0.2)?.save(&outside)?;
    std::os::unix::fs::symlink(&outside, root.join("link"))?;

    let mut cfg = ServerConfig::new(&m.dir);
    cfg.store_dir = Some(store_dir);
    let (server, _rx) = start(cfg, Arc::new(FeedbackOnly)).await?;
    let app = router(
        server.clone(),
        HttpConfig {
            admin_token: Some("sesame".into()),
            adapter_root: Some(root.clone()),
            max_body_bytes: 64 << 10,
            ..Default::default()
        },
    )?;
    // An empty token is a configuration error, not "no auth".
    for empty in ["", "  "] {
        let e = router(
            server.clone(),
            HttpConfig {
                admin_token: Some(empty.into()),
                ..Default::default()
            },
        )
        .expect_err("an empty admin token is refused");
        assert!(e.to_string().contains("admin token is empty"), "{e}");
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    // Chat, with the leaf object and natural-log log-probs.
    let body = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi."}]}],
        "max_tokens": 5, "temperature": 1.0, "top_p": 1.0, "logprobs": true, "seed": 1,
        "leaf": {"reference": "hello", "task": "greet"}
    });
    let (s, v) = http(addr, "POST", "/v1/chat/completions", None, body.to_string()).await;
    assert_eq!(s, 200, "{v}");
    let request_id = v["leaf"]["request_id"]
        .as_str()
        .expect("request id")
        .to_string();
    assert_eq!(v["leaf"]["adapter_version"], "base");
    assert_eq!(v["id"], request_id.as_str());
    assert!(
        v["choices"][0]["logprobs"]["content"][0]["logprob"]
            .as_f64()
            .unwrap()
            <= 0.0
    );

    // Malformed JSON, wrong types, oversized bodies: 4xx with a JSON error.
    let (s, v) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        None,
        "{not json".into(),
    )
    .await;
    assert!((400..500).contains(&s), "{s} {v}");
    assert!(v["error"]["message"].is_string());
    let (s, v) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        None,
        json!({"messages": 3}).to_string(),
    )
    .await;
    assert!((400..500).contains(&s), "{s} {v}");
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(100_000)}]});
    let (s, _) = http(addr, "POST", "/v1/chat/completions", None, big.to_string()).await;
    assert_eq!(s, 413);
    let (s, v) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        None,
        json!({"messages": [{"role": "user", "content": "x"}], "top_p": 7.0}).to_string(),
    )
    .await;
    assert_eq!(s, 400, "{v}");

    // Mutating routes: 401 without or with a wrong token.
    let fb = json!({"request_id": request_id, "reward": 0.5}).to_string();
    let (s, _) = http(addr, "POST", "/v1/feedback", None, fb.clone()).await;
    assert_eq!(s, 401);
    let (s, _) = http(addr, "POST", "/v1/feedback", Some("wrong"), fb.clone()).await;
    assert_eq!(s, 401);
    let (s, v) = http(addr, "POST", "/v1/feedback", Some("sesame"), fb).await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = http(
        addr,
        "POST",
        "/v1/feedback",
        Some("sesame"),
        json!({"request_id": "nope", "reward": 1.0}).to_string(),
    )
    .await;
    assert_eq!(s, 404);

    // Adapters: unknown version 404, promote, rollback.
    let (s, _) = http(
        addr,
        "POST",
        "/v1/adapters/promote",
        Some("sesame"),
        json!({"version": "abcdef12"}).to_string(),
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = http(
        addr,
        "POST",
        "/v1/adapters/promote",
        None,
        json!({"version": v1.to_string()}).to_string(),
    )
    .await;
    assert_eq!(s, 401);
    let (s, v) = http(
        addr,
        "POST",
        "/v1/adapters/promote",
        Some("sesame"),
        json!({"version": v1.to_string()}).to_string(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(server.current_version(), v1.to_string());
    let (s, v) = http(addr, "GET", "/v1/adapters", None, String::new()).await;
    assert_eq!(s, 200);
    assert_eq!(v["serving"], v1.to_string());

    // load_lora_adapter: inside the root works; outside (also through a link) is refused.
    let (s, v) = http(
        addr,
        "POST",
        "/v1/load_lora_adapter",
        Some("sesame"),
        json!({"lora_name": "v2", "lora_path": inside}).to_string(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let v2 = server.current_version();
    assert_ne!(v2, v1.to_string());
    for p in [
        outside.clone(),
        root.join("link"),
        root.join("../elsewhere"),
    ] {
        let (s, v) = http(
            addr,
            "POST",
            "/v1/load_lora_adapter",
            Some("sesame"),
            json!({"lora_name": "x", "lora_path": p}).to_string(),
        )
        .await;
        assert_eq!(s, 403, "{p:?}: {v}");
    }
    assert_eq!(server.current_version(), v2);
    let (s, v) = http(
        addr,
        "POST",
        "/v1/adapters/rollback",
        Some("sesame"),
        String::new(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(server.current_version(), v1.to_string());

    // Status and metrics.
    let (s, v) = http(addr, "GET", "/v1/leaf/status", None, String::new()).await;
    assert_eq!(s, 200);
    assert_eq!(v["current_version"], v1.to_string());
    assert!(v["swaps"].as_u64().unwrap() >= 3);
    let (s, text) =
        tokio::task::spawn_blocking(move || call(addr, "GET", "/metrics", None, "")).await?;
    assert_eq!(s, 200);
    assert!(text.contains("leaf_requests_total"), "{text}");
    assert!(text.contains("leaf_swaps_total"), "{text}");
    Ok(())
}

/// Serves `config` in front of `server` on a fresh loopback port.
async fn serve_on_loopback(
    server: Arc<LeafServer>,
    config: HttpConfig,
) -> anyhow::Result<std::net::SocketAddr> {
    let app = router(server, config)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// Records the reference of every sample it is asked to score; rewards 1 when there is one.
#[derive(Default)]
struct SeenReferences(Mutex<Vec<Option<String>>>);

#[async_trait::async_trait]
impl RewardSource for SeenReferences {
    fn name(&self) -> &str {
        "seen-references"
    }

    async fn score(&self, ctx: RewardContext<'_>) -> Option<f64> {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        seen.push(ctx.reference.map(str::to_string));
        ctx.reference.map(|_| 1.0)
    }
}

fn chat_with_reference(text: &str, reference: &str) -> String {
    json!({
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 3, "seed": 7,
        "leaf": {"reference": reference, "task": "t"}
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_references_count_only_when_trusted() -> anyhow::Result<()> {
    let m = tiny_model(14)?;
    let seen = Arc::new(SeenReferences::default());
    let (server, _rx) = start(ServerConfig::new(&m.dir), seen.clone()).await?;
    let addr = serve_on_loopback(
        server.clone(),
        HttpConfig {
            admin_token: Some("sesame".into()),
            reward_token: Some("payday".into()),
            ..Default::default()
        },
    )
    .await?;
    let with_token = "x-leaf-reward-token: payday\r\n".to_string();

    // Without the reward token the reference is dropped before it reaches the server.
    let (s, v) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        None,
        chat_with_reference("One.", "one"),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["leaf"]["reference_used"], false, "{v}");
    let untrusted_id = v["leaf"]["request_id"].as_str().unwrap().to_string();
    // With it, the reference is the reward's.
    let (s, v) = http_with(
        addr,
        "POST",
        "/v1/chat/completions",
        with_token.clone(),
        chat_with_reference("Two.", "two"),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["leaf"]["reference_used"], true, "{v}");
    // A wrong reward token is refused outright.
    let (s, v) = http_with(
        addr,
        "POST",
        "/v1/chat/completions",
        "x-leaf-reward-token: guess\r\n".into(),
        chat_with_reference("Three.", "three"),
    )
    .await;
    assert_eq!(s, 401, "{v}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut seen = seen.0.lock().unwrap().clone();
        if seen.len() >= 2 || std::time::Instant::now() > deadline {
            seen.sort();
            assert_eq!(seen, vec![None, Some("two".to_string())]);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Feedback: the reward token may post it; the reward must be in [0, 1].
    for bad in [1.5, -0.5, 1e308] {
        let (s, v) = http_with(
            addr,
            "POST",
            "/v1/feedback",
            with_token.clone(),
            json!({"request_id": untrusted_id, "reward": bad}).to_string(),
        )
        .await;
        assert_eq!(s, 400, "{bad}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("[0, 1]") && msg.contains("feedback_reward_range"),
            "{msg}"
        );
    }
    let (s, v) = http_with(
        addr,
        "POST",
        "/v1/feedback",
        "x-leaf-reward-token: guess\r\n".into(),
        json!({"request_id": untrusted_id, "reward": 0.5}).to_string(),
    )
    .await;
    assert_eq!(s, 401, "{v}");
    // (The sample joins its group right after it is scored: retry while it is not there yet.)
    let mut tries = 0;
    let (s, v) = loop {
        let (s, v) = http_with(
            addr,
            "POST",
            "/v1/feedback",
            with_token.clone(),
            json!({"request_id": untrusted_id, "reward": 0.5}).to_string(),
        )
        .await;
        tries += 1;
        if s != 404 || tries > 100 {
            break (s, v);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(s, 200, "{v}");
    let (_, text) =
        tokio::task::spawn_blocking(move || call(addr, "GET", "/metrics", None, "")).await?;
    assert!(text.contains("leaf_references_ignored_total"), "{text}");

    // A server that trusts its clients takes every reference; an empty reward token is refused.
    let trusting = serve_on_loopback(
        server.clone(),
        HttpConfig {
            trust_client_references: true,
            ..Default::default()
        },
    )
    .await?;
    let (s, v) = http(
        trusting,
        "POST",
        "/v1/chat/completions",
        None,
        chat_with_reference("Four.", "four"),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["leaf"]["reference_used"], true, "{v}");
    let e = router(
        server.clone(),
        HttpConfig {
            reward_token: Some(String::new()),
            ..Default::default()
        },
    )
    .expect_err("an empty reward token is refused");
    assert!(e.to_string().contains("reward token is empty"), "{e}");
    // An out-of-range reward range is a configuration error at start.
    let mut cfg = ServerConfig::new(&m.dir);
    cfg.feedback_reward_range.min = 2.0;
    let e = start(cfg, seen.clone()).await.expect_err("refused");
    assert!(format!("{e:#}").contains("feedback_reward_range"), "{e:#}");
    Ok(())
}

/// Standard base64 (with padding), enough for a test WAV.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn wav_part(seconds: f64) -> Value {
    let n = (seconds * 8000.0) as usize;
    let audio = Audio::new(vec![0.1; n], 8000).expect("audio");
    let bytes = write_wav_pcm16(&audio).expect("wav");
    json!({"type": "input_audio", "input_audio": {"data": base64(&bytes), "format": "wav"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cap_is_a_clear_4xx() -> anyhow::Result<()> {
    let m = tiny_model(15)?;
    let mut cfg = ServerConfig::new(&m.dir);
    cfg.sampling.max_tokens = 4;
    cfg.request_limits = RequestLimits {
        max_tokens: 8,
        max_messages: 3,
        max_text_bytes: 64,
        max_audio_parts: 1,
        max_audio_seconds: 1.0,
        max_units: 10,
        max_reference_bytes: 16,
        max_task_bytes: 8,
        max_concurrent_requests: 1,
        request_timeout_s: 3.0,
    };
    // A default max_tokens above the cap is a configuration error.
    let mut bad = cfg.clone();
    bad.sampling.max_tokens = 9;
    let e = start(bad, Arc::new(FeedbackOnly))
        .await
        .expect_err("refused");
    assert!(
        format!("{e:#}").contains("request_limits.max_tokens"),
        "{e:#}"
    );

    let (server, _rx) = start(cfg, Arc::new(FeedbackOnly)).await?;
    let addr = serve_on_loopback(
        server.clone(),
        HttpConfig {
            trust_client_references: true,
            ..Default::default()
        },
    )
    .await?;
    let user = |content: Value| json!([{"role": "user", "content": content}]);
    let cases = [
        (
            json!({"messages": user(json!("Hi.")), "max_tokens": 9}),
            400,
            "max_tokens",
        ),
        (
            json!({"messages": vec![json!({"role": "user", "content": "a"}); 4]}),
            413,
            "max_messages",
        ),
        (
            json!({"messages": user(json!("x".repeat(65)))}),
            413,
            "max_text_bytes",
        ),
        (
            json!({"messages": user(json!("Hi.")), "leaf": {"reference": "r".repeat(17)}}),
            413,
            "max_reference_bytes",
        ),
        (
            json!({"messages": user(json!("Hi.")), "leaf": {"task": "t".repeat(9)}}),
            413,
            "max_task_bytes",
        ),
        (
            json!({"messages": user(json!([{"type": "audio", "units": [1]}, {"type": "audio", "units": [2]}]))}),
            413,
            "max_audio_parts",
        ),
        (
            json!({"messages": user(json!([{"type": "audio", "units": vec![1; 11]}]))}),
            413,
            "max_units",
        ),
        (
            json!({"messages": user(json!([wav_part(1.5)]))}),
            413,
            "max_audio_seconds",
        ),
    ];
    for (body, status, limit) in cases {
        let (s, v) = http(addr, "POST", "/v1/chat/completions", None, body.to_string()).await;
        assert_eq!(s, status, "{limit}: {v}");
        assert_eq!(v["error"]["type"], "limit_exceeded", "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(&format!("request_limits.{limit}")), "{msg}");
    }
    // Within the caps: a short WAV passes them (and then needs a codebook this server lacks).
    let (s, v) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        None,
        json!({"messages": user(json!([wav_part(0.5)]))}).to_string(),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unit codebook"),
        "{v}"
    );
    let small = json!({"messages": user(json!("Hi.")), "max_tokens": 2}).to_string();
    let (s, v) = http(addr, "POST", "/v1/chat/completions", None, small.clone()).await;
    assert_eq!(s, 200, "{v}");

    // A client that sends its headers and then stalls holds the only slot: the next request is
    // shed with a 429 at once, /metrics still answers, and the stalled one ends with a 504 at
    // the request timeout.
    let mut stalled = TcpStream::connect(addr)?;
    write!(
        stalled,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"messages\":"
    )?;
    let stalled_reply = tokio::task::spawn_blocking(move || read_response(stalled));
    // (Let the server take the stalled request in before the next one races it for the slot.)
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let t0 = std::time::Instant::now();
    let (s, v) = loop {
        let small = small.clone();
        let (s, text) = tokio::task::spawn_blocking(move || {
            call_with(addr, "POST", "/v1/chat/completions", "", &small)
        })
        .await?;
        if s == 429 || t0.elapsed() > std::time::Duration::from_secs(2) {
            break parse_body(s, text);
        }
    };
    assert_eq!(s, 429, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("request_limits.max_concurrent_requests"),
        "{v}"
    );
    let (s, _) =
        tokio::task::spawn_blocking(move || call(addr, "GET", "/metrics", None, "")).await?;
    assert_eq!(s, 200);
    let (s, body) = stalled_reply.await?;
    let v = parse_body(s, body).1;
    assert_eq!(s, 504, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("request_limits.request_timeout_s"),
        "{v}"
    );
    assert!(t0.elapsed() >= std::time::Duration::from_secs(2));
    // The slot is free again.
    let (s, v) = http(addr, "POST", "/v1/chat/completions", None, small).await;
    assert_eq!(s, 200, "{v}");
    let (_, text) =
        tokio::task::spawn_blocking(move || call(addr, "GET", "/metrics", None, "")).await?;
    assert!(text.contains("leaf_requests_shed_total"), "{text}");
    assert!(text.contains("leaf_requests_timed_out_total"), "{text}");
    Ok(())
}
