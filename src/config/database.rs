//! The database's settings: the URL (whose password never leaves this module unredacted), the
//! pool's sizes and timeouts, and what every connection is told at login.

use std::{fmt, str::FromStr, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;
use url::Url;

use super::{
    Var,
    database_tls::{self, DbTlsSettings},
    env::{ConfigError, Env, invalid},
    redact::redact_url,
};

pub const VARS: &[Var] = &[
    Var {
        name: "DATABASE_URL",
        default: None,
        help: "Required. PostgreSQL URL, e.g. postgres://user:pass@postgres:5432/todos. The host is \
               resolved once at startup; its password is never logged. TLS as in libpq: sslmode \
               (disable, prefer: the default, require, verify-ca, verify-full), sslrootcert (a CA \
               file, or system), sslcert + sslkey (a client certificate); the certificate is \
               checked against the host name while connections go to the pinned address.",
    },
    Var {
        name: "DB_POOLER_MODE",
        default: Some("none"),
        help: "none: DATABASE_URL is PostgreSQL itself (or a session-mode pooler). \
               transaction-prepared: a transaction-mode pooler that carries prepared statements \
               (PgBouncer 1.21 or later with max_prepared_statements > 0): one exchange per \
               statement; the server's role or database settings must hold statement_timeout and \
               idle_in_transaction_session_timeout (checked before serving). transaction: any \
               transaction-mode pooler (PgBouncer 1.18): statements are unnamed and every call \
               runs in one transaction that sets the timeouts. Both pooler modes run migrations \
               over DATABASE_MIGRATION_URL.",
    },
    Var {
        name: "DATABASE_MIGRATION_URL",
        default: None,
        help: "PostgreSQL URL used only to apply migrations, straight to the server (their \
               advisory lock needs a session, which a transaction pooler does not keep). Required \
               with either transaction pooler mode; unset otherwise: migrations use DATABASE_URL. \
               Resolved once at startup, TLS as in DATABASE_URL, its password never logged.",
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
        name: "DB_MIGRATION_LOCK_TIMEOUT",
        default: Some("500ms"),
        help: "PostgreSQL lock_timeout of the migrations' session (10ms-60s): a migration that \
               cannot get its lock within it gives up and tries again with backoff, so a slow \
               transaction elsewhere queues requests behind the migration for at most this long \
               at a time.",
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
];

/// What `DATABASE_URL` points at: the server, or a pooler that hands out server connections per
/// transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolerMode {
    /// PostgreSQL itself, or a pooler that keeps a session: named statements, timeouts as
    /// startup options.
    None,
    /// A transaction pooler that cannot carry prepared statements (PgBouncer before 1.21):
    /// unnamed statements, each call in a transaction that sets the timeouts.
    Transaction,
    /// A transaction pooler that carries prepared statements (PgBouncer 1.21 or later with
    /// `max_prepared_statements`): named statements as on a direct connection; the timeouts come
    /// from the server's role or database settings, checked before serving.
    TransactionPrepared,
}

impl PoolerMode {
    /// The setting's value, as written in `DB_POOLER_MODE`.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolerMode::None => "none",
            PoolerMode::Transaction => "transaction",
            PoolerMode::TransactionPrepared => "transaction-prepared",
        }
    }

    /// Whether a session lasts only as long as a transaction: no session settings, no advisory
    /// locks held across statements.
    pub fn pools_transactions(self) -> bool {
        self != PoolerMode::None
    }
}

/// A PostgreSQL URL taken apart: connect options, the host to resolve once, TLS.
pub struct Target {
    url: SecretString,
    /// Connect options parsed from the URL, with the host still as written.
    pub connect_options: PgConnectOptions,
    pub host: String,
    pub port: u16,
    pub tls: DbTlsSettings,
}

