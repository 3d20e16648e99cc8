//! The todo queries, one statement each through `Db::call` (see `session`): a pooled connection
//! lent for the statement, discarded if the call is dropped half-way.
//!
//! Every statement names its owner (the caller's token `sub`, `''` without authentication), as
//! its last parameter: a todo of another owner is, to every query, a todo that does not exist.
//!
//! Lists are keyset-paged on `(owner, sort_key, id)` (see the migrations), so a page costs an
//! index range scan whatever its depth and however many todos other owners have, and rows inserted
//! while a client pages cannot shift later pages.

use chrono::{DateTime, Utc};
use sqlx::{Row, postgres::PgRow};

use super::{
    Db, DbError,
    session::{Effect, Statement},
};

/// One row of `todos`.
#[derive(Debug, Clone)]
pub struct TodoRow {
    pub id: i64,
    pub title: String,
    pub completed: bool,
    pub position: Option<i64>,
    pub sort_key: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Incremented by every update: the ETag.
    pub version: i64,
}

/// Where a page starts: strictly after this `(sort_key, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub sort_key: i64,
    pub id: i64,
}

impl Cursor {
    /// Before every row.
    pub const START: Cursor = Cursor {
        sort_key: i64::MIN,
        id: i64::MIN,
    };
}

/// A validated new todo.
#[derive(Debug)]
pub struct NewTodo {
    pub title: String,
    pub completed: bool,
    pub position: Option<i64>,
}

/// What a write conditional on the todo's version (`If-Match`) did.
#[derive(Debug)]
pub enum Conditional<T> {
    Done(T),
    /// No such todo (whatever the condition).
    NotFound,
    /// The todo exists at a version the condition did not name; nothing changed.
    VersionMismatch,
}

// Rows are read by column position, in the order every query's RETURNING/SELECT list gives:
// sqlx's derived `FromRow` looks each column up by name, a hash per column per row, which was a
// visible share of a 20-row page's cost in the profile.
impl<'r> sqlx::FromRow<'r, PgRow> for TodoRow {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        TodoRow::from_columns(row, 0)
    }
}

impl TodoRow {
    /// The todo's eight columns, starting at column `first`.
    pub(super) fn from_columns(row: &PgRow, first: usize) -> Result<Self, sqlx::Error> {
        Ok(TodoRow {
            id: row.try_get(first)?,
            title: row.try_get(first + 1)?,
            completed: row.try_get(first + 2)?,
            position: row.try_get(first + 3)?,
            sort_key: row.try_get(first + 4)?,
            created_at: row.try_get(first + 5)?,
            updated_at: row.try_get(first + 6)?,
            version: row.try_get(first + 7)?,
        })
    }
}

/// A validated partial update; `None` leaves a field unchanged, `Some(None)` clears `position`.
#[derive(Debug, Default)]
pub struct TodoChanges {
    pub title: Option<String>,
    pub completed: Option<bool>,
    pub position: Option<Option<i64>>,
}

impl TodoChanges {
    pub fn is_empty(&self) -> bool {
        self.title.is_none() && self.completed.is_none() && self.position.is_none()
    }
}

// Each statement is named once, here: its text goes on the database spans (parameterised: never
// values), and loadtest/pgbench runs the very same text (a test compares them).
const LIST: Statement = Statement {
    effect: Effect::Read,
    operation: "SELECT",
    table: "todos",
    sql: "SELECT id, title, completed, position, sort_key, created_at, updated_at, version \
          FROM todos \
          WHERE owner = $5 AND ($1::boolean IS NULL OR completed = $1) AND (sort_key, id) > ($2, $3) \
          ORDER BY sort_key, id \
          LIMIT $4",
};
const GET: Statement = Statement {
    effect: Effect::Read,
    operation: "SELECT",
    table: "todos",
    sql: "SELECT id, title, completed, position, sort_key, created_at, updated_at, version \
          FROM todos WHERE id = $1 AND owner = $2",
};
const GET_VERSION: Statement = Statement {
    effect: Effect::Read,
    operation: "SELECT",
    table: "todos",
    sql: "SELECT version FROM todos WHERE id = $1 AND owner = $2",
};
const CREATE: Statement = Statement {
    effect: Effect::Write,
    operation: "INSERT",
    table: "todos",
    sql: "INSERT INTO todos (title, completed, position, owner) VALUES ($1, $2, $3, $4) \
          RETURNING id, title, completed, position, sort_key, created_at, updated_at, version",
};
const UPDATE: Statement = Statement {
    effect: Effect::Write,
    operation: "UPDATE",
    table: "todos",
    sql: "UPDATE todos SET \
            title = COALESCE($2, title), \
            completed = COALESCE($3, completed), \
            position = CASE WHEN $4 THEN $5 ELSE position END, \
            updated_at = now(), \
            version = version + 1 \
          WHERE id = $1 AND ($6::bigint[] IS NULL OR version = ANY($6)) AND owner = $7 \
          RETURNING id, title, completed, position, sort_key, created_at, updated_at, version",
};
const DELETE: Statement = Statement {
    effect: Effect::Write,
    operation: "DELETE",
    table: "todos",
    sql: "DELETE FROM todos \
          WHERE id = $1 AND ($2::bigint[] IS NULL OR version = ANY($2)) AND owner = $3",
};
const DELETE_ALL: Statement = Statement {
    effect: Effect::Write,
    operation: "DELETE",
    table: "todos",
    sql: "DELETE FROM todos WHERE owner = $1",
};

