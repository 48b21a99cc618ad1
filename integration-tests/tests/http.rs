//! The HTTP API end to end over a real socket, auth included.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use leaf_adapters::store::AdapterStore;
use leaf_integration_tests::{random_adapter, start, tiny_model};
use leaf_plugin::harvest::reward::FeedbackOnly;
use leaf_plugin::serving::http::{router, HttpConfig};
use leaf_plugin::serving::ServerConfig;
use serde_json::{json, Value};

/// One HTTP/1.1 request with `Connection: close`; returns the status and the body.
fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
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
    let (status, text) =
        tokio::task::spawn_blocking(move || call(addr, method, path, token, &body))
            .await
            .expect("client task");
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
        .err()
        .expect("an empty admin token is refused");
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
