//! OpenTelemetry export settings: the standard `OTEL_*` variables, validated here rather than left
//! to the SDK, which falls back to defaults with only a warning on a bad value.

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue};
use url::Url;

use super::{
    Var,
    env::{ConfigError, Env, invalid},
    redact::{RedactedUrl, redact_url},
};

pub const VARS: &[Var] = &[
    Var {
        name: "OTEL_EXPORTER_OTLP_ENDPOINT",
        default: None,
        help: "OTLP collector URL, e.g. http://otel-collector:4317 (gRPC) or :4318 \
               (http/protobuf), or https://… for a collector behind TLS. Unset: no export, logs \
               only. Its host is resolved once at startup; with https the certificate is checked \
               against the name.",
    },
    Var {
        name: "OTEL_EXPORTER_OTLP_HEADERS",
        default: None,
        help: "Headers sent with every export, as key=value,key=value with URL-encoded values \
               (the OpenTelemetry form), e.g. signoz-ingestion-key=<key> for SigNoz Cloud. \
               Checked at startup; the values are never logged or shown.",
    },
    Var {
        name: "OTEL_EXPORTER_OTLP_CERTIFICATE",
        default: None,
        help: "PEM file of the CA (or certificate) that signs an https collector's certificate, \
               trusted beside the system's roots. The certificate is checked \
               against the endpoint's host name while the address stays the one resolved at \
               startup.",
    },
    Var {
        name: "OTEL_EXPORTER_OTLP_PROTOCOL",
        default: Some("grpc"),
        help: "`grpc` or `http/protobuf`.",
    },
    Var {
        name: "OTEL_SERVICE_NAME",
        default: Some("todo-service"),
        help: "service.name of the exported telemetry (what SigNoz lists under Services).",
    },
    Var {
        name: "OTEL_RESOURCE_ATTRIBUTES",
        default: None,
        help: "Extra resource attributes as key=value,key=value, e.g. \
               deployment.environment=production (default deployment.environment=development).",
    },
    Var {
        name: "OTEL_METRIC_EXPORT_INTERVAL",
        default: Some("60000"),
        help: "Milliseconds between metric exports (the OpenTelemetry standard variable).",
    },
    Var {
        name: "OTEL_TRACES_SAMPLER",
        default: Some("parentbased_always_on"),
        help: "Which requests are traced: always_on, always_off, traceidratio, or parentbased_* \
               of those (follow the caller's traceparent decision, else the named sampler).",
    },
    Var {
        name: "OTEL_TRACES_SAMPLER_ARG",
        default: Some("1.0"),
        help: "Fraction of traces kept by the *traceidratio samplers, from 0 to 1, e.g. 0.1. \
               At thousands of requests per second a fraction keeps export cheap (see \
               loadtest/archive.md#tracing-sdk-spans); metrics and logs are never sampled.",
    },
    Var {
        name: "TRACES_FORCED_PER_SECOND",
        default: Some("10"),
        help: "Traces per second (per replica) that callers may add beyond the sampler's own \
               choice by sending a sampled traceparent to a parentbased_* sampler that keeps less \
               than every trace; past it their requests are not traced. 0: a caller's flag never \
               adds a trace. Without it any client could have every request traced.",
    },
    Var {
        name: "OTEL_SDK_DISABLED",
        default: Some("false"),
        help: "true turns telemetry export off even when an endpoint is set.",
    },
];

