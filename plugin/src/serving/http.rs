//! The HTTP API (axum) in front of a [`LeafServer`].
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/chat/completions` | OpenAI-compatible chat; audio as an `input_audio` part (base64 WAV) or a `units` part; optional `"leaf": {"reference", "task"}`; the response adds `"leaf": {"request_id", "adapter_version", "reference_used"}` |
//! | `POST /v1/feedback` | `{"request_id", "reward"}` (admin token or reward token; the reward must lie in the configured range) |
//! | `GET /v1/adapters` | the store's versions and the served one |
//! | `POST /v1/adapters/promote` | `{"version"}` (mutating) |
//! | `POST /v1/adapters/rollback` | (mutating) |
//! | `POST /v1/load_lora_adapter` | `{"lora_name", "lora_path"}`: validate, store, swap in (mutating; only below `adapter_root`, checked after resolving links; disabled without it) |
//! | `GET /v1/leaf/status` | counters, rates, versions, queue depths and drops |
//! | `GET /metrics` | Prometheus text (`leaf_*`) |
//!
//! Mutating routes need `Authorization: Bearer TOKEN` when a token is configured and answer
//! 401 otherwise; without a token [`serve`] only listens on a loopback address. An empty token
//! is a configuration error, never "no auth"; tokens are checked in constant time
//! ([`super::auth::Secret`]). Every error is a 4xx/5xx with a JSON body
//! `{"error": {"message", "type"}}`; malformed JSON and oversized bodies included.
//!
//! A `leaf.reference` decides the reward of its sample, and so steers training. It is only used
//! when the server trusts client references ([`HttpConfig::trust_client_references`]) or the
//! request carries the reward token in the `x-leaf-reward-token` header; otherwise it is dropped
//! (the sample waits for feedback) and counted in `leaf_references_ignored_total`. A wrong
//! reward token is a 401. In-process callers of [`LeafServer::chat`] are trusted: the rule is
//! this HTTP layer's.
//!
//! Chat requests are held to [`ServerConfig::request_limits`](super::ServerConfig) before any
//! work is done on them: a request over a size cap is a 413 (400 for `max_tokens`) whose message
//! names the limit; more than `max_concurrent_requests` chat requests at once (uploads
//! included) are shed with a 429 and `Retry-After` (`leaf_requests_shed_total`); a request
//! running past `request_timeout_s` is cancelled and answered 504
//! (`leaf_requests_timed_out_total`). The other routes are not capped, so `/metrics`, the status
//! and the admin routes keep answering under load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Secret;
use super::limits::{LimitError, RequestLimits};
use super::server::{ChatRequest, LeafServer, Message, Part};
use super::ServeError;
use crate::harvest::HarvestError;

/// HTTP settings.
#[derive(Clone, Default)]
pub struct HttpConfig {
    /// Bearer token for the mutating routes; `None` allows them without auth, and [`serve`]
    /// then only listens on loopback. An empty token is refused by [`router`].
    pub admin_token: Option<String>,
    /// Token that makes a request's `leaf.reference` count (header `x-leaf-reward-token`), and
    /// that may also post feedback. `None`: only [`Self::trust_client_references`] makes them
    /// count. An empty token is refused by [`router`].
    pub reward_token: Option<String>,
    /// Use every client's `leaf.reference` as its reward, token or not. Only for a closed
    /// deployment where every client may steer training.
    pub trust_client_references: bool,
    /// The only directory `load_lora_adapter` may read from; `None` disables that route.
    pub adapter_root: Option<PathBuf>,
    /// Largest request body in bytes (default 32 MiB when 0).
    pub max_body_bytes: usize,
    /// Where promote and rollback go instead of this server's own store (a cluster replica
    /// turns them into a compare-and-set on the shared `current` key); `None`: local.
    pub adapter_control: Option<Arc<dyn AdapterControl>>,
}

/// Promote and rollback handled elsewhere than by [`LeafServer::promote`] /
/// [`LeafServer::rollback`] (see [`HttpConfig::adapter_control`]). Each returns the JSON the
/// route answers with.
#[async_trait::async_trait]
pub trait AdapterControl: Send + Sync {
    /// `POST /v1/adapters/promote` with `{"version"}`.
    async fn promote(&self, version: &str) -> Result<Value, ServeError>;
    /// `POST /v1/adapters/rollback`.
    async fn rollback(&self) -> Result<Value, ServeError>;
    /// Extra fields merged into `GET /v1/leaf/status` under `"cluster"`.
    fn status(&self) -> Value;
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the tokens themselves.
        f.debug_struct("HttpConfig")
            .field("admin_token", &self.admin_token.as_ref().map(|_| ".."))
            .field("reward_token", &self.reward_token.as_ref().map(|_| ".."))
            .field("trust_client_references", &self.trust_client_references)
            .field("adapter_root", &self.adapter_root)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("adapter_control", &self.adapter_control.is_some())
            .finish()
    }
}

#[derive(Clone)]
struct AppState {
    server: Arc<LeafServer>,
    admin: Option<Secret>,
    reward: Option<Secret>,
    trust_client_references: bool,
    adapter_root: Option<PathBuf>,
    metrics: Option<PrometheusHandle>,
    control: Option<Arc<dyn AdapterControl>>,
}

/// An API error: a status and a JSON body `{"error": {"message", "type"}}`.
#[derive(Debug, thiserror::Error)]
#[error("{status} {kind}: {message}")]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    /// The HTTP status the route answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body's `error.type` (`invalid_request_error`, `limit_exceeded`, ...).
    pub fn kind(&self) -> &str {
        self.kind
    }

    /// The body's `error.message`: what was wrong, naming the field or the limit.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind}});
        (self.status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError::new(r.status(), "invalid_request_error", r.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        ApiError::new(r.status(), "invalid_request_error", r.body_text())
    }
}

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        match &e {
            LimitError::Exceeded(x) if x.limit == "max_tokens" => {
                ApiError::new(StatusCode::BAD_REQUEST, "limit_exceeded", e.to_string())
            }
            LimitError::Exceeded(_) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "limit_exceeded",
                e.to_string(),
            ),
            LimitError::Audio { .. } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                e.to_string(),
            ),
        }
    }
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        use leaf_adapters::Error as A;
        let (status, kind) = match &e {
            ServeError::Request(_) | ServeError::Audio(_) | ServeError::Config(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            ServeError::Harvest(HarvestError::UnknownRequest { .. }) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            ServeError::Harvest(_) => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            ServeError::Adapter(A::UnknownVersion(_)) => (StatusCode::NOT_FOUND, "not_found"),
            ServeError::Adapter(A::NoRollbackTarget) | ServeError::NoStore => {
                (StatusCode::CONFLICT, "conflict")
            }
            ServeError::Adapter(A::Store(m)) if m.contains("not a version id") => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            ServeError::Adapter(_) | ServeError::Load(_) | ServeError::Probe { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "adapter_refused")
            }
            ServeError::SwapLimit(_) => (StatusCode::CONFLICT, "conflict"),
            ServeError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        ApiError::new(status, kind, e.to_string())
    }
}

/// Installs the process-wide Prometheus recorder once and returns its handle (`None` when
/// another recorder was installed first).
pub fn install_metrics() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .clone()
}

/// The router. `adapter_root` is resolved here; a root that does not exist is an error, and so
/// is an empty token.
pub fn router(server: Arc<LeafServer>, config: HttpConfig) -> Result<Router, ServeError> {
    let admin = config
        .admin_token
        .as_deref()
        .map(|t| Secret::new("admin token", t))
        .transpose()?;
    let reward = config
        .reward_token
        .as_deref()
        .map(|t| Secret::new("reward token", t))
        .transpose()?;
    let adapter_root = match &config.adapter_root {
        Some(r) => Some(r.canonicalize().map_err(|source| ServeError::Io {
            path: r.clone(),
            source,
        })?),
        None => None,
    };
    let limit = if config.max_body_bytes == 0 {
        32 << 20
    } else {
        config.max_body_bytes
    };
    let limits = server.config().request_limits.clone();
    let state = AppState {
        server,
        admin,
        reward,
        trust_client_references: config.trust_client_references,
        adapter_root,
        metrics: install_metrics(),
        control: config.adapter_control.clone(),
    };
    Ok(Router::new()
        .route(
            "/v1/chat/completions",
            post(chat).layer(axum::middleware::from_fn_with_state(
                Arc::new(Admission::new(&limits)),
                admit,
            )),
        )
        .route("/v1/feedback", post(feedback))
        .route("/v1/adapters", get(adapters))
        .route("/v1/adapters/promote", post(promote))
        .route("/v1/adapters/rollback", post(rollback))
        .route("/v1/load_lora_adapter", post(load_lora_adapter))
        .route("/v1/leaf/status", get(status))
        .route("/metrics", get(prometheus))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state))
}

/// Serves the API on `listen` until the task is dropped. Without an admin token only a
/// loopback address is accepted.
pub async fn serve(
    server: Arc<LeafServer>,
    config: HttpConfig,
    listen: SocketAddr,
) -> Result<(), ServeError> {
    check_listen(&config, listen)?;
    let listener = std::net::TcpListener::bind(listen).map_err(|source| ServeError::Io {
        path: PathBuf::from(listen.to_string()),
        source,
    })?;
    serve_listener(server, config, listener, std::future::pending::<()>()).await
}

fn check_listen(config: &HttpConfig, listen: SocketAddr) -> Result<(), ServeError> {
    if config.admin_token.is_none() && !listen.ip().is_loopback() {
        return Err(ServeError::Config(format!(
            "refusing to listen on {listen} without an admin token (use a loopback address or set a token)"
        )));
    }
    Ok(())
}

/// How long connections accepted just before a graceful shutdown get to send their request
/// before idle connections are closed (closing one whose request is unread would reset it).
const ACCEPT_GRACE: Duration = Duration::from_secs(1);

/// Serves the API on an already bound `listener` until `shutdown` completes, then shuts down
/// gracefully: it stops accepting (new connections wait in the socket's backlog), gives the
/// connections it accepted [`ACCEPT_GRACE`] to send their request, and returns once every open
/// request was answered. The listener is taken over (and closed at the end); pass a
/// `try_clone` to keep the socket open.
pub async fn serve_listener(
    server: Arc<LeafServer>,
    config: HttpConfig,
    listener: std::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(|source| ServeError::Io {
        path: PathBuf::from("listener"),
        source,
    })?;
    check_listen(&config, addr)?;
    let io = |source| ServeError::Io {
        path: PathBuf::from(addr.to_string()),
        source,
    };
    let app = router(server, config)?;
    listener.set_nonblocking(true).map_err(io)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let listener = StoppableListener {
        inner: tokio::net::TcpListener::from_std(listener).map_err(io)?,
        stop: stop_rx.clone(),
    };
    let mut graceful = stop_rx;
    let serving = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = graceful.wait_for(|stop| *stop).await;
        tokio::time::sleep(ACCEPT_GRACE).await;
    });
    let serving = std::future::IntoFuture::into_future(serving);
    tokio::pin!(serving);
    tokio::select! {
        r = &mut serving => return r.map_err(io),
        _ = shutdown => {}
    }
    stop_tx.send_replace(true);
    serving.await.map_err(io)
}

/// A TCP listener that stops handing out connections once `stop` is set (they stay in the
/// kernel's backlog), so a graceful shutdown can stop accepting before it closes idle
/// connections.
struct StoppableListener {
    inner: tokio::net::TcpListener,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl axum::serve::Listener for StoppableListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if *self.stop.borrow() {
                std::future::pending::<()>().await;
            }
            tokio::select! {
                r = self.inner.accept() => match r {
                    Ok(conn) => return conn,
                    Err(e) => {
                        // As axum's own listener: log, back off, retry (EMFILE and the like).
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                r = self.stop.changed() => {
                    if r.is_err() {
                        // The server is gone: no more connections.
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Header carrying the reward token.
pub const REWARD_TOKEN_HEADER: &str = "x-leaf-reward-token";

/// The chat route's admission control: a fixed number of slots and a deadline per request.
struct Admission {
    slots: Arc<tokio::sync::Semaphore>,
    max: usize,
    timeout: Duration,
    timeout_s: f64,
}

impl Admission {
    fn new(limits: &RequestLimits) -> Self {
        Admission {
            slots: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_requests)),
            max: limits.max_concurrent_requests,
            timeout: limits.request_timeout(),
            timeout_s: limits.request_timeout_s,
        }
    }
}

/// Sheds a request when every slot is taken (429), and ends it at the deadline (504; dropping
/// the handler cancels the engine request). Runs before the body is read, so slow uploads
/// count too.
async fn admit(State(gate): State<Arc<Admission>>, req: Request, next: Next) -> Response {
    let Ok(_slot) = gate.slots.clone().try_acquire_owned() else {
        metrics::counter!("leaf_requests_shed_total").increment(1);
        let mut r = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            format!(
                "the server is serving its limit of {} chat requests \
                 (request_limits.max_concurrent_requests); retry later",
                gate.max
            ),
        )
        .into_response();
        r.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
        return r;
    };
    match tokio::time::timeout(gate.timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            metrics::counter!("leaf_requests_timed_out_total").increment(1);
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "the request took longer than request_limits.request_timeout_s = {} s",
                    gate.timeout_s
                ),
            )
            .into_response()
        }
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}

/// The admin token check of the mutating routes.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    match &state.admin {
        None => Ok(()),
        Some(secret) if secret.matches(bearer(headers)) => Ok(()),
        Some(_) => Err(unauthorized("missing or wrong bearer token")),
    }
}

/// Whether the request presents the reward token: `Ok(false)` without the header, 401 with a
/// wrong one (or when the server has none).
fn reward_token_presented(state: &AppState, headers: &HeaderMap) -> Result<bool, ApiError> {
    let Some(given) = headers.get(REWARD_TOKEN_HEADER) else {
        return Ok(false);
    };
    match (&state.reward, given.to_str()) {
        (Some(secret), Ok(given)) if secret.matches(given) => Ok(true),
        (Some(_), _) => Err(unauthorized("wrong x-leaf-reward-token")),
        (None, _) => Err(unauthorized(
            "x-leaf-reward-token was sent but this server has no reward token",
        )),
    }
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    messages: Vec<MessageBody>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    logprobs: bool,
    #[serde(default)]
    top_logprobs: Option<usize>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    leaf: Option<LeafBody>,
    /// Accepted and ignored (the plugin serves one model).
    #[serde(default)]
    #[allow(dead_code)]
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LeafBody {
    #[serde(default)]
    reference: Option<String>,
    #[serde(default)]
    task: Option<String>,
}

#[derive(Debug, Deserialize)]
struct MessageBody {
    role: String,
    content: ContentBody,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ContentBody {
    Text(String),
    Parts(Vec<PartBody>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum PartBody {
    Text { text: String },
    InputAudio { input_audio: AudioBody },
    Audio { units: Vec<u32> },
}

#[derive(Debug, Deserialize)]
struct AudioBody {
    data: String,
    #[serde(default)]
    format: Option<String>,
}

fn to_request(body: ChatBody) -> Result<ChatRequest, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", m);
    let mut messages = Vec::with_capacity(body.messages.len());
    for (i, m) in body.messages.into_iter().enumerate() {
        let content = match m.content {
            ContentBody::Text(t) => vec![Part::Text(t)],
            ContentBody::Parts(parts) => {
                let mut out = Vec::with_capacity(parts.len());
                for (j, p) in parts.into_iter().enumerate() {
                    out.push(match p {
                        PartBody::Text { text } => Part::Text(text),
                        PartBody::Audio { units } => Part::Units(units),
                        PartBody::InputAudio { input_audio } => {
                            if input_audio.format.as_deref().is_some_and(|f| f != "wav") {
                                return Err(bad(format!(
                                    "messages[{i}].content[{j}]: only wav audio is supported"
                                )));
                            }
                            let wav = base64::engine::general_purpose::STANDARD
                                .decode(input_audio.data.as_bytes())
                                .map_err(|e| {
                                    bad(format!("messages[{i}].content[{j}]: bad base64: {e}"))
                                })?;
                            Part::Wav(wav)
                        }
                    });
                }
                out
            }
        };
        messages.push(Message {
            role: m.role,
            content,
        });
    }
    let leaf = body.leaf.unwrap_or(LeafBody {
        reference: None,
        task: None,
    });
    Ok(ChatRequest {
        messages,
        max_tokens: body.max_completion_tokens.or(body.max_tokens),
        temperature: body.temperature,
        top_p: body.top_p,
        logprobs: body.logprobs,
        top_logprobs: body.top_logprobs.unwrap_or(0),
        seed: body.seed,
        reference: leaf.reference,
        task: leaf.task,
    })
}

/// Turns the body of `POST /v1/chat/completions` into a checked [`ChatRequest`], or into the
/// 4xx error the route answers with: exactly what the route runs on every body it reads.
///
/// * Malformed JSON is a 400 and a well-formed body of the wrong shape (a missing or
///   mistyped field, a number out of its type's range) a 422, as axum's `Json` extractor
///   answers; unknown fields are ignored.
/// * An `input_audio` part that is not `wav` or not valid base64 is a 400 naming the part.
/// * The server-side caps ([`RequestLimits::check_request`]): 413, or 400 for `max_tokens`;
///   a WAV part whose header cannot be read is a 400.
/// * What the request gets wrong on its own ([`ChatRequest::check`]: no messages, an unknown
///   role, temperature, top-p, `max_tokens` 0, `top_logprobs`): 400.
///
/// It never panics, whatever the bytes (`plugin/tests/fuzz_inputs.rs`). The `leaf.reference`
/// is kept: whether it counts is the route's decision (see the module docs).
pub fn parse_chat_request(body: &[u8], limits: &RequestLimits) -> Result<ChatRequest, ApiError> {
    let Json(body) = Json::<ChatBody>::from_bytes(body)?;
    let req = to_request(body)?;
    limits.check_request(&req)?;
    req.check()?;
    Ok(req)
}

/// Whether the request says its body is JSON (`application/json` or `application/*+json`),
/// as axum's `Json` extractor demands; a 415 otherwise.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let is_json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| mime.trim().to_ascii_lowercase())
        .is_some_and(|mime| {
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        });
    if is_json {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "Expected request with `Content-Type: application/json`",
        ))
    }
}

async fn chat(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let token = reward_token_presented(&state, &headers)?;
    require_json(&headers)?;
    let body = body?;
    let mut req = parse_chat_request(&body, &state.server.config().request_limits)?;
    let reference_used = req.reference.is_some() && (token || state.trust_client_references);
    if req.reference.is_some() && !reference_used {
        req.reference = None;
        metrics::counter!("leaf_references_ignored_total").increment(1);
    }
    let reply = state.server.chat(req).await?;
    let mut v = serde_json::to_value(&reply.response).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            e.to_string(),
        )
    })?;
    if let Value::Object(map) = &mut v {
        map.insert(
            "leaf".into(),
            json!({"request_id": reply.request_id, "adapter_version": reply.adapter_version,
                   "logprob_base": "e", "reference_used": reference_used}),
        );
    }
    Ok(Json(v))
}

#[derive(Debug, Deserialize)]
struct FeedbackBody {
    request_id: String,
    reward: f64,
}

async fn feedback(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<FeedbackBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    // The reward token may post rewards too; otherwise the admin token is needed.
    if !reward_token_presented(&state, &headers)? {
        authorize(&state, &headers)?;
    }
    let Json(body) = body?;
    state.server.feedback(&body.request_id, body.reward)?;
    Ok(Json(json!({"ok": true})))
}

async fn adapters(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let current = state.server.current_version();
    let versions = match state.server.store() {
        Some(store) => {
            serde_json::to_value(store.list().map_err(ServeError::Adapter)?).unwrap_or(Value::Null)
        }
        None => json!([]),
    };
    Ok(Json(json!({"serving": current, "versions": versions})))
}

#[derive(Debug, Deserialize)]
struct PromoteBody {
    version: String,
}

async fn promote(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<PromoteBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let Json(body) = body?;
    if let Some(control) = &state.control {
        return Ok(Json(control.promote(&body.version).await?));
    }
    let report = state.server.promote(&body.version).await?;
    Ok(Json(json!(report)))
}

async fn rollback(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    if let Some(control) = &state.control {
        return Ok(Json(control.rollback().await?));
    }
    let report = state.server.rollback().await?;
    Ok(Json(json!(report)))
}

#[derive(Debug, Deserialize)]
struct LoadBody {
    lora_name: String,
    lora_path: PathBuf,
}

/// `path` resolved (links followed) and inside `root`.
fn inside(root: &Path, path: &Path) -> Result<PathBuf, ApiError> {
    let resolved = path.canonicalize().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("lora_path {}: {e}", path.display()),
        )
    })?;
    if resolved.starts_with(root) {
        Ok(resolved)
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("lora_path {} is outside the adapter root", path.display()),
        ))
    }
}

async fn load_lora_adapter(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<LoadBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let Json(body) = body?;
    let root = state.adapter_root.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "load_lora_adapter is disabled (no adapter root configured)",
        )
    })?;
    let dir = inside(root, &body.lora_path)?;
    let report = state.server.load_adapter_dir(&dir).await?;
    Ok(Json(json!({"lora_name": body.lora_name, "swap": report})))
}

async fn status(State(state): State<AppState>) -> Json<Value> {
    let st = state.server.status();
    let k = state.server.config().assembler.group_size.max(2) as f64;
    let rate = |a: u64, b: f64| if b > 0.0 { a as f64 / b } else { 0.0 };
    let mut v = json!(st);
    if let Value::Object(map) = &mut v {
        map.insert(
            "fork_fire_rate".into(),
            json!(rate(st.forks_fired, st.fork_candidates as f64)),
        );
        map.insert(
            "usable_fork_rate".into(),
            json!(rate(st.forks_usable, st.forks_fired as f64 * (k - 1.0))),
        );
        if let Some(control) = &state.control {
            map.insert("cluster".into(), control.status());
        }
    }
    Json(v)
}

async fn prometheus(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(h) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "another metrics recorder is installed in this process",
        )
        .into_response(),
    }
}
