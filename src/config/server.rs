//! The HTTP server's settings: where it listens, the links it writes, what it accepts, and how
//! it shuts down.

use std::{net::SocketAddr, time::Duration};

use axum::http::HeaderValue;
use url::Url;

use super::{
    Var,
    env::{ConfigError, Env, invalid},
};

pub const VARS: &[Var] = &[
    Var {
        name: "LISTEN_ADDR",
        default: Some("127.0.0.1:8080"),
        help: "Address and port the HTTP server binds, as IP:PORT (port 0 picks a free one). \
               The default serves this machine only; 0.0.0.0:8080 serves every interface (then \
               set AUTH_MODE).",
    },
    Var {
        name: "ADMIN_LISTEN_ADDR",
        default: Some("127.0.0.1:9091"),
        help: "Address of the operators' listener, as IP:PORT, or `off`: its /ready shows the \
               pinned database address, DNS lookups, the pool, the breaker's counters and the \
               driver's errors, which the public /ready does not. It has no authentication: an \
               address other machines can reach needs ADMIN_ALLOW_NETWORK=true.",
    },
    Var {
        name: "ADMIN_ALLOW_NETWORK",
        default: Some("false"),
        help: "true allows ADMIN_LISTEN_ADDR on an address other machines can reach (the admin \
               listener then warns at startup and in doctor: anyone who reaches it reads the \
               service's internals). false: such an address is a startup error.",
    },
    Var {
        name: "PUBLIC_BASE_URL",
        default: None,
        help: "Absolute base URL used in each todo's `url` and in Location/Link headers, e.g. \
               https://todos.example.com. Unset: built from the request's Host header when \
               ALLOWED_HOSTS allows it, else from LISTEN_ADDR.",
    },
    Var {
        name: "ALLOWED_HOSTS",
        default: Some("localhost,127.0.0.1,[::1]"),
        help: "When PUBLIC_BASE_URL is unset: the Host headers links may be built from, \
               comma-separated `host` (any port) or `host:port`, or `*` for any plain \
               host[:port]. Another Host is served, but its links use LISTEN_ADDR: a client \
               cannot make the service hand out links to a host the operator did not name.",
    },
    Var {
        name: "IDEMPOTENCY_KEY_TTL",
        default: Some("24h"),
        help: "How long an Idempotency-Key on POST /todos is remembered; a retry within it \
               returns the original 201 instead of creating a second todo.",
    },
    Var {
        name: "MAX_BODY_BYTES",
        default: Some("65536"),
        help: "Largest accepted request body in bytes; larger bodies get 413.",
    },
    Var {
        name: "CORS_ALLOWED_ORIGINS",
        default: Some("*"),
        help: "`*` or a comma-separated list of origins allowed by CORS, e.g. \
               https://a.example,https://b.example.",
    },
    Var {
        name: "HTTP_HEADER_READ_TIMEOUT",
        default: Some("10s"),
        help: "A connection must send a whole request head (request line and headers) within \
               this, or it is closed: slow-header clients cannot hold connections (1s to 5m). \
               It is also the idle keep-alive timeout: the timer restarts when a response is sent.",
    },
    Var {
        name: "HTTP_BODY_READ_TIMEOUT",
        default: Some("10s"),
        help: "A /todos request's whole body must arrive within this, or the client gets 408 and \
               the connection is closed (1s to 5m). The body is read before the request takes \
               one of the MAX_IN_FLIGHT slots, so slow senders cannot hold them.",
    },
    Var {
        name: "MAX_CONNECTIONS",
        default: Some("10000"),
        help: "Open client connections at most; more wait in the kernel's listen backlog. Keep it \
               below the process's open-files limit (ulimit -n) so accepting never fails \
               (100 to 1000000).",
    },
    Var {
        name: "SHUTDOWN_READINESS_DELAY",
        default: Some("0s"),
        help: "On SIGTERM/SIGINT, how long /ready answers 503 (draining) while the service still \
               serves everything, before it stops accepting connections (0-5m): long enough for \
               load balancers' health checks to take it out of rotation (e.g. 5s for HAProxy \
               checking every 1s, fall 3; Kubernetes needs the endpoint removed too). The orchestrator's \
               grace period must exceed this plus SHUTDOWN_TIMEOUT.",
    },
    Var {
        name: "SHUTDOWN_TIMEOUT",
        default: Some("10s"),
        help: "On SIGTERM/SIGINT, after SHUTDOWN_READINESS_DELAY, how long in-flight requests may \
               take to finish before exit.",
    },
];

