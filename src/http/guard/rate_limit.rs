//! Per-caller rate limits (tower_governor over governor), and what a caller reads of them: the
//! 429, and the `RateLimit-Policy` and `RateLimit` fields on every answer the limiter saw.
//!
//! The key is the caller ([`CallerKey`]): the token's `sub` when the request is authenticated (two
//! people behind one address have their own limits), else the client's address. The
//! authentication layer runs first and leaves the caller in the request's extensions; the
//! limiter's memory is bounded as the `limiter` module says.
//!
//! tower_governor writes the legacy `x-ratelimit-limit` and `x-ratelimit-remaining` (and
//! `x-ratelimit-after` on a 429); they are kept, for clients written against them. The standard
//! fields are derived from them by [`standard_fields`], which the front layer applies on the way
//! out with the headers it adds anyway: a layer of its own here would move the future of every
//! layer beneath once more (loadtest/archive.md#clones-boxes-moves).

use std::sync::Arc;

use axum::{
    body::Body,
    http::{HeaderName, Response, StatusCode, header},
    response::IntoResponse,
};
use governor::middleware::StateInformationMiddleware;
use tower_governor::{
    GovernorError, GovernorLayer,
    governor::{GovernorConfig, GovernorConfigBuilder},
};

use super::{
    caller::CallerKey,
    limiter::{LimitPolicy, period, spawn_pruner},
};
use crate::config::RateLimit;
use crate::http::problem::{ApiError, code::Code};

/// The rate limiter of the data routes.
pub type RateLimitLayer = GovernorLayer<CallerKey, StateInformationMiddleware, Body>;

type Governor = GovernorConfig<CallerKey, StateInformationMiddleware>;

/// The limiter, its state pruned in the background (see [`spawn_pruner`]), and the policy its
/// answers state.
pub fn layer(
    limit: RateLimit,
    key: CallerKey,
    max_clients: usize,
) -> (RateLimitLayer, LimitPolicy) {
    let config = governor(limit, key);
    let limiter = Arc::downgrade(config.limiter());
    spawn_pruner(limiter, max_clients);
    (
        GovernorLayer::new(config).error_handler(response),
        LimitPolicy::new("caller", limit.per_second, limit.burst),
    )
}

/// The standard fields of an answer, from what tower_governor wrote on it: the count left on one
/// it let through, the wait on its 429. An answer it did not count (the key could not be read; a
/// refusal before it, such as authentication's, which states its own policy) is left alone.
pub fn standard_fields(policy: &LimitPolicy, res: &mut Response<Body>) {
    let status = res.status();
    let headers = res.headers_mut();
    let number =
        |name: &HeaderName| -> Option<u64> { headers.get(name)?.to_str().ok()?.parse().ok() };
    let Some(left) = number(&X_RATELIMIT_REMAINING) else {
        return;
    };
    if status == StatusCode::TOO_MANY_REQUESTS {
        if let Some(wait) = number(&header::RETRY_AFTER) {
            policy.refused(headers, wait);
        }
    } else {
        policy.admitted(headers, u32::try_from(left).unwrap_or(u32::MAX));
    }
}

// A name, not a string: looked up by a string, the name would be parsed on every answer.
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");

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

    use std::{net::IpAddr, time::Duration};

    use super::*;
    use crate::http::guard::{caller::Key, client_ip::ClientAddr, limiter::prune};

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
