//! The connection budget that replicas share: the server's `max_connections`.
//!
//! Every replica's pool (`DB_POOL_MAX_SIZE`), a pooler's server connections and anything else
//! that logs in draw on one limit; past it, logins fail with "too many clients" and the breaker
//! opens. Operators sizing replicas need this replica's pool, the server's limit and what is in use
//! side by side, so `doctor` and the admin listener's `/ready` report them from here.

use sqlx::PgConnection;

use super::{
    Db, DbError,
    session::{Effect, Statement},
};

/// `reserved_connections` exists from PostgreSQL 16 on; `current_setting(…, true)` is NULL before.
const READ: Statement = Statement {
    effect: Effect::Read,
    operation: "SELECT",
    table: "pg_stat_activity",
    sql: "SELECT current_setting('max_connections')::int4, \
          current_setting('superuser_reserved_connections')::int4 \
          + coalesce(current_setting('reserved_connections', true)::int4, 0), \
          (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int4",
};

/// The server's connection limit and use, as one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConnections {
    pub max_connections: i32,
    /// Kept for superusers (and, from PostgreSQL 16, `pg_use_reserved_connections`).
    pub reserved: i32,
    /// Client connections open now, from every replica and everything else.
    pub in_use: i32,
}

impl ServerConnections {
    /// `named`: see `Lease::named` (`false` through a transaction pooler).
    pub async fn read(
        conn: &mut PgConnection,
        named: bool,
    ) -> Result<ServerConnections, sqlx::Error> {
        let (max_connections, reserved, in_use) = sqlx::query_as(READ.sql)
            .persistent(named)
            .fetch_one(conn)
            .await?;
        Ok(ServerConnections {
            max_connections,
            reserved,
            in_use,
        })
    }

    /// Connections an ordinary role can still open.
    pub fn free(&self) -> i32 {
        (self.max_connections - self.reserved - self.in_use).max(0)
    }

    /// How many more replicas with a pool of `pool_max_size` would fit in what is free.
    pub fn more_replicas(&self, pool_max_size: usize) -> i64 {
        i64::from(self.free()) / (pool_max_size.max(1) as i64)
    }
}

impl Db {
    /// The server's limit and use, through the pool like any call (so through a pooler too).
    pub async fn server_connections(&self) -> Result<ServerConnections, DbError> {
        self.call(READ, |mut c| async move {
            let named = c.named();
            let r = ServerConnections::read(&mut c, named).await;
            (c, r)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_connections_and_replicas_that_fit() {
        let s = ServerConnections {
            max_connections: 100,
            reserved: 3,
            in_use: 17,
        };
        assert_eq!(s.free(), 80);
        assert_eq!(s.more_replicas(16), 5);
        assert_eq!(s.more_replicas(0), 80, "a zero pool is treated as one");
        let full = ServerConnections { in_use: 120, ..s };
        assert_eq!(full.free(), 0);
        assert_eq!(full.more_replicas(16), 0);
    }
}
