//! The protective layers in front of the data routes (`/todos…`): rate limit, admission control
//! and a request timeout. Probes and docs are deliberately outside them,
//! so an operator can always see whether the service is alive and why it refuses work.
//!
//! From the outside in (see [`layer`]):
//! 1. **Rate limit** (tower_governor, per client IP): the cheapest refusal, so a runaway client is
//!    stopped before any work is done for it and never takes a place in the queue. 429 with
//!    `Retry-After`.
//! 2. **Body read** ([`super::read_body`]): the whole body, under `HTTP_BODY_READ_TIMEOUT` and
//!    `MAX_BODY_BYTES`, before the request may take a slot: slow senders hold a connection, not
//!    a slot. 408 / 413.
//! 3. **Admission** ([`super::admission`]): at most `MAX_IN_FLIGHT` requests are worked on; the
//!    next ones wait their turn for at most `MAX_QUEUE_WAIT`, and what cannot start within that
//!    is refused with 503 + a jittered `Retry-After`.
//! 4. **Request timeout** (tower-http): inside admission, so a request that times out frees its
//!    slot; answered 504 (turned into a problem by `error::ensure_problem`).
//!
//! The circuit breaker is not a layer here: it sits in `db`, around the database itself, where it
//! sees exactly the failures that mean "database unavailable" and nothing else.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use axum::{
    body::Body,
    extract::ConnectInfo,
    http::{Request, Response, StatusCode, header},
    response::IntoResponse,
};
use governor::middleware::StateInformationMiddleware;
use tower::{
    ServiceBuilder,
    layer::util::{Identity, Stack},
    util::Either,
};
use tower_governor::{
    GovernorError, GovernorLayer,
    governor::{GovernorConfig, GovernorConfigBuilder},
    key_extractor::KeyExtractor,
};
use tower_http::timeout::TimeoutLayer;

use super::{
    admission::{self, AdmissionLayer, EarlyRefusalLayer},
    client_ip::ClientAddr,
    code::Code,
    error::ApiError,
    read_body::{self, ReadBodyLayer},
};
use crate::config::{Config, RateLimit};

/// How often idle clients' rate-limit state is dropped, so memory stays bounded however many
/// distinct IPs have called.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// How often the number of tracked clients is checked against `RATE_LIMIT_MAX_CLIENTS`.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The layers described in the module doc (tower's `Stack` names them innermost first).
pub type Protect = Stack<
    TimeoutLayer,
    Stack<AdmissionLayer, Stack<ReadBodyLayer, Stack<Either<RateLimitLayer, Identity>, Identity>>>,
>;

type RateLimitLayer = GovernorLayer<ClientKey, StateInformationMiddleware, Body>;

/// The layers for the data routes, to sit innermost in the router's one layer stack (see
/// `http::router`).
///
/// The rate limiter sits outside admission, so a refused client is answered before it can take a
/// place in the queue or a slot (admission takes its slot when called, never in `poll_ready`).
/// Anything stateful shares its state across the router's per-route clones: admission one gate,
/// the governor one limiter.
///
/// Also returns admission's early refusal, for the router to place in front of its costlier
/// layers (see [`super::admission::EarlyRefusal`]).
pub fn layer(config: &Config) -> (EarlyRefusalLayer, Protect) {
    let admission = AdmissionLayer::new(admission::Limits {
        max_in_flight: config.max_in_flight,
        max_queue_wait: config.max_queue_wait,
    });
    let early = admission.early();
    let protect = ServiceBuilder::new()
        .option_layer(config.rate_limit.clone().map(rate_limit_layer))
        .layer(ReadBodyLayer(read_body::Limits {
            max_bytes: config.max_body_bytes,
            deadline: config.body_read_timeout,
        }))
        .layer(admission)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            config.request_timeout,
        ))
        .into_inner();
    (early, protect)
}

/// The rate-limit key: the client's address as [`ClientAddr`] finds it (the TCP peer, or behind
/// `TRUSTED_PROXIES` the rightmost untrusted `X-Forwarded-For` entry), IPv6 cut to its prefix.
#[derive(Debug, Clone)]
pub struct ClientKey(ClientAddr);