/// The server's settings, moved into [`super::Config`]'s fields.
pub(super) struct Server {
    pub admin_listen_addr: Option<SocketAddr>,
    pub admin_allow_network: bool,
    pub listen_addr: SocketAddr,
    pub public_base_url: Option<Url>,
    pub idempotency_key_ttl: Duration,
    pub max_body_bytes: usize,
    pub cors_allowed_origins: CorsOrigins,
    pub allowed_hosts: AllowedHosts,
    pub shutdown_timeout: Duration,
    pub shutdown_readiness_delay: Duration,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
}

pub(super) fn parse(env: &Env<'_>) -> Result<Server, ConfigError> {
    let admin_listen_addr: Option<SocketAddr> = match env.value("ADMIN_LISTEN_ADDR").trim() {
        "off" => None,
        _ => Some(env.parse("ADMIN_LISTEN_ADDR", "IP:PORT, e.g. 127.0.0.1:9091, or off")?),
    };
    let admin_allow_network = env.boolean("ADMIN_ALLOW_NETWORK")?;
    // The admin listener has no authentication: reachable from other machines only by choice,
    // as serving the data routes without authentication is (AUTH_MODE=none).
    if let Some(addr) = admin_listen_addr.filter(|a| !a.ip().is_loopback())
        && !admin_allow_network
    {
        return Err(invalid(
            "ADMIN_LISTEN_ADDR",
            format!(
                "{addr} is reachable from other machines, and the admin listener has no authentication"
            ),
            "a loopback address such as 127.0.0.1:9091, off, or ADMIN_ALLOW_NETWORK=true to \
             serve the service's internals to anyone who reaches it",
        ));
    }
    Ok(Server {
        listen_addr: env.parse("LISTEN_ADDR", "IP:PORT, e.g. 0.0.0.0:8080")?,
        admin_listen_addr,
        admin_allow_network,
        public_base_url: env
            .optional("PUBLIC_BASE_URL")
            .map(parse_base_url)
            .transpose()?,
        idempotency_key_ttl: env.duration_within(
            "IDEMPOTENCY_KEY_TTL",
            Duration::from_secs(60)..=Duration::from_secs(30 * 24 * 3600),
            "a duration from 1m to 30d, such as 24h",
        )?,
        max_body_bytes: env.bounded("MAX_BODY_BYTES", 1024, 64 * 1024 * 1024)?,
        cors_allowed_origins: parse_cors(&env.value("CORS_ALLOWED_ORIGINS"))?,
        allowed_hosts: parse_allowed_hosts(&env.value("ALLOWED_HOSTS"))?,
        shutdown_timeout: env.duration("SHUTDOWN_TIMEOUT")?,
        shutdown_readiness_delay: env.duration_within(
            "SHUTDOWN_READINESS_DELAY",
            Duration::ZERO..=Duration::from_secs(300),
            "a duration from 0s to 5m, such as 5s",
        )?,
        header_read_timeout: env.duration_within(
            "HTTP_HEADER_READ_TIMEOUT",
            Duration::from_secs(1)..=Duration::from_secs(300),
            "a duration from 1s to 5m, such as 10s",
        )?,
        body_read_timeout: env.duration_within(
            "HTTP_BODY_READ_TIMEOUT",
            Duration::from_secs(1)..=Duration::from_secs(300),
            "a duration from 1s to 5m, such as 10s",
        )?,
        max_connections: env.bounded("MAX_CONNECTIONS", 100, 1_000_000)?,
    })
}

