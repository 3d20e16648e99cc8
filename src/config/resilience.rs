//! The protective layers' settings: the per-client rate limit, the in-flight limit, the request
//! timeout and the database's circuit breaker.

use std::time::Duration;

use super::{
    Var,
    env::{ConfigError, Env, invalid},
};

pub const VARS: &[Var] = &[
    Var {
        name: "RATE_LIMIT_PER_SECOND",
        default: Some("200"),
        help: "Requests per second each client IP may sustain on /todos (0 disables the limit). \
               /health, /ready and the docs are never limited.",
    },
    Var {
        name: "RATE_LIMIT_BURST",
        default: Some("600"),
        help: "Requests a client may send at once before the per-second rate applies; the default \
               lets five 120-request spikes from one client through back to back.",
    },
    Var {
        name: "RATE_LIMIT_TRUST_FORWARDED_FOR",
        default: Some("false"),
        help: "true: key the rate limit on X-Forwarded-For / X-Real-IP / Forwarded (only behind a \
               proxy that sets them). false: key on the TCP peer address.",
    },
    Var {
        name: "MAX_IN_FLIGHT",
        default: None,
        help: "Requests to /todos worked on at once; the next ones wait their turn (see \
               MAX_QUEUE_WAIT). Default: 4 × DB_POOL_MAX_SIZE.",
    },
    Var {
        name: "MAX_QUEUE_WAIT",
        default: Some("500ms"),
        help: "Longest a /todos request waits for one of the MAX_IN_FLIGHT slots (0-60s). One \
               that cannot start within it gets 503 overloaded with a jittered Retry-After, at \
               once when the queue is already too long to start in time; 0 refuses whenever \
               every slot is busy.",
    },
    Var {
        name: "REQUEST_TIMEOUT",
        default: Some("10s"),
        help: "Longest a /todos request may take, body included, before it is answered 504.",
    },
    Var {
        name: "BREAKER_FAILURE_THRESHOLD",
        default: Some("5"),
        help: "Consecutive database-unavailable failures that open the circuit breaker.",
    },
    Var {
        name: "BREAKER_OPEN_DURATION",
        default: Some("2s"),
        help: "How long the breaker stays open (503 without touching the database) before probing.",
    },
    Var {
        name: "BREAKER_HALF_OPEN_PROBES",
        default: Some("1"),
        help: "Requests let through at once to probe the database after the open period.",
    },
];

/// Per-client rate limit; `None` in [`super::Config::rate_limit`] when disabled.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
    pub trust_forwarded_for: bool,
}

/// Circuit breaker settings (`BREAKER_*`); the breaker itself is `db::breaker`.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub open_for: Duration,
    pub half_open_probes: u32,
}

/// The layers' settings, moved into [`super::Config`]'s fields.
pub(super) struct Resilience {
    pub rate_limit: Option<RateLimit>,
    pub max_in_flight: usize,
    pub max_queue_wait: Duration,
    pub request_timeout: Duration,
    pub breaker: BreakerConfig,
}

/// `pool_max_size` sets `MAX_IN_FLIGHT`'s default.
pub(super) fn parse(env: &Env<'_>, pool_max_size: usize) -> Result<Resilience, ConfigError> {
    let per_second = env.bounded("RATE_LIMIT_PER_SECOND", 0, 1_000_000)? as u32;
    let rate_limit = (per_second > 0)
        .then(|| -> Result<RateLimit, ConfigError> {
            Ok(RateLimit {
                per_second,
                burst: env.bounded("RATE_LIMIT_BURST", 1, 1_000_000)? as u32,
                trust_forwarded_for: env.boolean("RATE_LIMIT_TRUST_FORWARDED_FOR")?,
            })
        })
        .transpose()?;
    let max_in_flight = match env.optional("MAX_IN_FLIGHT") {
        Some(_) => env.bounded("MAX_IN_FLIGHT", 1, 1_000_000)?,
        None => pool_max_size * 4,
    };
    let max_queue_wait = env.duration("MAX_QUEUE_WAIT")?;
    if max_queue_wait > Duration::from_secs(60) {
        return Err(invalid(
            "MAX_QUEUE_WAIT",
            format!("{max_queue_wait:?}"),
            "a duration from 0 to 60s, such as 500ms",
        ));
    }
    let request_timeout = env.duration("REQUEST_TIMEOUT")?;
    if request_timeout.is_zero() {
        return Err(invalid(
            "REQUEST_TIMEOUT",
            "\"0\"".into(),
            "a positive duration such as 10s",
        ));
    }
    let breaker = BreakerConfig {
        failure_threshold: env.bounded("BREAKER_FAILURE_THRESHOLD", 1, 10_000)? as u32,
        open_for: env.duration("BREAKER_OPEN_DURATION")?,
        half_open_probes: env.bounded("BREAKER_HALF_OPEN_PROBES", 1, 1000)? as u32,
    };
    Ok(Resilience {
        rate_limit,
        max_in_flight,
        max_queue_wait,
        request_timeout,
        breaker,
    })
}
