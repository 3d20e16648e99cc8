//! Typed settings read from environment variables, validated once at startup.
//!
//! Every variable the service reads is declared once in [`VARS`]: that table drives `--help`, a test
//! that keeps `.env.example` in step, and the parsing below. A bad value is an error that names the
//! variable and the accepted form, so a typo in a compose file fails loudly at start instead of
//! surfacing as odd behaviour under load.
//!
//! Parsing is hand-written on purpose: clap's `env` support reports a bad value against the *flag*
//! name, not the variable, and the service is configured by environment only (12-factor, compose).
//! Empty values count as unset, because compose files often write `VAR=` to mean "default".

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

use axum::http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;
use tracing_subscriber::EnvFilter;
use url::Url;

use crate::db::breaker::BreakerConfig;

/// One environment variable the service reads.
#[derive(Debug)]
pub struct Var {
    pub name: &'static str,
    /// Default used when unset or empty; `None` means required (or optional with no value).
    pub default: Option<&'static str>,
    pub help: &'static str,
}

/// Every variable, in the order `--help` and `.env.example` list them.
pub const VARS: &[Var] = &[
    Var {
        name: "DATABASE_URL",
        default: None,
        help: "Required. PostgreSQL URL, e.g. postgres://user:pass@postgres:5432/todos. The host is \
               resolved once at startup; its password is never logged.",
    },
    Var {
        name: "LISTEN_ADDR",
        default: Some("0.0.0.0:8080"),
        help: "Address and port the HTTP server binds, as IP:PORT (port 0 picks a free one).",
    },
    Var {
        name: "PUBLIC_BASE_URL",
        default: None,
        help: "Absolute base URL used in each todo's `url` and in Location/Link headers, e.g. \
               https://todos.example.com. Unset: built from the request's Host header.",
    },
    Var {
        name: "DB_POOL_MAX_SIZE",
        default: Some("16"),
        help: "Maximum number of pooled PostgreSQL connections (1-1000). Keep the sum over all \
               replicas below the server's max_connections.",
    },
    Var {
        name: "DB_POOL_WAIT_TIMEOUT",
        default: Some("2s"),
        help: "How long a request waits for a free pooled connection before it gets 503.",
    },
    Var {
        name: "DB_CONNECT_TIMEOUT",
        default: Some("3s"),
        help: "Time limit for opening one new PostgreSQL connection (TCP + login).",
    },
    Var {
        name: "DB_RECYCLE_TIMEOUT",
        default: Some("1s"),
        help: "Time limit for the health check of an idle connection taken from the pool.",
    },
    Var {
        name: "DB_STATEMENT_TIMEOUT",
        default: Some("5s"),
        help: "PostgreSQL statement_timeout set on every connection (0 disables it).",
    },
    Var {
        name: "DB_IDLE_IN_TRANSACTION_TIMEOUT",
        default: Some("5s"),
        help: "PostgreSQL idle_in_transaction_session_timeout set on every connection (0 disables \
               it): a backstop that ends any session left inside a transaction, so it cannot hold \
               row locks. The service's own transactions never pause between statements.",
    },
    Var {
        name: "DB_MAX_LIFETIME",
        default: Some("30m"),
        help: "Connections older than this (up to 10% less, spread so they do not all expire \
               together) are closed when they next come back to the pool, so connections rebalance \
               after a failover and no session state lives forever. 0 disables; otherwise 10s to 7d.",
    },
    Var {
        name: "DB_APPLICATION_NAME",
        default: Some("todo-service"),
        help: "application_name reported to PostgreSQL (visible in pg_stat_activity).",
    },
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
        help: "Requests to /todos handled at once; beyond it they get an immediate 503 with \
               Retry-After instead of queueing. Default: 16 × DB_POOL_MAX_SIZE.",
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
        name: "SHUTDOWN_TIMEOUT",
        default: Some("10s"),
        help: "On SIGTERM/SIGINT, how long in-flight requests may take to finish before exit.",
    },
    Var {
        name: "OTEL_EXPORTER_OTLP_ENDPOINT",
        default: None,
        help: "OTLP collector URL, e.g. http://otel-collector:4317 (gRPC) or :4318 \
               (http/protobuf). Unset: no export, logs only. Its host is resolved once at startup.",
    },
    Var {
        name: "OTEL_EXPORTER_OTLP_PROTOCOL",
        default: Some("grpc"),
        help: "`grpc` or `http/protobuf`.",
    },
    Var {
        name: "OTEL_SERVICE_NAME",
        default: Some("todo-service"),
        help: "service.name of the exported telemetry (what SigNoz lists under Services).",
    },
    Var {
        name: "OTEL_RESOURCE_ATTRIBUTES",
        default: None,
        help: "Extra resource attributes as key=value,key=value, e.g. \
               deployment.environment=production (default deployment.environment=development).",
    },
    Var {
        name: "OTEL_METRIC_EXPORT_INTERVAL",
        default: Some("60000"),
        help: "Milliseconds between metric exports (the OpenTelemetry standard variable).",
    },
    Var {
        name: "OTEL_TRACES_SAMPLER",
        default: Some("parentbased_always_on"),
        help: "Which requests are traced: always_on, always_off, traceidratio, or parentbased_* \
               of those (follow the caller's traceparent decision, else the named sampler).",
    },
    Var {
        name: "OTEL_TRACES_SAMPLER_ARG",
        default: Some("1.0"),
        help: "Fraction of traces kept by the *traceidratio samplers, from 0 to 1, e.g. 0.1. \
               At thousands of requests per second a fraction keeps export cheap (see \
               loadtest/RESULTS.md); metrics and logs are never sampled.",
    },
    Var {
        name: "OTEL_SDK_DISABLED",
        default: Some("false"),
        help: "true turns telemetry export off even when an endpoint is set.",
    },
    Var {
        name: "LOG_LEVEL",
        default: Some("info"),
        help: "Log filter in tracing's EnvFilter syntax, e.g. `info` or `info,todo_service=debug`.",
    },
    Var {
        name: "LOG_FORMAT",
        default: Some("text"),
        help: "`text` (human-readable) or `json` (one JSON object per line, for containers).",
    },
];

