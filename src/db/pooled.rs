//! What the server connections behind a transaction pooler bring with them, for
//! `DB_POOLER_MODE=transaction-prepared`.
//!
//! In that mode a call is one exchange, as on a direct connection: no per-call transaction sets
//! the timeouts, and a pooler passes no startup `options`, so `statement_timeout` and
//! `idle_in_transaction_session_timeout` must come from where the server keeps them for every
//! session (the role's or the database's settings, or the pooler's `connect_query`). And named
//! statements are safe only when the pooler carries them (PgBouncer 1.21 or later with
//! `max_prepared_statements` renames each one per server connection); a pooler that passes names
//! through (PgBouncer 1.18) could bind one client's statement on a server connection where another
//! client prepared a different one under the same name.
//!
//! Both are read from the server in one named statement that looks itself up in
//! `pg_prepared_statements`: the name the server knows it by shows whether the pooler renamed it.
//! The service refuses to serve until both hold (the migrations task runs this check and retries,
//! as it retries migrations; `/ready` says why), because a deployment that silently lost its
//! timeouts would keep runaway queries on the server after their clients gave up, and one that
//! passes names through could run the wrong statement. `doctor` reports the same check.

use std::time::Duration;

use sqlx::PgConnection;

use crate::config::{DatabaseConfig, PoolerMode};

/// Reads both timeouts in milliseconds and the server's name for this very statement (bound as
/// `$1`, so the statement finds its own text).
const READ: &str = "SELECT \
    (SELECT setting::int8 FROM pg_settings WHERE name = 'statement_timeout'), \
    (SELECT setting::int8 FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'), \
    (SELECT name FROM pg_prepared_statements WHERE statement = $1 LIMIT 1)";

/// The prefix sqlx gives the statements it names: seen on the server, nothing renamed them.
const SQLX_NAME_PREFIX: &str = "sqlx_s_";

/// What the service needs of the server connections: the configured timeouts (zero: none
/// required) and, for the fix it suggests, the role and database it logs in as.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub statement_timeout: Duration,
    pub idle_in_transaction_timeout: Duration,
    pub role: String,
    pub database: String,
}

impl Wanted {
    /// What `config` needs of the server connections; `None` unless its pooler mode is
    /// `transaction-prepared`.
    pub fn of(config: &DatabaseConfig) -> Option<Wanted> {
        let options = &config.connect_options;
        (config.pooler_mode == PoolerMode::TransactionPrepared).then(|| Wanted {
            statement_timeout: config.statement_timeout,
            idle_in_transaction_timeout: config.idle_in_transaction_timeout,
            role: options.get_username().to_owned(),
            database: options
                .get_database()
                .unwrap_or(options.get_username())
                .to_owned(),
        })
    }
}

/// What one server connection reached through the pooler had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub statement_timeout_ms: i64,
    pub idle_in_transaction_ms: i64,
    /// The server's name for a statement the service prepared; `None` if it was not found.
    pub statement_name: Option<String>,
}

impl Observed {
    /// Reads them over `conn` with a named statement, as the data calls run.
    pub async fn read(conn: &mut PgConnection) -> Result<Observed, sqlx::Error> {
        let (statement_timeout_ms, idle_in_transaction_ms, statement_name) = sqlx::query_as(READ)
            .bind(READ)
            .persistent(true)
            .fetch_one(conn)
            .await?;
        Ok(Observed {
            statement_timeout_ms,
            idle_in_transaction_ms,
            statement_name,
        })
    }

    /// Whether the pooler renamed the statement, i.e. carries prepared statements per server
    /// connection.
    pub fn statements_carried(&self) -> bool {
        self.statement_name
            .as_deref()
            .is_some_and(|name| !name.starts_with(SQLX_NAME_PREFIX))
    }

