//! TLS to PostgreSQL, negotiated by this crate instead of sqlx, so that connections go to the
//! pinned address while the certificate is checked against the host name.
//!
//! sqlx 0.9 opens its TCP connection to `host` (a fresh DNS lookup: the post-mortem's failure) and
//! checks the certificate against that same `host`; it has no `hostaddr`. Handing it the pinned IP
//! as the host would make `verify-full` check the certificate against an IP address, which managed
//! databases' certificates do not name, and would send no SNI, which some providers (Neon) route
//! by. The choices were a patched sqlx (a fork to carry from release to release) or doing here
//! what libpq does with `host` + `hostaddr`: TCP to the pinned address, PostgreSQL's SSLRequest,
//! then a rustls handshake whose server name (SNI and verification) is the configured host. We
//! chose the latter; `relay` hands the encrypted stream to sqlx.
//!
//! This module builds the rustls configuration once (CA and client certificate files are read at
//! startup, so a missing file stops the service naming it), performs the handshake and turns
//! rustls' errors into messages naming the setting to change; `certificate` summarises the
//! server's certificate for `doctor`.

use std::{fmt, net::SocketAddr, sync::Arc};

use anyhow::{Context, bail};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::certificate::CertificateSummary;
use crate::config::{DbTlsSettings, RootCert, SslMode};

/// PostgreSQL's SSLRequest: length 8, then the code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// The TLS side of connecting: the rustls configuration and the name the certificate must carry.
pub struct TlsClient {
    mode: SslMode,
    host: String,
    server_name: ServerName<'static>,
    config: Arc<ClientConfig>,
    /// The same, but accepting any certificate: `doctor` uses it to show what the server presents
    /// when verification fails.
    inspect: Arc<ClientConfig>,
    root_cert: RootCert,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient")
            .field("mode", &self.mode)
            .field("host", &self.host)
            .field("root_cert", &self.root_cert)
            .finish_non_exhaustive()
    }
}

/// What the server answered to SSLRequest.
pub enum Negotiated {
    Tls(Box<TlsStream<TcpStream>>),
    /// The server runs with `ssl = off`; the socket is still usable for a plain startup.
    Declined(TcpStream),
}

