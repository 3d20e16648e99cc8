//! What the guard's two governor limiters share (the rate limit per caller, and the throttle of
//! failed authentication per address): the period of a rate, and the pruning that keeps their
//! memory bounded however many distinct callers have called.

use std::{
    hash::Hash,
    num::NonZeroU32,
    sync::{Arc, Weak},
    time::Duration,
};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    middleware::{NoOpMiddleware, RateLimitingMiddleware},
    state::keyed::DefaultKeyedStateStore,
};

/// How often idle callers' rate-limit state is dropped, so memory stays bounded however many
/// distinct callers have called.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// How often the number of tracked callers is checked against `RATE_LIMIT_MAX_CLIENTS`.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The interval at which one request's quota comes back.
pub fn period(per_second: u32) -> Duration {
    Duration::from_nanos(1_000_000_000 / u64::from(per_second.max(1)))
}

/// A keyed limiter whose state can be pruned.
pub type Keyed<K, M> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, M>;

/// Forgets callers whose quota is whole again (their state says nothing a fresh one would not):
/// every `PRUNE_EVERY`, and within a second whenever more than `max_clients` are tracked. Callers
/// still being limited are kept, so rotating addresses to fill the table frees nobody from a
/// limit; the table holds at most `max_clients` plus the new callers of one second. Ends when the
/// app (and so the limiter) is dropped.
pub fn spawn_pruner<K, M>(limiter: Weak<Keyed<K, M>>, max_clients: usize)
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    M: RateLimitingMiddleware<<DefaultClock as Clock>::Instant> + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        let mut last_prune = tokio::time::Instant::now();
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(limiter) = limiter.upgrade() else {
                return;
            };
            if prune(&limiter, max_clients, last_prune.elapsed() >= PRUNE_EVERY) {
                last_prune = tokio::time::Instant::now();
            }
        }
    });
}

/// Prunes when `due` or when over `max_clients`; says whether it did.
pub(super) fn prune<K, M>(limiter: &Keyed<K, M>, max_clients: usize, due: bool) -> bool
where
    K: Hash + Eq + Clone,
    M: RateLimitingMiddleware<<DefaultClock as Clock>::Instant>,
{
    let tracked = limiter.len();
    if tracked <= max_clients && !due {
        return false;
    }
    limiter.retain_recent();
    limiter.shrink_to_fit();
    tracing::debug!(
        before = tracked,
        after = limiter.len(),
        "pruned rate-limit state"
    );
    true
}

/// A keyed limiter of `per_second` with bursts of `burst`, pruned in the background.
pub fn keyed<K>(per_second: u32, burst: u32, max_clients: usize) -> Arc<Keyed<K, NoOpMiddleware>>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    let quota = Quota::with_period(period(per_second))
        .expect("the period of a positive rate is not zero")
        .allow_burst(NonZeroU32::new(burst.max(1)).expect("at least 1"));
    let limiter = Arc::new(RateLimiter::keyed(quota));
    spawn_pruner(Arc::downgrade(&limiter), max_clients);
    limiter
}
