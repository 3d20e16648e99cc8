//! Idempotent creates: a `POST /todos` with an `Idempotency-Key` creates its todo once, however
//! often it is retried, and the keys expire and are swept in bounded batches.
//!
//! The claim of the key, the todo and the stored answer commit in one transaction: a concurrent
//! retry waits on the key's row until the first commits, then replays its answer. Keys are per
//! owner: two callers may use the same key without meeting.

use std::time::Duration;

use sqlx::{Connection, PgConnection, Row, postgres::PgRow};

use super::{
    Db, DbError,
    session::{Effect, Statement},
    todos::{NewTodo, TodoRow},
};

/// What an idempotent create did.
#[derive(Debug)]
pub enum Idempotent {
    /// First use of the key: the todo was created.
    Created(TodoRow),
    /// The key was used before with the same request: the todo created then, as returned then.
    Replayed(TodoRow),
    /// The key was used before with a different request; nothing was created.
    KeyReused,
}

/// `same_request` first, then the todo's columns.
struct Replay {
    same_request: bool,
    todo: TodoRow,
}

impl<'r> sqlx::FromRow<'r, PgRow> for Replay {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        Ok(Replay {
            same_request: row.try_get(0)?,
            todo: TodoRow::from_columns(row, 1)?,
        })
    }
}

/// Expired idempotency keys deleted per statement: each batch is short, whatever the backlog.
pub const SWEEP_BATCH: i64 = 1000;
/// A keyed create's span is named for its key claim, the statement that decides its outcome.
/// Running it twice is safe: a retry replays the first attempt's answer.
const CREATE_KEYED: Statement = Statement {
    effect: Effect::IdempotentWrite,
    operation: "INSERT",
    table: "todos",
    sql: "INSERT INTO idempotency_keys (key, request, expires_at, owner) \
          VALUES ($1, jsonb_build_object('title', $2::text, 'completed', $3::boolean, 'order', $4::bigint), \
                  now() + make_interval(secs => $5::float8), $6) \
          ON CONFLICT (owner, key) DO NOTHING",
};
/// SKIP LOCKED: a key being re-claimed by a request, or swept by another replica, is left alone.
/// Deleting expired keys twice deletes nothing more.
const SWEEP_KEYS: Statement = Statement {
    effect: Effect::IdempotentWrite,
    operation: "DELETE",
    table: "idempotency_keys",
    sql: "DELETE FROM idempotency_keys WHERE (owner, key) IN \
          (SELECT owner, key FROM idempotency_keys WHERE expires_at < now() \
           ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
};

impl Db {
    /// Creates a todo once per `key`: a retry with the same key and request replays the first
    /// response; the same key with another request is refused. Keys live for `ttl`.
    pub async fn create_todo_idempotent(
        &self,
        owner: &str,
        key: &str,
        new: &NewTodo,
        ttl: Duration,
    ) -> Result<Idempotent, DbError> {
        self.call(CREATE_KEYED, |mut c| async move {
            let named = c.named();
            let r = create_idempotent(&mut c, named, owner, key, new, ttl).await;
            (c, r)
        })
        .await
    }

    /// Deletes up to `batch` expired idempotency keys, oldest first; returns how many.
    pub async fn delete_expired_idempotency_keys(&self, batch: i64) -> Result<u64, DbError> {
        self.execute(SWEEP_KEYS, |q| q.bind(batch)).await
    }

    /// Deletes every expired idempotency key, [`SWEEP_BATCH`] per statement, so the sweep makes
    /// progress whatever the backlog and never holds a long transaction. On failure: the error,
    /// and how many were deleted before it.
    pub async fn sweep_expired_idempotency_keys(&self) -> Result<u64, (DbError, u64)> {
        let mut deleted = 0;
        loop {
            match self.delete_expired_idempotency_keys(SWEEP_BATCH).await {
                Ok(n) if n < SWEEP_BATCH as u64 => return Ok(deleted + n),
                Ok(n) => deleted += n,
                Err(e) => return Err((e, deleted)),
            }
        }
    }
}

async fn create_idempotent(
    conn: &mut PgConnection,
    named: bool,
    owner: &str,
    key: &str,
    new: &NewTodo,
    ttl: Duration,
) -> Result<Idempotent, sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query(
        "DELETE FROM idempotency_keys WHERE owner = $2 AND key = $1 AND expires_at < now()",
    )
    .persistent(named)
    .bind(key)
    .bind(owner)
    .execute(&mut *tx)
    .await?;
    // A concurrent claim of the same key makes this wait until that transaction ends.
    let claimed = sqlx::query(CREATE_KEYED.sql)
        .persistent(named)
        .bind(key)
        .bind(&new.title)
        .bind(new.completed)
        .bind(new.position)
        .bind(ttl.as_secs_f64())
        .bind(owner)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        == 1;
    let outcome = if claimed {
        let row = sqlx::query_as::<_, TodoRow>(
            "WITH t AS (INSERT INTO todos (title, completed, position, owner) VALUES ($2, $3, $4, $5) RETURNING *) \
             UPDATE idempotency_keys k SET response = to_jsonb(t) FROM t WHERE k.owner = $5 AND k.key = $1 \
             RETURNING t.id, t.title, t.completed, t.position, t.sort_key, t.created_at, t.updated_at, t.version",
        )
        .persistent(named)
        .bind(key)
        .bind(&new.title)
        .bind(new.completed)
        .bind(new.position)
        .bind(owner)
        .fetch_one(&mut *tx)
        .await?;
        Idempotent::Created(row)
    } else {
        let replay = sqlx::query_as::<_, Replay>(
            "SELECT k.request = jsonb_build_object('title', $2::text, 'completed', $3::boolean, 'order', $4::bigint) \
                    AS same_request, \
                    t.id, t.title, t.completed, t.position, t.sort_key, t.created_at, t.updated_at, \
                    COALESCE(t.version, 1) \
             FROM idempotency_keys k, jsonb_populate_record(NULL::todos, k.response) t \
             WHERE k.owner = $5 AND k.key = $1",
        )
        .persistent(named)
        .bind(key)
        .bind(&new.title)
        .bind(new.completed)
        .bind(new.position)
        .bind(owner)
        .fetch_one(&mut *tx)
        .await?;
        if replay.same_request {
            Idempotent::Replayed(replay.todo)
        } else {
            Idempotent::KeyReused
        }
    };
    tx.commit().await?;
    Ok(outcome)
}
