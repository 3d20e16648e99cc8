//! What `doctor` shows of a TLS session with PostgreSQL: protocol, cipher and the server's
//! certificate (subject, issuer, names, expiry), read from the negotiated stream. Apart from
//! `tls`, which negotiates, because it is one job of its own: reading a certificate for people.

use std::fmt;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// What `doctor` shows of a negotiated session.
#[derive(Debug, Clone)]
pub struct CertificateSummary {
    pub protocol: String,
    pub cipher: String,
    pub subject: String,
    pub issuer: String,
    /// DNS names and IP addresses from subjectAltName.
    pub names: Vec<String>,
    pub not_after: Option<chrono::DateTime<chrono::Utc>>,
}

impl CertificateSummary {
    /// For connections whose certificate nobody asked about.
    pub fn empty() -> CertificateSummary {
        CertificateSummary {
            protocol: String::new(),
            cipher: String::new(),
            subject: String::new(),
            issuer: String::new(),
            names: Vec::new(),
            not_after: None,
        }
    }

    pub fn of(stream: &TlsStream<TcpStream>) -> CertificateSummary {
        let session = stream.get_ref().1;
        let mut summary = CertificateSummary {
            protocol: session
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_owned(),
            cipher: session
                .negotiated_cipher_suite()
                .and_then(|c| c.suite().as_str())
                .unwrap_or("?")
                .to_owned(),
            ..CertificateSummary::empty()
        };
        let Some(leaf) = session.peer_certificates().and_then(|c| c.first()) else {
            return summary;
        };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
            return summary;
        };
        summary.subject = cert.subject().to_string();
        summary.issuer = cert.issuer().to_string();
        summary.not_after =
            chrono::DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0);
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            use x509_parser::extensions::GeneralName;
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => summary.names.push((*d).to_owned()),
                    GeneralName::IPAddress(b) => {
                        let ip = match b.len() {
                            4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            _ => None,
                        };
                        if let Some(ip) = ip {
                            summary.names.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        summary
    }
}

impl fmt::Display for CertificateSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}, certificate {:?} for [{}] issued by {:?}",
            self.protocol,
            self.cipher,
            self.subject,
            self.names.join(", "),
            self.issuer
        )?;
        if let Some(t) = self.not_after {
            write!(f, ", expires {}", t.format("%Y-%m-%d"))?;
        }
        Ok(())
    }
}