/// A configuration value that cannot be used; the message names the variable and its form.
#[derive(Debug, thiserror::Error)]
#[error("invalid {var}: {problem} (expected {expected})")]
pub struct ConfigError {
    pub var: &'static str,
    pub problem: String,
    pub expected: &'static str,
}

/// How logs are written to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Which origins CORS admits.
#[derive(Debug, Clone)]
pub enum CorsOrigins {
    Any,
    List(Vec<HeaderValue>),
}

/// Database settings; the URL stays secret and is only exposed to build connect options.
pub struct DatabaseConfig {
    url: SecretString,
    /// Connect options parsed from the URL, with the host still as written (resolution is separate).
    pub connect_options: PgConnectOptions,
    /// Host name from the URL, resolved once at startup by `db::resolve`.
    pub host: String,
    pub port: u16,
    pub pool_max_size: usize,
    pub pool_wait_timeout: Duration,
    pub connect_timeout: Duration,
    pub recycle_timeout: Duration,
    pub statement_timeout: Duration,
    /// `Duration::ZERO`: off.
    pub idle_in_transaction_timeout: Duration,
    /// `None`: connections live until they break.
    pub max_lifetime: Option<Duration>,
    pub application_name: String,
}

impl DatabaseConfig {
    /// The raw URL, for the rare places that need it (never log it).
    pub fn url(&self) -> &str {
        self.url.expose_secret()
    }

