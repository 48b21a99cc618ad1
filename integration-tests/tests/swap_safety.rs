//! Swaps are cancellation-safe: a caller that goes away mid-swap does not stop it, serving
//! and the store's `current` agree afterwards, and a rollback is possible past the swap limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use leaf_integration_tests::{start, store_with_adapters, tiny_model};
use leaf_plugin::harvest::reward::FeedbackOnly;
use leaf_plugin::serving::ServeError;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_whose_caller_goes_away_runs_to_completion() -> anyhow::Result<()> {
    let m = tiny_model(31)?;
    let (store, ids, cfg) = store_with_adapters(&m, &[1, 2], 0.05, true)?;
    let (a, b) = (ids[0].clone(), ids[1].clone());
    let (server, _rx) = start(cfg, Arc::new(FeedbackOnly)).await?;
    assert_eq!(server.current_version(), a.as_str());
    for (round, target) in [&b, &a, &b, &a].into_iter().enumerate() {
        let engines = server.status().leaked_threads;
        let s = server.clone();
        let t = target.to_string();
        let call = tokio::spawn(async move { s.promote(&t).await });
        // Wait until the swap is half-way (its new engine was added: loaded, not yet
        // probed, recorded or activated), then drop the caller, as a client disconnect does.
        let t0 = Instant::now();
        while server.status().leaked_threads == engines {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "round {round}: no engine added"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        call.abort();
        assert!(call.await.is_err_and(|e| e.is_cancelled()), "round {round}");
        // The next version operation waits for the swap lock, so it runs after the orphaned
        // swap finished: promoting the same version again must find it served already.
        let again = server.promote(target.as_str()).await?;
        assert_eq!(
            again.load_ms, 0.0,
            "round {round}: the aborted swap did not complete"
        );
        assert_eq!(server.current_version(), target.as_str(), "round {round}");
        assert_eq!(store.current()?.as_ref(), Some(target), "round {round}");
        assert_eq!(
            server
                .mistral()
                .list_models()
                .map_err(anyhow::Error::msg)?
                .len(),
            1,
            "round {round}: an engine leaked"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_works_past_the_swap_limit_and_every_engine_counts() -> anyhow::Result<()> {
    let m = tiny_model(32)?;
    let (store, ids, mut cfg) = store_with_adapters(&m, &[1, 2], 0.05, true)?;
    let (a, b) = (ids[0].clone(), ids[1].clone());
    cfg.max_swaps = 1;
    let (server, _rx) = start(cfg, Arc::new(FeedbackOnly)).await?;
    server.promote(b.as_str()).await?;
    assert_eq!(server.status().leaked_threads, 2);
    let refused = server.promote(a.as_str()).await;
    assert!(
        matches!(refused, Err(ServeError::SwapLimit(1))),
        "{refused:?}"
    );
    assert_eq!(server.current_version(), b.as_str());
    // Rolling back is always possible.
    let report = server.rollback().await?;
    assert_eq!(report.to_version, a.as_str());
    assert_eq!(server.current_version(), a.as_str());
    assert_eq!(store.current()?.as_ref(), Some(&a));
    assert_eq!(server.status().leaked_threads, 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_the_base_model_against_the_store_is_refused() -> anyhow::Result<()> {
    let m = tiny_model(33)?;
    let (_store, ids, cfg) = store_with_adapters(&m, &[1], 0.05, true)?;
    let a = ids[0].clone();
    let (server, _rx) = start(cfg, Arc::new(FeedbackOnly)).await?;
    let e = server.activate_base().await.unwrap_err();
    assert!(e.to_string().contains(a.as_str()), "{e}");
    assert_eq!(server.current_version(), a.as_str());
    Ok(())
}
