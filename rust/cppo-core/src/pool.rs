//! Rayon thread pools for a thread count (`num_threads`): built fallibly, cached with a
//! bound, and joined when dropped.
//!
//! - `threads == 0` (all cores) uses one default pool (`RAYON_NUM_THREADS` or one
//!   thread per core), kept for the life of the process. It is not rayon's global pool,
//!   whose failed start would panic in every later call.
//! - Other counts: at most [`MAX_CACHED_POOLS`] pools holding at most
//!   [`max_cached_threads`] threads in all stay cached, least recently used evicted
//!   first; a pool larger than that bound is built for its call and dropped after it.
//! - A pool's threads are spawned here and joined when the last user of the pool drops
//!   it, so an evicted or uncached pool leaves no threads behind.
//! - Thread creation failing (limits on threads or address space) is a [`PoolError`],
//!   never a panic, and the cache's lock is never held while building or dropping a
//!   pool (a poisoned lock is recovered: the cache stays consistent at every point).

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// Most pools with an explicit thread count kept at once.
pub const MAX_CACHED_POOLS: usize = 4;

/// The number of threads the machine can run at once (1 when unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Most threads kept in cached pools with an explicit thread count, in all:
/// `max(4 * cores, 16)`.
pub fn max_cached_threads() -> usize {
    (4 * cores()).max(16)
}

/// Starting the threads of a pool failed.
#[derive(Debug)]
pub struct PoolError {
    /// The requested count; 0 for the default pool.
    pub threads: usize,
    source: rayon::ThreadPoolBuildError,
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.threads {
            0 => format!(
                "the default thread pool (num_threads=None: RAYON_NUM_THREADS threads if set, \
                 else one per core, {} here)",
                cores()
            ),
            n => format!("{n} threads (num_threads={n})"),
        };
        write!(
            f,
            "could not start {what}: {}; lower num_threads, or raise the process's limits \
             on threads or memory (ulimit -u, ulimit -v)",
            self.source
        )
    }
}

impl std::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A rayon pool and the handles of its threads, joined on drop.
struct Pool {
    pool: Option<rayon::ThreadPool>,
    handles: Vec<JoinHandle<()>>,
}

impl Pool {
    fn build(threads: usize) -> Result<Pool, PoolError> {
        let handles = Arc::new(Mutex::new(Vec::new()));
        let spawned = Arc::clone(&handles);
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("cppo-{i}"))
            .spawn_handler(move |thread| {
                let mut b = std::thread::Builder::new();
                if let Some(name) = thread.name() {
                    b = b.name(name.to_owned());
                }
                if let Some(size) = thread.stack_size() {
                    b = b.stack_size(size);
                }
                let handle = b.spawn(|| thread.run())?;
                lock(&spawned).push(handle);
                Ok(())
            })
            .build();
        let handles = std::mem::take(&mut *lock(&handles));
        match built {
            Ok(pool) => Ok(Pool {
                pool: Some(pool),
                handles,
            }),
            Err(source) => {
                // rayon has told the threads it did start to stop: wait for them.
                join_all(handles);
                Err(PoolError { threads, source })
            }
        }
    }

    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool
            .as_ref()
            .expect("pool present until dropped")
            .install(f)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        drop(self.pool.take()); // tells the idle threads to exit
        join_all(std::mem::take(&mut self.handles));
    }
}

fn join_all(handles: Vec<JoinHandle<()>>) {
    let me = std::thread::current().id();
    for h in handles {
        if h.thread().id() != me {
            let _ = h.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Cache {
    default: Option<Arc<Pool>>,
    /// Pools with an explicit count, least recently used first.
    pools: Vec<(usize, Arc<Pool>)>,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    default: None,
    pools: Vec::new(),
});

impl Cache {
    fn find(&mut self, threads: usize) -> Option<Arc<Pool>> {
        if threads == 0 {
            return self.default.clone();
        }
        let i = self.pools.iter().position(|(n, _)| *n == threads)?;
        let entry = self.pools.remove(i);
        let pool = Arc::clone(&entry.1);
        self.pools.push(entry); // now the most recently used
        Some(pool)
    }

    /// Caches `built` if it fits (evicting into `dropped`); returns the pool to use.
    fn insert(
        &mut self,
        threads: usize,
        built: Arc<Pool>,
        dropped: &mut Vec<Arc<Pool>>,
    ) -> Arc<Pool> {
        if let Some(existing) = self.find(threads) {
            dropped.push(built); // a concurrent call cached one first
            return existing;
        }
        if threads == 0 {
            self.default = Some(Arc::clone(&built));
            return built;
        }
        let limit = max_cached_threads();
        if threads > limit {
            return built;
        }
        let mut total: usize = self.pools.iter().map(|(n, _)| n).sum();
        while !self.pools.is_empty()
            && (self.pools.len() >= MAX_CACHED_POOLS || total + threads > limit)
        {
            let (n, pool) = self.pools.remove(0);
            total -= n;
            dropped.push(pool);
        }
        self.pools.push((threads, Arc::clone(&built)));
        built
    }
}

fn pool_for(threads: usize) -> Result<Arc<Pool>, PoolError> {
    if let Some(pool) = lock(&CACHE).find(threads) {
        return Ok(pool);
    }
    let built = Arc::new(Pool::build(threads)?);
    let mut dropped = Vec::new();
    let pool = lock(&CACHE).insert(threads, built, &mut dropped);
    drop(dropped); // joins evicted pools' threads, outside the lock
    Ok(pool)
}

/// Runs `f` on a rayon pool with exactly `threads` workers, or on the default pool
/// (one thread per core) for 0; see the module doc for caching.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> Result<R, PoolError> {
    let pool = pool_for(threads)?;
    Ok(pool.install(f))
}

/// Calls `f` on the calling thread with the pool of `threads` workers (0: the default
/// pool), found or started as for [`with_threads`]: `f` decides what runs where (e.g.
/// `in_place_scope`, with the caller working too).
pub fn with_pool<R>(
    threads: usize,
    f: impl FnOnce(&rayon::ThreadPool) -> R,
) -> Result<R, PoolError> {
    let pool = pool_for(threads)?;
    Ok(f(pool.pool.as_ref().expect("pool present until dropped")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_the_requested_number_of_threads() {
        assert_eq!(with_threads(3, rayon::current_num_threads).unwrap(), 3);
        assert_eq!(with_threads(0, rayon::current_num_threads).unwrap(), {
            rayon::ThreadPoolBuilder::new()
                .build()
                .unwrap()
                .current_num_threads()
        });
    }

    #[test]
    fn the_cache_stays_bounded() {
        let limit = max_cached_threads();
        for n in [limit + 5, 1, 2, 3, 5, 7, limit, limit - 1, 2] {
            assert_eq!(with_threads(n, rayon::current_num_threads).unwrap(), n);
            let cache = lock(&CACHE);
            assert!(cache.pools.len() <= MAX_CACHED_POOLS);
            assert!(cache.pools.iter().map(|(n, _)| n).sum::<usize>() <= limit);
            assert!(cache.pools.iter().all(|(k, _)| *k != limit + 5));
        }
    }

    #[test]
    fn a_dropped_pool_joins_its_threads() {
        let pool = Pool::build(4).unwrap();
        assert_eq!(pool.handles.len(), 4);
        let counted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = Arc::clone(&counted);
        pool.install(|| {
            rayon::broadcast(|_| c.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        });
        assert_eq!(counted.load(std::sync::atomic::Ordering::SeqCst), 4);
        drop(pool); // returns only once the 4 threads have exited
    }
}
