//! Connection policy: the pinned address, the pool, migrations and the error classes that matter.
//!
//! [`Db`] is what handlers hold. It starts without touching Postgres (the pool is lazy), so the
//! service comes up and answers `/health` while the database is down; a background task applies
//! the migrations as soon as a connection succeeds, and until then data requests get
//! [`DbError::Unavailable`] (503 with `Retry-After`) rather than confusing "relation does not
//! exist" errors. Migrations take sqlx's advisory lock, so several replicas starting together apply
//! them once.
//!
//! Every data call goes through `Db::call` (in `session`): a breaker permit plus a pooled
//! connection, a deadline, and a connection that ends in a known state even when the call's
//! future is dropped half-way. The circuit breaker ([`breaker`]) lives here, around the database,
//! rather than around the router: it sees exactly the failures that mean "database unavailable",
//! and `/health` and the docs never depend on it.
//!
//! Queries are runtime-checked (`sqlx::query_as` with string SQL), not the `query!` macros: the
//! macros would make a fresh build depend on a live database or on a committed `.sqlx/` cache that
//! can go stale without sqlx-cli in CI. Instead every query in [`todos`] is exercised by the
//! integration tests against a real PostgreSQL, which catches the same mistakes.
//!
//! TLS ([`connect`], [`tls`], `relay`) is negotiated by this crate rather than sqlx, so the
//! certificate can be checked against the host name while connections go to the pinned address.

mod backoff;
pub mod breaker;
pub mod budget;
pub mod certificate;
pub mod connect;
mod deadline;
mod error;
mod fetch;
pub mod idempotency;
mod migrate;
pub mod pool;
pub mod pooled;
mod re_resolve;
mod relay;
pub mod resolve;
mod session;
pub mod tls;
pub mod todos;

pub use error::{DbError, classify};
pub use migrate::{MIGRATOR, applied_schema, expected_schema, run_migrations};

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use deadpool::managed::Object;
use sqlx::{Connection, postgres::PgConnectOptions};

use crate::config::{BreakerConfig, DatabaseConfig, PoolerMode};
use breaker::{Breaker, BreakerState};
use connect::Connector;
use deadline::within;
use pool::PgManager;
use resolve::{PinnedAddress, Resolver};

/// How much longer than `statement_timeout` a call may take before the client gives up on the
/// connection: enough for Postgres' own cancellation to arrive over a healthy link.
const QUERY_DEADLINE_MARGIN: Duration = Duration::from_secs(1);

pub type Pool = deadpool::managed::Pool<PgManager>;
type Conn = Object<PgManager>;

/// Shared handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    breaker: Arc<Breaker>,
    address: Arc<PinnedAddress>,
    migrated: AtomicBool,
    /// The newest migration the database had applied when this replica's migrations ran (0:
    /// not yet known).
    schema: AtomicI64,
    /// The latest reason migrations could not be applied yet, for `/ready`.
    migration_error: Mutex<Option<String>>,
    wait_timeout: Duration,
    /// Client-side limit for one database call: `statement_timeout` plus a margin. Postgres
    /// enforces its own timeout only while it can still talk to us; on a half-open TCP connection
    /// (peer gone without a FIN) nothing would ever answer, so this is what ends the wait.
    query_deadline: Option<Duration>,
    /// Database name and host as configured, for the spans' `db.namespace` and `server.address`:
    /// shared strings, so a span takes them without a copy.
    db_name: opentelemetry::StringValue,
    db_host: opentelemetry::StringValue,
    /// Told how long each call waited for a pooled connection (see [`Db::on_pool_wait`]).
    pool_wait_observer: OnceLock<fn(Duration)>,
    /// The last readiness round trip; its lock makes probes single-flight.
    probe: tokio::sync::Mutex<Option<Probe>>,
    probes: AtomicU64,
    /// `DB_POOLER_MODE=transaction`: the statement that opens every call's transaction and sets
    /// its timeouts (session settings do not survive a transaction pooler). `None`: calls run as
    /// they are, with named, cached statements.
    begin: Option<sqlx::SqlStr>,
    /// Where migrations connect, a session of their own: `DATABASE_MIGRATION_URL`, or else
    /// `DATABASE_URL` at the pool's pinned address.
    migration: (Connector, Arc<PinnedAddress>),
    /// `DB_POOLER_MODE=transaction-prepared`: what the pooler's server connections must bring,
    /// checked before the service serves (see [`pooled`]).
    pooled: Option<pooled::Wanted>,
}

/// A readiness round trip's outcome and when it finished.
struct Probe {
    at: tokio::time::Instant,
    outcome: Result<(), String>,
}

/// How long a readiness probe's outcome is served before another round trip.
const PROBE_FRESH_FOR: Duration = Duration::from_secs(1);

/// See [`Db::downgrade`].
pub struct WeakDb(std::sync::Weak<Inner>);

