//! The protective layers' settings: the per-client rate limit, the in-flight limit, the request
//! timeout and the database's circuit breaker.

use std::{net::IpAddr, time::Duration};

use ipnet::IpNet;

use super::{
    Var,
    env::{ConfigError, Env, invalid},
};

pub const VARS: &[Var] = &[
    Var {
        name: "RATE_LIMIT_PER_SECOND",
        default: Some("200"),
        help: "Requests per second each caller may sustain on /todos (0 disables the limit): \
               each token's sub with AUTH_MODE=jwt, each client address otherwise. /health, \
               /ready and the docs are never limited.",
    },
    Var {
        name: "RATE_LIMIT_BURST",
        default: Some("600"),
        help: "Requests a client may send at once before the per-second rate applies; the default \
               lets five 120-request spikes from one client through back to back.",
    },
    Var {
        name: "TRUSTED_PROXIES",
        default: None,
        help: "Comma-separated addresses or CIDR blocks of the proxies in front of the service, \
               e.g. 10.0.0.0/8,::1. When the TCP peer is one of them, the client (the rate-limit \
               key) is the rightmost X-Forwarded-For address that is not; Forwarded and X-Real-IP \
               are ignored. Unset: the TCP peer is the client and X-Forwarded-For is ignored.",
    },
    Var {
        name: "RATE_LIMIT_IPV6_PREFIX",
        default: Some("64"),
        help: "IPv6 clients share a rate limit per network of this prefix length (32-128): a host \
               usually holds a whole /64 and could pick a new address per request.",
    },
    Var {
        name: "RATE_LIMIT_MAX_CLIENTS",
        default: Some("100000"),
        help: "Clients whose rate-limit state is kept (1000-10000000). Above it, every client \
               whose quota is whole again is forgotten within a second; clients still being \
               limited are kept, so flooding the table frees nobody from their limit.",
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
        help: "Longest a /todos request may be worked on once admitted (its body is already read, \
               see HTTP_BODY_READ_TIMEOUT) before it is answered 504.",
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

/// Per-caller rate limit; `None` in [`super::Config::rate_limit`] when disabled.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// Who the client is, and how many clients' limits are remembered: shared by every per-client
/// limit (the rate limit, the unauthenticated one).
#[derive(Debug, Clone)]
pub struct Clients {
    /// `TRUSTED_PROXIES`; empty when unset.
    pub trusted_proxies: Vec<IpNet>,
    pub ipv6_prefix: u8,
    pub max_clients: usize,
}

/// Settings that no longer exist, and what replaced them: naming them in an error beats
/// ignoring them, which would silently change who the service takes for the client.
const REMOVED: &[(&str, &str)] = &[(
    "RATE_LIMIT_TRUST_FORWARDED_FOR",
    "unset; replaced by TRUSTED_PROXIES, the list of the proxies' addresses (CIDR)",
)];

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
    pub clients: Clients,
    pub max_in_flight: usize,
    pub max_queue_wait: Duration,
    pub request_timeout: Duration,
    pub breaker: BreakerConfig,
}

/// `pool_max_size` sets `MAX_IN_FLIGHT`'s default.
pub(super) fn parse(env: &Env<'_>, pool_max_size: usize) -> Result<Resilience, ConfigError> {
    for (name, instead) in REMOVED {
        if let Some(value) = (env.lookup)(name) {
            return Err(invalid(name, format!("{value:?}"), instead));
        }
    }
    let per_second = env.bounded("RATE_LIMIT_PER_SECOND", 0, 1_000_000)? as u32;
    let burst = env.bounded("RATE_LIMIT_BURST", 1, 1_000_000)? as u32;
    let rate_limit = (per_second > 0).then_some(RateLimit { per_second, burst });
    let clients = Clients {
        trusted_proxies: trusted_proxies(env)?,
        ipv6_prefix: env.bounded("RATE_LIMIT_IPV6_PREFIX", 32, 128)? as u8,
        max_clients: env.bounded("RATE_LIMIT_MAX_CLIENTS", 1000, 10_000_000)?,
    };
    let max_in_flight = match env.optional("MAX_IN_FLIGHT") {
        Some(_) => env.bounded("MAX_IN_FLIGHT", 1, 1_000_000)?,
        None => pool_max_size * 4,
    };
    let max_queue_wait = env.duration_within(
        "MAX_QUEUE_WAIT",
        Duration::ZERO..=Duration::from_secs(60),
        "a duration from 0 to 60s, such as 500ms",
    )?;
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
        clients,
        max_in_flight,
        max_queue_wait,
        request_timeout,
        breaker,
    })
}

/// `TRUSTED_PROXIES`: addresses (a host) or CIDR blocks, comma-separated.
fn trusted_proxies(env: &Env<'_>) -> Result<Vec<IpNet>, ConfigError> {
    const EXPECTED: &str = "comma-separated addresses or CIDR blocks, e.g. 10.0.0.0/8,::1";
    let Some(raw) = env.optional("TRUSTED_PROXIES") else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| invalid("TRUSTED_PROXIES", format!("{s:?}"), EXPECTED))
        })
        .collect()
}
