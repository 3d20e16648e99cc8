//! The todo queries. Each takes a pooled connection for one statement and gives it back.
//!
//! Todos leave the database as the API's JSON, built by Postgres (`todo_json!`): the service then
//! neither decodes seven columns per row nor serialises them again, which was a third of its CPU
//! on a 20-row page (profiles in `loadtest/RESULTS.md`). The `Todo` schema in `http::todos`
//! describes the same object, and the API tests read every response into it strictly.
//!
//! Lists are keyset-paged on `(sort_key, id)` (see the migration), so a page costs an index range
//! scan whatever its depth, and rows inserted while a client pages cannot shift later pages.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use super::{Db, DbError, within};

/// One todo as the API's JSON object, with its id (for `Location`).
#[derive(Debug, Clone)]
pub struct TodoJson {
    pub id: i64,
    pub json: String,
}

/// One todo of a page, with its position for the next page's cursor.
#[derive(Debug)]
pub struct PageRow {
    pub cursor: Cursor,
    pub json: String,
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

/// What an idempotent create did.
#[derive(Debug)]
pub enum Idempotent {
    /// First use of the key: the todo was created.
    Created(TodoJson),
    /// The key was used before with the same request: the todo created then, as returned then.
    Replayed(TodoJson),
    /// The key was used before with a different request; nothing was created.
    KeyReused,
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

/// The API's JSON for the todos row `p`, given `$1`: the URL prefix of a todo (`…/todos/`).
/// Timestamps are RFC 3339 in UTC with exactly six fractional digits, a form every ISO 8601
/// parser takes (older Python `fromisoformat` refuses Postgres' own trimmed fractions). The `":"`
/// quoting keeps the text usable verbatim in pgbench scripts, where a bare `:name` is a variable.
macro_rules! todo_json {
    () => {
        "(SELECT row_to_json(j)::text FROM (SELECT p.id, $1::text || p.id AS url, p.title, \
         p.completed, p.position AS \"order\", \
         to_char(p.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24\":\"MI\":\"SS.US\"Z\"') AS created_at, \
         to_char(p.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24\":\"MI\":\"SS.US\"Z\"') AS updated_at) j)"
    };
}

// Statements are named so their text can go on the database spans (parameterised: never values),
// and so loadtest/pgbench can run the very same text (a test compares them).
pub const SQL_CLAIM_IDEMPOTENCY_KEY: &str = "INSERT INTO idempotency_keys (key, request, expires_at) \
         VALUES ($1, jsonb_build_object('title', $2::text, 'completed', $3::boolean, 'order', $4::bigint), \
                 now() + make_interval(secs => $5::float8)) \
         ON CONFLICT (key) DO NOTHING";
pub const SQL_CREATE_TODO: &str = concat!(
    "WITH p AS (INSERT INTO todos (title, completed, position) VALUES ($2, $3, $4) RETURNING *) \
     SELECT p.id, ",
    todo_json!(),
    " FROM p"
);
const SQL_CREATE_IDEMPOTENT: &str = concat!(
    "WITH p AS (INSERT INTO todos (title, completed, position) VALUES ($3, $4, $5) RETURNING *), \
          k AS (UPDATE idempotency_keys k SET response = to_jsonb(p) FROM p WHERE k.key = $2) \
     SELECT p.id, ",
    todo_json!(),
    " FROM p"
);
const SQL_REPLAY_IDEMPOTENT: &str = concat!(
    "SELECT k.request = jsonb_build_object('title', $3::text, 'completed', $4::boolean, 'order', $5::bigint), \
            p.id, ",
    todo_json!(),
    " FROM idempotency_keys k, jsonb_populate_record(NULL::todos, k.response) p WHERE k.key = $2"
);
const SQL_DELETE_ALL_TODOS: &str = "DELETE FROM todos";
const SQL_DELETE_EXPIRED_KEYS: &str = "DELETE FROM idempotency_keys WHERE expires_at < now()";
const SQL_DELETE_TODO: &str = "DELETE FROM todos WHERE id = $1";
pub const SQL_GET_TODO: &str = concat!(
    "SELECT p.id, ",
    todo_json!(),
    " FROM todos p WHERE p.id = $2"
);
pub const SQL_LIST_TODOS: &str = concat!(
    "SELECT p.sort_key, p.id, ",
    todo_json!(),
    " FROM todos p \
     WHERE ($2::boolean IS NULL OR p.completed = $2) AND (p.sort_key, p.id) > ($3, $4) \
     ORDER BY p.sort_key, p.id \
     LIMIT $5"
);
pub const SQL_UPDATE_TODO: &str = concat!(
    "WITH p AS (UPDATE todos SET \
       title = COALESCE($3, title), \
       completed = COALESCE($4, completed), \
       position = CASE WHEN $5 THEN $6 ELSE position END, \
       updated_at = now() \
     WHERE id = $2 RETURNING *) \
     SELECT p.id, ",
    todo_json!(),
    " FROM p"
);

fn todo((id, json): (i64, String)) -> TodoJson {
    TodoJson { id, json }
}

impl Db {
    /// Up to `limit` todos after `after`, optionally only those with `completed = filter`.
    /// `url_prefix` is what each todo's `url` starts with (`…/todos/`).
    pub async fn list_todos(
        &self,
        url_prefix: &str,
        completed: Option<bool>,
        after: Cursor,
        limit: i64,
    ) -> Result<Vec<PageRow>, DbError> {
        let mut s = self.session("SELECT", "todos", SQL_LIST_TODOS).await?;
        let r = within(
            s.deadline,
            sqlx::query_as::<_, (i64, i64, String)>(SQL_LIST_TODOS)
                .bind(url_prefix)
                .bind(completed)
                .bind(after.sort_key)
                .bind(after.id)
                .bind(limit)
                .fetch_all(&mut *s.conn),
        )
        .await;
        s.finish(r).map(|rows| {
            rows.into_iter()
                .map(|(sort_key, id, json)| PageRow {
                    cursor: Cursor { sort_key, id },
                    json,
                })
                .collect()
        })
    }

