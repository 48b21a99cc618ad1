//! kill -9 at each step of publish, promote and rollback, then a restart: the store is valid,
//! its current version is one of the two it could be, and it loads and serves.
//!
//! Each case starts `leaf serve` (the `leaf-test-serve` binary) with `LEAF_FAULT_POINT=<point>`,
//! asks it for the operation over HTTP, checks that it died of SIGKILL at that point, then
//! opens the store again, verifies every version's content hash and starts a server on it.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use leaf_adapters::store::{AdapterStore, VersionId};
use leaf_integration_tests::{random_adapter, start, tiny_model, TinyModel};
use leaf_plugin::harvest::reward::FeedbackOnly;
use leaf_plugin::serving::{ChatRequest, Message, ServerConfig};
use serde_json::json;
use support::{call, ServeProcess};

/// Publish (through `load_lora_adapter`) and the promote that follows it.
const PUBLISH_POINTS: &[&str] = &[
    "publish-before",
    "store-PublishCreateTemp",
    "store-PublishWriteConfig",
    "store-PublishWriteWeights",
    "store-PublishWriteMeta",
    "store-PublishSyncTemp",
    "store-PublishRename",
    "store-PublishSyncVersions",
    "publish-after",
    "swap-loaded",
    "promote-before-record",
    "store-RecordWriteTemp",
    "store-RecordRename",
    "store-RecordSyncRoot",
    "promote-after-record",
    "swap-activated",
];

/// Rollback.
const ROLLBACK_POINTS: &[&str] = &[
    "swap-loaded",
    "rollback-before-record",
    "store-RecordWriteTemp",
    "store-RecordRename",
    "store-RecordSyncRoot",
    "rollback-after-record",
    "swap-activated",
];

/// Runs `op` (method, path, body) on a server armed with `point`; asserts it died of SIGKILL.
fn crash_at(
    m: &TinyModel,
    store_dir: &Path,
    extra: &[&str],
    point: &str,
    op: (&str, &str, String),
) {
    let log = m.tmp.path().join(format!("serve-{point}.log"));
    let mut args = vec!["--store", store_dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut server = ServeProcess::start(&m.dir, &args, &[("LEAF_FAULT_POINT", point)], &log);
    let r = call(server.addr, op.0, op.1, &op.2);
    let status = server
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{point}: the server did not die (the call gave {r:?})"));
    assert_eq!(
        status.signal(),
        Some(9),
        "{point}: expected death by SIGKILL, got {status} (call: {r:?}); log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// After a crash: the store opens, every version verifies, the current one is in `allowed`,
/// and a server started on the store serves it.
async fn check_restart(m: &TinyModel, store_dir: &Path, point: &str, allowed: &[&VersionId]) {
    let store = AdapterStore::open(store_dir).unwrap_or_else(|e| panic!("{point}: open: {e}"));
    for v in store
        .list()
        .unwrap_or_else(|e| panic!("{point}: list: {e}"))
    {
        store
            .get(&v.id)
            .unwrap_or_else(|e| panic!("{point}: version {} is damaged: {e}", v.id));
    }
    let current = store
        .current()
        .unwrap_or_else(|e| panic!("{point}: current: {e}"))
        .unwrap_or_else(|| panic!("{point}: no current version"));
    assert!(
        allowed.contains(&&current),
        "{point}: current {current} is none of {allowed:?}"
    );
    drop(store);
    let mut cfg = ServerConfig::new(&m.dir);
    cfg.store_dir = Some(store_dir.to_path_buf());
    let (server, _rx) = start(cfg, Arc::new(FeedbackOnly))
        .await
        .unwrap_or_else(|e| panic!("{point}: restart: {e}"));
    assert_eq!(server.current_version(), current.as_str(), "{point}");
    let reply = server
        .chat(ChatRequest {
            messages: vec![Message::text("user", "Hello?")],
            max_tokens: Some(4),
            seed: Some(1),
            ..ChatRequest::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{point}: chat after restart: {e}"));
    assert_eq!(reply.adapter_version, current.as_str(), "{point}");
    server.shutdown(Duration::from_secs(5)).await;
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_at_each_publish_and_promote_step_leaves_a_valid_store() -> anyhow::Result<()> {
    let m = tiny_model(21)?;
    let template = m.tmp.path().join("template-store");
    let store = AdapterStore::open(&template)?;
    let a = store.publish(&random_adapter(&m.config, 1, 0.05)?, Default::default())?;
    store.promote(&a)?;
    drop(store);
    let root = m.tmp.path().join("adapters");
    let c_dir = root.join("c");
    let c = random_adapter(&m.config, 3, 0.05)?;
    c.save(&c_dir)?;
    let c_id = VersionId::parse(&c.version_id()?)?;
    let root_arg = root.to_str().unwrap().to_string();
    for (i, point) in PUBLISH_POINTS.iter().enumerate() {
        let store_dir = m.tmp.path().join(format!("store-p{i}"));
        copy_dir(&template, &store_dir);
        let body = json!({"lora_name": "c", "lora_path": c_dir}).to_string();
        crash_at(
            &m,
            &store_dir,
            &["--adapter-root", &root_arg],
            point,
            ("POST", "/v1/load_lora_adapter", body),
        );
        check_restart(&m, &store_dir, point, &[&a, &c_id]).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_at_each_rollback_step_leaves_a_valid_store() -> anyhow::Result<()> {
    let m = tiny_model(22)?;
    let template = m.tmp.path().join("template-store");
    let store = AdapterStore::open(&template)?;
    let a = store.publish(&random_adapter(&m.config, 1, 0.05)?, Default::default())?;
    let b = store.publish(&random_adapter(&m.config, 2, 0.05)?, Default::default())?;
    store.promote(&a)?;
    store.promote(&b)?;
    drop(store);
    for (i, point) in ROLLBACK_POINTS.iter().enumerate() {
        let store_dir = m.tmp.path().join(format!("store-r{i}"));
        copy_dir(&template, &store_dir);
        crash_at(
            &m,
            &store_dir,
            &[],
            point,
            ("POST", "/v1/adapters/rollback", String::new()),
        );
        check_restart(&m, &store_dir, point, &[&a, &b]).await;
    }
    Ok(())
}
