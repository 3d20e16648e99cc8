//! Builds the application from settings and runs it until shutdown.
//!
//! [`Application::build`] binds the listener itself and exposes the real address, so tests ask
//! for port 0 and the binary and the tests share one path. [`Application::run_until`] takes the
//! shutdown signal as a future, which lets tests stop the server and `main` wire SIGTERM/SIGINT.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};

use crate::{
    auth::{Verifier, jwks},
    config::{AuthConfig, AuthMode, Config},
    db::{
        Db,
        resolve::{Resolver, SystemResolver},
    },
    http::{self, AppState},
};

/// The token verifier of `AUTH_MODE=jwt`, its JWK Set loaded (and refreshed from now on).
async fn verifier(auth: &AuthConfig) -> anyhow::Result<Option<Arc<Verifier>>> {
    use secrecy::ExposeSecret as _;
    let AuthMode::Jwt(jwt) = &auth.mode else {
        return Ok(None);
    };
    let set = match &jwt.jwks {
        Some(source) => Some(
            jwks::start(source.clone(), jwt.jwks_refresh)
                .await
                .with_context(|| format!("cannot use the JWK Set {source}"))?,
        ),
        None => None,
    };
    Ok(Some(Arc::new(Verifier::new(
        jwt.secret.as_ref().map(|s| s.expose_secret().as_bytes()),
        set,
        jwt.audience.as_deref(),
        jwt.issuer.as_deref(),
    ))))
}

/// Pending connections the kernel queues before `accept`. Tokio's default (mio) is 128, which a
/// 2000-connection spike overflows: the kernel then drops SYNs and clients retry after a second.
/// The kernel caps this at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// A bound, ready-to-run service.
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    /// The operators' listener and its routes (`ADMIN_LISTEN_ADDR`), unless it is off.
    admin: Option<(TcpListener, axum::Router)>,
    db: Db,
    shutdown_timeout: Duration,
    readiness_delay: Duration,
    draining: Arc<AtomicBool>,
    limits: http::server::ConnectionLimits,
}

impl Application {
    /// Builds with the operating system's resolver.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_resolver(config, Arc::new(SystemResolver)).await
    }

    /// Builds with a given resolver for the database host (tests count and fail lookups).
    pub async fn build_with_resolver(
        config: Config,
        resolver: Arc<dyn Resolver>,
    ) -> anyhow::Result<Self> {
        crate::net::install_tls_provider();
        let listener = bind(config.listen_addr)
            .with_context(|| format!("cannot listen on LISTEN_ADDR={}", config.listen_addr))?;
        let local = listener.local_addr()?;
        let admin_listener = config
            .admin_listen_addr
            .map(|addr| {
                bind(addr).with_context(|| format!("cannot listen on ADMIN_LISTEN_ADDR={addr}"))
            })
            .transpose()?;
        if let Some(admin) = &admin_listener
            && let Ok(addr) = admin.local_addr()
            && !addr.ip().is_loopback()
        {
            // Allowed only with ADMIN_ALLOW_NETWORK=true (see config::server).
            tracing::warn!(
                admin_listen_addr = %addr,
                "the admin listener is on an address other machines can reach, without \
                 authentication: anyone who reaches it reads the service's internals"
            );
        }
        if config.auth.is_open_to_the_network(local) {
            tracing::warn!(
                listen_addr = %local,
                "AUTH_MODE=none on an address other machines can reach: anyone who reaches it \
                 can read, change and delete every todo; set AUTH_MODE=jwt to require tokens"
            );
        }
        tracing::info!(
            auth = match config.auth.mode {
                crate::config::AuthMode::None { .. } => "none",
                crate::config::AuthMode::Jwt(_) => "jwt",
            },
            database = %config.database.redacted_url(),
            pool_max_size = config.database.pool_max_size,
            "connecting to the database lazily"
        );
        let db = Db::connect(&config.database, config.breaker, resolver).await?;
        let draining = Arc::new(AtomicBool::new(false));
        let state = AppState::new(http::Shared {
            db: db.clone(),
            public_base_url: config
                .public_base_url
                .as_ref()
                .map(|u| Arc::from(u.as_str().trim_end_matches('/'))),
            fallback_base_url: Arc::from(format!("http://{local}")),
            allowed_hosts: config.allowed_hosts.clone(),
            idempotency_key_ttl: config.idempotency_key_ttl,
            draining: Arc::clone(&draining),
        });
        spawn_idempotency_sweeper(&db);
        crate::metrics::register_db(&db);
        let verifier = verifier(&config.auth).await?;
        let router = http::router(state.clone(), &config, verifier);
        let admin = admin_listener.map(|l| (l, http::routes::admin::router(state)));
        Ok(Application {
            listener,
            router,
            admin,
            db,
            shutdown_timeout: config.shutdown_timeout,
            readiness_delay: config.shutdown_readiness_delay,
            draining,
            limits: http::server::ConnectionLimits {
                header_read_timeout: config.header_read_timeout,
                max_connections: config.max_connections,
            },
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The admin listener's address, unless `ADMIN_LISTEN_ADDR=off`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .map(|(l, _)| l.local_addr().expect("bound listener has an address"))
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Serves until `shutdown` completes; then `/ready` says 503 for `SHUTDOWN_READINESS_DELAY`
    /// while everything is still served (load balancers take the replica out of rotation), then
    /// it stops accepting, lets in-flight requests finish for up to `SHUTDOWN_TIMEOUT`, and closes
    /// the pool.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = self.local_addr();
        tracing::info!(%addr, admin = ?self.admin_addr(), "listening");
        let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
        let (stop_admin, admin_stopped) = tokio::sync::watch::channel(false);
        if let Some((listener, router)) = self.admin {
            let mut stop = admin_stopped;
            // Operators' requests are few: a small cap, the same header timeout.
            let limits = http::server::ConnectionLimits {
                max_connections: 100,
                ..self.limits
            };
            tokio::spawn(http::server::serve(listener, router, limits, async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            }));
        }
        let (draining, readiness_delay) = (self.draining, self.readiness_delay);
        let server = http::server::serve(self.listener, self.router, self.limits, async move {
            shutdown.await;
            draining.store(true, Ordering::Relaxed);
            if !readiness_delay.is_zero() {
                tracing::info!(
                    ?readiness_delay,
                    "shutting down: /ready answers 503 while requests are still served"
                );
                tokio::time::sleep(readiness_delay).await;
            }
            let _ = signalled_tx.send(());
        });
        let deadline = self.shutdown_timeout;
        let drain_limit = async move {
            if signalled_rx.await.is_ok() {
                tokio::time::sleep(deadline).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = server => {}
            () = drain_limit => tracing::warn!(?deadline, "in-flight requests did not finish before SHUTDOWN_TIMEOUT; exiting anyway"),
        }
        let _ = stop_admin.send(true);
        self.db.close();
        tracing::info!("stopped");
        Ok(())
    }
}

/// Deletes expired idempotency keys every few minutes so the table stays small. Holds the
/// database only weakly: it ends when the application is dropped.
fn spawn_idempotency_sweeper(db: &Db) {
    let db = db.downgrade();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        loop {
            tick.tick().await;
            let Some(db) = db.upgrade() else { return };
            match db.sweep_expired_idempotency_keys().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "swept expired idempotency keys"),
                // Every ten minutes at most, and a table that keeps growing deserves a look.
                Err((e, deleted)) => tracing::warn!(
                    error = %e, deleted,
                    "idempotency key sweep failed; expired keys stay until the next sweep"
                ),
            }
        }
    });
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Completes on SIGTERM (orchestrators) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