impl WeakDb {
    pub fn upgrade(&self) -> Option<Db> {
        self.0.upgrade().map(|inner| Db { inner })
    }
}

/// The database as this replica sees it, for readiness checks (`/ready` words it for clients).
#[derive(Debug)]
pub struct DbStatus {
    /// What is wrong; `None` when a round trip succeeded and the schema is migrated.
    pub error: Option<String>,
    /// Whether the recent round trip succeeded (the schema aside).
    pub reachable: bool,
    /// Host name from `DATABASE_URL`.
    pub host: String,
    /// The pinned address, until the host first resolves `None`.
    pub address: Option<SocketAddr>,
    /// DNS lookups of the database host since startup (1 in a healthy run, 0 for an IP).
    pub dns_lookups: u64,
    pub migrations_applied: bool,
    /// The newest migration the database had applied when this replica migrated.
    pub schema_applied: Option<i64>,
    pub pool: deadpool::Status,
    pub breaker: BreakerState,
    pub consecutive_failures: u32,
    /// Times the breaker opened since startup.
    pub breaker_opened_total: u64,
}

impl Db {
    /// Resolves the host (once), builds the lazy pool and starts applying migrations in the
    /// background. Never fails because the database is down.
    pub async fn connect(
        config: &DatabaseConfig,
        breaker_config: BreakerConfig,
        resolver: Arc<dyn Resolver>,
    ) -> anyhow::Result<Db> {
        let address =
            PinnedAddress::resolve(&config.host, config.port, Arc::clone(&resolver)).await;
        let (options, begin) = session_settings(config);
        let migration = match &config.migration {
            None => (
                migration_connector(&config.connect_options, &config.tls, &config.host, config)?,
                Arc::clone(&address),
            ),
            Some(target) => {
                let connector = migration_connector(
                    &target.connect_options,
                    &target.tls,
                    &target.host,
                    config,
                )?;
                let address = PinnedAddress::resolve(&target.host, target.port, resolver).await;
                (connector, address)
            }
        };
        let connector = Connector::new(options, &config.tls, &config.host)?;
        let manager = PgManager::new(connector, Arc::clone(&address), config.max_lifetime);
        let pool = Pool::builder(manager)
            .max_size(config.pool_max_size)
            .wait_timeout(Some(config.pool_wait_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.recycle_timeout))
            .runtime(deadpool::Runtime::Tokio1)
            .build()?;
        let db = Db {
            inner: Arc::new(Inner {
                pool,
                breaker: Breaker::new(breaker_config),
                db_host: Arc::<str>::from(address.host()).into(),
                address,
                migrated: AtomicBool::new(false),
                schema: AtomicI64::new(0),
                migration_error: Mutex::new(None),
                wait_timeout: config.pool_wait_timeout,
                query_deadline: (!config.statement_timeout.is_zero())
                    .then(|| config.statement_timeout + QUERY_DEADLINE_MARGIN),
                db_name: Arc::<str>::from(
                    config
                        .connect_options
                        .get_database()
                        .unwrap_or(config.connect_options.get_username()),
                )
                .into(),
                pool_wait_observer: OnceLock::new(),
                probe: tokio::sync::Mutex::new(None),
                probes: AtomicU64::new(0),
                begin,
                migration,
                pooled: pooled::Wanted::of(config),
            }),
        };
        db.spawn_migrations();
        if db.inner.address.is_name() {
            re_resolve::spawn(db.downgrade());
        }
        Ok(db)
    }

    /// Has `observer` told how long each call waits for a pooled connection: the metrics record
    /// it, and `db` need not know about them. Only the first observer set is kept.
    pub fn on_pool_wait(&self, observer: fn(Duration)) {
        let _ = self.inner.pool_wait_observer.set(observer);
    }

    /// A handle that does not keep the database alive (for background tasks).
    pub fn downgrade(&self) -> WeakDb {
        WeakDb(Arc::downgrade(&self.inner))
    }

    /// The pinned database address (for logs, `/ready` and tests).
    pub fn address(&self) -> &PinnedAddress {
        &self.inner.address
    }

    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    pub fn migrations_applied(&self) -> bool {
        self.inner.migrated.load(Ordering::Acquire)
    }

    /// Closes the pool: waiters get an error and idle connections are dropped.
    pub fn close(&self) {
        self.inner.pool.close();
    }

    pub fn breaker(&self) -> &Breaker {
        &self.inner.breaker
    }

    /// Readiness round trips performed since startup (however many callers asked).
    pub fn readiness_probes(&self) -> u64 {
        self.inner.probes.load(Ordering::Relaxed)
    }

