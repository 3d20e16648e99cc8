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
//!
//! Each concern's variables and parsing live in their own file ([`database`], [`server`],
//! [`auth`], [`resilience`], [`otel`], [`logging`]), each holding its rows of the table; this file assembles
//! [`VARS`] and [`Config`] from them. `config` is the bottom of the crate's module graph: it
//! imports nothing of the crate.

pub mod auth;
pub mod database;
pub mod database_tls;
mod env;
pub mod logging;
pub mod otel;
mod redact;
pub mod resilience;
pub mod server;
#[cfg(test)]
mod tests;

use std::{net::SocketAddr, time::Duration};

use url::Url;

pub use auth::{AuthConfig, AuthMode, JwksSource, JwtConfig};
pub use database::{DatabaseConfig, PoolerMode, Target};
pub use database_tls::{ClientCert, DbTlsSettings, RootCert, SslMode};
pub use env::ConfigError;
pub use logging::LogFormat;
pub use otel::{ExportHeaders, OtelConfig, OtlpProtocol, TraceSampler};
pub use redact::{RedactedUrl, redact_url};
pub use resilience::{BreakerConfig, Clients, RateLimit};
pub use server::{AllowedHosts, CorsOrigins, is_plain_authority};

use env::Env;

/// One environment variable the service reads.
#[derive(Debug, Clone, Copy)]
pub struct Var {
    pub name: &'static str,
    /// Default used when unset or empty; `None` means required (or optional with no value).
    pub default: Option<&'static str>,
    pub help: &'static str,
}

/// Every variable, section by section, in the order `--help` lists them.
pub const VARS: &[Var] = &concat_sections();

const SECTIONS: [&[Var]; 6] = [
    database::VARS,
    server::VARS,
    auth::VARS,
    resilience::VARS,
    otel::VARS,
    logging::VARS,
];

const VAR_COUNT: usize = {
    let mut n = 0;
    let mut i = 0;
    while i < SECTIONS.len() {
        n += SECTIONS[i].len();
        i += 1;
    }
    n
};

const fn concat_sections() -> [Var; VAR_COUNT] {
    let mut all = [Var {
        name: "",
        default: None,
        help: "",
    }; VAR_COUNT];
    let (mut k, mut i) = (0, 0);
    while i < SECTIONS.len() {
        let mut j = 0;
        while j < SECTIONS[i].len() {
            all[k] = SECTIONS[i][j];
            k += 1;
            j += 1;
        }
        i += 1;
    }
    all
}

/// All settings of the service.
#[derive(Debug)]
pub struct Config {
    pub listen_addr: SocketAddr,
    /// `None` when `ADMIN_LISTEN_ADDR=off`.
    pub admin_listen_addr: Option<SocketAddr>,
    /// `ADMIN_ALLOW_NETWORK`: the admin listener may be on an address other machines reach.
    pub admin_allow_network: bool,
    pub public_base_url: Option<Url>,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub rate_limit: Option<RateLimit>,
    pub clients: Clients,
    pub max_in_flight: usize,
    pub max_queue_wait: Duration,
    pub request_timeout: Duration,
    pub breaker: BreakerConfig,
    pub idempotency_key_ttl: Duration,
    pub max_body_bytes: usize,
    pub cors_allowed_origins: CorsOrigins,
    /// `ALLOWED_HOSTS`: the Host headers links may be built from.
    pub allowed_hosts: AllowedHosts,
    pub shutdown_timeout: Duration,
    /// On a shutdown signal, `/ready` says 503 for this long before the listener closes.
    pub shutdown_readiness_delay: Duration,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
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
        let database = database::parse(&env)?;
        let server = server::parse(&env)?;
        let resilience = resilience::parse(&env, database.pool_max_size)?;
        let auth = auth::parse(&env, server.listen_addr)?;
        Ok(Config {
            listen_addr: server.listen_addr,
            admin_listen_addr: server.admin_listen_addr,
            admin_allow_network: server.admin_allow_network,
            public_base_url: server.public_base_url,
            database,
            auth,
            rate_limit: resilience.rate_limit,
            clients: resilience.clients,
            max_in_flight: resilience.max_in_flight,
            max_queue_wait: resilience.max_queue_wait,
            request_timeout: resilience.request_timeout,
            breaker: resilience.breaker,
            idempotency_key_ttl: server.idempotency_key_ttl,
            max_body_bytes: server.max_body_bytes,
            cors_allowed_origins: server.cors_allowed_origins,
            allowed_hosts: server.allowed_hosts,
            shutdown_timeout: server.shutdown_timeout,
            shutdown_readiness_delay: server.shutdown_readiness_delay,
            header_read_timeout: server.header_read_timeout,
            body_read_timeout: server.body_read_timeout,
            max_connections: server.max_connections,
            log_level: logging::level(&env)?,
            log_format: logging::format(&env)?,
            otel: otel::parse(&env)?,
        })
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