/// How traces are sent to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// OpenTelemetry export settings (the standard `OTEL_*` variables).
#[derive(Debug, Clone)]
pub struct OtelConfig {
    /// Printed without its credentials.
    pub endpoint: Option<RedactedUrl>,
    /// `OTEL_EXPORTER_OTLP_HEADERS`, for the span exporter (`telemetry::otlp_spans`); the stock
    /// metric and log exporters read the variable themselves. The values are secrets: marked
    /// sensitive, and never shown by `Debug`.
    pub headers: ExportHeaders,
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE`: a PEM file, read when the exporters are built.
    pub certificate: Option<std::path::PathBuf>,
    pub protocol: OtlpProtocol,
    pub service_name: String,
    pub resource_attributes: Vec<(String, String)>,
    pub disabled: bool,
    pub metric_interval: std::time::Duration,
    pub sampler: TraceSampler,
}

/// The headers every OTLP export carries (`OTEL_EXPORTER_OTLP_HEADERS`).
#[derive(Clone, Default)]
pub struct ExportHeaders(pub Vec<(HeaderName, HeaderValue)>);

impl ExportHeaders {
    /// The header names, lower-case; the values stay out of sight.
    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_str()).collect()
    }
}

impl std::fmt::Debug for ExportHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

/// Reads `OTEL_EXPORTER_OTLP_HEADERS` as opentelemetry-otlp reads it (comma-separated
/// `key=value`, values percent-decoded). The exporter would drop an entry it cannot use without a
/// word, and the collector would then refuse every export; here it is a startup error naming the
/// variable and the entry's key, never its value.
fn headers(raw: &str) -> Result<ExportHeaders, ConfigError> {
    const VAR: &str = "OTEL_EXPORTER_OTLP_HEADERS";
    const FORM: &str = "key=value pairs separated by commas, each key a header name and each \
                        value (URL-decoded) a header value";
    let mut headers = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((key, value)) = entry.split_once('=') else {
            return Err(invalid(VAR, "an entry without `=`".into(), FORM));
        };
        let key = key.trim();
        let Ok(name) = HeaderName::from_bytes(key.as_bytes()) else {
            return Err(invalid(VAR, format!("the key {key:?}"), FORM));
        };
        let value = percent_encoding::percent_decode_str(value.trim())
            .decode_utf8()
            .ok()
            .filter(|v| !v.is_empty())
            .and_then(|v| HeaderValue::from_str(&v).ok());
        let Some(mut value) = value else {
            return Err(invalid(VAR, format!("the value of {key:?}"), FORM));
        };
        value.set_sensitive(true);
        headers.push((name, value));
    }
    Ok(ExportHeaders(headers))
}

/// The head sampler of `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`. Parsed here rather than
/// left to the SDK, which falls back to always-on with only a warning on a bad value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceSampler {
    /// Follow the sampled flag of an incoming `traceparent` when there is one.
    pub parent_based: bool,
    /// Fraction of new traces kept, 0.0 to 1.0 (always_off is 0, always_on is 1).
    pub ratio: f64,
    /// `TRACES_FORCED_PER_SECOND`: traces a caller's sampled flag may add beyond `ratio`.
    pub forced_per_second: u32,
}

pub(super) fn parse(env: &Env<'_>) -> Result<OtelConfig, ConfigError> {
    const URL_FORM: &str = "an http(s) URL such as http://otel-collector:4317";
    let endpoint = env
        .optional("OTEL_EXPORTER_OTLP_ENDPOINT")
        .map(|raw| match Url::parse(raw.trim()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                Ok(RedactedUrl::new(u))
            }
            _ => Err(invalid(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                redact_url(raw.trim()),
                URL_FORM,
            )),
        })
        .transpose()?;
    let headers = env
        .optional("OTEL_EXPORTER_OTLP_HEADERS")
        .map(|raw| headers(&raw))
        .transpose()?
        .unwrap_or_default();
    let protocol = match env.value("OTEL_EXPORTER_OTLP_PROTOCOL").trim() {
        "grpc" => OtlpProtocol::Grpc,
        "http/protobuf" => OtlpProtocol::HttpProtobuf,
        other => {
            return Err(invalid(
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                format!("{other:?}"),
                "grpc or http/protobuf",
            ));
        }
    };
    let resource_attributes = env
        .optional("OTEL_RESOURCE_ATTRIBUTES")
        .map(|raw| {
            raw.split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|pair| match pair.split_once('=') {
                    Some((k, v)) if !k.trim().is_empty() => {
                        Ok((k.trim().to_owned(), v.trim().to_owned()))
                    }
                    _ => Err(invalid(
                        "OTEL_RESOURCE_ATTRIBUTES",
                        format!("{pair:?}"),
                        "key=value pairs separated by commas",
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(OtelConfig {
        endpoint,
        headers,
        certificate: env
            .optional("OTEL_EXPORTER_OTLP_CERTIFICATE")
            .map(|p| std::path::PathBuf::from(p.trim())),
        protocol,
        service_name: env.value("OTEL_SERVICE_NAME").trim().to_owned(),
        resource_attributes,
        disabled: env.boolean("OTEL_SDK_DISABLED")?,
        metric_interval: Duration::from_millis(env.bounded(
            "OTEL_METRIC_EXPORT_INTERVAL",
            100,
            3_600_000,
        )? as u64),
        sampler: trace_sampler(env)?,
    })
}

fn trace_sampler(env: &Env<'_>) -> Result<TraceSampler, ConfigError> {
    const NAMES: &str = "always_on, always_off, traceidratio, parentbased_always_on, \
                         parentbased_always_off or parentbased_traceidratio";
    let raw = env.value("OTEL_TRACES_SAMPLER");
    let name = raw.trim();
    let (parent_based, rule) = match name.strip_prefix("parentbased_") {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    let ratio = match rule {
        "always_on" => 1.0,
        "always_off" => 0.0,
        "traceidratio" => {
            let arg = env.value("OTEL_TRACES_SAMPLER_ARG");
            match arg.trim().parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => r,
                _ => {
                    return Err(invalid(
                        "OTEL_TRACES_SAMPLER_ARG",
                        format!("{arg:?}"),
                        "a fraction from 0 to 1, e.g. 0.1",
                    ));
                }
            }
        }
        _ => {
            return Err(invalid("OTEL_TRACES_SAMPLER", format!("{name:?}"), NAMES));
        }
    };
    Ok(TraceSampler {
        parent_based,
        ratio,
        forced_per_second: env.bounded("TRACES_FORCED_PER_SECOND", 0, 1_000_000)? as u32,
    })
}
