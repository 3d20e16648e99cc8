//! Per-caller rate limits (tower_governor over governor): whom a request is counted against, how
//! the limiters' memory stays bounded, and the 429 a refused caller reads.
//!
//! The key is the caller: the token's `sub` when the request is authenticated (two people behind
//! one address have their own limits), else the client's address as [`ClientAddr`] finds it. The
//! authentication layer runs first and leaves the caller in the request's extensions.

use std::{
    hash::Hash,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Weak},
    time::Duration,
};

use axum::{
    body::Body,
    extract::ConnectInfo,
    http::{Request, Response, header},
    response::IntoResponse,
};
use governor::{
    RateLimiter,
    clock::{Clock, DefaultClock},
    middleware::{RateLimitingMiddleware, StateInformationMiddleware},
    state::keyed::DefaultKeyedStateStore,
};
use tower_governor::{
    GovernorError, GovernorLayer,
    governor::{GovernorConfig, GovernorConfigBuilder},
    key_extractor::KeyExtractor,
};

use super::{authenticate::Caller, client_ip::ClientAddr};
use crate::config::RateLimit;
use crate::http::problem::{ApiError, code::Code};

/// How often idle callers' rate-limit state is dropped, so memory stays bounded however many
/// distinct callers have called.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// How often the number of tracked callers is checked against `RATE_LIMIT_MAX_CLIENTS`.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The rate limiter of the data routes.
pub type RateLimitLayer = GovernorLayer<CallerKey, StateInformationMiddleware, Body>;

/// Whom a request counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// An unauthenticated caller, by address (IPv6 by prefix).
    Addr(IpAddr),
    /// An authenticated caller, by the token's `sub`.
    Sub(Arc<str>),
}

/// Extracts the [`Key`]: the authenticated caller's `sub`, else the client's address.
#[derive(Debug, Clone)]
pub struct CallerKey(pub ClientAddr);

impl CallerKey {
    /// The client's address as a key, from the TCP peer and (behind trusted proxies)
    /// `X-Forwarded-For`.
    pub fn addr<T>(&self, req: &Request<T>) -> Option<IpAddr> {
        let peer = req.extensions().get::<ConnectInfo<SocketAddr>>()?.0.ip();
        Some(self.0.key(self.0.client(peer, req.headers())))
    }
}

impl KeyExtractor for CallerKey {
    type Key = Key;

    fn extract<T>(&self, req: &Request<T>) -> Result<Key, GovernorError> {
        if let Some(Caller::Principal(p)) = req.extensions().get::<Caller>() {
            return Ok(Key::Sub(p.sub.clone()));
        }
        self.addr(req)
            .map(Key::Addr)
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

type Governor = GovernorConfig<CallerKey, StateInformationMiddleware>;

/// The limiter, its state pruned in the background (see [`spawn_pruner`]).
pub fn layer(limit: RateLimit, key: CallerKey, max_clients: usize) -> RateLimitLayer {
    let config = governor(limit, key);
    let limiter = Arc::downgrade(config.limiter());
    spawn_pruner(limiter, max_clients);
    GovernorLayer::new(config).error_handler(response)
}

fn governor(limit: RateLimit, key: CallerKey) -> Arc<Governor> {
    Arc::new(
        GovernorConfigBuilder::default()
            .period(period(limit.per_second))
            .burst_size(limit.burst)
            .key_extractor(key)
            .use_headers()
            .finish()
            .expect("per_second and burst are validated non-zero"),
    )
}

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
fn prune<K, M>(limiter: &Keyed<K, M>, max_clients: usize, due: bool) -> bool
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

fn response(err: GovernorError) -> Response<Body> {
    match err {
        GovernorError::TooManyRequests { wait_time, headers } => {
            // Counted (metrics, spans) and logged at debug only, in the request's "response" line
            // (`rejected_by`): a line each at a default level would let one abusive client flood
            // the logs.
            // governor reports whole seconds rounded down (0 for a wait under a second); one more
            // second is always enough, so a client that honours Retry-After is admitted.
            let mut res = ApiError::rate_limited(wait_time + 1).into_response();
            for (name, value) in headers.iter().flatten() {
                if name != header::RETRY_AFTER {
                    res.headers_mut().insert(name.clone(), value.clone());
                }
            }
            res
        }
        GovernorError::UnableToExtractKey => {
            ApiError::internal(&GovernorError::UnableToExtractKey).into_response()
        }
        GovernorError::Other { code, msg, headers } => {
            let mut res = ApiError::new(
                code,
                Code::for_status(code.as_u16()),
                "Rate limiter error",
                msg.unwrap_or_default(),
            )
            .into_response();
            if let Some(h) = headers {
                res.headers_mut().extend(h);
            }
            res
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    #[test]
    fn over_the_bound_callers_with_a_whole_quota_are_forgotten_and_limited_ones_kept() {
        // A request every 100 ms, bursts of 50.
        let config = governor(
            RateLimit {
                per_second: 10,
                burst: 50,
            },
            CallerKey(ClientAddr::new(&[], 64)),
        );
        let limiter = config.limiter();
        let limited = Key::Sub("alice".into());
        while limiter.check_key(&limited).is_ok() {}
        for i in 0..5000u32 {
            let _ = limiter.check_key(&Key::Addr(IpAddr::V4((0x0a00_0000 + i).into())));
        }
        assert_eq!(limiter.len(), 5001);
        assert!(
            !prune(limiter, 10_000, false),
            "under the bound and not due"
        );
        // The one-shot callers' quotas are whole again 100 ms after their request; the limited
        // caller's is 5 s away.
        std::thread::sleep(Duration::from_millis(300));
        assert!(prune(limiter, 1000, false));
        assert_eq!(limiter.len(), 1, "only the limited caller is remembered");
        // Remembered, so it has only the few requests 300 ms refilled, not a fresh burst of 50.
        let mut admitted = 0;
        while limiter.check_key(&limited).is_ok() {
            admitted += 1;
        }
        assert!(
            admitted < 10,
            "a forgotten caller would get 50; got {admitted}"
        );
    }

    #[test]
    fn retry_after_is_never_zero_and_keeps_the_rate_limit_headers() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("x-ratelimit-limit", "200".parse().unwrap());
        headers.insert(header::RETRY_AFTER, "0".parse().unwrap());
        let res = response(GovernorError::TooManyRequests {
            wait_time: 0,
            headers: Some(headers),
        });
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()[header::RETRY_AFTER], "1");
        assert_eq!(res.headers()["x-ratelimit-limit"], "200");
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }
}
