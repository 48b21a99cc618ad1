//! Fault points for crash tests: `LEAF_FAULT_POINT=<name>` (or `<name>@<n>`, the n-th time the
//! point is reached) makes the process kill itself with `SIGKILL` at that point, as `kill -9`
//! would, so that a test can restart it and check what a crash there leaves behind.
//!
//! The names: the swap's own steps (`swap-loaded`, `swap-activated`), the version operations'
//! steps around the store (`publish-before`, `publish-after`, `promote-before-record`,
//! `promote-after-record`, `rollback-before-record`, `rollback-after-record`) and every step of
//! the store itself, as `store-` and the [`FailPoint`]'s name (`store-PublishRename`,
//! `store-RecordRename`, ...; the online trainer's publishes and promotes go through them too).
//! Unset, a fault point costs one atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use leaf_adapters::store::{AdapterStore, FailPoint, Fault};

/// The environment variable naming the fault point.
pub const FAULT_POINT_ENV: &str = "LEAF_FAULT_POINT";

struct Armed {
    name: String,
    nth: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(FAULT_POINT_ENV).ok()?;
            let (name, nth) = match spec.split_once('@') {
                Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            Some(Armed {
                name,
                nth: nth.max(1),
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Kills the process (`SIGKILL`) if `name` is the armed fault point (see the module docs).
pub fn fault_point(name: &str) {
    let Some(a) = armed() else { return };
    if a.name != name || a.seen.fetch_add(1, Ordering::SeqCst) + 1 != a.nth {
        return;
    }
    eprintln!("leaf: fault point {name} reached: killing the process");
    // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL cannot be caught; should delivery be delayed, do not run on.
    std::process::abort();
}

/// Arms the store's steps as fault points `store-<FailPoint>` when a fault point is set.
pub(super) fn arm_store(store: &mut AdapterStore) {
    if armed().is_some_and(|a| a.name.starts_with("store-")) {
        store.set_fault_hook(Some(Arc::new(|p: FailPoint| -> Option<Fault> {
            fault_point(&format!("store-{p:?}"));
            None
        })));
    }
}
