//! `leaf serve`: the plugin, its HTTP API and (optionally) the online trainer in one process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::audio::AudioEncoder;
use super::http::{serve_listener, HttpConfig};
use super::limits::RequestLimits;
use super::server::{LeafServer, ServerConfig};
use crate::device::ComputeDevice;
use crate::harvest::ReferenceReward;
use crate::online::{training_group_policy, OnlineConfig, OnlineTrainer};
use crate::reward::{Metric, RewardOptions};

/// Arguments of `leaf serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The base model directory (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    pub model: PathBuf,
    /// Where the model runs: cpu, cuda:N (a build with `--features leaf-plugin/cuda`) or
    /// metal (`--features leaf-plugin/metal`); overrides the config's `device` [default: cpu].
    /// The online trainer trains there too unless its config sets `train.device`. A device
    /// this build has no back-end for is refused at start.
    #[arg(long, value_name = "cpu|cuda:N|metal")]
    pub device: Option<ComputeDevice>,
    /// The versioned adapter store; its current version is served at start.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// The only directory `POST /v1/load_lora_adapter` may read from (disabled without it).
    #[arg(long)]
    pub adapter_root: Option<PathBuf>,
    /// Address to listen on. Without an admin token only loopback addresses are accepted.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Bearer token required by the mutating endpoints. Visible to every local user in `ps`:
    /// prefer --admin-token-file or the LEAF_ADMIN_TOKEN environment variable.
    #[arg(long, conflicts_with = "admin_token_file")]
    pub admin_token: Option<String>,
    /// File holding the admin token (one line; a trailing newline is ignored).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Token that makes a request's `leaf.reference` count as its reward (header
    /// `x-leaf-reward-token`); it may also post feedback. Prefer --reward-token-file or
    /// LEAF_REWARD_TOKEN.
    #[arg(long, conflicts_with = "reward_token_file")]
    pub reward_token: Option<String>,
    /// File holding the reward token.
    #[arg(long)]
    pub reward_token_file: Option<PathBuf>,
    /// Use every client's `leaf.reference` as its reward: any client can then steer training.
    /// Without it (and without the reward token) references are ignored.
    #[arg(long)]
    pub trust_client_references: bool,
    /// Lowest reward `/v1/feedback` accepts (overrides the config's feedback_reward_range).
    #[arg(long)]
    pub feedback_reward_min: Option<f64>,
    /// Highest reward `/v1/feedback` accepts (overrides the config's feedback_reward_range).
    #[arg(long)]
    pub feedback_reward_max: Option<f64>,
    /// A JSON `ServerConfig` (every field but `model_dir` optional) for the finer settings.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Unit codebook for audio prompts.
    #[arg(long)]
    pub units: Option<PathBuf>,
    /// Reward metric against the `leaf.reference` of a request.
    #[arg(long, value_enum, default_value = "bleu")]
    pub metric: Metric,
    /// Run the online trainer with this JSON `OnlineConfig` (needs --store).
    #[arg(long)]
    pub online: Option<PathBuf>,
    /// Join a cluster: publish sealed groups to this NATS JetStream server and follow its
    /// `current` adapter version; promote/rollback move it for every replica (needs --store).
    #[cfg(feature = "cluster")]
    #[arg(long, value_name = "nats://HOST:PORT", conflicts_with = "online")]
    pub cluster: Option<String>,
    /// Held-out data of the online trainer's promotion gate: a directory of recordings, or a
    /// JSON-lines file of {"prompt_ids", "reference"} (overrides the online config's
    /// `gate_data`). Without it candidates are promoted unchecked.
    #[arg(long, requires = "online")]
    pub gate_data: Option<PathBuf>,
    /// Caps on chat requests (override the config's `request_limits`). Boxed: ten options
    /// would make `ServeArgs` the one large variant of the CLI's command enum.
    #[command(flatten)]
    pub limits: Box<LimitFlags>,
}