impl TlsClient {
    /// `None` when `settings` never try TLS (`disable`, `allow`).
    pub fn new(settings: &DbTlsSettings, host: &str) -> anyhow::Result<Option<TlsClient>> {
        if !settings.mode.tries_tls() {
            return Ok(None);
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_owned())
            .with_context(|| format!("DATABASE_URL: host {host:?} is not a valid TLS name"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match settings.mode {
            SslMode::VerifyFull => WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(&settings.root_cert)?),
                Arc::clone(&provider),
            )
            .build()?,
            SslMode::VerifyCa => Arc::new(NameNotChecked(
                WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots(&settings.root_cert)?),
                    Arc::clone(&provider),
                )
                .build()?,
            )),
            _ => Arc::new(NothingChecked(Arc::clone(&provider))),
        };
        let client_auth = match &settings.client_cert {
            None => None,
            Some(c) => {
                let chain = CertificateDer::pem_file_iter(&c.cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .with_context(|| {
                        format!("DATABASE_URL: sslcert={} cannot be read", c.cert.display())
                    })?;
                if chain.is_empty() {
                    bail!(
                        "DATABASE_URL: sslcert={} holds no PEM certificate",
                        c.cert.display()
                    );
                }
                // The key's own error text could quote it; only the path is reported.
                let key = PrivateKeyDer::from_pem_file(&c.key).map_err(|_| {
                    anyhow::anyhow!(
                        "DATABASE_URL: sslkey={} cannot be read as an unencrypted PEM private key",
                        c.key.display()
                    )
                })?;
                Some((chain, key))
            }
        };
        let build = |verifier: Arc<dyn ServerCertVerifier>| -> anyhow::Result<ClientConfig> {
            let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(verifier);
            let mut config = match &client_auth {
                Some((chain, key)) => builder
                    .with_client_auth_cert(chain.clone(), key.clone_key())
                    .context("DATABASE_URL: sslcert and sslkey do not form a usable pair")?,
                None => builder.with_no_client_auth(),
            };
            // PostgreSQL 17 checks ALPN when a client offers it; libpq 17 offers this one.
            config.alpn_protocols = vec![b"postgresql".to_vec()];
            Ok(config)
        };
        Ok(Some(TlsClient {
            mode: settings.mode,
            host: host.to_owned(),
            server_name,
            config: Arc::new(build(verifier)?),
            inspect: Arc::new(build(Arc::new(NothingChecked(Arc::clone(&provider))))?),
            root_cert: settings.root_cert.clone(),
        }))
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// Asks the server at `addr` for TLS and, if it agrees, performs the handshake.
    pub async fn negotiate(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> Result<Negotiated, sqlx::Error> {
        self.negotiate_with(&self.config, tcp, addr).await
    }

    /// The certificate the server at `addr` presents, whether or not it would verify.
    pub async fn inspect(
        &self,
        addr: SocketAddr,
    ) -> Result<Option<CertificateSummary>, sqlx::Error> {
        let tcp = TcpStream::connect(addr).await?;
        Ok(match self.negotiate_with(&self.inspect, tcp, addr).await? {
            Negotiated::Tls(stream) => Some(CertificateSummary::of(&stream)),
            Negotiated::Declined(_) => None,
        })
    }

    async fn negotiate_with(
        &self,
        config: &Arc<ClientConfig>,
        mut tcp: TcpStream,
        addr: SocketAddr,
    ) -> Result<Negotiated, sqlx::Error> {
        let _ = tcp.set_nodelay(true);
        tcp.write_all(&SSL_REQUEST).await?;
        // Exactly one byte: anything the server sent after it, before the handshake, must not be
        // read as if it were encrypted (CVE-2021-23222); rustls reads the socket afresh.
        let answer = tcp.read_u8().await?;
        match answer {
            b'S' => {}
            b'N' => return Ok(Negotiated::Declined(tcp)),
            other => {
                return Err(sqlx::Error::Protocol(format!(
                    "{addr} answered SSLRequest with 0x{other:02x}: is it PostgreSQL?"
                )));
            }
        }
        TlsConnector::from(Arc::clone(config))
            .connect(self.server_name.clone(), tcp)
            .await
            .map(|s| Negotiated::Tls(Box::new(s)))
            .map_err(|e| sqlx::Error::Tls(self.explain(&e, addr).into()))
    }

    /// An error that says what failed and which setting decides it.
    fn explain(&self, e: &std::io::Error, addr: SocketAddr) -> String {
        let host = &self.host;
        let mode = self.mode;
        let ca = match &self.root_cert {
            RootCert::File(p) => format!("sslrootcert={}", p.display()),
            RootCert::System => "the system's CA store (sslrootcert=system)".into(),
            RootCert::None => "no sslrootcert".into(),
        };
        let rustls_error = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
        let why = match rustls_error {
            Some(rustls::Error::InvalidCertificate(c)) => match c {
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => format!(
                    "the server's certificate does not name {host:?} ({c}); sslmode={mode} in \
                     DATABASE_URL checks the certificate against the host name: write a name the \
                     certificate carries as the host, or use sslmode=verify-ca"
                ),
                CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                    "the server's certificate is not signed by a CA in {ca} ({c}); sslmode={mode} \
                     in DATABASE_URL verifies it: point sslrootcert at your provider's CA bundle"
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    format!("the server's certificate has expired ({c})")
                }
                other => format!("the server's certificate was refused: {other}"),
            },
            Some(other) => format!("handshake failed: {other}"),
            None => format!("handshake failed: {e}"),
        };
        format!("TLS to {host} at {addr}: {why}")
    }
}

fn roots(source: &RootCert) -> anyhow::Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match source {
        RootCert::None => bail!("DATABASE_URL: verification needs sslrootcert"),
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                bail!(
                    "DATABASE_URL: sslrootcert=system, but the system's CA store is empty or \
                     unreadable (install ca-certificates, or give the CA file's path)"
                );
            }
        }
        RootCert::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| {
                    format!(
                        "DATABASE_URL: sslrootcert={} cannot be read",
                        path.display()
                    )
                })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                bail!(
                    "DATABASE_URL: sslrootcert={} holds no usable PEM certificate",
                    path.display()
                );
            }
        }
    }
    Ok(store)
}

/// `verify-ca`: the chain must lead to a trusted CA; the name is not checked (libpq's meaning).
#[derive(Debug)]
struct NameNotChecked(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for NameNotChecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain before the name, so a name error means the chain passed.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require`: encryption without authentication of the server (libpq's meaning).
/// The handshake's signatures are still checked, so the session key belongs to whoever holds the
/// certificate's key.
#[derive(Debug)]
struct NothingChecked(Arc<CryptoProvider>);

impl ServerCertVerifier for NothingChecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
