//! Runnable programs that use leaf; see `src/bin/`.
