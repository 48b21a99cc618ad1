//! `leaf adapter`: check, inspect, publish, promote, roll back and merge PEFT LoRA adapters.
//!
//! Every subcommand prints one JSON object on stdout. An invalid adapter, an unknown version or
//! any other failure prints the reason on stderr and exits with a non-zero status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use leaf_adapters::merge::merge_model_dir;
use leaf_adapters::store::{AdapterStore, VersionId, VersionMeta};
use leaf_adapters::validate::{inspect, validate, Limits, ValidationReport};
use leaf_adapters::{LlamaConfig, LoraAdapter};
use serde_json::json;

/// `leaf adapter ...`
#[derive(clap::Subcommand)]
pub enum Command {
    /// Check an adapter directory against a base model's config.json; prints the report.
    Validate(ValidateArgs),
    /// Summarise an adapter directory: rank, alpha, targets, layers, parameters, version id.
    Inspect(InspectArgs),
    /// Publish an adapter directory into a versioned store (optionally making it current).
    Publish(PublishArgs),
    /// List the versions of a store and the current one.
    List(StoreArgs),
    /// Make a stored version current (a full id or a unique prefix).
    Promote(PromoteArgs),
    /// Make the previous current version current again.
    Rollback(StoreArgs),
    /// Delete all but the newest N versions (never the current one or the rollback target).
    Retain(RetainArgs),
    /// Merge an adapter into its base model's weights and write the merged model.
    Merge(MergeArgs),
}

/// Size limits an adapter must respect.
#[derive(clap::Args)]
pub struct LimitArgs {
    /// Largest accepted LoRA rank.
    #[arg(long, default_value_t = Limits::default().max_rank)]
    max_rank: usize,
    /// Largest accepted total number of LoRA parameters.
    #[arg(long, default_value_t = Limits::default().max_parameters)]
    max_params: usize,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_rank: self.max_rank,
            max_parameters: self.max_params,
        }
    }
}

