//! TLS settings for PostgreSQL, read from `DATABASE_URL`'s query the way libpq reads them.
//!
//! Operators copy these URLs from their provider's console (RDS, Cloud SQL, Supabase, Neon), so
//! the parameter names and meanings are libpq's: `sslmode`, `sslrootcert`, `sslcert`, `sslkey`.
//! Two differences, both refusals rather than surprises: verification modes need an explicit CA
//! (`sslrootcert=PATH`, or `system` for the operating system's store) instead of libpq's silent
//! `~/.postgresql/root.crt`, and a passphrase-protected client key (`sslpassword`) is refused
//! because rustls cannot decrypt one. The `PGSSL*` environment variables are not read: the URL is
//! the one place these settings live. Files are read when the connector is built, at startup.

use std::{fmt, path::PathBuf};

use url::Url;

use super::env::{ConfigError, invalid};

/// libpq's `sslmode`. `allow` is accepted and behaves as `disable` (plain first; no server
/// requires TLS only after a plain attempt failed in practice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a connection is attempted over TLS at all.
    pub fn tries_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Allow)
    }

    /// Whether the certificate chain is checked against a CA.
    pub fn verifies_chain(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the CA certificates that verify the server come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// No `sslrootcert`: only valid when nothing is verified.
    None,
    /// `sslrootcert=system`: the operating system's store.
    System,
    /// A PEM file with one or more CA certificates.
    File(PathBuf),
}

/// A client certificate and its key (`sslcert` + `sslkey`), both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbTlsSettings {
    pub mode: SslMode,
    pub root_cert: RootCert,
    pub client_cert: Option<ClientCert>,
}

const MODES: &str = "sslmode=disable|allow|prefer|require|verify-ca|verify-full in DATABASE_URL";

pub(super) fn parse(url: &Url) -> Result<DbTlsSettings, ConfigError> {
    let param = |name: &str| {
        url.query_pairs()
            .filter(|(k, _)| k == name)
            .last()
            .map(|(_, v)| v.into_owned())
    };
    let root_cert = match param("sslrootcert").as_deref() {
        None | Some("") => RootCert::None,
        Some("system") => RootCert::System,
        Some(path) => RootCert::File(PathBuf::from(path)),
    };
    let mode = mode(param("sslmode").as_deref(), &root_cert)?;
    if param("sslpassword").is_some() {
        return Err(invalid(
            "DATABASE_URL",
            "sslpassword is set (the value is not shown)".into(),
            "an unencrypted client key (e.g. `openssl pkey -in enc.key -out client.key`) kept \
             readable by this service only; encrypted keys are not supported",
        ));
    }
    Ok(DbTlsSettings {
        mode,
        client_cert: client_cert(param("sslcert"), param("sslkey"), mode)?,
        root_cert,
    })
}

/// The `sslmode` in force, from the one written (if any) and the root certificate, as libpq
/// decides it; refused where libpq would refuse it or would silently verify nothing.
fn mode(written: Option<&str>, root_cert: &RootCert) -> Result<SslMode, ConfigError> {
    let explicit = match written {
        None => None,
        Some("disable") => Some(SslMode::Disable),
        Some("allow") => Some(SslMode::Allow),
        Some("prefer") => Some(SslMode::Prefer),
        Some("require") => Some(SslMode::Require),
        Some("verify-ca") => Some(SslMode::VerifyCa),
        Some("verify-full") => Some(SslMode::VerifyFull),
        Some(other) => {
            return Err(invalid(
                "DATABASE_URL",
                format!("sslmode={other:?} is not a libpq sslmode"),
                MODES,
            ));
        }
    };
    // libpq's defaults: `prefer`; `verify-full` with the system store (PostgreSQL 16); and
    // `require` with a CA file verifies the chain, as libpq does for a present root file.
    let mode = match (explicit, root_cert) {
        (None, RootCert::System) => SslMode::VerifyFull,
        (None, _) => SslMode::Prefer,
        (Some(SslMode::Require), RootCert::File(_)) => SslMode::VerifyCa,
        (Some(mode), _) => mode,
    };
    if *root_cert == RootCert::System && mode != SslMode::VerifyFull {
        return Err(invalid(
            "DATABASE_URL",
            format!("sslrootcert=system with sslmode={mode}"),
            "sslrootcert=system only with sslmode=verify-full (any CA in the store could vouch for \
             any name otherwise), as libpq requires",
        ));
    }
    if mode.verifies_chain() && *root_cert == RootCert::None {
        return Err(invalid(
            "DATABASE_URL",
            format!("sslmode={mode} without sslrootcert"),
            "sslrootcert=/path/to/ca.pem (your provider's CA bundle) or sslrootcert=system",
        ));
    }
    Ok(mode)
}