    /// The URL with any password replaced, safe to log.
    pub fn redacted_url(&self) -> String {
        redact_url(self.url.expose_secret())
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.redacted_url())
            .field("host", &self.host)
            .field("port", &self.port)
            .field("pool_max_size", &self.pool_max_size)
            .field("pool_wait_timeout", &self.pool_wait_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("recycle_timeout", &self.recycle_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field(
                "idle_in_transaction_timeout",
                &self.idle_in_transaction_timeout,
            )
            .field("max_lifetime", &self.max_lifetime)
            .field("application_name", &self.application_name)
            .finish()
    }
}

/// How traces are sent to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// OpenTelemetry export settings (the standard `OTEL_*` variables).
#[derive(Debug, Clone)]
pub struct OtelConfig {
    pub endpoint: Option<Url>,
    pub protocol: OtlpProtocol,
    pub service_name: String,
    pub resource_attributes: Vec<(String, String)>,
    pub disabled: bool,
    pub metric_interval: std::time::Duration,
    pub sampler: TraceSampler,
}

/// The head sampler of `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`. Parsed here rather than
/// left to the SDK, which falls back to always-on with only a warning on a bad value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceSampler {
    /// Follow the sampled flag of an incoming `traceparent` when there is one.
    pub parent_based: bool,
    /// Fraction of new traces kept, 0.0 to 1.0 (always_off is 0, always_on is 1).
    pub ratio: f64,
}

/// Per-client rate limit; `None` in [`Config::rate_limit`] when disabled.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
    pub trust_forwarded_for: bool,
}