/// `leaf serve` flags for [`RequestLimits`]; each overrides the config's value when given.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LimitFlags {
    /// Most new tokens a request may ask for [default: 2048].
    #[arg(long)]
    pub max_request_tokens: Option<usize>,
    /// Most messages per request [default: 64].
    #[arg(long)]
    pub max_messages: Option<usize>,
    /// Most bytes of text per request [default: 65536].
    #[arg(long)]
    pub max_text_bytes: Option<usize>,
    /// Most audio parts per request [default: 4].
    #[arg(long)]
    pub max_audio_parts: Option<usize>,
    /// Most seconds of WAV audio per request [default: 60].
    #[arg(long)]
    pub max_audio_seconds: Option<f64>,
    /// Most unit ids per request [default: 16384].
    #[arg(long)]
    pub max_units: Option<usize>,
    /// Most bytes of `leaf.reference` [default: 4096].
    #[arg(long)]
    pub max_reference_bytes: Option<usize>,
    /// Most bytes of `leaf.task` [default: 256].
    #[arg(long)]
    pub max_task_bytes: Option<usize>,
    /// Most chat requests at once; more are answered 429 [default: 64].
    #[arg(long)]
    pub max_concurrent_requests: Option<usize>,
    /// Longest a chat request may take, in seconds; longer ones get a 504 [default: 300].
    #[arg(long)]
    pub request_timeout_s: Option<f64>,
}

impl LimitFlags {
    /// Writes the given flags into `limits`.
    pub fn apply(&self, limits: &mut RequestLimits) {
        fn set<T: Copy>(flag: Option<T>, field: &mut T) {
            if let Some(v) = flag {
                *field = v;
            }
        }
        set(self.max_request_tokens, &mut limits.max_tokens);
        set(self.max_messages, &mut limits.max_messages);
        set(self.max_text_bytes, &mut limits.max_text_bytes);
        set(self.max_audio_parts, &mut limits.max_audio_parts);
        set(self.max_audio_seconds, &mut limits.max_audio_seconds);
        set(self.max_units, &mut limits.max_units);
        set(self.max_reference_bytes, &mut limits.max_reference_bytes);
        set(self.max_task_bytes, &mut limits.max_task_bytes);
        set(
            self.max_concurrent_requests,
            &mut limits.max_concurrent_requests,
        );
        set(self.request_timeout_s, &mut limits.request_timeout_s);
    }
}

/// Environment variable read for the admin token when neither flag gives it.
pub const ADMIN_TOKEN_ENV: &str = "LEAF_ADMIN_TOKEN";
/// Environment variable read for the reward token when neither flag gives it.
pub const REWARD_TOKEN_ENV: &str = "LEAF_REWARD_TOKEN";

/// Longest token file read (a token is a line, not a document).
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// A secret from its flag, its file or its environment variable, in that order; `None` when
/// none is set. A set but empty secret is an error, never "no auth".
fn secret_from(
    what: &str,
    flag: Option<&str>,
    file: Option<&Path>,
    env_var: &str,
) -> anyhow::Result<Option<String>> {
    let (token, source) = if let Some(t) = flag {
        (t.to_string(), "its command-line flag".to_string())
    } else if let Some(path) = file {
        (read_token_file(path)?, path.display().to_string())
    } else {
        match std::env::var(env_var) {
            Ok(t) => (t, format!("${env_var}")),
            Err(std::env::VarError::NotPresent) => return Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                anyhow::bail!("${env_var} is not valid UTF-8")
            }
        }
    };
    if token.trim().is_empty() {
        anyhow::bail!(
            "the {what} from {source} is empty; an empty token would turn authentication off"
        );
    }
    Ok(Some(token))
}

/// The first line of a small token file, without its line ending.
fn read_token_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_TOKEN_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    if text.len() as u64 > MAX_TOKEN_FILE_BYTES {
        anyhow::bail!(
            "{} is longer than {MAX_TOKEN_FILE_BYTES} bytes; a token file holds one line",
            path.display()
        );
    }
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// Finds a model's [`AudioEncoder`]: from the `--units` file when given, else from what the
/// model directory carries (`units.json` for the spoken-digit front-end); `None` when the model
/// has none. `leaf` passes the `speech` feature's `serve_audio_encoder`; serving itself knows no
/// front-end.
pub type AudioEncoderLoader =
    fn(model_dir: &Path, units: Option<&Path>) -> anyhow::Result<Option<Arc<dyn AudioEncoder>>>;

