//! Migrations: embedded in the binary, applied at startup by a background task that retries
//! until the database accepts them, under sqlx's advisory lock so that replicas starting together
//! apply them once.

use std::{sync::atomic::Ordering, time::Duration};

use deadpool::managed::Object;

use super::{Db, DbError, error::pool_error};

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
    /// Applies the migrations, retrying with backoff until they are applied.
    pub(super) async fn migrate_until_applied(self) {
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