    pub async fn get_todo(&self, url_prefix: &str, id: i64) -> Result<Option<TodoJson>, DbError> {
        let mut s = self.session("SELECT", "todos", SQL_GET_TODO).await?;
        let r = within(
            s.deadline,
            sqlx::query_as::<_, (i64, String)>(SQL_GET_TODO)
                .bind(url_prefix)
                .bind(id)
                .fetch_optional(&mut *s.conn),
        )
        .await;
        s.finish(r).map(|row| row.map(todo))
    }

    pub async fn create_todo(&self, url_prefix: &str, new: &NewTodo) -> Result<TodoJson, DbError> {
        let mut s = self.session("INSERT", "todos", SQL_CREATE_TODO).await?;
        let r = within(
            s.deadline,
            sqlx::query_as::<_, (i64, String)>(SQL_CREATE_TODO)
                .bind(url_prefix)
                .bind(&new.title)
                .bind(new.completed)
                .bind(new.position)
                .fetch_one(&mut *s.conn),
        )
        .await;
        s.finish(r).map(todo)
    }

    /// Applies `changes`; `None` when the todo does not exist. An empty change set reads the todo
    /// without touching `updated_at`.
    pub async fn update_todo(
        &self,
        url_prefix: &str,
        id: i64,
        changes: &TodoChanges,
    ) -> Result<Option<TodoJson>, DbError> {
        if changes.is_empty() {
            return self.get_todo(url_prefix, id).await;
        }
        let mut s = self.session("UPDATE", "todos", SQL_UPDATE_TODO).await?;
        let r = within(
            s.deadline,
            sqlx::query_as::<_, (i64, String)>(SQL_UPDATE_TODO)
                .bind(url_prefix)
                .bind(id)
                .bind(changes.title.as_deref())
                .bind(changes.completed)
                .bind(changes.position.is_some())
                .bind(changes.position.flatten())
                .fetch_optional(&mut *s.conn),
        )
        .await;
        s.finish(r).map(|row| row.map(todo))
    }

    /// `true` when a todo was deleted.
    pub async fn delete_todo(&self, id: i64) -> Result<bool, DbError> {
        let mut s = self.session("DELETE", "todos", SQL_DELETE_TODO).await?;
        let r = within(
            s.deadline,
            sqlx::query(SQL_DELETE_TODO).bind(id).execute(&mut *s.conn),
        )
        .await;
        s.finish(r).map(|done| done.rows_affected() == 1)
    }