fn read_json<T: serde::de::DeserializeOwned>(path: &PathBuf) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Reads the `--online` config. One that does not set `train.device` trains on
/// `server_device`, the device the server runs on.
fn read_online_config(
    path: &PathBuf,
    server_device: ComputeDevice,
) -> anyhow::Result<OnlineConfig> {
    let v: serde_json::Value = read_json(path)?;
    let device_given = v.pointer("/train/device").is_some();
    let mut cfg: OnlineConfig =
        serde_json::from_value(v).with_context(|| format!("parsing {}", path.display()))?;
    if !device_given {
        cfg.train.device = server_device;
    }
    Ok(cfg)
}

/// Runs the server until Ctrl-C, then shuts the trainer and the server down cleanly.
/// `audio` finds the model's audio encoder (see [`AudioEncoderLoader`]).
pub fn run(args: ServeArgs, audio: AudioEncoderLoader) -> anyhow::Result<ExitCode> {
    let mut policy_given = false;
    let mut config = match &args.config {
        Some(p) => {
            let mut v: serde_json::Value = read_json(p)?;
            policy_given = v.get("group_policy").is_some();
            if let Some(map) = v.as_object_mut() {
                map.insert(
                    "model_dir".into(),
                    serde_json::Value::String(args.model.to_string_lossy().into_owned()),
                );
            }
            serde_json::from_value(v).context("server config")?
        }
        None => ServerConfig::new(&args.model),
    };
    if args.store.is_some() {
        config.store_dir = args.store.clone();
    }
    if let Some(device) = args.device {
        config.device = device;
    }
    // A model directory that carries its unit codebook serves audio without --units.
    config.audio_encoder = audio(&args.model, args.units.as_deref())?;
    let mut online: Option<OnlineConfig> = args
        .online
        .as_ref()
        .map(|p| read_online_config(p, config.device))
        .transpose()?;
    if let Some(cfg) = online.as_mut() {
        if args.gate_data.is_some() {
            cfg.gate_data = args.gate_data.clone();
        }
        match &cfg.gate_data {
            Some(d) => eprintln!(
                "leaf: online training: candidates are promoted only if their held-out reward \
                 on {} stays within {} of the served version's",
                d.display(),
                cfg.gate.max_drop
            ),
            None => eprintln!(
                "leaf: WARNING: online training WITHOUT a promotion gate: every candidate \
                 adapter is promoted UNCHECKED (no held-out check; only a NaN loss stops one). \
                 Give held-out data with --gate-data. /v1/leaf/status reports \
                 trainer.promotes_unchecked."
            ),
        }
    }
    if online.is_some() && !policy_given {
        // Live prompts rarely repeat: with online training on, groups come from the server's
        // own extra samples unless the server config chose a group policy.
        config.group_policy = training_group_policy();
        eprintln!(
            "leaf: online training: each client request gets {} extra samples in the \
             background (at most {} at once; set group_policy in --config to change it)",
            config.assembler.group_size.saturating_sub(1),
            config.group_policy.background_concurrency
        );
    }
    if online
        .as_ref()
        .is_some_and(|o| o.reference_guidance.is_some() || o.supervised.is_some())
    {
        // Reference guidance and the supervised objective train on each request's reference
        // as ids.
        config.assembler.reference_ids = true;
    }
    if online.as_ref().is_some_and(|o| o.supervised.is_some()) {
        // Labelled requests that are not forked still teach the supervised objective.
        config.group_policy.labelled_singles = true;
    }
    args.limits.apply(&mut config.request_limits);
    if let Some(min) = args.feedback_reward_min {
        config.feedback_reward_range.min = min;
    }
    if let Some(max) = args.feedback_reward_max {
        config.feedback_reward_range.max = max;
    }
    for (given, flag, env) in [
        (args.admin_token.is_some(), "--admin-token", ADMIN_TOKEN_ENV),
        (
            args.reward_token.is_some(),
            "--reward-token",
            REWARD_TOKEN_ENV,
        ),
    ] {
        if given {
            tracing::warn!(
                "{flag} is visible to every local user in the process list; \
                 prefer {flag}-file or ${env}"
            );
        }
    }
    let admin_token = secret_from(
        "admin token",
        args.admin_token.as_deref(),
        args.admin_token_file.as_deref(),
        ADMIN_TOKEN_ENV,
    )?;
    let reward_token = secret_from(
        "reward token",
        args.reward_token.as_deref(),
        args.reward_token_file.as_deref(),
        REWARD_TOKEN_ENV,
    )?;
    if args.trust_client_references {
        tracing::warn!(
            "--trust-client-references: every client's leaf.reference becomes its reward, so \
             any client can steer training"
        );
    } else if reward_token.is_none() {
        eprintln!(
            "leaf: client references are ignored (no reward token, no \
             --trust-client-references); rewards come from /v1/feedback"
        );
    }
    // Inherited after a restart, else bound here (before any thread starts).
    let listener = super::restart::listener(args.listen)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let reward = Arc::new(ReferenceReward::new(args.metric, RewardOptions::default()));
        let (server, groups) = LeafServer::start(config, reward).await?;
        #[cfg(feature = "cluster")]
        let (groups, replica) =
            crate::cluster::replica::from_flag(&server, groups, args.cluster.as_deref()).await?;
        let trainer = match online {
            Some(cfg) => Some(OnlineTrainer::spawn(
                server.clone(),
                groups,
                cfg,
                tokio::runtime::Handle::current(),
            )?),
            None => {
                // Nobody trains: keep the queue drained so sealed groups are not counted as
                // drops forever.
                std::thread::spawn(move || while groups.recv().is_ok() {});
                None
            }
        };
        let http = HttpConfig {
            admin_token,
            reward_token,
            trust_client_references: args.trust_client_references,
            adapter_root: args.adapter_root.clone(),
            max_body_bytes: 0,
            #[cfg(feature = "cluster")]
            adapter_control: replica.as_ref().map(|r| r.control()),
            #[cfg(not(feature = "cluster"))]
            adapter_control: None,
        };
        eprintln!(
            "leaf: serving {} on {} at http://{} (version {}, restarts {})",
            server.model().dir().display(),
            server.config().device,
            args.listen,
            server.current_version(),
            super::restart::restarts()
        );
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let http_task = serve_listener(server.clone(), http, listener.try_clone()?, async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        });
        tokio::pin!(http_task);
        let mut http_done = false;
        let restart = tokio::select! {
            r = &mut http_task => { r?; http_done = true; false }
            _ = tokio::signal::ctrl_c() => { eprintln!("leaf: shutting down"); false }
            _ = server.recycle_requested() => {
                eprintln!(
                    "leaf: {} engines created; restarting in place to hand their threads back",
                    server.status().leaked_threads
                );
                true
            }
        };
        // Stop accepting (new connections wait in the socket's backlog) and let the open ones
        // finish.
        stop_tx.send_replace(true);
        if !http_done {
            match tokio::time::timeout(Duration::from_secs(60), &mut http_task).await {
                Ok(r) => r?,
                Err(_) => eprintln!("leaf: connections still open after 60 s; closing them"),
            }
        }
        server.shutdown(Duration::from_secs(30)).await;
        if let Some(t) = trainer {
            let report = tokio::task::spawn_blocking(move || t.shutdown()).await??;
            eprintln!(
                "leaf: trainer stopped after {} updates, {} versions published",
                report.updates,
                report.published.len()
            );
        }
        if restart {
            // Returns only if the exec failed.
            return Err(super::restart::exec_self(&listener).into());
        }
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        use clap::Parser as _;
        let argv = ["leaf"].iter().chain(args).copied();
        Cli::try_parse_from(argv).map(|c| c.serve)
    }

    #[test]
    fn the_device_flag_is_parsed_documented_and_followed_by_the_trainer() {
        let a = parse(&["--model", "m", "--device", "cuda:1"]).unwrap();
        assert_eq!(a.device, Some(ComputeDevice::Cuda(1)));
        assert_eq!(parse(&["--model", "m"]).unwrap().device, None);
        let e = parse(&["--model", "m", "--device", "gpu"]).unwrap_err();
        assert!(e.to_string().contains("expected cpu, cuda"), "{e}");
        let help = {
            use clap::CommandFactory as _;
            Cli::command().render_long_help().to_string()
        };
        assert!(help.contains("--device <cpu|cuda:N|metal>"), "{help}");
        assert!(help.contains("leaf-plugin/cuda"), "{help}");

        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("online.json");
        std::fs::write(&plain, r#"{"publish_every": 2, "train": {"kl_beta": 0.1}}"#).unwrap();
        let cfg = read_online_config(&plain, ComputeDevice::Cuda(1)).unwrap();
        assert_eq!(cfg.train.device, ComputeDevice::Cuda(1));
        assert_eq!(cfg.train.kl_beta, 0.1);
        assert_eq!(cfg.publish_every, 2);
        let pinned = dir.path().join("pinned.json");
        std::fs::write(&pinned, r#"{"train": {"device": "cpu"}}"#).unwrap();
        let cfg = read_online_config(&pinned, ComputeDevice::Cuda(1)).unwrap();
        assert_eq!(cfg.train.device, ComputeDevice::Cpu);
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"train": {"device": "tpu"}}"#).unwrap();
        let e = read_online_config(&bad, ComputeDevice::Cpu).unwrap_err();
        assert!(format!("{e:#}").contains("tpu"), "{e:#}");
    }

    #[test]
    fn gate_data_needs_online() {
        assert!(parse(&["--model", "m", "--gate-data", "d"]).is_err());
        let a = parse(&["--model", "m", "--online", "o.json", "--gate-data", "d"]).unwrap();
        assert_eq!(a.gate_data.as_deref(), Some(Path::new("d")));
    }

    #[test]
    fn limit_flags_override_the_config() {
        let a = parse(&[
            "--model",
            "m",
            "--max-audio-parts",
            "2",
            "--request-timeout-s",
            "1.5",
            "--trust-client-references",
        ])
        .unwrap();
        let mut limits = RequestLimits::default();
        a.limits.apply(&mut limits);
        assert_eq!(limits.max_audio_parts, 2);
        assert_eq!(limits.request_timeout_s, 1.5);
        assert_eq!(limits.max_tokens, RequestLimits::default().max_tokens);
        assert!(a.trust_client_references);
        // A token and a token file at once is ambiguous.
        let e = parse(&[
            "--model",
            "m",
            "--admin-token",
            "t",
            "--admin-token-file",
            "f",
        ]);
        assert!(e.is_err());
    }

    #[test]
    fn secrets_come_from_flag_file_or_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let env = "LEAF_TEST_SECRET_FROM";
        assert_eq!(
            secret_from("t", Some("flag"), None, env)
                .unwrap()
                .as_deref(),
            Some("flag")
        );
        assert_eq!(
            secret_from("t", None, Some(&file), env).unwrap().as_deref(),
            Some("from-file")
        );
        assert_eq!(secret_from("t", None, None, env).unwrap(), None);
    }

    #[test]
    fn empty_or_oversized_secrets_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, "x".repeat(5000)).unwrap();
        let env = "LEAF_TEST_SECRET_EMPTY";
        let e = secret_from("admin token", Some(""), None, env).unwrap_err();
        assert!(e.to_string().contains("admin token"), "{e}");
        assert!(e.to_string().contains("empty"), "{e}");
        let e = secret_from("admin token", None, Some(&empty), env).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = secret_from("admin token", None, Some(&big), env).unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        let e = secret_from("t", None, Some(&dir.path().join("missing")), env).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