    /// The outcome of a round trip at most [`PROBE_FRESH_FOR`] old. One probe at a time: callers
    /// that arrive meanwhile wait for it and share its outcome, so any number of `/ready` callers
    /// cost at most one query a second and never crowd the data requests out of the pool.
    async fn recent_probe(&self) -> Result<(), String> {
        let mut last = self.inner.probe.lock().await;
        if let Some(p) = last.as_ref()
            && p.at.elapsed() < PROBE_FRESH_FOR
        {
            return p.outcome.clone();
        }
        let outcome = self.probe().await.map_err(|e| e.to_string());
        self.inner.probes.fetch_add(1, Ordering::Relaxed);
        *last = Some(Probe {
            at: tokio::time::Instant::now(),
            outcome: outcome.clone(),
        });
        outcome
    }

    /// One round trip, bounded by the pool wait timeout (at most 1 s).
    async fn probe(&self) -> Result<(), DbError> {
        let limit = self.inner.wait_timeout.min(Duration::from_secs(1));
        tokio::time::timeout(limit, async {
            let mut span = self.span("PING", "postgres", "-- connection check");
            let (mut lease, permit) = self.lease(&mut span).await?;
            let reused = lease.reused();
            let r = within(self.inner.query_deadline, lease.ping()).await;
            self.finish(Some(lease), reused, permit, r.and_then(|r| r))
                .map_err(|f| f.recorded_on(&mut span))
        })
        .await
        .unwrap_or_else(|_| Err(DbError::Unavailable(format!("no answer within {limit:?}"))))
    }

    /// The database's state for `/ready`: the outcome of a recent round trip (see
    /// `Db::recent_probe`) and what this replica knows without asking.
    pub async fn check(&self) -> DbStatus {
        let outcome = self.recent_probe().await;
        let migrated = self.migrations_applied();
        let error = match (&outcome, migrated) {
            (Err(e), _) => Some(e.clone()),
            (Ok(()), false) => Some(
                self.inner
                    .migration_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .unwrap_or_else(|| "migrations not applied yet".into()),
            ),
            (Ok(()), true) => None,
        };
        DbStatus {
            reachable: outcome.is_ok(),
            error,
            host: self.inner.address.host().to_owned(),
            address: self.inner.address.get(),
            dns_lookups: self.inner.address.lookups(),
            migrations_applied: migrated,
            schema_applied: Some(self.inner.schema.load(Ordering::Relaxed)).filter(|v| *v != 0),
            pool: self.inner.pool.status(),
            breaker: self.inner.breaker.state(),
            consecutive_failures: self.inner.breaker.consecutive_failures(),
            breaker_opened_total: self.inner.breaker.opened_total(),
        }
    }
}

/// The connect options of the pool's connections and, through a transaction pooler that cannot
/// carry prepared statements, the statement that begins each call's transaction: the statement
/// and idle-in-transaction timeouts go where the server keeps them. A transaction pooler cannot
/// pass `options` at login (and would not keep the settings for the session anyway), so there
/// each call's transaction sets them, or (`transaction-prepared`) the server's role or database
/// settings hold them ([`pooled`]).
fn session_settings(config: &DatabaseConfig) -> (PgConnectOptions, Option<sqlx::SqlStr>) {
    let statement_timeout = format!("{}ms", config.statement_timeout.as_millis());
    let idle_in_transaction = format!("{}ms", config.idle_in_transaction_timeout.as_millis());
    let options = config
        .connect_options
        .clone()
        .application_name(&config.application_name);
    match config.pooler_mode {
        PoolerMode::None => (
            options.options([
                ("statement_timeout", statement_timeout.as_str()),
                (
                    "idle_in_transaction_session_timeout",
                    idle_in_transaction.as_str(),
                ),
            ]),
            None,
        ),
        PoolerMode::TransactionPrepared => (options, None),
        PoolerMode::Transaction => (
            options,
            Some(sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(
                format!(
                    "BEGIN; SET LOCAL statement_timeout = '{statement_timeout}'; \
                     SET LOCAL idle_in_transaction_session_timeout = '{idle_in_transaction}'"
                ),
            ))),
        ),
    }
}

/// The connector of the migrations' own session (see `migrate`): no `statement_timeout`, since
/// a migration may rightly take long and the server's role or database settings that bound the
/// requests through a pooler (`transaction-prepared`) must not cut it short; a short
/// `lock_timeout` (`DB_MIGRATION_LOCK_TIMEOUT`), since while it waits for a lock every request
/// behind it waits too.
fn migration_connector(
    options: &PgConnectOptions,
    tls: &crate::config::DbTlsSettings,
    host: &str,
    config: &DatabaseConfig,
) -> anyhow::Result<Connector> {
    let lock_timeout = format!("{}ms", config.migration_lock_timeout.as_millis());
    Connector::new(
        options
            .clone()
            .application_name(&format!("{}-migrate", config.application_name))
            .options([
                ("statement_timeout", "0"),
                ("lock_timeout", lock_timeout.as_str()),
            ]),
        tls,
        host,
    )
}
