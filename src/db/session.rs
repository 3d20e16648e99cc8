//! One database call from start to a known end: breaker permit, pooled connection, deadline,
//! outcome, and what happens to the connection afterwards.
//!
//! Every data call goes through [`Db::call`], so this sequence is written once.
//!
//! **Cancellation.** Any future can be dropped at any await: the client went away,
//! `REQUEST_TIMEOUT` fired, the service is shutting down. A connection whose call was dropped
//! part-way is in a state nobody knows: a `BEGIN` may have run on the server without sqlx counting
//! it (transact-rs/sqlx#4393, not fixed in sqlx 0.9.0), so the next borrower's statements would run
//! inside a transaction that never commits; or a statement's reply may still be unread. Such a
//! connection is **discarded**, never returned to the pool ([`Lease`]'s `Drop`). Closing the
//! socket makes Postgres roll back whatever transaction the session had open, so a write whose
//! client went away is committed whole (its `COMMIT`, or its single autocommit statement, had
//! already run) or not at all; and a write is acknowledged only after its commit returned.
//!
//! Discarding was chosen over driving the call to completion in a detached task: it needs no task
//! and no owned copy of every parameter per call on the hot path, it leaves no work running for a
//! client that is gone (which shutdown would otherwise have to wait for), and its cost, one
//! reconnect of a few milliseconds per abandoned call, is bounded: the pool opens at most one
//! connection per slot. `idle_in_transaction_session_timeout` on every connection (see
//! [`super::Db::connect`]) is the backstop should a future bug leak an open transaction anyway.
//!
//! **Stale connections.** Postgres may end an idle pooled connection at any time (restart,
//! `pg_terminate_backend`, a failover behind a pooler). A call that fails at the connection level
//! on a *reused* connection is retried on another one, which the pool pings first (the failure
//! marks every connection not checked since as suspect), when the statement provably had no
//! effect; see [`Effect`]. Up to [`STALE_RETRIES`] times: a sibling can pass its ping a moment
//! before the server, still ending connections, ends it too (drill 4 met that once in CI). Anything else is a 503 with `Retry-After`, and a keyed `POST` is safe
//! to retry.

use deadpool::managed::{Object, PoolError, TimeoutType};
use opentelemetry::{
    KeyValue,
    trace::{Span as _, Status},
};
use sqlx::PgConnection;

use crate::{net, telemetry::spans};

/// Retries of a call that met a stale connection. Each retry is on another connection, and a
/// failure on a freshly opened one ends the call (see [`CallFailure::Other`]), so this bounds the
/// calls a mass disconnect can cost a request, not a wait.
pub(super) const STALE_RETRIES: u32 = 2;

use super::{Conn, Db, DbError, breaker::Permit, classify, deadline::within};

/// What a call does to the data, which decides whether a failure on a stale connection may be
/// retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Effect {
    /// Reads change nothing: always safe to run again.
    Read,
    /// A write that is safe to run twice: a keyed `POST` replays the first attempt's answer when
    /// that attempt committed after all.
    IdempotentWrite,
    /// Any other write. Retried only when the reply was the server's termination notice (SQLSTATE
    /// 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now): a backend told to
    /// end while idle in the pool exits without reading another message, and one told to end while
    /// it runs a statement aborts that statement's transaction.
    Write,
}

/// A call's statement, named once: its SQL (parameterised: it goes on the span, never values),
/// the span's `{operation} {table}`, and what it does to the data.
#[derive(Debug, Clone, Copy)]
pub(super) struct Statement {
    pub effect: Effect,
    pub operation: &'static str,
    pub table: &'static str,
    pub sql: &'static str,
}

/// A pooled connection lent to one call. Dropped before [`Lease::release`] (the call's future
/// was dropped, or its deadline fired), the connection is discarded: see the module doc.
pub(super) struct Lease {
    conn: Option<Conn>,
    /// See [`Lease::named`].
    named: bool,
}