/// The client certificate of `sslcert` and `sslkey`: both or neither, and only over TLS.
fn client_cert(
    cert: Option<String>,
    key: Option<String>,
    mode: SslMode,
) -> Result<Option<ClientCert>, ConfigError> {
    let client_cert = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => ClientCert {
            cert: cert.into(),
            key: key.into(),
        },
        _ => {
            return Err(invalid(
                "DATABASE_URL",
                "only one of sslcert and sslkey is set".into(),
                "both sslcert=/path/client.crt and sslkey=/path/client.key, or neither",
            ));
        }
    };
    if !mode.tries_tls() {
        return Err(invalid(
            "DATABASE_URL",
            format!("sslcert/sslkey with sslmode={mode}"),
            "a client certificate needs TLS: sslmode=require or stronger",
        ));
    }
    Ok(Some(client_cert))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(query: &str) -> Result<DbTlsSettings, ConfigError> {
        parse(&Url::parse(&format!("postgres://u@db.example.com/todos{query}")).unwrap())
    }

    #[test]
    fn modes_follow_libpq() {
        let mode = |q: &str| settings(q).unwrap().mode;
        assert_eq!(mode(""), SslMode::Prefer, "libpq's default");
        assert_eq!(mode("?sslmode=disable"), SslMode::Disable);
        assert_eq!(mode("?sslmode=require"), SslMode::Require);
        assert_eq!(
            mode("?sslmode=require&sslrootcert=/ca.pem"),
            SslMode::VerifyCa,
            "a CA file makes require verify the chain, as in libpq"
        );
        assert_eq!(mode("?sslrootcert=system"), SslMode::VerifyFull);
        assert_eq!(
            mode("?sslmode=verify-full&sslrootcert=/ca.pem"),
            SslMode::VerifyFull
        );
    }

    #[test]
    fn unsafe_or_unsupported_combinations_name_the_setting() {
        for (query, says) in [
            ("?sslmode=verify-all", "sslmode=\"verify-all\""),
            ("?sslmode=verify-full", "without sslrootcert"),
            ("?sslmode=verify-ca", "without sslrootcert"),
            ("?sslmode=require&sslrootcert=system", "sslrootcert=system"),
            ("?sslmode=require&sslcert=/c.pem", "only one of sslcert"),
            ("?sslmode=disable&sslcert=/c&sslkey=/k", "needs TLS"),
        ] {
            let err = settings(query).unwrap_err();
            assert_eq!(err.var, "DATABASE_URL");
            let text = format!("{} {}", err.problem, err.expected);
            assert!(text.contains(says), "{query}: {text}");
        }
        let err = settings("?sslmode=require&sslpassword=hunter2hunter2").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn client_certificates_come_in_pairs() {
        let s = settings("?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/k.pem")
            .unwrap();
        assert_eq!(
            s.client_cert,
            Some(ClientCert {
                cert: "/c.pem".into(),
                key: "/k.pem".into()
            })
        );
        assert_eq!(s.root_cert, RootCert::File("/ca.pem".into()));
    }
}
