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

pub mod breaker;
pub mod pool;
pub mod resolve;
mod session;
pub mod todos;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use deadpool::managed::{Object, PoolError, TimeoutType};
use sqlx::Connection;
use tracing::{Span, field::Empty};

use crate::{
    config::{BreakerConfig, DatabaseConfig},
    telemetry::sampling,
};
use breaker::{Breaker, BreakerState};
use pool::PgManager;
use resolve::{PinnedAddress, Resolver};
use session::within;

/// How much longer than `statement_timeout` a call may take before the client gives up on the
/// connection: enough for Postgres' own cancellation to arrive over a healthy link.
const QUERY_DEADLINE_MARGIN: Duration = Duration::from_secs(1);

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub type Pool = deadpool::managed::Pool<PgManager>;
type Conn = Object<PgManager>;

/// Why a database call failed, in the terms the HTTP layer needs.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database cannot be used right now (down, unreachable, pool exhausted, not migrated).
    /// Retrying later may succeed.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The circuit breaker is open: the database was not touched.
    #[error("database circuit open; next probe in {retry_after:?}")]
    CircuitOpen { retry_after: Duration },
    /// The database answered but a statement ran past `statement_timeout`. Retrying may succeed;
    /// it does not count toward the breaker (the database is up, just slow for this query).
    #[error("database statement timed out: {0}")]
    Timeout(String),
    /// Anything else: a bug or a schema mismatch. Details are logged, not shown to clients.
    #[error(transparent)]
    Unexpected(#[from] sqlx::Error),
}

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
    /// The latest reason migrations could not be applied yet, for `/ready`.
    migration_error: Mutex<Option<String>>,
    wait_timeout: Duration,
    /// Client-side limit for one database call: `statement_timeout` plus a margin. Postgres
    /// enforces its own timeout only while it can still talk to us; on a half-open TCP connection
    /// (peer gone without a FIN) nothing would ever answer, so this is what ends the wait.
    query_deadline: Option<Duration>,
    /// Database name, for the spans' `db.namespace`.
    db_name: String,
    /// Told how long each call waited for a pooled connection (see [`Db::on_pool_wait`]).
    pool_wait_observer: OnceLock<fn(Duration)>,
}

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
    /// Host name from `DATABASE_URL`.
    pub host: String,
    /// The pinned address, until the host first resolves `None`.
    pub address: Option<SocketAddr>,
    /// DNS lookups of the database host since startup (1 in a healthy run, 0 for an IP).
    pub dns_lookups: u64,
    pub migrations_applied: bool,
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
        let address = PinnedAddress::resolve(&config.host, config.port, resolver).await;
        let statement_timeout = format!("{}ms", config.statement_timeout.as_millis());
        let idle_in_transaction = format!("{}ms", config.idle_in_transaction_timeout.as_millis());
        let options = config
            .connect_options
            .clone()
            .application_name(&config.application_name)
            .options([
                ("statement_timeout", statement_timeout.as_str()),
                (
                    "idle_in_transaction_session_timeout",
                    idle_in_transaction.as_str(),
                ),
            ]);
        let manager = PgManager::new(options, Arc::clone(&address), config.max_lifetime);
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
                address,
                migrated: AtomicBool::new(false),
                migration_error: Mutex::new(None),
                wait_timeout: config.pool_wait_timeout,
                query_deadline: (!config.statement_timeout.is_zero())
                    .then(|| config.statement_timeout + QUERY_DEADLINE_MARGIN),
                db_name: config
                    .connect_options
                    .get_database()
                    .unwrap_or(config.connect_options.get_username())
                    .to_owned(),
                pool_wait_observer: OnceLock::new(),
            }),
        };
        tokio::spawn(db.clone().migrate_until_applied());
        if db.inner.address.is_name() {
            spawn_re_resolver(db.downgrade());
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

    /// The client span of one database call. Named `{operation} {table}` as SigNoz's DB views
    /// expect, with the older `db.system` attribute SigNoz still counts, the parameterised SQL
    /// (never values), the host as configured and the pinned address actually used.
    fn span(&self, operation: &'static str, table: &'static str, sql: &'static str) -> Span {
        // Two callsites because a callsite's target is fixed: spans of untraced requests (see
        // `telemetry::sampling`) go under the target the exporter ignores.
        macro_rules! db_span {
            ($target:expr) => {
                tracing::info_span!(
                    target: $target,
                    "db",
                    otel.name = %format_args!("{operation} {table}"),
                    otel.kind = "client",
                    db.system = "postgresql",
                    db.system.name = "postgresql",
                    db.namespace = %self.inner.db_name,
                    db.operation.name = operation,
                    db.collection.name = table,
                    db.query.text = sql,
                    server.address = %self.inner.address.host(),
                    server.port = i64::from(self.inner.address.port()),
                    network.peer.address = Empty,
                    db.client.connection.wait_time_ms = Empty,
                    otel.status_code = Empty,
                    error.type = Empty,
                )
            };
        }
        let span = if sampling::in_traced_request() {
            db_span!("todo_service::db")
        } else {
            db_span!(sampling::UNTRACED)
        };
        if !span.is_disabled()
            && let Some(addr) = self.inner.address.get()
        {
            span.record("network.peer.address", addr.ip().to_string());
        }
        span
    }

    /// A cheap round trip for `/ready`, bounded by the pool wait timeout (at most 1 s).
    pub async fn check(&self) -> DbStatus {
        let limit = self.inner.wait_timeout.min(Duration::from_secs(1));
        let outcome = tokio::time::timeout(limit, async {
            let span = self.span("PING", "postgres", "-- connection check");
            let (mut lease, permit) = self.lease(&span).await?;
            let reused = lease.reused();
            let r = within(self.inner.query_deadline, lease.ping()).await;
            self.finish(Some(lease), reused, permit, r.and_then(|r| r))
                .map_err(|f| f.recorded_on(&span))
        })
        .await
        .unwrap_or_else(|_| Err(DbError::Unavailable(format!("no answer within {limit:?}"))));
        let migrated = self.migrations_applied();
        let error = match (&outcome, migrated) {
            (Err(e), _) => Some(e.to_string()),
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
            error,
            host: self.inner.address.host().to_owned(),
            address: self.inner.address.get(),
            dns_lookups: self.inner.address.lookups(),
            migrations_applied: migrated,
            pool: self.inner.pool.status(),
            breaker: self.inner.breaker.state(),
            consecutive_failures: self.inner.breaker.consecutive_failures(),
            breaker_opened_total: self.inner.breaker.opened_total(),
        }
    }

    async fn migrate_until_applied(self) {
        let mut delay = Duration::from_millis(100);
        loop {
            let attempt = async {
                let mut conn = self.inner.pool.get().await.map_err(pool_error)?;
                let r = run_migrations(&mut conn)
                    .await
                    .map_err(|e| DbError::Unavailable(format!("migrations failed: {e}")));
                if r.is_err() {
                    drop(Object::take(conn));
                }
                r
            };
            match attempt.await {
                Ok(()) => {
                    self.inner.migrated.store(true, Ordering::Release);
                    *self
                        .inner
                        .migration_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = None;
                    tracing::info!("database migrations applied");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "database not ready; will retry migrations");
                    *self
                        .inner
                        .migration_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

/// `Migrator::run` inside a spawned task fails to compile ("implementation of `Acquire` is not
/// general enough", a known sqlx limitation); `run_direct` is sqlx's public, doc-hidden entry point
/// for exactly this case. It takes the same advisory lock as `run` when locking is on (the default).
pub async fn run_migrations(
    conn: &mut sqlx::PgConnection,
) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run_direct(None, conn, false).await
}

/// While the breaker is open (the pinned address keeps failing), looks the host up again in the
/// background: at once when it opens, then with doubling delays up to a minute, until it closes.
/// One lookup per outage in the common case; never a lookup storm, never on a request.
fn spawn_re_resolver(db: WeakDb) {
    tokio::spawn(async move {
        loop {
            let Some(breaker) = db.upgrade().map(|d| Arc::clone(&d.inner.breaker)) else {
                return;
            };
            breaker.opened().await;
            let mut delay = Duration::from_secs(2);
            loop {
                let Some(d) = db.upgrade() else { return };
                if d.breaker().state() == BreakerState::Closed {
                    break;
                }
                let address = d.address();
                match address.re_resolve().await {
                    resolve::ReResolved::Switched { from, to } => {
                        tracing::warn!(
                            db.host = address.host(), ?from, %to,
                            "database address changed: switched to an address that answers"
                        );
                        // The breaker's next probe tries the new address; if that fails too, the
                        // breaker reopens and this starts over.
                        break;
                    }
                    outcome => tracing::info!(
                        db.host = address.host(), ?outcome, retry_in = ?delay,
                        "re-resolved the database host during an outage; keeping the address"
                    ),
                }
                drop(d);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    });
}

fn pool_error(e: PoolError<sqlx::Error>) -> DbError {
    match e {
        PoolError::Timeout(TimeoutType::Wait) => {
            DbError::Unavailable("no pooled connection became free in time".into())
        }
        PoolError::Timeout(TimeoutType::Create) => {
            DbError::Unavailable("connecting to the database timed out".into())
        }
        PoolError::Timeout(TimeoutType::Recycle) => {
            DbError::Unavailable("checking a pooled connection timed out".into())
        }
        PoolError::Backend(e) => match classify(e) {
            // Any failure to open a connection means the database is not usable right now.
            DbError::Unexpected(e) => DbError::Unavailable(format!("cannot connect: {e}")),
            unavailable => unavailable,
        },
        PoolError::Closed => DbError::Unavailable("the service is shutting down".into()),
        PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
            DbError::Unavailable(format!("pool misconfigured: {e}"))
        }
    }
}

/// Splits sqlx errors into "the database is unavailable" (retry later: 503) and the rest (500).
pub fn classify(e: sqlx::Error) -> DbError {
    let unavailable = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) if db.code().as_deref() == Some("57014") => {
            return DbError::Timeout(db.message().to_owned());
        }
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // 08: connection exception; 53: insufficient resources (too many connections, disk
            // full); 57P0x: admin/crash shutdown, cannot connect now.
            c.starts_with("08") || c.starts_with("53") || c.starts_with("57P")
        }),
        _ => false,
    };
    if unavailable {
        DbError::Unavailable(e.to_string())
    } else {
        DbError::Unexpected(e)
    }
}
