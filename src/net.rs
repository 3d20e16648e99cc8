//! Host names and addresses, as every part of the service that resolves something reads them: the
//! database host (`db::resolve`), the OTLP collector (`telemetry`) and `doctor`; and the TLS
//! crypto provider every HTTP client of the process needs. At the bottom of the module graph
//! beside `config`: it imports nothing of the crate.

use std::net::{IpAddr, SocketAddr};

/// Installs rustls' ring provider for the process, once (later calls do nothing): reqwest is
/// built without a provider of its own (no C library or cmake for aws-lc), so every client it
/// builds, the OTLP http exporter's and the JWK Set fetcher's, needs this first, even for http.
pub fn install_tls_provider() {
    // An error means a provider is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The address a host names by itself (`10.0.0.5`, `::1` or `[::1]` as URLs write it): no
/// lookup needed.
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    host.trim_matches(['[', ']']).parse().ok()
}

/// An address as text, as `Display` writes it (`10.0.0.5`, `::1`): for the span attributes every
/// traced request carries (`client.address`, `network.peer.address`). IPv4 is written here
/// digit by digit, as `Display` goes through the formatting machinery and its padding support
/// (its cost per call: loadtest/archive.md#tracing-sdk-spans).
pub fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut text = String::with_capacity(15);
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push('.');
                }
                text.push_str(digits.format(octet));
            }
            text
        }
        IpAddr::V6(_) => ip.to_string(),
    }
}

/// The address to use of those a lookup returned: the first IPv4 one, else the first. Container
/// networks and PostgreSQL's default `listen_addresses` are IPv4 first.
pub fn preferred(addrs: &[SocketAddr]) -> Option<SocketAddr> {
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_recognised_with_or_without_brackets() {
        assert_eq!(ip_literal("10.0.0.5"), Some("10.0.0.5".parse().unwrap()));
        assert_eq!(ip_literal("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(ip_literal("::1"), Some("::1".parse().unwrap()));
        assert_eq!(ip_literal("postgres"), None);
        assert_eq!(ip_literal("10.0.0.5.example"), None);
    }

    #[test]
    fn addresses_read_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "10.0.0.5",
            "127.0.0.1",
            "255.255.255.255",
            "::1",
            "::ffff:10.0.0.5",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    #[test]
    fn ipv4_is_preferred_and_otherwise_the_first_is_kept() {
        let v6: SocketAddr = "[::1]:5432".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        let v6b: SocketAddr = "[::2]:5432".parse().unwrap();
        assert_eq!(preferred(&[v6, v4]), Some(v4));
        assert_eq!(preferred(&[v6, v6b]), Some(v6));
        assert_eq!(preferred(&[]), None);
    }
}