/// All settings of the service.
#[derive(Debug)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub public_base_url: Option<Url>,
    pub database: DatabaseConfig,
    pub rate_limit: Option<RateLimit>,
    pub max_in_flight: usize,
    pub request_timeout: Duration,
    pub breaker: BreakerConfig,
    pub idempotency_key_ttl: Duration,
    pub max_body_bytes: usize,
    pub cors_allowed_origins: CorsOrigins,
    pub shutdown_timeout: Duration,
    pub log_level: String,
    pub log_format: LogFormat,
    pub otel: OtelConfig,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup`, so tests can pass a map instead of mutating the process env.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env { lookup: &lookup };
        let database = database_config(&env)?;
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
            None => database.pool_max_size * 16,
        };
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
        Ok(Config {
            listen_addr: env.parse("LISTEN_ADDR", "IP:PORT, e.g. 0.0.0.0:8080")?,
            public_base_url: env
                .optional("PUBLIC_BASE_URL")
                .map(parse_base_url)
                .transpose()?,
            database,
            rate_limit,
            max_in_flight,
            request_timeout,
            breaker,
            idempotency_key_ttl: env.duration_within(
                "IDEMPOTENCY_KEY_TTL",
                Duration::from_secs(60)..=Duration::from_secs(30 * 24 * 3600),
                "a duration from 1m to 30d, such as 24h",
            )?,
            max_body_bytes: env.bounded("MAX_BODY_BYTES", 1024, 64 * 1024 * 1024)?,
            cors_allowed_origins: parse_cors(&env.value("CORS_ALLOWED_ORIGINS"))?,
            shutdown_timeout: env.duration("SHUTDOWN_TIMEOUT")?,
            log_level: parse_log_level(env.value("LOG_LEVEL"))?,
            log_format: match env.value("LOG_FORMAT").to_ascii_lowercase().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => return Err(invalid("LOG_FORMAT", format!("{other:?}"), "text or json")),
            },
            otel: otel_config(&env)?,
        })
    }
}

fn database_config(env: &Env<'_>) -> Result<DatabaseConfig, ConfigError> {
    const FORM: &str = "postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE";
    let url = env
        .optional("DATABASE_URL")
        .ok_or_else(|| invalid("DATABASE_URL", "it is not set".into(), FORM))?;
    let parsed = Url::parse(&url).map_err(|e| invalid("DATABASE_URL", e.to_string(), FORM))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(invalid(
            "DATABASE_URL",
            format!("scheme {:?} is not postgres", parsed.scheme()),
            FORM,
        ));
    }
    let connect_options = PgConnectOptions::from_str(&url)
        // sqlx's message does not echo the URL, so the password cannot leak through it.
        .map_err(|e| invalid("DATABASE_URL", e.to_string(), FORM))?;
    if connect_options.get_socket().is_some() {
        return Err(invalid(
            "DATABASE_URL",
            "Unix-socket hosts are not supported (the host is resolved and pinned to an IP)".into(),
            FORM,
        ));
    }
    let host = connect_options.get_host().to_owned();
    let port = connect_options.get_port();
    let application_name = env.value("DB_APPLICATION_NAME");
    if application_name.len() > 63 || !application_name.is_ascii() {
        return Err(invalid(
            "DB_APPLICATION_NAME",
            format!("{application_name:?}"),
            "at most 63 ASCII characters",
        ));
    }
    Ok(DatabaseConfig {
        url: SecretString::from(url),
        connect_options,
        host,
        port,
        pool_max_size: env.bounded("DB_POOL_MAX_SIZE", 1, 1000)?,
        pool_wait_timeout: env.duration("DB_POOL_WAIT_TIMEOUT")?,
        connect_timeout: env.duration("DB_CONNECT_TIMEOUT")?,
        recycle_timeout: env.duration("DB_RECYCLE_TIMEOUT")?,
        statement_timeout: env.duration("DB_STATEMENT_TIMEOUT")?,
        idle_in_transaction_timeout: env.duration("DB_IDLE_IN_TRANSACTION_TIMEOUT")?,
        max_lifetime: if env.duration("DB_MAX_LIFETIME")?.is_zero() {
            None
        } else {
            Some(env.duration_within(
                "DB_MAX_LIFETIME",
                Duration::from_secs(10)..=Duration::from_secs(7 * 24 * 3600),
                "0 (off) or a duration from 10s to 7d, such as 30m",
            )?)
        },
        application_name,
    })
}

struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    fn optional(&self, name: &'static str) -> Option<String> {
        debug_assert!(
            VARS.iter().any(|v| v.name == name),
            "{name} missing from VARS"
        );
        (self.lookup)(name).filter(|v| !v.trim().is_empty())
    }

    /// The value or the table's default; only for variables that have one.
    fn value(&self, name: &'static str) -> String {
        self.optional(name).unwrap_or_else(|| {
            VARS.iter()
                .find(|v| v.name == name)
                .and_then(|v| v.default)
                .expect("variable has a default")
                .to_owned()
        })
    }

    fn parse<T: FromStr>(
        &self,
        name: &'static str,
        expected: &'static str,
    ) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        let raw = self.value(name);
        raw.trim()
            .parse()
            .map_err(|e| invalid(name, format!("{raw:?}: {e}"), expected))
    }

    fn boolean(&self, name: &'static str) -> Result<bool, ConfigError> {
        let raw = self.value(name);
        match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(invalid(name, format!("{raw:?}"), "true or false")),
        }
    }

    fn bounded(&self, name: &'static str, min: usize, max: usize) -> Result<usize, ConfigError> {
        let raw = self.value(name);
        match raw.trim().parse::<usize>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ConfigError {
                var: name,
                problem: format!("{raw:?}"),
                expected: leak_range(min, max),
            }),
        }
    }

    fn duration(&self, name: &'static str) -> Result<Duration, ConfigError> {
        let raw = self.value(name);
        humantime::parse_duration(raw.trim()).map_err(|e| {
            invalid(
                name,
                format!("{raw:?}: {e}"),
                "a duration such as 500ms, 2s or 1m",
            )
        })
    }
}

impl Env<'_> {
    /// A duration inside `range`; `expected` names the range for the error.
    fn duration_within(
        &self,
        name: &'static str,
        range: std::ops::RangeInclusive<Duration>,
        expected: &'static str,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(name)?;
        if range.contains(&d) {
            Ok(d)
        } else {
            Err(invalid(name, format!("{:?}", self.value(name)), expected))
        }
    }
}

/// `expected` is `&'static str` so errors stay cheap to build; ranges are few and fixed.
fn leak_range(min: usize, max: usize) -> &'static str {
    Box::leak(format!("an integer from {min} to {max}").into_boxed_str())
}

fn invalid(var: &'static str, problem: String, expected: &'static str) -> ConfigError {
    ConfigError {
        var,
        problem,
        expected,
    }
}

