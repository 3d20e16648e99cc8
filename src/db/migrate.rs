//! Migrations: embedded in the binary, applied at startup by a background task that retries
//! until the database accepts them, under sqlx's advisory lock so that replicas starting together
//! apply them once. They run in a session of their own (never a pooled connection): the advisory
//! lock needs a session, which a transaction pooler does not keep, so through one they connect to
//! `DATABASE_MIGRATION_URL`, straight to the server; and the session has the migrations' own
//! settings (no statement timeout, a short lock timeout: see `super::migration_connector`). A
//! migration that cannot get its lock in time fails, and the task tries again with backoff while
//! the replicas already migrated keep serving: it never holds the requests queued behind its lock
//! for longer than `DB_MIGRATION_LOCK_TIMEOUT` at a time. With `DB_POOLER_MODE=transaction-prepared`
//! the same task then checks what the pooler's server connections bring (`super::pooled`): the
//! service serves once both are done.

use std::{
    sync::{LazyLock, atomic::Ordering},
    time::Duration,
};

use deadpool::managed::Object;

use super::{
    Db, DbError,
    backoff::{Attempt, Backoff},
    error::pool_error,
    pooled::Observed,
};

/// Limit for opening the migrations' own connection.
const MIGRATION_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The migrations in `migrations/`, embedded in the binary. Migrations this build does not know
/// (a newer release applied them) do not stop it: whether it may serve on that schema is
/// `schema_compatibility`'s to say (`serving_floor`).
pub static MIGRATOR: LazyLock<sqlx::migrate::Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
});

/// The schema version this build's migrations end at: the newest migration's.
pub fn expected_schema() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The newest migration the database has applied (`None` before the first).
pub async fn applied_schema(conn: &mut sqlx::PgConnection) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
        .persistent(false)
        .fetch_one(conn)
        .await
}

/// `Migrator::run` inside a spawned task fails to compile ("implementation of `Acquire` is not
/// general enough", a known sqlx limitation); `run_direct` is sqlx's public, doc-hidden entry point
/// for exactly this case. It takes the same advisory lock as `run` when locking is on (the default).
pub async fn run_migrations(
    conn: &mut sqlx::PgConnection,
) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run_direct(None, conn, false).await
}

/// The oldest schema a release may expect and still serve on this one (`schema_compatibility`,
/// raised by a migration that contracts); `None` if its row is gone. This build's migrations
/// create the table, so it exists once they have run.
pub(super) async fn serving_floor(
    conn: &mut sqlx::PgConnection,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT oldest_serving_schema FROM schema_compatibility")
        .persistent(false)
        .fetch_optional(conn)
        .await
}

/// Applies the migrations over `conn`, then reads the schema version they left; refuses a
/// schema that has moved past what this build can serve.
async fn migrate_and_read(conn: &mut sqlx::PgConnection) -> Result<Option<i64>, DbError> {
    run_migrations(conn)
        .await
        .map_err(|e| DbError::Unavailable(format!("migrations failed: {e}")))?;
    let unreadable = |e: sqlx::Error| DbError::Unavailable(format!("cannot read the schema: {e}"));
    let applied = applied_schema(conn).await.map_err(unreadable)?;
    let expected = expected_schema();
    match serving_floor(conn).await.map_err(unreadable)? {
        Some(floor) if floor > expected => Err(DbError::Unavailable(format!(
            "this release cannot serve on the database's schema: its migrations end at {expected}, \
             and the schema ({}) serves releases whose migrations reach {floor} or later; deploy \
             one of those",
            applied.unwrap_or_default()
        ))),
        _ => Ok(applied),
    }
}

impl Db {
    /// Applies the migrations in the background, retrying until they are applied; ends early if
    /// the application is dropped first.
    pub(super) fn spawn_migrations(&self) {
        let db = self.downgrade();
        tokio::spawn(async move {
            let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
            db.retry(backoff, |db| async move { db.migrate_once().await })
                .await;
        });
    }

    async fn migrate_once(&self) -> Attempt {
        let attempt = async {
            let (connector, address) = &self.inner.migration;
            let addr = address.get().ok_or_else(|| {
                DbError::Unavailable(format!(
                    "the migrations' host {:?} has not resolved yet",
                    address.host()
                ))
            })?;
            let mut conn = tokio::time::timeout(MIGRATION_CONNECT_TIMEOUT, connector.connect(addr))
                .await
                .map_err(|_| {
                    DbError::Unavailable(format!(
                        "migrations: no connection within {MIGRATION_CONNECT_TIMEOUT:?}"
                    ))
                })?
                .map_err(|e| DbError::Unavailable(format!("migrations: {e}")))?;
            let r = migrate_and_read(&mut conn).await;
            let _ = sqlx::Connection::close(conn).await;
            r
        };
        let outcome = match attempt.await {
            Ok(applied) => {
                self.inner
                    .schema
                    .store(applied.unwrap_or(0), Ordering::Relaxed);
                self.check_pooled().await
            }
            Err(e) => Err(e),
        };
        *self
            .inner
            .migration_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = outcome.as_ref().err().map(|e| e.to_string());
        match outcome {
            Ok(()) => {
                self.inner.migrated.store(true, Ordering::Release);
                tracing::info!("database migrations applied; serving");
                Attempt::Done
            }
            Err(e) => {
                tracing::warn!(error = %e, "database not ready; will retry");
                Attempt::Again
            }
        }
    }

    /// `DB_POOLER_MODE=transaction-prepared`: refuses to serve until the pooler's server
    /// connections have the timeouts and the pooler carries named statements (`super::pooled`).
    async fn check_pooled(&self) -> Result<(), DbError> {
        let Some(wanted) = &self.inner.pooled else {
            return Ok(());
        };
        let mut conn = self.inner.pool.get().await.map_err(pool_error)?;
        let observed = match Observed::read(&mut conn).await {
            Ok(o) => o,
            Err(e) => {
                drop(Object::take(conn));
                return Err(DbError::Unavailable(format!(
                    "cannot check the pooler's server connections: {e}"
                )));
            }
        };
        let problems = observed.problems(wanted);
        if problems.is_empty() {
            return Ok(());
        }
        // Its statement cache names statements the pooler may not carry.
        drop(Object::take(conn));
        Err(DbError::Unavailable(format!(
            "DB_POOLER_MODE=transaction-prepared: {}",
            problems.join("; ")
        )))
    }
}
