//! The serving plugin against a real in-process mistral.rs engine on the tiny model.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor, D};
use leaf_adapters::model::{Batch, Pass};
use leaf_adapters::store::AdapterStore;
use leaf_integration_tests::{
    ask, next_group, random_adapter, start, store_with_adapters, tiny_model, tiny_model_sized,
    trainer_model, weight_bytes, BareRequest, TinyModel,
};
use leaf_plugin::device::ComputeDevice;
use leaf_plugin::harvest::reward::FeedbackOnly;
use leaf_plugin::harvest::{
    AssemblerConfig, PrivacyMode, ReferenceReward, SampleOrigin, SamplingTap, SealedGroup,
    TapConfig,
};
use leaf_plugin::online::{GroupReceipt, SourcedGroup};
use leaf_plugin::reward::{Metric, RewardOptions};
use leaf_plugin::serving::{GroupPolicy, LeafServer, ServeError, ServerConfig};
use mistralrs_core::{CustomLogitsProcessor, Request, RequestMessage, Response, SamplingParams};

/// Log-softmax of `row / t`, then the top-p nucleus renormalised, by a full sort (an
/// implementation independent of the tap's).
fn reference_logprob(row: &[f32], t: f64, top_p: f64, id: usize) -> f64 {
    let z: Vec<f64> = row.iter().map(|&l| l as f64 / t).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    let p: Vec<f64> = z.iter().map(|v| (v - lse).exp()).collect();
    if top_p >= 1.0 {
        return z[id] - lse;
    }
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let mut cum = 0.0;
    let mut mass = 0.0;
    let mut inside = false;
    for i in order {
        if cum >= top_p {
            break;
        }
        cum += p[i];
        mass += p[i];
        inside |= i == id;
    }
    assert!(inside, "token {id} outside the nucleus");
    z[id] - lse - mass.ln()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_logprobs_equal_teacher_forced_logprobs() -> anyhow::Result<()> {
    let m = tiny_model(1)?;
    let adapter = random_adapter(&m.config, 11, 0.3)?;
    let store_dir = m.tmp.path().join("store");
    let store = AdapterStore::open(&store_dir)?;
    let id = store.publish(&adapter, Default::default())?;
    store.promote(&id)?;
    let mut cfg = ServerConfig::new(&m.dir);
    cfg.store_dir = Some(store_dir);
    let (server, _rx) = start(cfg, Arc::new(FeedbackOnly)).await?;
    assert_eq!(server.current_version(), id.to_string());
    let model = trainer_model(&m.dir, Some(&adapter))?;
    let base = trainer_model(&m.dir, None)?;

    for (t, top_p, seed) in [(1.0, 1.0, 3u64), (0.7, 0.8, 4), (1.3, 0.95, 5)] {
        let mut req = ask("Say seven.", 12, seed);
        req.temperature = Some(t);
        req.top_p = Some(top_p);
        req.logprobs = true;
        let reply = server.chat(req).await?;
        assert_eq!(reply.adapter_version, id.to_string());
        let n = reply.response.usage.completion_tokens;
        assert_eq!(reply.completion_ids.len(), n);
        assert_eq!(reply.logprobs.len(), n);
        assert!(n >= 1);
        assert_eq!(reply.prompt_ids.len(), reply.response.usage.prompt_tokens);
        // The prompt ids are the template's ids for this chat.
        let want_prompt = m.tokenizer.chat_ids(
            &[leaf_plugin::speech::ChatMessage::text("user", "Say seven.")],
            true,
        )?;
        assert_eq!(reply.prompt_ids, want_prompt);
        // Client-visible log-probs are the tap's natural logs.
        let content = reply.response.choices[0]
            .logprobs
            .as_ref()
            .and_then(|l| l.content.clone())
            .expect("logprobs were requested");
        for (c, lp) in content.iter().zip(&reply.logprobs) {
            assert!((c.logprob as f64 - lp).abs() < 1e-5);
        }
        // Teacher forcing through the trainer's model, same weights.
        let batch = Batch::new(&[(&reply.prompt_ids, &reply.completion_ids)], &Device::Cpu)?;
        if t == 1.0 && top_p == 1.0 {
            let lp: Vec<f32> = model.logprobs(&batch, true)?.flatten_all()?.to_vec1()?;
            for (i, (a, b)) in reply.logprobs.iter().zip(&lp).enumerate() {
                assert!(
                    (a - *b as f64).abs() < 1e-4,
                    "token {i}: tap {a} vs trainer {b}"
                );
            }
            // And the adapter matters: the base model gives different numbers.
            let lb: Vec<f32> = base.logprobs(&batch, false)?.flatten_all()?.to_vec1()?;
            let diff: f64 = lb.iter().zip(&lp).map(|(a, b)| (a - b).abs() as f64).sum();
            assert!(diff > 1e-3, "the adapter changed nothing ({diff})");
        }
        // Any temperature / top-p: the trainer's logits through an independent nucleus.
        let mut ids = reply.prompt_ids.clone();
        ids.extend(&reply.completion_ids);
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward(&input, &Pass::POLICY)?.squeeze(0)?;
        let p0 = reply.prompt_ids.len();
        for (i, &tok) in reply.completion_ids.iter().enumerate() {
            let row: Vec<f32> = logits.get(p0 + i - 1)?.to_vec1()?;
            let want = reference_logprob(&row, t, top_p, tok as usize);
            let got = reply.logprobs[i];
            assert!(
                (got - want).abs() < 1e-4,
                "t={t} top_p={top_p} token {i}: tap {got} vs reference {want}"
            );
        }
        let _ = logits.dim(D::Minus1)?;
    }
    Ok(())
}

/// Records every call's context and logits; returns the logits unchanged.
#[derive(Default)]
struct Observer(Mutex<Vec<(Vec<u32>, Vec<f32>)>>);

impl CustomLogitsProcessor for Observer {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        let v: Vec<f32> = logits.to_vec1()?;
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((context.to_vec(), v));
        Ok(logits.clone())
    }
}