fn otel_config(env: &Env<'_>) -> Result<OtelConfig, ConfigError> {
    const URL_FORM: &str = "an http(s) URL such as http://otel-collector:4317";
    let endpoint = env
        .optional("OTEL_EXPORTER_OTLP_ENDPOINT")
        .map(|raw| match Url::parse(raw.trim()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Ok(u),
            _ => Err(invalid(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("{raw:?}"),
                URL_FORM,
            )),
        })
        .transpose()?;
    let protocol = match env.value("OTEL_EXPORTER_OTLP_PROTOCOL").trim() {
        "grpc" => OtlpProtocol::Grpc,
        "http/protobuf" => OtlpProtocol::HttpProtobuf,
        other => {
            return Err(invalid(
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                format!("{other:?}"),
                "grpc or http/protobuf",
            ));
        }
    };
    let resource_attributes = env
        .optional("OTEL_RESOURCE_ATTRIBUTES")
        .map(|raw| {
            raw.split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|pair| match pair.split_once('=') {
                    Some((k, v)) if !k.trim().is_empty() => {
                        Ok((k.trim().to_owned(), v.trim().to_owned()))
                    }
                    _ => Err(invalid(
                        "OTEL_RESOURCE_ATTRIBUTES",
                        format!("{pair:?}"),
                        "key=value pairs separated by commas",
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(OtelConfig {
        endpoint,
        protocol,
        service_name: env.value("OTEL_SERVICE_NAME").trim().to_owned(),
        resource_attributes,
        disabled: env.boolean("OTEL_SDK_DISABLED")?,
        metric_interval: Duration::from_millis(env.bounded(
            "OTEL_METRIC_EXPORT_INTERVAL",
            100,
            3_600_000,
        )? as u64),
        sampler: trace_sampler(env)?,
    })
}

fn trace_sampler(env: &Env<'_>) -> Result<TraceSampler, ConfigError> {
    const NAMES: &str = "always_on, always_off, traceidratio, parentbased_always_on, \
                         parentbased_always_off or parentbased_traceidratio";
    let raw = env.value("OTEL_TRACES_SAMPLER");
    let name = raw.trim();
    let (parent_based, rule) = match name.strip_prefix("parentbased_") {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    let ratio = match rule {
        "always_on" => 1.0,
        "always_off" => 0.0,
        "traceidratio" => {
            let arg = env.value("OTEL_TRACES_SAMPLER_ARG");
            match arg.trim().parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => r,
                _ => {
                    return Err(invalid(
                        "OTEL_TRACES_SAMPLER_ARG",
                        format!("{arg:?}"),
                        "a fraction from 0 to 1, e.g. 0.1",
                    ));
                }
            }
        }
        _ => {
            return Err(invalid("OTEL_TRACES_SAMPLER", format!("{name:?}"), NAMES));
        }
    };
    Ok(TraceSampler {
        parent_based,
        ratio,
    })
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

fn parse_cors(raw: &str) -> Result<CorsOrigins, ConfigError> {
    const FORM: &str = "* or a comma-separated list of origins like https://app.example";
    if raw.trim() == "*" {
        return Ok(CorsOrigins::Any);
    }
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|origin| {
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
        })
        .collect::<Result<Vec<_>, _>>()
        .map(CorsOrigins::List)
}

fn parse_log_level(raw: String) -> Result<String, ConfigError> {
    EnvFilter::try_new(&raw).map_err(|e| {
        invalid(
            "LOG_LEVEL",
            format!("{raw:?}: {e}"),
            "an EnvFilter directive such as info or warn,todo_service=debug",
        )
    })?;
    Ok(raw)
}

/// Replaces the password in a URL with `***`; unparsable input is hidden entirely.
pub fn redact_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) => "<unparsable URL hidden>".to_owned(),
    }
}

/// The environment section of `--help`, generated from [`VARS`].
pub fn help_text() -> String {
    let mut out = String::from("Environment variables (empty counts as unset):\n");
    for var in VARS {
        let default = match var.default {
            Some(d) => format!(" [default: {d}]"),
            None => String::new(),
        };
        out.push_str(&format!("  {}{default}\n      {}\n", var.name, var.help));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    const URL: (&str, &str) = ("DATABASE_URL", "postgres://app:s3cret@postgres:5432/todos");

    #[test]
    fn defaults_apply_when_only_the_database_url_is_set() {
        let c = config(&[URL]).unwrap();
        assert_eq!(c.listen_addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.database.host, "postgres");
        assert_eq!(c.database.port, 5432);
        assert_eq!(c.database.pool_max_size, 16);
        assert_eq!(c.database.pool_wait_timeout, Duration::from_secs(2));
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(matches!(c.cors_allowed_origins, CorsOrigins::Any));
        let rl = c.rate_limit.expect("rate limit on by default");
        assert!(
            rl.burst >= 5 * 120,
            "five of the post-mortem's spikes must fit the burst"
        );
        assert!(!rl.trust_forwarded_for);
        assert_eq!(c.max_in_flight, 16 * 16, "derived from the pool size");
        assert_eq!(c.breaker.failure_threshold, 5);
    }

    #[test]
    fn a_zero_rate_disables_the_limit_and_max_in_flight_follows_the_pool() {
        let c = config(&[
            URL,
            ("RATE_LIMIT_PER_SECOND", "0"),
            ("DB_POOL_MAX_SIZE", "4"),
        ])
        .unwrap();
        assert!(c.rate_limit.is_none());
        assert_eq!(c.max_in_flight, 64);
        let c = config(&[URL, ("MAX_IN_FLIGHT", "7")]).unwrap();
        assert_eq!(c.max_in_flight, 7);
    }

    #[test]
    fn a_missing_database_url_is_an_error_naming_it() {
        let err = config(&[]).unwrap_err();
        assert_eq!(err.var, "DATABASE_URL");
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn bad_values_name_the_variable_and_the_expected_form() {
        let cases = [
            ("LISTEN_ADDR", "localhost", "IP:PORT"),
            ("DB_POOL_MAX_SIZE", "0", "from 1 to 1000"),
            ("DB_POOL_MAX_SIZE", "many", "from 1 to 1000"),
            ("DB_POOL_WAIT_TIMEOUT", "2 parsecs", "duration"),
            ("DB_STATEMENT_TIMEOUT", "-1s", "duration"),
            ("DB_IDLE_IN_TRANSACTION_TIMEOUT", "soon", "duration"),
            ("DB_MAX_LIFETIME", "5s", "from 10s to 7d"),
            ("DB_MAX_LIFETIME", "30d", "from 10s to 7d"),
            ("IDEMPOTENCY_KEY_TTL", "1s", "from 1m to 30d"),
            ("IDEMPOTENCY_KEY_TTL", "365d", "from 1m to 30d"),
            ("IDEMPOTENCY_KEY_TTL", "forever", "duration"),
            ("MAX_BODY_BYTES", "10", "from 1024"),
            ("PUBLIC_BASE_URL", "ftp://x", "http(s)"),
            ("PUBLIC_BASE_URL", "not a url", "http(s)"),
            ("CORS_ALLOWED_ORIGINS", "https://a.example/path", "origins"),
            ("LOG_FORMAT", "xml", "text or json"),
            ("RATE_LIMIT_BURST", "0", "from 1"),
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "collector:4317",
                "http(s) URL",
            ),
            (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "http/json",
                "grpc or http/protobuf",
            ),
            ("OTEL_RESOURCE_ATTRIBUTES", "novalue", "key=value"),
            ("OTEL_SDK_DISABLED", "perhaps", "true or false"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1m", "from 100"),
            (
                "OTEL_TRACES_SAMPLER",
                "sometimes",
                "parentbased_traceidratio",
            ),
            ("RATE_LIMIT_TRUST_FORWARDED_FOR", "maybe", "true or false"),
            ("MAX_IN_FLIGHT", "0", "from 1"),
            ("REQUEST_TIMEOUT", "0s", "positive duration"),
            ("BREAKER_FAILURE_THRESHOLD", "0", "from 1"),
            ("BREAKER_OPEN_DURATION", "soon", "duration"),
            ("LOG_LEVEL", "info,[", "EnvFilter"),
            ("DATABASE_URL", "mysql://x@y/z", "postgres://"),
            (
                "DATABASE_URL",
                "postgres://app@db:notaport/todos",
                "postgres://",
            ),
            ("DATABASE_URL", "not a url", "postgres://"),
        ];
        for (var, value, form) in cases {
            let err = if var == "DATABASE_URL" {
                config(&[(var, value)])
            } else {
                config(&[URL, (var, value)])
            }
            .expect_err(var);
            let msg = err.to_string();
            assert_eq!(err.var, var, "{var}={value}: {msg}");
            assert!(
                msg.contains(var) && msg.contains(form),
                "{var}={value}: {msg}"
            );
        }
    }

    #[test]
    fn trace_samplers_follow_the_otel_names() {
        let sampler = |pairs: &[(&str, &str)]| {
            let mut all = vec![URL];
            all.extend_from_slice(pairs);
            config(&all).map(|c| c.otel.sampler)
        };
        let s = |parent_based, ratio| TraceSampler {
            parent_based,
            ratio,
        };
        assert_eq!(sampler(&[]).unwrap(), s(true, 1.0));
        assert_eq!(
            sampler(&[("OTEL_TRACES_SAMPLER", "always_off")]).unwrap(),
            s(false, 0.0)
        );
        assert_eq!(
            sampler(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ])
            .unwrap(),
            s(true, 0.25)
        );
        // A ratio sampler without its argument keeps everything, as the OTel spec says.
        assert_eq!(
            sampler(&[("OTEL_TRACES_SAMPLER", "traceidratio")]).unwrap(),
            s(false, 1.0)
        );
        for bad in ["1.5", "-0.1", "half", "NaN"] {
            let err = sampler(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", bad),
            ])
            .unwrap_err();
            assert_eq!(err.var, "OTEL_TRACES_SAMPLER_ARG", "{bad}: {err}");
            assert!(err.to_string().contains("from 0 to 1"), "{err}");
        }
    }

    #[test]
    fn secrets_never_appear_in_debug_output_or_errors() {
        let c = config(&[URL]).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("app:***@postgres"), "{debug}");
        let err = config(&[("DATABASE_URL", "mysql://app:s3cret@x/db")]).unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn empty_values_fall_back_to_defaults() {
        let c = config(&[URL, ("LISTEN_ADDR", ""), ("LOG_FORMAT", " ")]).unwrap();
        assert_eq!(c.listen_addr.port(), 8080);
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn cors_origin_lists_are_parsed() {
        let c = config(&[
            URL,
            (
                "CORS_ALLOWED_ORIGINS",
                "https://a.example, http://b.example:3000",
            ),
        ])
        .unwrap();
        match c.cors_allowed_origins {
            CorsOrigins::List(v) => assert_eq!(v.len(), 2),
            CorsOrigins::Any => panic!("expected a list"),
        }
    }

    #[test]
    fn env_example_documents_exactly_the_variables_read() {
        let example = include_str!("../.env.example");
        let listed: Vec<&str> = example
            .lines()
            .map(|l| l.trim_start_matches('#').trim())
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
            .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .collect();
        for var in VARS {
            assert!(
                listed.contains(&var.name),
                ".env.example lacks {}",
                var.name
            );
        }
        for name in listed {
            assert!(
                VARS.iter().any(|v| v.name == name),
                ".env.example lists {name}, which the service does not read"
            );
        }
    }

    #[test]
    fn the_readme_configuration_table_lists_every_variable() {
        let readme = include_str!("../README.md");
        for var in VARS {
            assert!(
                readme.contains(&format!("| `{}` |", var.name)),
                "README.md's configuration table lacks {}",
                var.name
            );
        }
    }

    #[test]
    fn help_lists_every_variable() {
        let help = help_text();
        for var in VARS {
            assert!(help.contains(var.name), "--help lacks {}", var.name);
        }
    }
}
