//! Calls of one statement, the common case: the caller names the [`Statement`] and binds its
//! parameters; the method says how its rows are read. The lease goes out to the statement and
//! comes back in these four methods (see [`Db::call`]), never at the call sites.
//!
//! The binder is a plain closure, called again for each attempt, rather than an async closure
//! that borrows the connection: the futures of async closures that borrow their argument are not
//! yet provably `Send` for every lifetime (rustc reports "implementation of `Send` is not general
//! enough" at the handlers), and every data call runs inside a handler's `Send` future.

use sqlx::{
    FromRow, Postgres,
    postgres::{PgArguments, PgQueryResult, PgRow},
    query::{Query, QueryAs},
};

use super::{Db, DbError, session::Statement};

/// A statement whose rows are read as `O`s, before and after its parameters are bound.
pub(super) type Rows<'q, O> = QueryAs<'q, Postgres, O, PgArguments>;
/// A statement whose rows are not read, only counted.
pub(super) type Plain<'q> = Query<'q, Postgres, PgArguments>;

impl Db {
    /// Every row of `stmt`, with the parameters `bind` gives it.
    pub(super) async fn fetch_all<'q, O>(
        &self,
        stmt: Statement,
        bind: impl Fn(Rows<'q, O>) -> Rows<'q, O>,
    ) -> Result<Vec<O>, DbError>
    where
        O: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        let bind = &bind;
        self.call(stmt, |mut c| async move {
            let r = bind(rows(stmt, c.named())).fetch_all(&mut *c).await;
            (c, r)
        })
        .await
    }

    /// The one row `stmt` returns.
    pub(super) async fn fetch_one<'q, O>(
        &self,
        stmt: Statement,
        bind: impl Fn(Rows<'q, O>) -> Rows<'q, O>,
    ) -> Result<O, DbError>
    where
        O: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        let bind = &bind;
        self.call(stmt, |mut c| async move {
            let r = bind(rows(stmt, c.named())).fetch_one(&mut *c).await;
            (c, r)
        })
        .await
    }

    /// The row `stmt` returns, if any.
    pub(super) async fn fetch_optional<'q, O>(
        &self,
        stmt: Statement,
        bind: impl Fn(Rows<'q, O>) -> Rows<'q, O>,
    ) -> Result<Option<O>, DbError>
    where
        O: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        let bind = &bind;
        self.call(stmt, |mut c| async move {
            let r = bind(rows(stmt, c.named())).fetch_optional(&mut *c).await;
            (c, r)
        })
        .await
    }

    /// How many rows `stmt` changed.
    pub(super) async fn execute<'q>(
        &self,
        stmt: Statement,
        bind: impl Fn(Plain<'q>) -> Plain<'q>,
    ) -> Result<u64, DbError> {
        let bind = &bind;
        let plain = |named| sqlx::query(stmt.sql).persistent(named);
        self.call(stmt, |mut c| async move {
            let r = bind(plain(c.named())).execute(&mut *c).await;
            (c, r)
        })
        .await
        .map(|done: PgQueryResult| done.rows_affected())
    }
}

/// `stmt`'s SQL as a query, under a cached name when the connection allows it
/// (see `Lease::named`).
fn rows<'q, O>(stmt: Statement, named: bool) -> Rows<'q, O>
where
    O: for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_as(stmt.sql).persistent(named)
}
