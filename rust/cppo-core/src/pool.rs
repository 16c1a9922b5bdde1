//! Rayon thread pools for an explicit thread count (`num_threads`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// A rayon pool with exactly `threads` workers (cached), or the global pool for 0.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    if threads == 0 {
        return f();
    }
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let pool = {
        let mut pools = POOLS.get_or_init(Default::default).lock().unwrap();
        pools
            .entry(threads)
            .or_insert_with(|| {
                Arc::new(
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .expect("rayon pool"),
                )
            })
            .clone()
    };
    pool.install(f)
}