impl Lease {
    /// Whether statements may be prepared under a name and cached on the connection, for
    /// `sqlx::query(..).persistent(..)`: not through a transaction pooler, where the next
    /// transaction may run on another server connection. `false` makes sqlx use the unnamed
    /// statement, which leaves nothing behind (a statement cache of 0 would still prepare named
    /// ones: transact-rs/sqlx#4328).
    pub(super) fn named(&self) -> bool {
        self.named
    }

    /// Whether the connection served calls before this one.
    pub(super) fn reused(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| Object::metrics(c).recycle_count > 0)
    }

    /// Ends the lease with the connection in a known state.
    fn release(mut self) -> Conn {
        self.conn
            .take()
            .expect("a lease holds its connection until released")
    }
}

impl std::ops::Deref for Lease {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn
            .as_ref()
            .expect("a lease holds its connection until released")
    }
}

impl std::ops::DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until released")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Closing the socket is what makes the server roll back an open transaction.
            drop(Object::take(conn));
        }
    }
}

/// The client span of one database call, when it runs inside a traced request (see
/// `telemetry::spans`). Ends when dropped, so a call dropped part-way ends it too.
pub(super) struct CallSpan(Option<opentelemetry_sdk::trace::Span>);

impl CallSpan {
    fn set(&mut self, attribute: impl FnOnce() -> KeyValue) {
        if let Some(span) = &mut self.0 {
            span.set_attribute(attribute());
        }
    }

    /// Marks the call failed, with the failure's class.
    pub(super) fn record_error(&mut self, err: &DbError) {
        if let Some(span) = &mut self.0 {
            span.set_status(Status::error(""));
            span.set_attribute(KeyValue::new(
                "error.type",
                match err {
                    DbError::Unavailable(_) => "unavailable",
                    DbError::CircuitOpen { .. } => "circuit_open",
                    DbError::Timeout(_) => "statement_timeout",
                    DbError::Unexpected(_) => "unexpected",
                },
            ));
        }
    }
}

impl Db {
    /// The client span of one database call. Named `{operation} {table}` as SigNoz's DB views
    /// expect, with the older `db.system` attribute SigNoz counts (not the newer `db.system.name`,
    /// which it ignores: SigNoz/signoz#8164), the parameterised SQL (never values), the host as
    /// configured and the pinned address actually used.
    pub(super) fn span(
        &self,
        operation: &'static str,
        table: &'static str,
        sql: &'static str,
    ) -> CallSpan {
        CallSpan(spans::start_client(
            || spans::name(operation, table),
            || {
                let address = &self.inner.address;
                let mut attributes = Vec::with_capacity(9);
                attributes.extend([
                    KeyValue::new("db.system", "postgresql"),
                    KeyValue::new("db.namespace", self.inner.db_name.clone()),
                    KeyValue::new("db.operation.name", operation),
                    KeyValue::new("db.collection.name", table),
                    KeyValue::new("db.query.text", sql),
                    KeyValue::new("server.address", self.inner.db_host.clone()),
                    KeyValue::new("server.port", i64::from(address.port())),
                ]);
                if let Some(addr) = address.get() {
                    attributes.push(KeyValue::new(
                        "network.peer.address",
                        net::ip_text(addr.ip()),
                    ));
                }
                attributes
            },
        ))
    }