/// Which origins CORS admits.
#[derive(Debug, Clone)]
pub enum CorsOrigins {
    Any,
    List(Vec<HeaderValue>),
}

fn parse_base_url(raw: String) -> Result<Url, ConfigError> {
    const FORM: &str = "an absolute http(s) URL without query, e.g. https://todos.example.com";
    let url = Url::parse(raw.trim())
        .map_err(|e| invalid("PUBLIC_BASE_URL", format!("{raw:?}: {e}"), FORM))?;
    if !matches!(url.scheme(), "http" | "https") || url.query().is_some() || url.cannot_be_a_base()
    {
        return Err(invalid("PUBLIC_BASE_URL", format!("{raw:?}"), FORM));
    }
    Ok(url)
}

/// The `Host` headers links may be built from (`ALLOWED_HOSTS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedHosts {
    /// `*`: any plain `host[:port]`.
    Any,
    /// Host names (lower case) with the one port allowed, or any port.
    List(Vec<(String, Option<u16>)>),
}

impl AllowedHosts {
    /// Whether a request's `host[:port]` is one of them.
    pub fn allows(&self, authority: &str) -> bool {
        let AllowedHosts::List(list) = self else {
            return true;
        };
        let (host, port) = split_authority(authority);
        list.iter()
            .any(|(h, p)| h.eq_ignore_ascii_case(host) && p.is_none_or(|p| Some(p) == port))
    }
}

/// `host[:port]` into its parts; `[::1]:80` is `([::1], 80)`. A port that does not parse stays
/// part of the host, which then matches nothing.
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => match port.parse() {
            Ok(port) => (host, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

fn parse_allowed_hosts(raw: &str) -> Result<AllowedHosts, ConfigError> {
    const FORM: &str =
        "* or a comma-separated list of host or host:port, e.g. todos.example.com,localhost:8080";
    let hosts = star_or_list(raw, |entry| {
        let (host, port) = split_authority(entry);
        if !is_plain_authority(entry.as_bytes())
            || host.is_empty()
            || (host.contains(':') && !host.starts_with('['))
        {
            return Err(invalid("ALLOWED_HOSTS", format!("{entry:?}"), FORM));
        }
        Ok((host.to_ascii_lowercase(), port))
    })?;
    Ok(hosts.map_or(AllowedHosts::Any, AllowedHosts::List))
}

/// Whether `host` is a plain `host[:port]` (a name, IPv4, or bracketed IPv6): only such a Host
/// header is echoed into links, so a hostile one cannot inject a path, credentials or markup.
/// Stricter than RFC 3986's authority (no user info, percent-encoding or sub-delimiters), which
/// no client needs here.
pub fn is_plain_authority(host: &[u8]) -> bool {
    !host.is_empty()
        && host.iter().all(|&b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']')
        })
}

/// A setting that is `*` (`None`) or a comma-separated list, each entry read by `entry`.
fn star_or_list<T>(
    raw: &str,
    entry: impl Fn(&str) -> Result<T, ConfigError>,
) -> Result<Option<Vec<T>>, ConfigError> {
    if raw.trim() == "*" {
        return Ok(None);
    }
    raw.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(entry)
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn parse_cors(raw: &str) -> Result<CorsOrigins, ConfigError> {
    const FORM: &str = "* or a comma-separated list of origins like https://app.example";
    let origins = star_or_list(raw, |origin| {
        let ok = Url::parse(origin)
            .map(|u| matches!(u.scheme(), "http" | "https") && u.path() == "/")
            .unwrap_or(false);
        if !ok || origin.ends_with('/') {
            return Err(invalid(
                "CORS_ALLOWED_ORIGINS",
                format!("{origin:?} is not an origin"),
                FORM,
            ));
        }
        HeaderValue::from_str(origin)
            .map_err(|e| invalid("CORS_ALLOWED_ORIGINS", e.to_string(), FORM))
    })?;
    Ok(origins.map_or(CorsOrigins::Any, CorsOrigins::List))
}
