//! The OTLP collector's address, resolved once at startup like the database's, and the clients
//! the exporters reach it with (see [`Collector`]). Apart from `telemetry`'s assembly of the
//! pipelines because it is one job of its own: DNS, TLS and the pinned address.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use url::Url;

use crate::config::{OtelConfig, OtlpProtocol};

/// Where the exporters send, with the collector's host resolved once, now, so that reconnects
/// never go back to DNS.
///
/// - gRPC: the URL's host is replaced by the address; for `https://`, TLS checks the
///   certificate against the host name (tonic's `domain_name`), with the system's roots and
///   `OTEL_EXPORTER_OTLP_CERTIFICATE`.
/// - http/protobuf: the URL keeps the host name and one shared client is told the address
///   (`reqwest::ClientBuilder::resolve`), so an `https://` collector's certificate is checked
///   against the name (what it names) while the connection goes to the pinned address, as libpq
///   does with `host` + `hostaddr`. `OTEL_EXPORTER_OTLP_CERTIFICATE` adds a CA to the system's.
///
/// A failed lookup keeps the name (export errors will say why), rather than stopping the service
/// over telemetry; an unreadable certificate file does stop it, naming the variable.
pub(super) struct Collector {
    pub(super) url: Url,
    /// For http/protobuf.
    pub(super) http_client: Option<reqwest::blocking::Client>,
    /// For gRPC to an `https://` collector.
    pub(super) grpc_tls: Option<opentelemetry_otlp::tonic_types::transport::ClientTlsConfig>,
}

impl Collector {
    /// `export_timeout` bounds each request of the http/protobuf client.
    pub(super) async fn resolve_once(
        otel: &OtelConfig,
        endpoint: &Url,
        export_timeout: Duration,
    ) -> anyhow::Result<Collector> {
        let host = endpoint.host_str().unwrap_or_default().to_owned();
        let pinned = pin(&host, endpoint.port_or_known_default().unwrap_or(4317)).await;
        let ca_pem = otel
            .certificate
            .as_ref()
            .map(|path| {
                std::fs::read(path).with_context(|| {
                    format!(
                        "cannot read OTEL_EXPORTER_OTLP_CERTIFICATE={}",
                        path.display()
                    )
                })
            })
            .transpose()?;
        match otel.protocol {
            OtlpProtocol::Grpc => Ok(Collector::grpc(endpoint, host, pinned, ca_pem)),
            OtlpProtocol::HttpProtobuf => {
                Collector::http(endpoint, host, pinned, ca_pem, export_timeout)
            }
        }
    }

    /// Over gRPC: tonic connects to the pinned address, and TLS checks the certificate against
    /// the host name.
    fn grpc(
        endpoint: &Url,
        host: String,
        pinned: Option<SocketAddr>,
        ca_pem: Option<Vec<u8>>,
    ) -> Collector {
        use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
        let mut url = endpoint.clone();
        if let Some(addr) = pinned {
            let _ = url.set_ip_host(addr.ip());
        }
        let grpc_tls = (endpoint.scheme() == "https").then(|| {
            let tls = ClientTlsConfig::new().domain_name(host).with_native_roots();
            match &ca_pem {
                Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
                None => tls,
            }
        });
        Collector {
            url,
            http_client: None,
            grpc_tls,
        }
    }

    /// Over http/protobuf: reqwest's blocking client, the host name mapped to the pinned address.
    fn http(
        endpoint: &Url,
        host: String,
        pinned: Option<SocketAddr>,
        ca_pem: Option<Vec<u8>>,
        timeout: Duration,
    ) -> anyhow::Result<Collector> {
        let ca = ca_pem
            .map(|pem| {
                reqwest::Certificate::from_pem(&pem).with_context(|| {
                    "OTEL_EXPORTER_OTLP_CERTIFICATE is not a PEM certificate".to_string()
                })
            })
            .transpose()?;
        // reqwest's blocking client starts a runtime of its own, which cannot be done on one of
        // ours: built on a thread, as the exporter builds its default one.
        let client = std::thread::spawn(move || {
            let mut builder = reqwest::blocking::Client::builder().timeout(timeout);
            if let Some(addr) = pinned {
                builder = builder.resolve(&host, addr);
            }
            if let Some(ca) = ca {
                builder = builder.add_root_certificate(ca);
            }
            builder.build()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("building the OTLP http client panicked"))??;
        Ok(Collector {
            url: endpoint.clone(),
            http_client: Some(client),
            grpc_tls: None,
        })
    }
}

/// The collector's address, looked up once; `None` for an IP literal (nothing to pin) or a name
/// that did not resolve (then the exporter uses the name).
async fn pin(host: &str, port: u16) -> Option<SocketAddr> {
    if crate::net::ip_literal(host).is_some() {
        return None;
    }
    let found: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map(Iterator::collect)
        .unwrap_or_default();
    match crate::net::preferred(&found) {
        Some(addr) => {
            eprintln!("info: OTLP collector {host} resolved once to {}", addr.ip());
            Some(addr)
        }
        None => {
            eprintln!("warning: OTLP collector host {host} did not resolve; using the name");
            None
        }
    }
}
