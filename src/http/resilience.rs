//! The protective layers in front of the data routes (`/todos…`): rate limit, admission control
//! and a request timeout. Probes and docs are deliberately outside them,
//! so an operator can always see whether the service is alive and why it refuses work.
//!
//! From the outside in (see [`layer`]):
//! 1. **Rate limit** (tower_governor, per client IP): the cheapest refusal, so a runaway client is
//!    stopped before any work is done for it and never takes a place in the queue. 429 with
//!    `Retry-After`.
//! 2. **Admission** ([`super::admission`]): at most `MAX_IN_FLIGHT` requests are worked on; the
//!    next ones wait their turn for at most `MAX_QUEUE_WAIT`, and what cannot start within that
//!    is refused with 503 + a jittered `Retry-After`.
//! 3. **Request timeout** (tower-http): inside admission, so a request that times out frees its
//!    slot; answered 504 (turned into a problem by `error::ensure_problem`).
//!
//! The circuit breaker is not a layer here: it sits in `db`, around the database itself, where it
//! sees exactly the failures that mean "database unavailable" and nothing else.

use std::{net::IpAddr, sync::Arc, time::Duration};

use axum::{
    body::Body,
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
    key_extractor::{KeyExtractor, PeerIpKeyExtractor, SmartIpKeyExtractor},
};
use tower_http::timeout::TimeoutLayer;

use super::{
    admission::{self, AdmissionLayer},
    code::Code,
    error::ApiError,
};
use crate::config::{Config, RateLimit};

/// How often idle clients' rate-limit state is dropped, so memory stays bounded however many
/// distinct IPs have called.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The layers described in the module doc (tower's `Stack` names them innermost first).
pub type Protect = Stack<
    TimeoutLayer,
    Stack<
        AdmissionLayer,
        Stack<Either<RateLimitLayer, Identity>, Identity>,
    >,
>;

type RateLimitLayer = GovernorLayer<ClientIp, StateInformationMiddleware, Body>;

/// The layers for the data routes, to sit innermost in the router's one layer stack (see
/// `http::router`).
///
/// The rate limiter sits outside admission, so a refused client is answered before it can take a
/// place in the queue or a slot (admission takes its slot when called, never in `poll_ready`).
/// Anything stateful shares its state across the router's per-route clones: admission one gate,
/// the governor one limiter.
pub fn layer(config: &Config) -> Protect {
    ServiceBuilder::new()
        .option_layer(config.rate_limit.map(rate_limit_layer))
        .layer(AdmissionLayer::new(admission::Limits {
            max_in_flight: config.max_in_flight,
            max_queue_wait: config.max_queue_wait,
        }))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            config.request_timeout,
        ))
        .into_inner()
}

/// The rate-limit key: the TCP peer, or the forwarded client address when configured to trust it.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp {
    trust_forwarded_for: bool,
}

impl KeyExtractor for ClientIp {
    type Key = IpAddr;

    fn extract<T>(&self, req: &Request<T>) -> Result<IpAddr, GovernorError> {
        if self.trust_forwarded_for {
            SmartIpKeyExtractor.extract(req)
        } else {
            PeerIpKeyExtractor.extract(req)
        }
    }
}

type Governor = GovernorConfig<ClientIp, StateInformationMiddleware>;

fn rate_limit_layer(limit: RateLimit) -> RateLimitLayer {
    let config: Arc<Governor> = Arc::new(
        GovernorConfigBuilder::default()
            .period(Duration::from_nanos(
                1_000_000_000 / u64::from(limit.per_second),
            ))
            .burst_size(limit.burst)
            .key_extractor(ClientIp {
                trust_forwarded_for: limit.trust_forwarded_for,
            })
            .use_headers()
            .finish()
            .expect("per_second and burst are validated non-zero"),
    );
    spawn_pruner(Arc::downgrade(&config));
    GovernorLayer::new(config).error_handler(rate_limit_response)
}

/// Drops idle clients' state periodically; ends when the app (and so the config) is dropped.
fn spawn_pruner(config: std::sync::Weak<Governor>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PRUNE_EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(config) = config.upgrade() else {
                return;
            };
            let limiter = config.limiter();
            limiter.retain_recent();
            limiter.shrink_to_fit();
            tracing::debug!(clients = limiter.len(), "pruned rate-limit state");
        }
    });
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