    /// Runs `f` on a pooled connection under the breaker, the call's span and its deadline, and
    /// retries it on another connection when `stmt.effect` allows (see [`Effect`]).
    ///
    /// `f` owns the [`Lease`] while it runs and hands it back with its result, so a call dropped
    /// part-way drops the lease with it, and the connection is discarded rather than reused. A
    /// call of one statement uses `Db::fetch_*` or `Db::execute` (`db::fetch`), which write that
    /// hand-back once; `f` is for calls of several statements.
    pub(super) async fn call<T, Fut>(
        &self,
        stmt: Statement,
        f: impl Fn(Lease) -> Fut,
    ) -> Result<T, DbError>
    where
        Fut: Future<Output = (Lease, Result<T, sqlx::Error>)>,
    {
        let mut span = self.span(stmt.operation, stmt.table, stmt.sql);
        if !self.migrations_applied() {
            let err = DbError::Unavailable(
                "the database is not ready yet: migrations or checks pending (see /ready)".into(),
            );
            span.record_error(&err);
            return Err(err);
        }
        let mut retries = 0;
        loop {
            let (lease, permit) = self.lease(&mut span).await?;
            let reused = lease.reused();
            // Awaited where it is written, not bound to a name first: a named future's slot is
            // kept beside the one it is moved into (see `within`).
            let call = within(self.inner.query_deadline, async {
                match &self.inner.begin {
                    None => f(lease).await,
                    Some(begin) => in_transaction(lease, begin, &f).await,
                }
            })
            .await;
            let (lease, result) = match call {
                Ok((lease, result)) => (Some(lease), result),
                Err(elapsed) => (None, Err(elapsed)),
            };
            match self.finish(lease, reused, permit, result) {
                Err(failure) if retries < STALE_RETRIES && failure.retryable(stmt.effect) => {
                    tracing::debug!("stale pooled connection; retrying the call on another");
                    retries += 1;
                }
                Err(failure) => return Err(failure.recorded_on(&mut span)),
                Ok(v) => return Ok(v),
            }
        }
    }

    /// A breaker permit and a pooled connection, waited for under `span`. Refused at once,
    /// without touching the pool, while the breaker is open.
    pub(super) async fn lease(&self, span: &mut CallSpan) -> Result<(Lease, Permit), DbError> {
        let permit = match self.inner.breaker.try_acquire() {
            Ok(p) => p,
            Err(r) => {
                let err = DbError::CircuitOpen {
                    retry_after: r.retry_after,
                };
                span.record_error(&err);
                return Err(err);
            }
        };
        let waited = tokio::time::Instant::now();
        let got = self.inner.pool.get().await;
        let waited = waited.elapsed();
        span.set(|| {
            KeyValue::new(
                "db.client.connection.wait_time_ms",
                waited.as_secs_f64() * 1000.0,
            )
        });
        if let Some(observe) = self.inner.pool_wait_observer.get() {
            observe(waited);
        }
        match got {
            Ok(conn) => Ok((
                Lease {
                    conn: Some(conn),
                    named: self.inner.begin.is_none(),
                },
                permit,
            )),
            Err(e) => {
                // Waiting too long for a pooled connection says this service is busy (a flood, a
                // slow query holding connections), not that the database cannot be reached: it
                // must not open the breaker while the database answers.
                let busy = matches!(e, PoolError::Timeout(TimeoutType::Wait));
                let err = super::error::pool_error(e);
                span.record_error(&err);
                if busy {
                    drop(permit);
                } else {
                    record(permit, &err);
                }
                Err(err)
            }
        }
    }
}

/// Runs `f` inside one transaction (`DB_POOLER_MODE=transaction`). A transaction pooler keeps
/// the client on one server connection only while a transaction is open, and sqlx parses an
/// unnamed statement and binds it in two separate exchanges: outside a transaction the bind could
/// reach a server connection where another client's statement sits unnamed. `begin` also sets the
/// timeouts, which cannot be session settings there. sqlx's own transactions inside `f` become
/// savepoints. Dropped part-way, the lease is discarded like any other (the pooler then closes
/// its server connection, which rolls back).
async fn in_transaction<T, Fut>(
    mut lease: Lease,
    begin: &sqlx::SqlStr,
    f: impl Fn(Lease) -> Fut,
) -> (Lease, Result<T, sqlx::Error>)
where
    Fut: Future<Output = (Lease, Result<T, sqlx::Error>)>,
{
    use sqlx::postgres::PgTransactionManager;
    use sqlx_core::transaction::TransactionManager;
    if let Err(e) = PgTransactionManager::begin(&mut lease, Some(begin.clone())).await {
        return (lease, Err(e));
    }
    let (mut lease, result) = f(lease).await;
    let end = match &result {
        Ok(_) => PgTransactionManager::commit(&mut lease).await,
        Err(_) => PgTransactionManager::rollback(&mut lease).await,
    };
    match (result, end) {
        (Ok(_), Err(e)) => (lease, Err(e)),
        (result, _) => (lease, result),
    }
}