/// Arguments of `leaf adapter validate`.
#[derive(clap::Args)]
pub struct ValidateArgs {
    /// The adapter directory (adapter_config.json + adapter_model.safetensors).
    dir: PathBuf,
    /// The base model directory (or its config.json).
    #[arg(long)]
    base: PathBuf,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Arguments of `leaf adapter inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// The adapter directory.
    dir: PathBuf,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Arguments naming a store.
#[derive(clap::Args)]
pub struct StoreArgs {
    /// The store's root directory.
    #[arg(long)]
    store: PathBuf,
}

/// Arguments of `leaf adapter publish`.
#[derive(clap::Args)]
pub struct PublishArgs {
    /// The adapter directory to publish.
    dir: PathBuf,
    /// The store's root directory (created if missing).
    #[arg(long)]
    store: PathBuf,
    /// Validate against this base model first (without it, only base-independent checks run).
    #[arg(long)]
    base: Option<PathBuf>,
    /// Make the published version current.
    #[arg(long)]
    promote: bool,
    /// The version this one was trained from (id or unique prefix).
    #[arg(long)]
    parent: Option<String>,
    /// The trainer's step counter.
    #[arg(long)]
    step: Option<u64>,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Arguments of `leaf adapter promote`.
#[derive(clap::Args)]
pub struct PromoteArgs {
    /// The version id (or a unique prefix of at least 4 hex digits).
    version: String,
    /// The store's root directory.
    #[arg(long)]
    store: PathBuf,
}

/// Arguments of `leaf adapter retain`.
#[derive(clap::Args)]
pub struct RetainArgs {
    /// How many of the newest versions to keep.
    keep: usize,
    /// The store's root directory.
    #[arg(long)]
    store: PathBuf,
}

/// Arguments of `leaf adapter merge`.
#[derive(clap::Args)]
pub struct MergeArgs {
    /// The adapter directory.
    dir: PathBuf,
    /// The base model directory (config.json + model.safetensors or shards).
    #[arg(long)]
    base: PathBuf,
    /// Where to write the merged model (must differ from --base).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Runs the subcommand.
pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let out = match cmd {
        Command::Validate(a) => {
            let (_, report) = load_valid(&a.dir, Some(&a.base), &a.limits.limits())?;
            with_valid(report)?
        }
        Command::Inspect(a) => {
            let (_, report) = load_valid(&a.dir, None, &a.limits.limits())?;
            serde_json::to_value(report)?
        }
        Command::Publish(a) => publish(a)?,
        Command::List(a) => {
            let store = open_store(&a.store)?;
            let record = store.record()?;
            json!({
                "current": record.current,
                "previous": record.previous,
                "versions": store.list()?,
            })
        }
        Command::Promote(a) => {
            let store = open_store(&a.store)?;
            let id = store.resolve(&a.version)?;
            let before = store.current()?;
            store
                .promote(&id)
                .with_context(|| format!("promoting version {id}"))?;
            json!({ "current": id, "previous": before })
        }
        Command::Rollback(a) => {
            let store = open_store(&a.store)?;
            let before = store.current()?;
            let id = store.rollback()?;
            json!({ "current": id, "rolled_back_from": before })
        }
        Command::Retain(a) => {
            let store = open_store(&a.store)?;
            let deleted = store.retain(a.keep)?;
            json!({ "deleted": deleted, "current": store.current()? })
        }
        Command::Merge(a) => {
            let (adapter, report) = load_valid(&a.dir, Some(&a.base), &a.limits.limits())?;
            let merged = merge_model_dir(&a.base, &adapter, &a.out).with_context(|| {
                format!(
                    "merging {} into {} (writing {})",
                    a.dir.display(),
                    a.base.display(),
                    a.out.display()
                )
            })?;
            json!({
                "version_id": report.version_id,
                "scale": merged.scale,
                "merged": merged.merged,
                "files": merged.files,
                "out": a.out,
            })
        }
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(ExitCode::SUCCESS)
}

/// Loads the adapter in `dir` and checks it (against `base` when given).
fn load_valid(
    dir: &Path,
    base: Option<&Path>,
    limits: &Limits,
) -> anyhow::Result<(LoraAdapter, ValidationReport)> {
    let adapter =
        LoraAdapter::load(dir).with_context(|| format!("cannot read adapter {}", dir.display()))?;
    let report = match base {
        Some(base) => {
            let cfg = LlamaConfig::from_path(base)
                .with_context(|| format!("cannot read base model {}", base.display()))?;
            validate(&adapter, &cfg, limits)
        }
        None => inspect(&adapter, limits),
    }
    .with_context(|| format!("adapter {} is invalid", dir.display()))?;
    Ok((adapter, report))
}

fn with_valid(report: ValidationReport) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(report)?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("valid".into(), serde_json::Value::Bool(true));
    }
    Ok(v)
}

fn open_store(root: &Path) -> anyhow::Result<AdapterStore> {
    AdapterStore::open(root)
        .with_context(|| format!("cannot open adapter store {}", root.display()))
}

fn publish(a: PublishArgs) -> anyhow::Result<serde_json::Value> {
    let (adapter, report) = load_valid(&a.dir, a.base.as_deref(), &a.limits.limits())?;
    let store = open_store(&a.store)?;
    let parent: Option<VersionId> = a.parent.as_deref().map(|p| store.resolve(p)).transpose()?;
    let meta = VersionMeta {
        parent,
        step: a.step,
        notes: serde_json::Map::new(),
    };
    let id = store
        .publish(&adapter, meta)
        .with_context(|| format!("publishing {}", a.dir.display()))?;
    if a.promote {
        store.promote(&id)?;
    }
    Ok(json!({
        "version": id,
        "path": store.path(&id)?,
        "promoted": a.promote,
        "current": store.current()?,
        "num_parameters": report.num_parameters,
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{Device, Tensor};
    use clap::Parser;
    use leaf_adapters::peft::{tensor_name, LoraPart, PeftConfig};
    use rand::{Rng, SeedableRng};

    use super::*;

    #[derive(Parser)]
    struct Wrapper {
        #[command(subcommand)]
        cmd: Command,
    }

    fn leaf_adapter(args: &[&str]) -> anyhow::Result<ExitCode> {
        let w = Wrapper::try_parse_from(std::iter::once("adapter").chain(args.iter().copied()))
            .expect("arguments parse");
        run(w.cmd)
    }

    fn s(p: &Path) -> &str {
        p.to_str().expect("utf-8 path")
    }

    fn base_config() -> LlamaConfig {
        serde_json::from_value(json!({
            "hidden_size": 16, "intermediate_size": 24, "vocab_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        }))
        .unwrap()
    }

    fn random(rng: &mut rand_chacha::ChaCha8Rng, shape: (usize, usize)) -> Tensor {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-0.5f32..0.5))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A base model directory with every targetable weight.
    fn write_base(dir: &Path, cfg: &LlamaConfig) -> HashMap<String, Tensor> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut w = HashMap::new();
        for l in 0..cfg.num_hidden_layers {
            for m in leaf_adapters::config::ALL_TARGETS {
                let name = leaf_adapters::peft::base_weight_name(l, m).unwrap();
                w.insert(name, random(&mut rng, cfg.module_shape(m).unwrap()));
            }
        }
        cfg.save(dir).unwrap();
        candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
        w
    }

    /// An adapter on q_proj and down_proj with non-zero B.
    fn write_adapter(dir: &Path, cfg: &LlamaConfig, seed: u64) -> LoraAdapter {
        let pc = PeftConfig::new(2, 4.0, vec!["q_proj".into(), "down_proj".into()], "base");
        let mut ad = LoraAdapter::init(pc, cfg, seed).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for l in 0..cfg.num_hidden_layers {
            for m in ["q_proj", "down_proj"] {
                let (o, _) = cfg.module_shape(m).unwrap();
                ad.insert(l, m, LoraPart::B, random(&mut rng, (o, 2)))
                    .unwrap();
            }
        }
        ad.save(dir).unwrap();
        ad
    }

    #[test]
    fn validate_publish_rollback_merge() {
        let tmp = tempfile::tempdir().unwrap();
        let (base, store_dir, out) = (
            tmp.path().join("base"),
            tmp.path().join("store"),
            tmp.path().join("merged"),
        );
        let (a1, a2) = (tmp.path().join("a1"), tmp.path().join("a2"));
        std::fs::create_dir_all(&base).unwrap();
        let cfg = base_config();
        let weights = write_base(&base, &cfg);
        let ad1 = write_adapter(&a1, &cfg, 10);
        let ad2 = write_adapter(&a2, &cfg, 11);
        let id1 = VersionId::parse(&ad1.version_id().unwrap()).unwrap();
        let id2 = VersionId::parse(&ad2.version_id().unwrap()).unwrap();

        leaf_adapter(&["validate", s(&a1), "--base", s(&base)]).unwrap();
        leaf_adapter(&["inspect", s(&a2)]).unwrap();
        let st = s(&store_dir);
        leaf_adapter(&[
            "publish",
            s(&a1),
            "--store",
            st,
            "--base",
            s(&base),
            "--promote",
        ])
        .unwrap();
        let prefix = &id1.as_str()[..8];
        leaf_adapter(&[
            "publish",
            s(&a2),
            "--store",
            st,
            "--promote",
            "--parent",
            prefix,
            "--step",
            "7",
        ])
        .unwrap();
        leaf_adapter(&["list", "--store", st]).unwrap();
        let store = AdapterStore::open(&store_dir).unwrap();
        assert_eq!(store.current().unwrap(), Some(id2.clone()));
        let info = store.info(&id2).unwrap();
        assert_eq!(info.meta.parent, Some(id1.clone()));
        assert_eq!(info.meta.step, Some(7));

        leaf_adapter(&["rollback", "--store", st]).unwrap();
        assert_eq!(store.current().unwrap(), Some(id1.clone()));
        assert!(leaf_adapter(&["rollback", "--store", st]).is_err());
        leaf_adapter(&["promote", &id2.as_str()[..6], "--store", st]).unwrap();
        assert_eq!(store.current().unwrap(), Some(id2.clone()));
        leaf_adapter(&["retain", "0", "--store", st]).unwrap();
        // The rollback target survives retention.
        assert_eq!(store.list().unwrap().len(), 2);
        assert!(leaf_adapter(&["promote", "ffffffff", "--store", st]).is_err());

        let merged_from = store.path(&id2).unwrap();
        leaf_adapter(&[
            "merge",
            s(&merged_from),
            "--base",
            s(&base),
            "--out",
            s(&out),
        ])
        .unwrap();
        let merged =
            candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        let name = "model.layers.1.mlp.down_proj.weight";
        let a = ad2.get(1, "down_proj", LoraPart::A).unwrap();
        let b = ad2.get(1, "down_proj", LoraPart::B).unwrap();
        let want = (&weights[name] + (b.matmul(a).unwrap() * 2.0).unwrap()).unwrap();
        let diff = (&merged[name] - &want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
        assert!(out.join("config.json").is_file());
    }

    #[test]
    fn invalid_adapters_fail_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        let bad = tmp.path().join("bad");
        let store_dir = tmp.path().join("store");
        std::fs::create_dir_all(&base).unwrap();
        let cfg = base_config();
        write_base(&base, &cfg);
        let mut ad = write_adapter(&bad, &cfg, 12);
        // Mis-shaped lora_A (in_features 15 instead of 16) in layer 1.
        let name = tensor_name(1, "q_proj", LoraPart::A);
        ad.tensors.insert(
            name.clone(),
            Tensor::zeros((2, 15), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        ad.save(&bad).unwrap();

        let e = leaf_adapter(&["validate", s(&bad), "--base", s(&base)]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains(&name) && msg.contains("shape"), "{msg}");
        assert!(leaf_adapter(&["inspect", s(&bad)]).is_err());
        let st = s(&store_dir);
        assert!(leaf_adapter(&["publish", s(&bad), "--store", st, "--base", s(&base)]).is_err());
        assert!(
            !store_dir.exists()
                || AdapterStore::open(&store_dir)
                    .unwrap()
                    .list()
                    .unwrap()
                    .is_empty()
        );
        let out = tmp.path().join("out");
        assert!(leaf_adapter(&["merge", s(&bad), "--base", s(&base), "--out", s(&out)]).is_err());
        assert!(!out.join("model.safetensors").exists());

        // Rank over the limit; corrupt weights file.
        let good = tmp.path().join("good");
        write_adapter(&good, &cfg, 13);
        let e = leaf_adapter(&["validate", s(&good), "--base", s(&base), "--max-rank", "1"])
            .unwrap_err();
        assert!(format!("{e:#}").contains("rank 2 exceeds the limit 1"));
        let e = leaf_adapter(&[
            "validate",
            s(&good),
            "--base",
            s(&base),
            "--max-params",
            "10",
        ])
        .unwrap_err();
        assert!(format!("{e:#}").contains("exceed the limit 10"));
        let w = good.join("adapter_model.safetensors");
        let bytes = std::fs::read(&w).unwrap();
        std::fs::write(&w, &bytes[..bytes.len() - 3]).unwrap();
        let e = leaf_adapter(&["inspect", s(&good)]).unwrap_err();
        assert!(format!("{e:#}").contains("not a valid safetensors file"));
    }
}
