//! What the server reached says about itself: whether it takes writes, how many connections it
//! has left for this replica's pool, which migrations it has applied, and, through a pooler that
//! carries prepared statements, what its server connections bring (`db::pooled`).

use sqlx::{Connection, PgConnection};

use super::report::{Check, Status};
use crate::{
    config::{DatabaseConfig, PoolerMode},
    db::{
        MIGRATOR,
        budget::ServerConnections,
        pooled::{Observed, Wanted},
    },
};

/// The checks made over a logged-in connection, in the order of the report.
pub(super) const SERVER: [&str; 4] = [
    "writable",
    "connection budget",
    "migrations",
    "pooler sessions",
];

/// What the server says about itself ([`SERVER`]). Read-only, in one transaction with unnamed
/// statements (but `pooler sessions`' own, named as the service names them): through a
/// transaction pooler that keeps the queries on one server connection.
pub(super) async fn checks(conn: &mut PgConnection, db: &DatabaseConfig) -> Vec<Check> {
    match conn.begin().await {
        Ok(mut tx) => {
            let checks = vec![
                writable(&mut tx, "DATABASE_URL").await,
                budget(&mut tx, db.pool_max_size, db.pooler_mode).await,
                migrations(&mut tx).await,
                pooler_sessions(&mut tx, db).await,
            ];
            let _ = tx.rollback().await;
            checks
        }
        Err(e) => SERVER
            .iter()
            .map(|name| Check::new(name, Status::Fail, format!("cannot begin: {e}")))
            .collect(),
    }
}

/// Whether the server takes writes: after a failover, a URL (or a pooler) left pointing at the
/// former primary reaches a standby, where every write fails.
pub(super) async fn writable(conn: &mut PgConnection, var: &str) -> Check {
    let in_recovery: Result<bool, sqlx::Error> = sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .persistent(false)
        .fetch_one(&mut *conn)
        .await;
    match in_recovery {
        Ok(false) => Check::new("writable", Status::Pass, "a primary: it takes writes"),
        Ok(true) => Check::new(
            "writable",
            Status::Fail,
            format!("{var} reaches a standby (in recovery): every write fails there"),
        )
        .hint(format!(
            "Point {var} (or the pooler in front) at the primary; after a failover, at the \
             promoted server."
        )),
        Err(e) => Check::new("writable", Status::Warn, format!("cannot tell: {e}")),
    }
}

/// This replica's pool beside the server's `max_connections`, which every replica shares.
/// Through a transaction pooler the pool's connections are the pooler's clients, and the server's
/// are the pooler's to spend.
async fn budget(conn: &mut PgConnection, pool_max_size: usize, pooler: PoolerMode) -> Check {
    let s = match ServerConnections::read(conn, false).await {
        Ok(s) => s,
        Err(e) => {
            return Check::new(
                "connection budget",
                Status::Warn,
                format!("cannot read: {e}"),
            );
        }
    };
    let usable = s.max_connections - s.reserved;
    if pooler.pools_transactions() {
        let detail = format!(
            "through a transaction pooler (DB_POOLER_MODE={}): this replica's pool of up to \
             {pool_max_size} are the pooler's clients; the server: max_connections {} ({} \
             reserved), {} in use (the pooler's among them), {} free",
            pooler.as_str(),
            s.max_connections,
            s.reserved,
            s.in_use,
            s.free()
        );
        return if s.free() == 0 {
            Check::new("connection budget", Status::Warn, detail).hint(
                "The server has no connection left for the pooler to open: lower the pooler's \
                 pool size (default_pool_size) or raise max_connections.",
            )
        } else {
            Check::new("connection budget", Status::Pass, detail)
        };
    }
    let detail = format!(
        "server max_connections {} ({} reserved), {} in use, {} free; this replica's pool up to \
         {pool_max_size} (DB_POOL_MAX_SIZE): room for {} more replicas of that size",
        s.max_connections,
        s.reserved,
        s.in_use,
        s.free(),
        s.more_replicas(pool_max_size)
    );
    if pool_max_size as i64 > i64::from(usable) {
        Check::new("connection budget", Status::Warn, detail).hint(
            "One replica's pool can take every connection the server allows: lower \
             DB_POOL_MAX_SIZE, or put a pooler (PgBouncer) in front.",
        )
    } else if (s.free() as usize) < pool_max_size {
        Check::new("connection budget", Status::Warn, detail).hint(
            "Another replica of this size would not fit: keep replicas × DB_POOL_MAX_SIZE below \
             max_connections less the reserved and other clients' connections, or use a pooler.",
        )
    } else {
        Check::new("connection budget", Status::Pass, detail)
    }
}