    /// Deletes every todo; returns how many there were.
    pub async fn delete_all_todos(&self) -> Result<u64, DbError> {
        let mut s = self
            .session("DELETE", "todos", SQL_DELETE_ALL_TODOS)
            .await?;
        let r = within(
            s.deadline,
            sqlx::query(SQL_DELETE_ALL_TODOS).execute(&mut *s.conn),
        )
        .await;
        s.finish(r).map(|done| done.rows_affected())
    }

    /// Creates a todo once per `key`: a retry with the same key and request replays the first
    /// response; the same key with another request is refused. Keys live for `ttl`.
    pub async fn create_todo_idempotent(
        &self,
        url_prefix: &str,
        key: &str,
        new: &NewTodo,
        ttl: Duration,
    ) -> Result<Idempotent, DbError> {
        let mut s = self
            .session("INSERT", "todos", SQL_CLAIM_IDEMPOTENCY_KEY)
            .await?;
        let r = within(
            s.deadline,
            create_idempotent(&mut s.conn, url_prefix, key, new, ttl),
        )
        .await;
        s.finish(r)
    }

    /// Deletes expired idempotency keys; returns how many.
    pub async fn delete_expired_idempotency_keys(&self) -> Result<u64, DbError> {
        let mut s = self
            .session("DELETE", "idempotency_keys", SQL_DELETE_EXPIRED_KEYS)
            .await?;
        let r = within(
            s.deadline,
            sqlx::query(SQL_DELETE_EXPIRED_KEYS).execute(&mut *s.conn),
        )
        .await;
        s.finish(r).map(|done| done.rows_affected())
    }
}

async fn create_idempotent(
    conn: &mut PgConnection,
    url_prefix: &str,
    key: &str,
    new: &NewTodo,
    ttl: Duration,
) -> Result<Idempotent, sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("DELETE FROM idempotency_keys WHERE key = $1 AND expires_at < now()")
        .bind(key)
        .execute(&mut *tx)
        .await?;
    // A concurrent claim of the same key makes this wait until that transaction ends.
    let claimed = sqlx::query(SQL_CLAIM_IDEMPOTENCY_KEY)
        .bind(key)
        .bind(&new.title)
        .bind(new.completed)
        .bind(new.position)
        .bind(ttl.as_secs_f64())
        .execute(&mut *tx)
        .await?
        .rows_affected()
        == 1;
    let outcome = if claimed {
        let row = sqlx::query_as::<_, (i64, String)>(SQL_CREATE_IDEMPOTENT)
            .bind(url_prefix)
            .bind(key)
            .bind(&new.title)
            .bind(new.completed)
            .bind(new.position)
            .fetch_one(&mut *tx)
            .await?;
        Idempotent::Created(todo(row))
    } else {
        let (same_request, id, json) =
            sqlx::query_as::<_, (bool, i64, String)>(SQL_REPLAY_IDEMPOTENT)
                .bind(url_prefix)
                .bind(key)
                .bind(&new.title)
                .bind(new.completed)
                .bind(new.position)
                .fetch_one(&mut *tx)
                .await?;
        if same_request {
            Idempotent::Replayed(TodoJson { id, json })
        } else {
            Idempotent::KeyReused
        }
    };
    tx.commit().await?;
    Ok(outcome)
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
                as_pgbench(SQL_GET_TODO, &[":url_prefix", ":id"]),
            ),
            (
                include_str!("../../loadtest/pgbench/list.sql"),
                as_pgbench(
                    SQL_LIST_TODOS,
                    &[":url_prefix", "NULL::boolean", ":start", ":start", ":limit"],
                ),
            ),
            (
                include_str!("../../loadtest/pgbench/post.sql"),
                as_pgbench(
                    SQL_CREATE_TODO,
                    &[":url_prefix", "'load test'", "false", "NULL::bigint"],
                ),
            ),
            (
                include_str!("../../loadtest/pgbench/patch.sql"),
                as_pgbench(
                    SQL_UPDATE_TODO,
                    &[
                        ":url_prefix",
                        ":id",
                        "NULL::text",
                        "true",
                        "false",
                        "NULL::bigint",
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
