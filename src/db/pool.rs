//! A deadpool manager for sqlx connections, connecting to the pinned database address.
//!
//! Why deadpool around sqlx instead of sqlx's own `PgPool`: deadpool's pool is a small, explicit
//! object — wait, create and recycle timeouts are separate, `status()` reports waiters, and
//! `Object::take` lets us throw away a connection that failed mid-query instead of returning it.
//! sqlx stays the driver (statement cache per connection, migrations, typed rows). No crate
//! provides this manager (`deadpool-sqlx` does not exist), so it is written here; it is small.
//!
//! Every connection is opened to the address in [`PinnedAddress`], never to the host name, so
//! opening connections never touches DNS; [`Connector`] adds TLS when `sslmode` asks for it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use deadpool::managed::{Manager, Metrics, RecycleError, RecycleResult};
use sqlx::{Connection, postgres::PgConnection};

use super::{connect::Connector, resolve::PinnedAddress};

/// A connection idle for longer than this is pinged before it is handed out again. Connections in
/// steady use skip the round trip; one that sat idle (and may have been cut by a firewall, a
/// Postgres restart or `pg_terminate_backend`) is checked first.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Opens sqlx connections to the pinned database address.
#[derive(Debug)]
pub struct PgManager {
    connector: Connector,
    address: Arc<PinnedAddress>,
    /// Reference point for `suspect_mark`.
    epoch: Instant,
    /// Nanoseconds after `epoch` at which a pooled connection was last found broken (0: never).
    /// Connections not checked since then are pinged before reuse: when one connection breaks
    /// (Postgres restarted, backends terminated, a proxy cut), its siblings usually broke too.
    suspect_mark: AtomicU64,
    /// `DB_MAX_LIFETIME`.
    max_lifetime: Option<Duration>,
}

impl PgManager {
    pub fn new(
        connector: Connector,
        address: Arc<PinnedAddress>,
        max_lifetime: Option<Duration>,
    ) -> Self {
        PgManager {
            connector,
            address,
            epoch: Instant::now(),
            suspect_mark: AtomicU64::new(0),
            max_lifetime,
        }
    }

    /// Whether a connection has outlived `DB_MAX_LIFETIME`. Each connection's limit is up to 10 %
    /// shorter, by an amount taken from its creation time, so connections opened together (at
    /// startup, after a failover) are not all replaced in the same instant.
    fn expired(&self, metrics: &Metrics) -> bool {
        let Some(lifetime) = self.max_lifetime else {
            return false;
        };
        let since_epoch = (metrics.created.checked_duration_since(self.epoch))
            .unwrap_or_else(|| self.epoch - metrics.created);
        let spread = since_epoch.subsec_nanos() % 1000;
        let limit = lifetime - lifetime / 10 * spread / 1000;
        metrics.age() >= limit
    }

    /// Marks every connection not checked since now as suspect: it is pinged (and replaced if
    /// dead) before its next use instead of failing a request.
    pub fn mark_suspect(&self) {
        let now = self.epoch.elapsed().as_nanos().max(1) as u64;
        self.suspect_mark.fetch_max(now, Ordering::Relaxed);
    }

    fn must_ping(&self, metrics: &Metrics) -> bool {
        if metrics.last_used() >= PING_IF_IDLE_FOR {
            return true;
        }
        let mark = self.suspect_mark.load(Ordering::Relaxed);
        let last_checked = metrics.recycled.unwrap_or(metrics.created);
        mark != 0
            && last_checked
                .saturating_duration_since(self.epoch)
                .as_nanos() as u64
                <= mark
    }
}

impl Manager for PgManager {
    type Type = PgConnection;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<PgConnection, sqlx::Error> {
        let addr = self.address.get().ok_or_else(|| {
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!(
                    "database host {:?} has not resolved yet",
                    self.address.host()
                ),
            ))
        })?;
        // Boxed: deadpool's checkout future holds this one inline, and opening a connection
        // (TCP, TLS, login) is a large future, so every checkout would carry (and move) its
        // kilobytes though nearly all of them take an idle connection. The allocation is paid
        // only when a connection is opened.
        Box::pin(self.connector.connect(addr)).await
    }

    async fn recycle(
        &self,
        conn: &mut PgConnection,
        metrics: &Metrics,
    ) -> RecycleResult<sqlx::Error> {
        if conn.is_in_transaction() {
            // Calls that did not finish are discarded before they get here (`db::session`); this
            // catches a transaction sqlx knows about that some future code path left open.
            return Err(RecycleError::message(
                "connection was returned inside a transaction",
            ));
        }
        if self.expired(metrics) {
            return Err(RecycleError::message("connection reached DB_MAX_LIFETIME"));
        }
        if self.must_ping(metrics) {
            // Boxed for the same reason as `create`'s connect: paid only when a ping is due.
            Box::pin(conn.ping()).await.map_err(RecycleError::Backend)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::resolve::SystemResolver;

    async fn manager(max_lifetime: Option<Duration>) -> PgManager {
        // An IP literal: resolving it does no lookup.
        let address = PinnedAddress::resolve("127.0.0.1", 5432, Arc::new(SystemResolver)).await;
        let plain = crate::config::DbTlsSettings {
            mode: crate::config::SslMode::Disable,
            root_cert: crate::config::RootCert::None,
            client_cert: None,
        };
        let connector =
            Connector::new(sqlx::postgres::PgConnectOptions::new(), &plain, "127.0.0.1").unwrap();
        PgManager::new(connector, address, max_lifetime)
    }

    fn aged(age: Duration, nanos: u32) -> Metrics {
        // The nanoseconds decide where in the last 10 % a connection expires.
        let created = Instant::now() - age - Duration::from_nanos(u64::from(nanos));
        Metrics {
            created,
            recycled: None,
            recycle_count: 0,
        }
    }

    #[tokio::test]
    async fn connections_expire_within_the_last_tenth_of_their_lifetime() {
        let m = manager(Some(Duration::from_secs(100))).await;
        let nanos = (0..50).map(|i| i * 19_999_981);
        for n in nanos.clone() {
            assert!(!m.expired(&aged(Duration::from_secs(89), n)), "before 90 %");
            assert!(m.expired(&aged(Duration::from_secs(101), n)), "after 100 %");
        }
        let at_95: Vec<bool> = nanos
            .map(|n| m.expired(&aged(Duration::from_secs(95), n)))
            .collect();
        assert!(
            at_95.contains(&true) && at_95.contains(&false),
            "connections opened together expire at different moments: {at_95:?}"
        );
        let forever = manager(None).await;
        assert!(!forever.expired(&aged(Duration::from_secs(10 * 24 * 3600), 0)));
    }

    /// Every data call awaits a checkout, and its future is moved into each box between the
    /// handler and hyper: opening a connection inline made it kilobytes (the instructions per
    /// GET are in loadtest/RESULTS.md#layer-costs). Boxed, it stays small.
    #[tokio::test]
    async fn a_checkout_does_not_carry_the_connect_future() {
        let pool: deadpool::managed::Pool<PgManager> =
            deadpool::managed::Pool::builder(manager(None).await)
                .max_size(1)
                .build()
                .unwrap();
        let checkout = pool.get();
        let size = std::mem::size_of_val(&checkout);
        assert!(size < 2048, "the checkout future is {size} bytes");
    }
}