async fn send_raw(
    server: &leaf_plugin::serving::LeafServer,
    prompt: Vec<u32>,
    params: SamplingParams,
    processor: Arc<dyn CustomLogitsProcessor>,
    return_logprobs: bool,
) -> anyhow::Result<mistralrs_core::CompletionResponse> {
    let engine = server.status().engine_id;
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let req = BareRequest {
        messages: RequestMessage::CompletionTokens(prompt),
        params,
        processors: Some(vec![processor]),
        return_logprobs,
        model_id: Some(engine.clone()),
    }
    .build(server.mistral().next_request_id(), tx);
    server
        .mistral()
        .get_sender(Some(&engine))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .send(Request::Normal(Box::new(req)))
        .await?;
    // Read to the end of the channel (never drop the receiver early).
    let mut done = None;
    while let Some(r) = rx.recv().await {
        if let Response::CompletionDone(c) = r {
            done.get_or_insert(c);
        }
    }
    done.ok_or_else(|| anyhow::anyhow!("no final response"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_logprobs_equal_engine_log10_times_ln10() -> anyhow::Result<()> {
    let m = tiny_model(2)?;
    let (server, _rx) = start(ServerConfig::new(&m.dir), Arc::new(FeedbackOnly)).await?;
    let prompt = m.tokenizer.chat_ids(
        &[leaf_plugin::speech::ChatMessage::text("user", "Count.")],
        true,
    )?;
    let mut compared = 0;
    for t in [1.0f64, 0.6] {
        // 1. The engine samples by itself (no tap), top-p 1, with its own log-probs.
        let observer = Arc::new(Observer::default());
        let mut params = SamplingParams::neutral();
        params.temperature = Some(t);
        params.top_p = Some(1.0);
        params.max_len = Some(10);
        let resp = send_raw(&server, prompt.clone(), params, observer.clone(), true).await?;
        let engine_lp: Vec<f64> = resp.choices[0]
            .logprobs
            .as_ref()
            .and_then(|l| l.content.as_ref())
            .expect("engine logprobs")
            .iter()
            .map(|e| e.logprob as f64 * std::f64::consts::LN_10)
            .collect();
        // The engine's ids: each call's context extends the previous one by the chosen id.
        let calls = observer.0.lock().unwrap().clone();
        let last = &calls.last().expect("calls").0;
        let ids: Vec<u32> = last[prompt.len()..].to_vec();
        assert!(ids.len() >= 3, "too few tokens to compare: {}", ids.len());
        // 2. The tap replays exactly those ids through the engine with the same temperature.
        let tap = Arc::new(
            SamplingTap::new(TapConfig {
                temperature: t,
                top_p: 1.0,
                top_logprobs: 0,
                stop_token: m.tokenizer.ids().eos,
                seed: 0,
                forced: ids.clone(),
            })
            .map_err(anyhow::Error::msg)?,
        );
        let mut params = SamplingParams::neutral();
        params.temperature = Some(0.0);
        params.max_len = Some(ids.len());
        let r2 = send_raw(&server, prompt.clone(), params, tap.clone(), false).await?;
        let rec = tap.take_record(r2.usage.completion_tokens);
        assert_eq!(rec.tokens, ids);
        for (i, (a, b)) in rec.logprobs.iter().zip(&engine_lp).enumerate() {
            assert!(
                (a - b).abs() < 1e-4,
                "t={t} token {i}: tap {a} vs engine {b}"
            );
            compared += 1;
        }
    }
    assert!(compared >= 6);
    Ok(())
}

/// A server on `m` that forks every client request into a group (`assembler`), rewarded by
/// chrF against the request's reference.
async fn forking_server(
    m: &TinyModel,
    assembler: AssemblerConfig,
) -> anyhow::Result<(Arc<LeafServer>, crossbeam_channel::Receiver<SealedGroup>)> {
    let mut cfg = ServerConfig::new(&m.dir);
    cfg.assembler = assembler;
    cfg.group_policy = GroupPolicy {
        fork_fraction: 1.0,
        ..GroupPolicy::default()
    };
    let reward = Arc::new(ReferenceReward::new(Metric::Chrf, RewardOptions::default()));
    start(cfg, reward).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_samples_make_one_group_of_k() -> anyhow::Result<()> {
    let m = tiny_model(3)?;
    let (server, rx) = forking_server(
        &m,
        AssemblerConfig {
            group_size: 4,
            ..AssemblerConfig::default()
        },
    )
    .await?;
    let mut req = ask("Repeat: three.", 8, 9);
    req.reference = Some("three".into());
    let reply = server.chat(req).await?;
    let group = next_group(&rx, 60).await.expect("a sealed group");
    assert_eq!(group.members.len(), 4);
    assert!(!group.partial);
    let keys: std::collections::BTreeSet<&str> = group
        .members
        .iter()
        .map(|m| m.0.prompt_key.as_str())
        .collect();
    assert_eq!(keys.len(), 1);
    let users: Vec<_> = group
        .members
        .iter()
        .filter(|m| m.0.origin == SampleOrigin::User)
        .collect();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].0.request_id, reply.request_id);
    for (s, r) in &group.members {
        assert_eq!(s.prompt_ids, reply.prompt_ids);
        assert_eq!(
            s.reference_ids, None,
            "only harvested for reference guidance"
        );
        assert_eq!(s.completion_ids.len(), s.logprobs.len());
        assert!((0.0..=1.0).contains(r));
        assert_eq!(s.adapter_version, "base");
    }
    // The last fork's counter moves just after its sample sealed the group.
    let mut st = server.status();
    for _ in 0..200 {
        if st.forks_usable >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        st = server.status();
    }
    assert_eq!(st.forks_fired, 1);
    assert_eq!(st.forks_usable, 3);
    assert_eq!(st.groups_sealed, 1);

    // Identical prompts arriving together coalesce (no forks), then feedback completes them.
    let mut cfg = ServerConfig::new(&m.dir);
    cfg.assembler = AssemblerConfig {
        group_size: 3,
        ..AssemblerConfig::default()
    };
    let (server, rx) = start(cfg, Arc::new(FeedbackOnly)).await?;
    let mut handles = Vec::new();
    for s in 0..3 {
        let server = server.clone();
        handles.push(tokio::spawn(async move {
            server.chat(ask("Same prompt.", 6, 100 + s)).await
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        ids.push(h.await??.request_id);
    }
    // Let the harvest tasks run, then give feedback.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (i, id) in ids.iter().enumerate() {
        server.feedback(id, i as f64 / 2.0)?;
    }
    let unknown = server.feedback("no-such-request", 1.0);
    assert!(matches!(
        unknown,
        Err(ServeError::Harvest(
            leaf_plugin::harvest::HarvestError::UnknownRequest { .. }
        ))
    ));
    let group = next_group(&rx, 30).await.expect("a coalesced group");
    assert_eq!(group.members.len(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_are_harvested_as_answer_ids_for_guidance_even_ids_only() -> anyhow::Result<()> {
    let m = tiny_model(3)?;
    let (server, rx) = forking_server(
        &m,
        AssemblerConfig {
            group_size: 2,
            reference_ids: true,
            privacy: PrivacyMode::IdsOnly,
            ..AssemblerConfig::default()
        },
    )
    .await?;
    let mut req = ask("Repeat: three.", 8, 9);
    req.reference = Some("three four".into());
    server.chat(req).await?;
    let group = next_group(&rx, 60).await.expect("a sealed group");
    let want = server.model().chat_format().answer_ids("three four")?;
    assert!(server.model().stop_ids().contains(want.last().unwrap()));
    for (s, _) in &group.members {
        assert_eq!(s.reference, None, "ids-only keeps no text");
        assert_eq!(s.reference_ids.as_deref(), Some(want.as_slice()));
    }
    let sourced = SourcedGroup::from_sealed(&group, GroupReceipt::none());
    assert_eq!(sourced.reference_ids, Some(want));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_concurrent_requests_fails_none() -> anyhow::Result<()> {
    let m = tiny_model(4)?;
    let (store, ids, mut cfg) = store_with_adapters(&m, &[21], 0.2, false)?;
    let v1 = ids[0].clone();
    // Many requests in flight on the old engine at once: what the drain must handle.
    cfg.engine_admission = leaf_plugin::serving::EngineAdmission::Concurrent;
    let (server, _rx) = start(cfg, Arc::new(FeedbackOnly)).await?;
    assert_eq!(server.current_version(), "base");
    let mut handles = Vec::new();
    for i in 0..24u64 {
        let server = server.clone();
        handles.push(tokio::spawn(async move {
            // Half start before the swap, half around it.
            tokio::time::sleep(Duration::from_millis((i / 12) * 40 + i)).await;
            server.chat(ask("Keep talking.", 150, i)).await
        }));
    }
    // Swap while requests are in flight on the old engine.
    for _ in 0..500 {
        if server.status().inflight >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let report = server.promote(v1.as_str()).await?;
    assert!(
        report.drained_requests >= 1,
        "nothing was in flight: {report:?}"
    );
    assert_eq!(report.from_version, "base");
    assert_eq!(report.to_version, v1.to_string());
    let mut versions = std::collections::BTreeMap::new();
    for h in handles {
        let reply = h.await?.expect("no request may fail across a swap");
        assert!(reply.response.usage.completion_tokens >= 1);
        *versions.entry(reply.adapter_version).or_insert(0) += 1;
    }
    // Requests after the swap report the new version.
    let after = server.chat(ask("After.", 4, 99)).await?;
    assert_eq!(after.adapter_version, v1.to_string());
    assert_eq!(store.current()?, Some(v1.clone()));
    let models = server.mistral().list_models().map_err(anyhow::Error::msg)?;
    assert_eq!(models, vec![report.engine_id.clone()]);
    eprintln!("swap {report:?}; served per version {versions:?}");
    // Roll back to the base... the store has no previous version, so rollback is refused and
    // nothing changes.
    assert!(server.rollback().await.is_err());
    assert_eq!(server.current_version(), v1.to_string());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_adapter_is_refused_and_old_version_keeps_serving() -> anyhow::Result<()> {
    let m = tiny_model(5)?;
    let (store, ids, cfg) = store_with_adapters(&m, &[31], 0.2, true)?;
    let good = ids[0].clone();
    let (server, _rx) = start(cfg, Arc::new(FeedbackOnly)).await?;
    assert_eq!(server.current_version(), good.to_string());

    // (a) Truncated weights.
    let bad = m.tmp.path().join("bad-truncated");
    random_adapter(&m.config, 32, 0.2)?.save(&bad)?;
    let w = bad.join("adapter_model.safetensors");
    let bytes = std::fs::read(&w)?;
    std::fs::write(&w, &bytes[..bytes.len() / 2])?;
    assert!(server.load_adapter_dir(&bad).await.is_err());
    // (b) Wrong rank for the shapes it claims.
    let bad2 = m.tmp.path().join("bad-shape");
    let mut a = random_adapter(&m.config, 33, 0.2)?;
    a.config.r = 8;
    a.save(&bad2)?;
    assert!(server.load_adapter_dir(&bad2).await.is_err());
    // (c) Non-finite values.
    let bad3 = m.tmp.path().join("bad-nan");
    let mut a = random_adapter(&m.config, 34, 0.2)?;
    let name = a
        .tensors
        .keys()
        .find(|n| n.contains("lora_B"))
        .cloned()
        .unwrap();
    let shape = a.tensors[&name].dims().to_vec();
    let n: usize = shape.iter().product();
    a.tensors.insert(
        name,
        Tensor::from_vec(vec![f32::NAN; n], shape, &Device::Cpu)?,
    );
    a.save(&bad3)?;
    assert!(server.load_adapter_dir(&bad3).await.is_err());
    // (d) A stored version whose bytes were altered after publishing.
    let other = store.publish(&random_adapter(&m.config, 35, 0.2)?, Default::default())?;
    let wpath = store.path(&other)?.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&wpath)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&wpath, bytes)?;
    assert!(server.promote(other.as_str()).await.is_err());
    // (e) An unknown version.
    assert!(server.promote("deadbeef").await.is_err());

    // The good version still serves, and the store still points at it.
    assert_eq!(server.current_version(), good.to_string());
    let reply = server.chat(ask("Still there?", 6, 1)).await?;
    assert_eq!(reply.adapter_version, good.to_string());
    assert_eq!(store.current()?, Some(good));
    assert_eq!(server.status().swaps, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_cancels_without_disturbing_others() -> anyhow::Result<()> {
    let m = tiny_model(6)?;
    let (server, _rx) = start(ServerConfig::new(&m.dir), Arc::new(FeedbackOnly)).await?;
    let neighbour = {
        let server = server.clone();
        tokio::spawn(async move { server.chat(ask("Neighbour.", 40, 1)).await })
    };
    // A client that gives up after 30 ms on a long answer.
    let gone = tokio::time::timeout(
        Duration::from_millis(30),
        server.chat(ask("Long answer.", 400, 2)),
    )
    .await;
    assert!(gone.is_err(), "the long request should still be running");
    let n = neighbour.await??;
    assert!(n.response.usage.completion_tokens >= 1);
    // The engine is healthy: the next request works.
    let r = server.chat(ask("Next.", 4, 3)).await?;
    assert!(r.response.usage.completion_tokens >= 1);
    // Wait for the cancelled request to end (forced stop token), well before 400 tokens.
    for _ in 0..200 {
        if server.status().inflight == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let st = server.status();
    assert_eq!(st.inflight, 0);
    assert_eq!(st.requests_cancelled, 1);
    Ok(())
}

fn rss_mib() -> f64 {
    leaf_integration_tests::rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_engines_free_their_memory_over_many_swaps() -> anyhow::Result<()> {
    // Wider than the other tests so a retained engine would show in the RSS.
    let m = tiny_model_sized(7, 256, 1024)?;
    let model_mib = weight_bytes(&m.config) as f64 / (1 << 20) as f64;
    let (_store, ids, cfg) = store_with_adapters(&m, &[41, 42], 0.2, false)?;
    let (a, b) = (ids[0].clone(), ids[1].clone());
    let (server, _rx) = start(cfg, Arc::new(FeedbackOnly)).await?;
    let threads0 = leaf_integration_tests::thread_count().unwrap_or(0);
    // Warm up (first swaps allocate caches that stay).
    for v in [&a, &b] {
        server.promote(v.as_str()).await?;
        server.chat(ask("Warm.", 4, 0)).await?;
    }
    let rss0 = rss_mib();
    let swaps = 20;
    let mut last = None;
    for i in 0..swaps {
        let v = if i % 2 == 0 { &a } else { &b };
        last = Some(server.promote(v.as_str()).await?);
        server.chat(ask("Check.", 4, i)).await?;
    }
    let rss1 = rss_mib();
    let threads1 = leaf_integration_tests::thread_count().unwrap_or(0);
    let st = server.status();
    eprintln!(
        "RSS {rss0:.1} MiB -> {rss1:.1} MiB over {swaps} swaps; threads {threads0} -> {threads1}; \
         leaked logger threads {}; last swap {:?}",
        st.leaked_threads, last
    );
    assert_eq!(
        server
            .mistral()
            .list_models()
            .map_err(anyhow::Error::msg)?
            .len(),
        1
    );
    assert_eq!(st.leaked_threads, st.swaps + 1);
    // Each engine holds the merged weights (model_mib); if retired engines were kept, RSS
    // would grow by at least swaps * model_mib. Require well under a quarter of that.
    let bound = 0.25 * swaps as f64 * model_mib;
    eprintln!("weights {model_mib:.2} MiB per engine; growth bound {bound:.1} MiB");
    assert!(
        rss1 - rss0 < bound,
        "RSS grew by {:.1} MiB (bound {bound:.1})",
        rss1 - rss0
    );
    Ok(())
}

/// `ServerConfig::device`: the CPU serves; a device this build has no back-end for is refused
/// at start, by name and before the model is read; on a build with the back-end and a device
/// present, the model serves there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_its_device_and_refuses_one_this_build_lacks() -> anyhow::Result<()> {
    let m = tiny_model(5)?;
    let mut cfg = ServerConfig::new(&m.dir);
    cfg.device = "cpu".parse()?;
    let (server, _rx) = start(cfg, Arc::new(FeedbackOnly)).await?;
    let cpu = server.chat(ask("Say one.", 4, 1)).await?;
    assert!(!cpu.completion_ids.is_empty());
    server.shutdown(Duration::from_secs(5)).await;

    for device in [ComputeDevice::Cuda(0), ComputeDevice::Metal(0)] {
        let mut cfg = ServerConfig::new(&m.dir);
        cfg.device = device;
        if !device.is_compiled() {
            // Refused before the model is read: even a directory that is no model gives the
            // device error.
            cfg.model_dir = m.tmp.path().join("no-such-model");
            let err = LeafServer::start(cfg, Arc::new(FeedbackOnly))
                .await
                .expect_err("a device without its back-end is refused");
            let msg = err.to_string();
            let feature = device.feature().unwrap_or_default();
            assert!(matches!(err, ServeError::Config(_)), "{msg}");
            assert!(msg.contains(&device.to_string()), "{msg}");
            assert!(
                msg.contains(&format!("--features leaf-plugin/{feature}")),
                "{msg}"
            );
            continue;
        }
        if device.open().is_err() {
            // Built with the back-end, but this machine has no such device.
            let err = LeafServer::start(cfg, Arc::new(FeedbackOnly))
                .await
                .expect_err("a missing device is refused");
            assert!(err.to_string().contains("cannot open"), "{err}");
            continue;
        }
        let (server, _rx) = start(cfg, Arc::new(FeedbackOnly)).await?;
        let reply = server.chat(ask("Say one.", 4, 1)).await?;
        assert!(!reply.completion_ids.is_empty());
        assert!(reply.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
        server.shutdown(Duration::from_secs(5)).await;
    }
    Ok(())
}