impl Db {
    /// Up to `limit` of `owner`'s todos after `after`, optionally only those with
    /// `completed = filter`.
    pub async fn list_todos(
        &self,
        owner: &str,
        completed: Option<bool>,
        after: Cursor,
        limit: i64,
    ) -> Result<Vec<TodoRow>, DbError> {
        self.fetch_all(LIST, |q| {
            q.bind(completed)
                .bind(after.sort_key)
                .bind(after.id)
                .bind(limit)
                .bind(owner)
        })
        .await
    }

    pub async fn get_todo(&self, owner: &str, id: i64) -> Result<Option<TodoRow>, DbError> {
        self.fetch_optional(GET, |q| q.bind(id).bind(owner)).await
    }

    pub async fn create_todo(&self, owner: &str, new: &NewTodo) -> Result<TodoRow, DbError> {
        self.fetch_one(CREATE, |q| {
            q.bind(&new.title)
                .bind(new.completed)
                .bind(new.position)
                .bind(owner)
        })
        .await
    }

    /// Applies `changes` if the todo's version is one of `if_match` (any version when `None`).
    /// An empty change set reads the todo without touching `updated_at` or the version.
    pub async fn update_todo(
        &self,
        owner: &str,
        id: i64,
        changes: &TodoChanges,
        if_match: Option<&[i64]>,
    ) -> Result<Conditional<TodoRow>, DbError> {
        if changes.is_empty() {
            return Ok(match self.get_todo(owner, id).await? {
                None => Conditional::NotFound,
                Some(row) if if_match.is_some_and(|v| !v.contains(&row.version)) => {
                    Conditional::VersionMismatch
                }
                Some(row) => Conditional::Done(row),
            });
        }
        let updated = self
            .fetch_optional(UPDATE, |q| {
                q.bind(id)
                    .bind(changes.title.as_deref())
                    .bind(changes.completed)
                    .bind(changes.position.is_some())
                    .bind(changes.position.flatten())
                    .bind(if_match)
                    .bind(owner)
            })
            .await?;
        match updated {
            Some(row) => Ok(Conditional::Done(row)),
            None => self.why_unchanged(owner, id, if_match).await,
        }
    }

    /// Deletes the todo if its version is one of `if_match` (any version when `None`).
    pub async fn delete_todo(
        &self,
        owner: &str,
        id: i64,
        if_match: Option<&[i64]>,
    ) -> Result<Conditional<()>, DbError> {
        let deleted = self
            .execute(DELETE, |q| q.bind(id).bind(if_match).bind(owner))
            .await?;
        if deleted == 1 {
            Ok(Conditional::Done(()))
        } else {
            self.why_unchanged(owner, id, if_match).await
        }
    }

    /// After a conditional write changed no row: was the todo missing, or at another version?
    /// Read after the write, so a todo deleted in between reads as missing, as it now is.
    async fn why_unchanged<T>(
        &self,
        owner: &str,
        id: i64,
        if_match: Option<&[i64]>,
    ) -> Result<Conditional<T>, DbError> {
        if if_match.is_none() {
            return Ok(Conditional::NotFound);
        }
        let version: Option<(i64,)> = self
            .fetch_optional(GET_VERSION, |q| q.bind(id).bind(owner))
            .await?;
        Ok(match version {
            None => Conditional::NotFound,
            Some(_) => Conditional::VersionMismatch,
        })
    }

    /// Deletes every todo of `owner`; returns how many there were.
    pub async fn delete_all_todos(&self, owner: &str) -> Result<u64, DbError> {
        self.execute(DELETE_ALL, |q| q.bind(owner)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sql` as loadtest/pgbench runs it: parameters replaced by pgbench variables or literals.
    fn as_pgbench(sql: &str, params: &[&str]) -> String {
        let mut out = sql.to_owned();
        // Highest first, so `$1` does not match the start of `$10`.
        for (i, p) in params.iter().enumerate().rev() {
            out = out.replace(&format!("${}", i + 1), p);
        }
        format!("{out};")
    }

    /// The load test's baseline must run what the service runs; this keeps the copies honest.
    #[test]
    fn the_pgbench_scripts_run_the_services_sql() {
        let cases = [
            (
                include_str!("../../loadtest/pgbench/get-one.sql"),
                as_pgbench(GET.sql, &[":id", ":owner"]),
            ),
            (
                include_str!("../../loadtest/pgbench/list.sql"),
                as_pgbench(
                    LIST.sql,
                    &["NULL::boolean", ":start", ":start", ":limit", ":owner"],
                ),
            ),
            (
                include_str!("../../loadtest/pgbench/post.sql"),
                as_pgbench(
                    CREATE.sql,
                    &["'load test'", "false", "NULL::bigint", ":owner"],
                ),
            ),
            (
                include_str!("../../loadtest/pgbench/patch.sql"),
                as_pgbench(
                    UPDATE.sql,
                    &[
                        ":id",
                        "NULL::text",
                        "true",
                        "false",
                        "NULL::bigint",
                        "NULL::bigint[]",
                        ":owner",
                    ],
                ),
            ),
        ];
        let stale: Vec<String> = cases
            .iter()
            .filter(|(script, expected)| {
                let statement = script
                    .lines()
                    .find(|l| !l.starts_with("--") && !l.starts_with('\\') && !l.is_empty());
                statement != Some(expected.as_str())
            })
            .map(|(_, expected)| expected.clone())
            .collect();
        assert!(
            stale.is_empty(),
            "loadtest/pgbench is stale; its statements should be:\n{}",
            stale.join("\n")
        );
    }
}