impl KeyExtractor for ClientKey {
    type Key = IpAddr;

    fn extract<T>(&self, req: &Request<T>) -> Result<IpAddr, GovernorError> {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .ok_or(GovernorError::UnableToExtractKey)?
            .0
            .ip();
        Ok(self.0.key(self.0.client(peer, req.headers())))
    }
}

type Governor = GovernorConfig<ClientKey, StateInformationMiddleware>;

fn rate_limit_layer(limit: RateLimit) -> RateLimitLayer {
    let config = governor(&limit);
    spawn_pruner(Arc::downgrade(&config), limit.max_clients);
    GovernorLayer::new(config).error_handler(rate_limit_response)
}

fn governor(limit: &RateLimit) -> Arc<Governor> {
    Arc::new(
        GovernorConfigBuilder::default()
            .period(Duration::from_nanos(
                1_000_000_000 / u64::from(limit.per_second),
            ))
            .burst_size(limit.burst)
            .key_extractor(ClientKey(ClientAddr::new(
                &limit.trusted_proxies,
                limit.ipv6_prefix,
            )))
            .use_headers()
            .finish()
            .expect("per_second and burst are validated non-zero"),
    )
}

/// Forgets clients whose quota is whole again (their state says nothing a fresh one would not):
/// every `PRUNE_EVERY`, and within a second whenever more than `max_clients` are tracked. Clients
/// still being limited are kept, so rotating addresses to fill the table frees nobody from a
/// limit; the table holds at most `max_clients` plus the new clients of one second. Ends when the
/// app (and so the config) is dropped.
fn spawn_pruner(config: std::sync::Weak<Governor>, max_clients: usize) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        let mut last_prune = tokio::time::Instant::now();
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(config) = config.upgrade() else {
                return;
            };
            if prune(&config, max_clients, last_prune.elapsed() >= PRUNE_EVERY) {
                last_prune = tokio::time::Instant::now();
            }
        }
    });
}

/// Prunes when `due` or when over `max_clients`; says whether it did.
fn prune(config: &Governor, max_clients: usize, due: bool) -> bool {
    let limiter = config.limiter();
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

fn rate_limit_response(err: GovernorError) -> Response<Body> {
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
    use super::*;

    #[test]
    fn over_the_bound_clients_with_a_whole_quota_are_forgotten_and_limited_ones_kept() {
        // A request every 100 ms, bursts of 50.
        let config = governor(&RateLimit {
            per_second: 10,
            burst: 50,
            trusted_proxies: Vec::new(),
            ipv6_prefix: 64,
            max_clients: 1000,
        });
        let limiter = config.limiter();
        let limited: IpAddr = "192.0.2.1".parse().unwrap();
        while limiter.check_key(&limited).is_ok() {}
        for i in 0..5000u32 {
            let _ = limiter.check_key(&IpAddr::V4((0x0a00_0000 + i).into()));
        }
        assert_eq!(limiter.len(), 5001);
        assert!(
            !prune(&config, 10_000, false),
            "under the bound and not due"
        );
        // The one-shot clients' quotas are whole again 100 ms after their request; the limited
        // client's is 5 s away.
        std::thread::sleep(Duration::from_millis(300));
        assert!(prune(&config, 1000, false));
        assert_eq!(limiter.len(), 1, "only the limited client is remembered");
        // Remembered, so it has only the few requests 300 ms refilled, not a fresh burst of 50.
        let mut admitted = 0;
        while limiter.check_key(&limited).is_ok() {
            admitted += 1;
        }
        assert!(
            admitted < 10,
            "a forgotten client would get 50; got {admitted}"
        );
    }

    #[test]
    fn retry_after_is_never_zero_and_keeps_the_rate_limit_headers() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("x-ratelimit-limit", "200".parse().unwrap());
        headers.insert(header::RETRY_AFTER, "0".parse().unwrap());
        let res = rate_limit_response(GovernorError::TooManyRequests {
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
