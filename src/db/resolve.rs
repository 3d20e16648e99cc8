//! Resolves the database host name once and pins the address.
//!
//! This is the module the post-mortem asks for: the old service resolved `postgres` through
//! Docker's DNS on every new connection, and a burst of 120 connections overflowed the resolver.
//! Here the host is looked up once at startup; every connection the pool opens afterwards goes to
//! the pinned IP, so neither a request nor a reconnect storm ever reaches the resolver.
//!
//! If the first lookup fails (Postgres' container not up yet, DNS briefly down) the service still
//! starts; a background task retries with capped backoff until one lookup succeeds, and connection
//! attempts report "not resolved yet" meanwhile. The cost of pinning is that a changed DNS record
//! (fail-over by DNS) is only followed after a restart.
//!
//! If connections to the pinned address keep failing (the circuit breaker opened), a background
//! task may look the name up again ([`PinnedAddress::re_resolve`]), with capped exponential backoff
//! while the outage lasts, and switches only to an address that accepts a TCP connection; a failed
//! lookup keeps the last good address. Requests never wait for any of it.
//!
//! The lookup goes through the [`Resolver`] trait so tests can count and fail lookups.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, RwLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use super::backoff::Backoff;

/// A boxed lookup future; boxed so [`Resolver`] stays object-safe.
pub type LookupFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Something that turns a host name into socket addresses.
pub trait Resolver: Send + Sync + 'static {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> LookupFuture<'a>;
}

/// The operating system's resolver (getaddrinfo, via tokio's blocking pool).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> LookupFuture<'a> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// The database address: the host as configured and the IP it was pinned to.
#[derive(Debug)]
pub struct PinnedAddress {
    host: String,
    port: u16,
    addr: RwLock<Option<SocketAddr>>,
    lookups: AtomicU64,
    resolver: Arc<dyn Resolver>,
}

impl std::fmt::Debug for dyn Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// What a re-resolution did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReResolved {
    /// The host is an IP address: there is nothing to look up.
    Literal,
    /// The lookup failed; the last good address stays pinned.
    LookupFailed,
    /// No other address answered; the pinned one stays.
    Kept,
    /// Switched to an address that accepts connections.
    Switched {
        from: Option<SocketAddr>,
        to: SocketAddr,
    },
}

/// How long a candidate address gets to accept a TCP connection before it is passed over.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

impl PinnedAddress {
    /// Pins `host` right away when it is an IP literal; otherwise performs the one lookup, and if
    /// that fails keeps retrying in the background until it succeeds.
    pub async fn resolve(host: &str, port: u16, resolver: Arc<dyn Resolver>) -> Arc<Self> {
        let pinned = Arc::new(PinnedAddress {
            host: host.to_owned(),
            port,
            addr: RwLock::new(None),
            lookups: AtomicU64::new(0),
            resolver: Arc::clone(&resolver),
        });
        if let Some(ip) = pinned.literal() {
            pinned.pin(SocketAddr::new(ip, port));
            tracing::info!(db.host = host, db.address = %SocketAddr::new(ip, port), "database host is an IP address; no DNS lookup needed");
            return pinned;
        }
        if let Err(error) = pinned.lookup_once(resolver.as_ref()).await {
            tracing::warn!(db.host = host, %error, "database host did not resolve at startup; retrying in the background");
            let retry = Arc::downgrade(&pinned);
            tokio::spawn(PinnedAddress::retry_until_resolved(retry, resolver));
        }
        pinned
    }

    fn literal(&self) -> Option<IpAddr> {
        crate::net::ip_literal(&self.host)
    }

    /// Whether the host is a name (so re-resolving can change anything).
    pub fn is_name(&self) -> bool {
        self.literal().is_none()
    }