    /// What keeps the service from serving through this pooler, each with its fix; empty when
    /// nothing does.
    pub fn problems(&self, wanted: &Wanted) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.statements_carried() {
            problems.push(format!(
                "the pooler passes statement names through unchanged (the server knows the \
                 service's statement as {:?}): it does not carry prepared statements, so named \
                 statements could run on another client's server connection. Use PgBouncer 1.21 \
                 or later with max_prepared_statements > 0, or DB_POOLER_MODE=transaction",
                self.statement_name.as_deref().unwrap_or("(not found)")
            ));
        }
        let timeouts = [
            (
                "statement_timeout",
                "DB_STATEMENT_TIMEOUT",
                self.statement_timeout_ms,
                wanted.statement_timeout,
            ),
            (
                "idle_in_transaction_session_timeout",
                "DB_IDLE_IN_TRANSACTION_TIMEOUT",
                self.idle_in_transaction_ms,
                wanted.idle_in_transaction_timeout,
            ),
        ];
        for (setting, var, observed_ms, want) in timeouts {
            let want_ms = i64::try_from(want.as_millis()).unwrap_or(i64::MAX);
            if want_ms == 0 || (1..=want_ms).contains(&observed_ms) {
                continue;
            }
            let observed = if observed_ms == 0 {
                "0 (off)".to_owned()
            } else {
                format!("{observed_ms}ms")
            };
            problems.push(format!(
                "{setting} on the pooler's server connections is {observed}, and {var} is \
                 {want_ms}ms: set it where every server session gets it, e.g. ALTER ROLE {role} \
                 IN DATABASE {database} SET {setting} = '{want_ms}ms' (then RECONNECT in the \
                 pooler's console, or wait for server_lifetime)",
                role = identifier(&wanted.role),
                database = identifier(&wanted.database),
            ));
        }
        problems
    }
}

/// `name` quoted as an SQL identifier, for a command the operator can paste.
fn identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted() -> Wanted {
        Wanted {
            statement_timeout: Duration::from_secs(5),
            idle_in_transaction_timeout: Duration::from_secs(10),
            role: "todo".into(),
            database: "todos".into(),
        }
    }

    fn observed(statement: i64, idle: i64, name: &str) -> Observed {
        Observed {
            statement_timeout_ms: statement,
            idle_in_transaction_ms: idle,
            statement_name: Some(name.into()),
        }
    }

    #[test]
    fn a_renaming_pooler_with_the_timeouts_in_force_passes() {
        assert!(
            observed(5000, 10000, "PGBOUNCER_7")
                .problems(&wanted())
                .is_empty()
        );
        // Stricter than configured is in force too.
        assert!(
            observed(1000, 2000, "PGBOUNCER_7")
                .problems(&wanted())
                .is_empty()
        );
    }

    #[test]
    fn names_passed_through_are_refused() {
        let problems = observed(5000, 10000, "sqlx_s_3").problems(&wanted());
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("\"sqlx_s_3\""), "{problems:?}");
        assert!(problems[0].contains("max_prepared_statements"));
        let missing = Observed {
            statement_name: None,
            ..observed(5000, 10000, "")
        };
        assert_eq!(missing.problems(&wanted()).len(), 1);
    }

    #[test]
    fn a_timeout_off_or_longer_than_configured_is_refused_with_its_fix() {
        let problems = observed(0, 60_000, "PGBOUNCER_1").problems(&wanted());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("statement_timeout on the pooler's server connections is 0 (off)")
        );
        assert!(problems[0].contains(
            "ALTER ROLE \"todo\" IN DATABASE \"todos\" SET statement_timeout = '5000ms'"
        ));
        assert!(problems[1].contains("is 60000ms, and DB_IDLE_IN_TRANSACTION_TIMEOUT is 10000ms"));
    }

    #[test]
    fn a_timeout_the_service_does_not_want_is_not_required() {
        let none = Wanted {
            statement_timeout: Duration::ZERO,
            idle_in_transaction_timeout: Duration::ZERO,
            ..wanted()
        };
        assert!(observed(0, 0, "PGBOUNCER_1").problems(&none).is_empty());
    }
}
