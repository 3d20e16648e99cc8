//! Why a database call failed, in the classes the rest of the service acts on: unavailable
//! (503 and the breaker), circuit open, statement timeout, and anything else (a bug: 500).

use std::time::Duration;

use deadpool::managed::{PoolError, TimeoutType};

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

pub(super) fn pool_error(e: PoolError<sqlx::Error>) -> DbError {
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
            // full); 57P0x: admin/crash shutdown, cannot connect now; 25006: a write on a
            // read-only server, which is what a standby is: after a failover, the URL (or the
            // pooler behind it) still reaching the former primary. Retrying later succeeds once
            // it points at the new one, and counting it toward the breaker is what makes the
            // service look the host up again (`re_resolve`).
            c.starts_with("08") || c.starts_with("53") || c.starts_with("57P") || c == "25006"
        }),
        _ => false,
    };
    if unavailable {
        DbError::Unavailable(e.to_string())
    } else {
        DbError::Unexpected(e)
    }
}