    /// Looks the host up again and switches to another address only if it accepts a TCP
    /// connection. Called from a background task while the database is unreachable.
    pub async fn re_resolve(&self) -> ReResolved {
        if !self.is_name() {
            return ReResolved::Literal;
        }
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let addrs = match self.resolver.lookup(&self.host, self.port).await {
            Ok(a) if !a.is_empty() => a,
            Ok(_) | Err(_) => return ReResolved::LookupFailed,
        };
        let current = self.get();
        let mut candidates: Vec<SocketAddr> =
            addrs.into_iter().filter(|a| Some(*a) != current).collect();
        candidates.sort_by_key(|a| !a.is_ipv4());
        for candidate in candidates {
            let answers =
                tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(candidate))
                    .await
                    .is_ok_and(|r| r.is_ok());
            if answers {
                self.pin(candidate);
                return ReResolved::Switched {
                    from: current,
                    to: candidate,
                };
            }
        }
        ReResolved::Kept
    }

    /// The pinned address, or `None` while the startup lookup has not succeeded yet.
    pub fn get(&self) -> Option<SocketAddr> {
        *self.addr.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many DNS lookups this process has performed for the database host.
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    fn pin(&self, addr: SocketAddr) {
        *self.addr.write().unwrap_or_else(|e| e.into_inner()) = Some(addr);
    }

    async fn lookup_once(&self, resolver: &dyn Resolver) -> io::Result<SocketAddr> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let addrs = resolver.lookup(&self.host, self.port).await?;
        let addr = crate::net::preferred(&addrs)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no addresses returned"))?;
        self.pin(addr);
        tracing::info!(db.host = %self.host, db.address = %addr, "resolved database host once; connections use this address until restart");
        Ok(addr)
    }

    /// Retries the startup lookup until it succeeds; ends early if the address is dropped (the
    /// application went away), since it holds the address only weakly.
    async fn retry_until_resolved(pinned: Weak<Self>, resolver: Arc<dyn Resolver>) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        loop {
            backoff.wait().await;
            let Some(pinned) = pinned.upgrade() else {
                return;
            };
            match pinned.lookup_once(resolver.as_ref()).await {
                Ok(_) => return,
                Err(error) => tracing::warn!(
                    db.host = %pinned.host, %error, retry_in = ?backoff.next_delay(),
                    "database host still does not resolve"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Fails the first `fail` lookups, then answers 127.0.0.1; counts every call.
    struct Flaky {
        fail: usize,
        calls: AtomicUsize,
    }

    impl Resolver for Flaky {
        fn lookup<'a>(&'a self, _host: &'a str, port: u16) -> LookupFuture<'a> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let fail = n < self.fail;
            Box::pin(async move {
                if fail {
                    Err(io::Error::other("resolver overflow"))
                } else {
                    Ok(vec![
                        SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], port)),
                        SocketAddr::from(([127, 0, 0, 1], port)),
                    ])
                }
            })
        }
    }

    #[tokio::test]
    async fn re_resolving_keeps_the_address_when_the_lookup_fails_or_nothing_else_answers() {
        // First call answers, the next fails.
        struct OnceThenFail(AtomicUsize);
        impl Resolver for OnceThenFail {
            fn lookup<'a>(&'a self, _: &'a str, port: u16) -> LookupFuture<'a> {
                let n = self.0.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    match n {
                        0 => Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))]),
                        1 => Err(io::Error::other("SERVFAIL")),
                        // A different address on a port where nothing listens.
                        _ => Ok(vec![SocketAddr::from(([127, 0, 0, 1], 1))]),
                    }
                })
            }
        }
        let p =
            PinnedAddress::resolve("db", 5432, Arc::new(OnceThenFail(AtomicUsize::new(0)))).await;
        let good = p.get();
        assert_eq!(p.re_resolve().await, ReResolved::LookupFailed);
        assert_eq!(p.get(), good);
        assert_eq!(
            p.re_resolve().await,
            ReResolved::Kept,
            "the other address does not answer"
        );
        assert_eq!(p.get(), good);
        assert_eq!(p.lookups(), 3);

        let literal = PinnedAddress::resolve("10.0.0.1", 5432, Arc::new(SystemResolver)).await;
        assert_eq!(literal.re_resolve().await, ReResolved::Literal);
        assert_eq!(literal.lookups(), 0);
    }

    #[tokio::test]
    async fn an_ip_literal_is_pinned_without_any_lookup() {
        let r = Arc::new(Flaky {
            fail: 0,
            calls: AtomicUsize::new(0),
        });
        let p = PinnedAddress::resolve("10.1.2.3", 5432, r.clone()).await;
        assert_eq!(p.get(), Some("10.1.2.3:5432".parse().unwrap()));
        assert_eq!(r.calls.load(Ordering::SeqCst), 0);
        assert_eq!(p.lookups(), 0);
    }

    #[tokio::test]
    async fn a_name_is_looked_up_once_and_ipv4_is_preferred() {
        let r = Arc::new(Flaky {
            fail: 0,
            calls: AtomicUsize::new(0),
        });
        let p = PinnedAddress::resolve("postgres", 5432, r.clone()).await;
        assert_eq!(p.get(), Some("127.0.0.1:5432".parse().unwrap()));
        for _ in 0..100 {
            assert!(p.get().is_some());
        }
        assert_eq!(r.calls.load(Ordering::SeqCst), 1);
        assert_eq!(p.lookups(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_startup_lookup_is_retried_in_the_background_until_it_succeeds() {
        let r = Arc::new(Flaky {
            fail: 3,
            calls: AtomicUsize::new(0),
        });
        let p = PinnedAddress::resolve("postgres", 5432, r.clone()).await;
        assert_eq!(p.get(), None, "nothing pinned while DNS fails");
        // Backoff 250ms, 500ms, 1s: the third retry (4th call) succeeds after 1.75s.
        tokio::time::sleep(Duration::from_millis(1800)).await;
        assert_eq!(p.get(), Some("127.0.0.1:5432".parse().unwrap()));
        assert_eq!(r.calls.load(Ordering::SeqCst), 4);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(r.calls.load(Ordering::SeqCst), 4, "no lookups once pinned");
    }
}