/// How a finished call failed.
pub(super) enum CallFailure {
    /// The server answered, or the call failed in a way a retry would not mend (a fresh
    /// connection failing, the deadline running out on a connection that hangs).
    Other(DbError),
    /// A reused connection turned out to be dead: a stale socket, not evidence that the database
    /// is down, so another connection may succeed.
    Stale {
        err: DbError,
        /// The reply was the server's termination notice (see [`Effect::Write`]).
        termination_notice: bool,
    },
}

impl CallFailure {
    /// Whether a call with `effect` may run again on another connection after this failure.
    fn retryable(&self, effect: Effect) -> bool {
        match (self, effect) {
            (CallFailure::Other(_), _) => false,
            (CallFailure::Stale { .. }, Effect::Read | Effect::IdempotentWrite) => true,
            (
                CallFailure::Stale {
                    termination_notice, ..
                },
                Effect::Write,
            ) => *termination_notice,
        }
    }

    /// The error, marked on the call's span.
    pub(super) fn recorded_on(self, span: &mut CallSpan) -> DbError {
        let (CallFailure::Other(err) | CallFailure::Stale { err, .. }) = self;
        span.record_error(&err);
        err
    }
}

impl Db {
    /// Maps a call's result, tells the breaker, and decides the connection's fate. `lease` is
    /// `None` when the call ran out of time (the lease was dropped with it: discarded); `reused`
    /// says whether the connection had served calls before this one.
    ///
    /// The connection goes back to the pool only when the server answered (rows, or an error
    /// reply: sqlx has then read everything up to the server's `ReadyForQuery`). After a
    /// connection-level failure it is discarded, and its siblings are marked suspect so they are
    /// pinged before reuse: after a mass disconnect, stale connections are found by pings, not by
    /// requests. Such a failure on a reused connection does not count toward the breaker (if the
    /// database is down, opening the replacement fails and that counts); on a fresh one it does.
    pub(super) fn finish<T>(
        &self,
        lease: Option<Lease>,
        reused: bool,
        permit: Permit,
        result: Result<T, sqlx::Error>,
    ) -> Result<T, CallFailure> {
        let e = match result {
            Ok(v) => {
                permit.success();
                // Back to the pool.
                drop(lease.map(Lease::release));
                return Ok(v);
            }
            Err(e) => e,
        };
        let termination = is_termination_notice(&e);
        let err = classify(e);
        if !matches!(err, DbError::Unavailable(_)) {
            drop(lease.map(Lease::release));
            record(permit, &err);
            return Err(CallFailure::Other(err));
        }
        self.inner.pool.manager().mark_suspect();
        // A connection that answered with a failure is stale; one that did not answer in time
        // (no lease: dropped with the call) hangs, and a retry would only wait as long again.
        let stale = reused && lease.is_some();
        // Discarded, whatever it was doing.
        drop(lease);
        if reused {
            drop(permit);
        } else {
            record(permit, &err);
        }
        Err(if stale {
            CallFailure::Stale {
                err,
                termination_notice: termination,
            }
        } else {
            CallFailure::Other(err)
        })
    }
}

/// The server ended the session from its side (SQLSTATE class 57P: admin shutdown, crash
/// shutdown, cannot connect now).
fn is_termination_notice(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("57P")))
}

/// Only outage-class failures count against the breaker; any other answer proves the database is
/// there.
fn record(permit: Permit, err: &DbError) {
    match err {
        DbError::Unavailable(_) => permit.failure(),
        DbError::CircuitOpen { .. } => drop(permit),
        DbError::Timeout(_) | DbError::Unexpected(_) => permit.success(),
    }
}
