//! Opening one PostgreSQL connection to the pinned address, with or without TLS.
//!
//! Plain connections go straight from sqlx to the address. TLS is negotiated here ([`super::tls`])
//! and the stream handed to sqlx (`relay`), so that the address stays pinned while the
//! certificate is checked against the host name. `sslmode` decides between them, as in libpq:
//! `prefer` falls back to plain when the server declines TLS or the handshake fails, `require` and
//! stronger refuse to. Unlike libpq, `prefer` remembers a server's "no TLS" for a minute, so a
//! burst of reconnects to a plain server does not pay an extra round trip and TCP connection each.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use sqlx::{
    Connection,
    postgres::{PgConnectOptions, PgConnection, PgSslMode},
};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{
    certificate::CertificateSummary,
    relay::{self, RelayDir},
    tls::{Negotiated, TlsClient},
};
use crate::config::{DbTlsSettings, SslMode};

/// How a connection was made, for `doctor`.
#[derive(Debug, Clone)]
pub enum Transport {
    Tls(CertificateSummary),
    /// Plain text, and why.
    Plain(&'static str),
}

enum Route<'a> {
    Tls(Box<TlsStream<TcpStream>>, &'a RelayDir),
    Plain(&'static str),
}

/// Opens connections to whatever address it is given, with the configured TLS.
#[derive(Debug)]
pub struct Connector {
    /// From `DATABASE_URL` plus per-connection settings. sqlx itself never does TLS (it is built
    /// without it); the host here is only used for messages.
    options: PgConnectOptions,
    mode: SslMode,
    tls: Option<(TlsClient, RelayDir)>,
    /// `prefer` against a server that declined TLS: milliseconds after `epoch` until which new
    /// connections go plain without asking again (0: ask). Saves every reconnect a round trip
    /// and a second TCP connection, which a reconnect storm would otherwise pay in full.
    plain_until: AtomicU64,
    epoch: Instant,
}

/// How long `prefer` trusts a server's "no TLS" before asking again.
const DECLINE_REMEMBERED_FOR: Duration = Duration::from_secs(60);

impl Connector {
    /// Reads the certificate files now, so a bad one stops startup.
    pub fn new(
        options: PgConnectOptions,
        settings: &DbTlsSettings,
        host: &str,
    ) -> anyhow::Result<Connector> {
        let tls = match TlsClient::new(settings, host)? {
            None => None,
            Some(client) => Some((client, RelayDir::create()?)),
        };
        Ok(Connector {
            options: options.ssl_mode(PgSslMode::Disable),
            mode: settings.mode,
            tls,
            plain_until: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    pub async fn connect(&self, addr: SocketAddr) -> Result<PgConnection, sqlx::Error> {
        match self.route(addr).await? {
            Route::Tls(stream, relay_dir) => {
                relay::connect_over(relay_dir, &self.options, stream).await
            }
            Route::Plain(_) => self.plain(addr).await,
        }
    }

    /// How a connection to `addr` would be carried, without logging in (`doctor`).
    pub async fn probe(&self, addr: SocketAddr) -> Result<Transport, sqlx::Error> {
        Ok(match self.route(addr).await? {
            Route::Tls(stream, _) => Transport::Tls(CertificateSummary::of(&stream)),
            Route::Plain(why) => Transport::Plain(why),
        })
    }

    /// The certificate the server presents, verified or not (`doctor`, after a failure).
    pub async fn inspect(
        &self,
        addr: SocketAddr,
    ) -> Option<Result<Option<CertificateSummary>, sqlx::Error>> {
        let (client, _) = self.tls.as_ref()?;
        Some(client.inspect(addr).await)
    }

    /// TLS as `sslmode` says: a TLS stream to log in over, or plain (a new socket) and why.
    async fn route(&self, addr: SocketAddr) -> Result<Route<'_>, sqlx::Error> {
        let Some((client, relay_dir)) = &self.tls else {
            return Ok(Route::Plain("sslmode does not ask for TLS"));
        };
        let now = self.epoch.elapsed().as_millis() as u64;
        if now < self.plain_until.load(Ordering::Relaxed) {
            return Ok(Route::Plain(
                "the server declined TLS (ssl = off) a moment ago, which sslmode=prefer allows",
            ));
        }
        let tcp = TcpStream::connect(addr).await?;
        match client.negotiate(tcp, addr).await {
            Ok(Negotiated::Tls(stream)) => Ok(Route::Tls(stream, relay_dir)),
            Ok(Negotiated::Declined(_)) if self.mode == SslMode::Prefer => {
                let until = now + DECLINE_REMEMBERED_FOR.as_millis() as u64;
                self.plain_until.store(until, Ordering::Relaxed);
                Ok(Route::Plain(
                    "the server declined TLS (ssl = off), which sslmode=prefer allows",
                ))
            }
            Ok(Negotiated::Declined(_)) => Err(sqlx::Error::Tls(
                format!(
                    "TLS to {} at {addr}: the server does not offer TLS (ssl = off), and \
                     sslmode={} in DATABASE_URL requires it",
                    self.options.get_host(),
                    self.mode
                )
                .into(),
            )),
            Err(sqlx::Error::Tls(_)) if self.mode == SslMode::Prefer => Ok(Route::Plain(
                "the TLS handshake failed, and sslmode=prefer falls back to plain",
            )),
            Err(e) => Err(e),
        }
    }

    async fn plain(&self, addr: SocketAddr) -> Result<PgConnection, sqlx::Error> {
        PgConnection::connect_with(&aimed_at(&self.options, addr)).await
    }
}

/// `options` with the host replaced by the address: sqlx then connects without a lookup.
pub fn aimed_at(options: &PgConnectOptions, addr: SocketAddr) -> PgConnectOptions {
    options
        .clone()
        .host(&addr.ip().to_string())
        .port(addr.port())
}
