//! What the guard's two governor limiters share (the rate limit per caller, and the throttle of
//! failed authentication per address): the period of a rate, the pruning that keeps their
//! memory bounded however many distinct callers have called, and the `RateLimit-Policy` and
//! `RateLimit` fields that tell a client its limit ([`LimitPolicy`]).

use std::{
    hash::Hash,
    num::NonZeroU32,
    sync::{Arc, Weak},
    time::Duration,
};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
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

/// `RateLimit-Policy`: the limits a client is held to (draft-ietf-httpapi-ratelimit-headers-10).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`: what is left of a limit now.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// A limit as the IETF's RateLimit fields state it: `RateLimit-Policy: "<name>";q=<burst>;w=<s>`
/// and `RateLimit: "<name>";r=<remaining>;t=<s>`. Our limits are token buckets (one request back
/// every 1/`per_second` s, at most `burst` held), which the draft's quota-per-window describes as
/// `q` = the burst over `w` = the time the whole burst takes to come back, rounded up so that a
/// client pacing itself at q/w never exceeds the rate. `t`, "seconds until additional quota is
/// made available", is the next request's return: under a second for any rate of at least one per
/// second, so 1 while anything is spent, absent while the quota is whole, and the wait (as
/// `Retry-After`) on a refusal.
#[derive(Debug)]
pub struct LimitPolicy {
    name: &'static str,
    quota: u32,
    field: HeaderValue,
}

impl LimitPolicy {
    /// `name`: a few lowercase letters (the buffer each field is written in has room for 32).
    pub fn new(name: &'static str, per_second: u32, burst: u32) -> Self {
        assert!(name.len() <= 32 && name.bytes().all(|b| b.is_ascii_lowercase()));
        let window = burst.div_ceil(per_second.max(1)).max(1);
        let field = HeaderValue::from_str(&format!("\"{name}\";q={burst};w={window}"))
            .expect("a name, digits and separators are a valid header value");
        LimitPolicy {
            name,
            quota: burst,
            field,
        }
    }

    /// The fields of an answer the limit let through, with `remaining` requests left.
    pub fn admitted(&self, headers: &mut HeaderMap, remaining: u32) {
        self.write(headers, remaining, (remaining < self.quota).then_some(1));
    }

    /// The fields of a refusal, which says to retry in `retry_after` seconds.
    pub fn refused(&self, headers: &mut HeaderMap, retry_after: u64) {
        self.write(headers, 0, Some(retry_after));
    }

    fn write(&self, headers: &mut HeaderMap, remaining: u32, reset: Option<u64>) {
        // Written on the stack and copied once into the value: no formatting machinery, one
        // allocation, on every answer.
        let mut field = [0u8; 96];
        let mut len = 0;
        let mut put = |bytes: &[u8]| {
            field[len..len + bytes.len()].copy_from_slice(bytes);
            len += bytes.len();
        };
        put(b"\"");
        put(self.name.as_bytes());
        put(b"\";r=");
        put(itoa::Buffer::new().format(remaining).as_bytes());
        if let Some(t) = reset {
            put(b";t=");
            put(itoa::Buffer::new().format(t).as_bytes());
        }
        headers.insert(RATELIMIT_POLICY, self.field.clone());
        headers.insert(
            RATELIMIT,
            HeaderValue::from_bytes(&field[..len])
                .expect("a name and digits are a valid header value"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fields_state_the_bucket_as_a_quota_over_the_time_it_takes_to_refill() {
        let policy = LimitPolicy::new("caller", 200, 600);
        let mut h = HeaderMap::new();
        policy.admitted(&mut h, 600);
        assert_eq!(h[RATELIMIT_POLICY], r#""caller";q=600;w=3"#);
        assert_eq!(
            h[RATELIMIT], r#""caller";r=600"#,
            "whole: nothing is coming back"
        );
        policy.admitted(&mut h, 17);
        assert_eq!(h[RATELIMIT], r#""caller";r=17;t=1"#);
        policy.refused(&mut h, 4);
        assert_eq!(h[RATELIMIT], r#""caller";r=0;t=4"#);
        // 5 at 2 per second: 2.5 s to refill, stated as 3 so q/w never exceeds the rate.
        let mut h = HeaderMap::new();
        LimitPolicy::new("x", 2, 5).admitted(&mut h, 5);
        assert_eq!(h[RATELIMIT_POLICY], r#""x";q=5;w=3"#);
        LimitPolicy::new("x", 1000, 10).admitted(&mut h, 5);
        assert_eq!(
            h[RATELIMIT_POLICY], r#""x";q=10;w=1"#,
            "never a window of 0"
        );
    }
}