async fn migrations(conn: &mut PgConnection) -> Check {
    let known: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    let applied: Result<Vec<i64>, sqlx::Error> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .persistent(false)
            .fetch_all(&mut *conn)
            .await;
    match applied {
        Ok(applied) => {
            let pending: Vec<&i64> = known.iter().filter(|v| !applied.contains(v)).collect();
            let unknown: Vec<&i64> = applied.iter().filter(|v| !known.contains(v)).collect();
            if !unknown.is_empty() {
                Check::new(
                    "migrations",
                    Status::Warn,
                    format!(
                        "the database has migrations this build does not know: {unknown:?} (this \
                         build's schema ends at {})",
                        crate::db::expected_schema()
                    ),
                )
                .hint(
                    "A newer release migrated this database: this one serves on it only while \
                     that release's migrations keep to expand/contract (docs/scaling-out.md); \
                     deploy the newer release.",
                )
            } else if pending.is_empty() {
                Check::new(
                    "migrations",
                    Status::Pass,
                    format!(
                        "all {} applied: schema {}, as this build expects",
                        known.len(),
                        crate::db::expected_schema()
                    ),
                )
            } else {
                Check::new(
                    "migrations",
                    Status::Warn,
                    format!("{} of {} pending: {pending:?}", pending.len(), known.len()),
                )
                .hint("The service applies them at startup; nothing to do unless it cannot start.")
            }
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Check::new(
            "migrations",
            Status::Warn,
            format!("none applied yet ({} pending)", known.len()),
        )
        .hint("The service applies them at startup."),
        Err(e) => Check::new(
            "migrations",
            Status::Fail,
            format!("cannot read the migration table: {e}"),
        )
        .hint("The user in DATABASE_URL needs read access to _sqlx_migrations."),
    }
}

/// `DB_POOLER_MODE=transaction-prepared`: the check the service makes before serving
/// (`db::pooled`), so an operator sees why it does not.
async fn pooler_sessions(conn: &mut PgConnection, db: &DatabaseConfig) -> Check {
    const NAME: &str = "pooler sessions";
    let Some(wanted) = Wanted::of(db) else {
        return Check::new(
            NAME,
            Status::Skip,
            format!(
                "DB_POOLER_MODE={}: the service sets the timeouts itself",
                db.pooler_mode.as_str()
            ),
        );
    };
    match Observed::read(conn).await {
        Ok(observed) => {
            let problems = observed.problems(&wanted);
            if problems.is_empty() {
                Check::new(
                    NAME,
                    Status::Pass,
                    format!(
                        "the pooler carries prepared statements (the server names ours {}); \
                         statement_timeout {}ms, idle_in_transaction_session_timeout {}ms",
                        observed.statement_name.as_deref().unwrap_or_default(),
                        observed.statement_timeout_ms,
                        observed.idle_in_transaction_ms
                    ),
                )
            } else {
                Check::new(NAME, Status::Fail, problems.join("; "))
                    .hint("The service does not serve until this passes (its /ready says why).")
            }
        }
        Err(e) => Check::new(NAME, Status::Fail, format!("cannot read: {e}")).hint(
            "Through PgBouncer before 1.21 (or max_prepared_statements = 0) named statements \
             fail: use DB_POOLER_MODE=transaction there.",
        ),
    }
}
