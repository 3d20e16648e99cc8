//! Migrations: embedded in the binary, applied at startup by a background task that retries
//! until the database accepts them, under sqlx's advisory lock so that replicas starting together
//! apply them once. That lock lives as long as the session, which a transaction pooler does not
//! keep, so through a transaction pooler they run over `DATABASE_MIGRATION_URL` instead, on a
//! connection of their own straight to the server. With `DB_POOLER_MODE=transaction-prepared` the
//! same task then checks what the pooler's server connections bring (`super::pooled`): the
//! service serves once both are done.

use std::{sync::atomic::Ordering, time::Duration};

use deadpool::managed::Object;

use super::{
    Db, DbError,
    backoff::{Attempt, Backoff},
    error::pool_error,
    pooled::Observed,
};

/// Limit for opening the dedicated migration connection (`DATABASE_MIGRATION_URL`).
const MIGRATION_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// `Migrator::run` inside a spawned task fails to compile ("implementation of `Acquire` is not
/// general enough", a known sqlx limitation); `run_direct` is sqlx's public, doc-hidden entry point
/// for exactly this case. It takes the same advisory lock as `run` when locking is on (the default).
pub async fn run_migrations(
    conn: &mut sqlx::PgConnection,
) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run_direct(None, conn, false).await
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
            let Some((connector, address)) = &self.inner.migration else {
                let mut conn = self.inner.pool.get().await.map_err(pool_error)?;
                let r = run_migrations(&mut conn)
                    .await
                    .map_err(|e| DbError::Unavailable(format!("migrations failed: {e}")));
                if r.is_err() {
                    drop(Object::take(conn));
                }
                return r;
            };
            // DATABASE_MIGRATION_URL: a connection of its own, straight to the server, closed after.
            let addr = address.get().ok_or_else(|| {
                DbError::Unavailable(format!(
                    "DATABASE_MIGRATION_URL's host {:?} has not resolved yet",
                    address.host()
                ))
            })?;
            let mut conn = tokio::time::timeout(MIGRATION_CONNECT_TIMEOUT, connector.connect(addr))
                .await
                .map_err(|_| {
                    DbError::Unavailable(format!(
                        "DATABASE_MIGRATION_URL: no connection within {MIGRATION_CONNECT_TIMEOUT:?}"
                    ))
                })?
                .map_err(|e| DbError::Unavailable(format!("DATABASE_MIGRATION_URL: {e}")))?;
            let r = run_migrations(&mut conn)
                .await
                .map_err(|e| DbError::Unavailable(format!("migrations failed: {e}")));
            let _ = sqlx::Connection::close(conn).await;
            r
        };
        let outcome = match attempt.await {
            Ok(()) => self.check_pooled().await,
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