impl Target {
    /// The URL with any password replaced, safe to log.
    pub fn redacted_url(&self) -> String {
        redact_url(self.url.expose_secret())
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.redacted_url())
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Database settings; the URL stays secret and is only exposed to build connect options.
pub struct DatabaseConfig {
    url: SecretString,
    /// Connect options parsed from the URL, with the host still as written (resolution is separate).
    pub connect_options: PgConnectOptions,
    /// Host name from the URL, resolved once at startup by `db::resolve`.
    pub host: String,
    /// `sslmode` and the certificates, from the URL's query.
    pub tls: DbTlsSettings,
    /// `DB_POOLER_MODE`.
    pub pooler_mode: PoolerMode,
    /// `DATABASE_MIGRATION_URL`: where migrations run, when not through `DATABASE_URL`.
    pub migration: Option<Target>,
    pub port: u16,
    pub pool_max_size: usize,
    pub pool_wait_timeout: Duration,
    pub connect_timeout: Duration,
    pub recycle_timeout: Duration,
    pub statement_timeout: Duration,
    /// `Duration::ZERO`: off.
    pub idle_in_transaction_timeout: Duration,
    /// `DB_MIGRATION_LOCK_TIMEOUT`: how long a migration waits for a lock before it tries again.
    pub migration_lock_timeout: Duration,
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
            .field("tls", &self.tls)
            .field("pooler_mode", &self.pooler_mode)
            .field("migration", &self.migration)
            .field("pool_max_size", &self.pool_max_size)
            .field("pool_wait_timeout", &self.pool_wait_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("recycle_timeout", &self.recycle_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field(
                "idle_in_transaction_timeout",
                &self.idle_in_transaction_timeout,
            )
            .field("migration_lock_timeout", &self.migration_lock_timeout)
            .field("max_lifetime", &self.max_lifetime)
            .field("application_name", &self.application_name)
            .finish()
    }
}

fn target(env: &Env<'_>, var: &'static str) -> Result<Option<Target>, ConfigError> {
    const FORM: &str = "postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE";
    let Some(url) = env.optional(var) else {
        return Ok(None);
    };
    let parsed = Url::parse(&url).map_err(|e| invalid(var, e.to_string(), FORM))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(invalid(
            var,
            format!("scheme {:?} is not postgres", parsed.scheme()),
            FORM,
        ));
    }
    let tls = database_tls::parse(&parsed).map_err(|mut e| {
        e.var = var;
        e.problem = e.problem.replace("DATABASE_URL", var);
        e
    })?;
    let connect_options = PgConnectOptions::from_str(&url)
        // sqlx's message does not echo the URL, so the password cannot leak through it.
        .map_err(|e| invalid(var, e.to_string(), FORM))?;
    if connect_options.get_socket().is_some() {
        return Err(invalid(
            var,
            "Unix-socket hosts are not supported (the host is resolved and pinned to an IP)".into(),
            FORM,
        ));
    }
    Ok(Some(Target {
        host: connect_options.get_host().to_owned(),
        port: connect_options.get_port(),
        url: SecretString::from(url),
        connect_options,
        tls,
    }))
}

pub(super) fn parse(env: &Env<'_>) -> Result<DatabaseConfig, ConfigError> {
    let Target {
        url,
        connect_options,
        host,
        port,
        tls,
    } = target(env, "DATABASE_URL")?.ok_or_else(|| {
        invalid(
            "DATABASE_URL",
            "it is not set".into(),
            "postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
        )
    })?;
    let pooler_mode = match env.value("DB_POOLER_MODE").as_str() {
        "none" => PoolerMode::None,
        "transaction" => PoolerMode::Transaction,
        "transaction-prepared" => PoolerMode::TransactionPrepared,
        other => {
            return Err(invalid(
                "DB_POOLER_MODE",
                format!("{other:?}"),
                "none, transaction-prepared or transaction",
            ));
        }
    };
    let migration = target(env, "DATABASE_MIGRATION_URL")?;
    if pooler_mode.pools_transactions() && migration.is_none() {
        return Err(invalid(
            "DATABASE_MIGRATION_URL",
            format!("it is not set, and DB_POOLER_MODE={}", pooler_mode.as_str()),
            "a URL straight to PostgreSQL (not through the pooler): migrations hold an advisory \
             lock for a whole session",
        ));
    }
    let application_name = env.value("DB_APPLICATION_NAME");
    if application_name.len() > 63 || !application_name.is_ascii() {
        return Err(invalid(
            "DB_APPLICATION_NAME",
            format!("{application_name:?}"),
            "at most 63 ASCII characters",
        ));
    }
    Ok(DatabaseConfig {
        url,
        connect_options,
        host,
        port,
        tls,
        pooler_mode,
        migration,
        pool_max_size: env.bounded("DB_POOL_MAX_SIZE", 1, 1000)?,
        pool_wait_timeout: env.duration("DB_POOL_WAIT_TIMEOUT")?,
        connect_timeout: env.duration("DB_CONNECT_TIMEOUT")?,
        recycle_timeout: env.duration("DB_RECYCLE_TIMEOUT")?,
        statement_timeout: env.duration("DB_STATEMENT_TIMEOUT")?,
        idle_in_transaction_timeout: env.duration("DB_IDLE_IN_TRANSACTION_TIMEOUT")?,
        migration_lock_timeout: env.duration_within(
            "DB_MIGRATION_LOCK_TIMEOUT",
            Duration::from_millis(10)..=Duration::from_secs(60),
            "a duration from 10ms to 60s, such as 500ms",
        )?,
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
