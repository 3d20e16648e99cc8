//! Logging, trace, metric and log export, built once at startup.
//!
//! Logs go to stdout through `tracing`, filtered by `LOG_LEVEL`, as text for people or JSON for
//! containers (`LOG_FORMAT`); libraries that log through the `log` crate (sqlx) are bridged in.
//! Every line written while serving a request carries its request id, method and route, and
//! inside a traced request its `trace_id` and `span_id` (see `log_format`).
//!
//! When `OTEL_EXPORTER_OTLP_ENDPOINT` is set and `OTEL_SDK_DISABLED` is not, three signals go to an
//! OTLP collector (SigNoz): the service's own spans (one per traced request, one per database call
//! in it), built with the SDK directly (see `spans`), encoded directly too (see `otlp_spans`) and
//! sent with OTLP's retries (see `otlp_send`); the metrics of `metrics`; and the same log events
//! as stdout, through `opentelemetry-appender-tracing`, stamped with the active trace so SigNoz
//! shows them beside it.
//! Export never blocks a request: spans and log records are queued in bounded buffers and sent by
//! the SDK's batch processors on their own threads; if the collector is down the queues fill and
//! further records are dropped — counted (see `counted`) — and the service keeps serving. The
//! collector's host is resolved once at startup, like the database's (see `collector`): each
//! exporter keeps one long-lived channel to that address.
//!
//! `LOG_LEVEL` governs the logs only, so quieting them cannot silence the traces. The exporters'
//! own HTTP/gRPC internals are never exported as log records, so that exporting cannot feed on
//! itself.

mod collector;
mod counted;
pub mod log_format;
mod otlp_send;
mod otlp_spans;
pub mod sampling;
pub mod spans;

use std::{io::IsTerminal, time::Duration};

use anyhow::Context as _;
use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    logs::{BatchLogProcessor, SdkLoggerProvider},
    metrics::{PeriodicReader, SdkMeterProvider},
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider},
};
use tracing_subscriber::{
    EnvFilter, Layer, Registry, filter::FilterExt as _, layer::SubscriberExt,
    util::SubscriberInitExt,
};

use crate::config::{Config, LogFormat, OtelConfig, OtlpProtocol, TraceSampler};
use collector::Collector;
use counted::Counted;
use log_format::RequestContext;

/// Spans waiting for export; beyond this they are dropped rather than held in memory.
const MAX_QUEUED_SPANS: usize = 4096;
/// Log records waiting for export, likewise.
const MAX_QUEUED_LOGS: usize = 4096;
/// One export, retries included; a dead collector costs at most this per batch, on the exporter's
/// thread.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);
/// Crates that carry the export itself: their events are never exported, or a failing export
/// would log about itself over the same failing path.
const EXPORT_INTERNALS: &[&str] = &[
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
    "tonic",
    "h2",
    "hyper",
    "hyper_util",
    "tower",
    "reqwest",
];

/// Owns the export pipelines; [`Telemetry::shutdown`] flushes them.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    meters: Option<SdkMeterProvider>,
    logs: Option<SdkLoggerProvider>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends what is still queued and stops the exporters. Call after the server has drained,
    /// inside the runtime (the gRPC exporters run on it). Logs first, so the shutdown's own log
    /// lines and the last spans' logs go out; metrics last, so they include the final counts.
    pub async fn shutdown(self) {
        if let Some(logs) = self.logs {
            let r = tokio::task::spawn_blocking(move || logs.shutdown()).await;
            if let Ok(Err(e)) = r {
                eprintln!("warning: log exporter shutdown: {e}");
            }
        }
        if let Some(provider) = self.provider {
            let r = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = r {
                eprintln!("warning: trace exporter shutdown: {e}");
            }
        }
        if let Some(meters) = self.meters {
            let r = tokio::task::spawn_blocking(move || meters.shutdown()).await;
            if let Ok(Err(e)) = r {
                eprintln!("warning: metric exporter shutdown: {e}");
            }
        }
    }
}

/// Installs the global subscriber and, when configured, the OTLP exporters. Must run inside the
/// Tokio runtime.
///
/// `request` names the request a log line is written for; telemetry does not know what a request
/// is (the HTTP layer passes its own, `http::log_context`).
pub async fn init(config: &Config, request: RequestContext) -> anyhow::Result<Telemetry> {
    // The http/protobuf exporter's client panics without it.
    crate::net::install_tls_provider();
    let (provider, meters, logs) = match (&config.otel.endpoint, config.otel.disabled) {
        (Some(endpoint), false) => {
            let collector =
                Collector::resolve_once(&config.otel, endpoint.url(), EXPORT_TIMEOUT).await?;
            let resource = resource(&config.otel);
            // First, so the SDK's processors built next find it for their own drop counters.
            let meters = meter_provider(&config.otel, &collector, resource.clone())?;
            opentelemetry::global::set_meter_provider(meters.clone());
            (
                Some(tracer_provider(&config.otel, &collector, resource.clone())?),
                Some(meters),
                Some(logger_provider(
                    &config.otel,
                    &collector,
                    resource,
                    request,
                )?),
            )
        }
        _ => (None, None, None),
    };
    tracing_subscriber::registry()
        .with(layers(config, request, logs.as_ref())?)
        .try_init()?;
    if let (Some(endpoint), Some(_)) = (&config.otel.endpoint, &provider) {
        tracing::info!(%endpoint, protocol = ?config.otel.protocol, service = %config.otel.service_name, "exporting traces, metrics and logs over OTLP");
    }
    Ok(Telemetry {
        provider,
        meters,
        logs,
    })
}

/// The subscriber's layers: stdout, and log export when its provider exists. Every layer carries
/// its own filter, and only the layers that exist are listed: an absent `Option` layer answers
/// "always interested" for every callsite (its price: loadtest/archive.md#logs-at-info).
fn layers(
    config: &Config,
    request: RequestContext,
    logs: Option<&SdkLoggerProvider>,
) -> anyhow::Result<Vec<Box<dyn Layer<Registry> + Send + Sync>>> {
    // Exported log records follow LOG_LEVEL like stdout, minus the exporters' internals.
    let log_export_layer = match logs {
        Some(logs) => {
            let mut filter = EnvFilter::try_new(&config.log_level)?;
            for target in EXPORT_INTERNALS {
                filter = filter.add_directive(format!("{target}=off").parse()?);
            }
            Some(
                OpenTelemetryTracingBridge::new(logs)
                    .with_filter(log_format::EventsOnly.and(filter)),
            )
        }
        None => None,
    };
    // Events follow LOG_LEVEL (validated in config, so this cannot fail); spans are not the log
    // layer's business (see log_format).
    let filter = log_format::EventsOnly.and(EnvFilter::try_new(&config.log_level)?);
    let fmt_layer = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stdout().is_terminal())
            .event_format(log_format::Text::new(request))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .event_format(log_format::JsonLine(
                tracing_subscriber::fmt::format()
                    .json()
                    .with_current_span(false)
                    .with_span_list(false),
                request,
            ))
            .with_filter(filter)
            .boxed(),
    };
    let mut layers = vec![fmt_layer];
    layers.extend(log_export_layer.map(Layer::boxed));
    Ok(layers)
}

/// The same resource on every signal, so SigNoz joins them by service.
fn resource(otel: &OtelConfig) -> Resource {
    let mut attributes = vec![
        KeyValue::new("service.version", crate::release::RELEASE),
        KeyValue::new("deployment.environment", "development"),
    ];
    for (k, v) in &otel.resource_attributes {
        attributes.push(KeyValue::new(k.clone(), v.clone()));
    }
    Resource::builder_empty()
        .with_attributes(attributes)
        .with_service_name(otel.service_name.clone())
        .build()
}

/// Builds an OTLP exporter for the configured protocol. The metric and log exporter builders
/// share no trait in opentelemetry-otlp, so a macro is what keeps the two identical (spans have
/// their own exporter, `otlp_spans`).
macro_rules! exporter {
    ($builder:expr, $otel:expr, $collector:expr, $path:literal) => {{
        let base = $collector.url.as_str().trim_end_matches('/');
        match (&$otel.protocol, &$collector.http_client) {
            (OtlpProtocol::HttpProtobuf, Some(client)) => $builder
                .with_http()
                .with_http_client(client.clone())
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(format!("{base}{}", $path))
                .with_timeout(EXPORT_TIMEOUT)
                .build()?,
            _ => {
                let builder = $builder
                    .with_tonic()
                    .with_endpoint(base)
                    .with_timeout(EXPORT_TIMEOUT);
                match &$collector.grpc_tls {
                    Some(tls) => builder.with_tls_config(tls.clone()).build()?,
                    None => builder.build()?,
                }
            }
        }
    }};
}

/// Metrics are pushed every `OTEL_METRIC_EXPORT_INTERVAL` ms (validated in config) by the SDK's
/// own reader thread, and once more at shutdown.
fn meter_provider(
    otel: &OtelConfig,
    collector: &Collector,
    resource: Resource,
) -> anyhow::Result<SdkMeterProvider> {
    let exporter = exporter!(
        opentelemetry_otlp::MetricExporter::builder(),
        otel,
        collector,
        "/v1/metrics"
    );
    Ok(SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(
            PeriodicReader::builder(exporter)
                .with_interval(otel.metric_interval)
                .build(),
        )
        .build())
}

fn tracer_provider(
    otel: &OtelConfig,
    collector: &Collector,
    resource: Resource,
) -> anyhow::Result<SdkTracerProvider> {
    // Spans are encoded straight from the SDK's data (see `otlp_spans`) and sent by `otlp_send`.
    let base = collector.url.as_str().trim_end_matches('/');
    let sender = match (&otel.protocol, &collector.http_client) {
        (OtlpProtocol::HttpProtobuf, Some(client)) => otlp_send::Sender::http(
            client.clone(),
            format!("{base}/v1/traces"),
            otel.headers.clone(),
            EXPORT_TIMEOUT,
        ),
        _ => {
            let endpoint = tonic::transport::Endpoint::from_shared(base.to_owned())
                .context("OTEL_EXPORTER_OTLP_ENDPOINT is not a gRPC endpoint")?
                .timeout(EXPORT_TIMEOUT);
            let endpoint = match &collector.grpc_tls {
                Some(tls) => endpoint
                    .tls_config(tls.clone())
                    .context("TLS to the OTLP collector")?,
                None => endpoint,
            };
            otlp_send::Sender::grpc(endpoint.connect_lazy(), &otel.headers, EXPORT_TIMEOUT)
        }
    };
    let processor = BatchSpanProcessor::builder(Counted::new(
        otlp_spans::SpanExporterDirect::new(sender),
        "traces",
    ))
    .with_batch_config(
        BatchConfigBuilder::default()
            .with_max_queue_size(MAX_QUEUED_SPANS)
            .build(),
    )
    .build();
    // The configured sampler decides per request before any span exists (see `sampling`); what
    // reaches the SDK was chosen already.
    sampling::install(
        sampler(otel.sampler),
        forced_bound(otel.sampler),
        otel.sampler.forced_per_second,
    );
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(Sampler::AlwaysOn)
        .with_span_processor(processor)
        .build();
    spans::install(provider.tracer("todo-service"));
    Ok(provider)
}

/// The rule for new traces: the ratio.
fn root_sampler(ratio: f64) -> Sampler {
    if ratio >= 1.0 {
        Sampler::AlwaysOn
    } else if ratio <= 0.0 {
        Sampler::AlwaysOff
    } else {
        Sampler::TraceIdRatioBased(ratio)
    }
}

fn sampler(config: TraceSampler) -> Sampler {
    let root = root_sampler(config.ratio);
    if config.parent_based {
        Sampler::ParentBased(Box::new(root))
    } else {
        root
    }
}

/// The rule a caller's sampled flag can overrule, when there is one: a parentbased_* sampler that
/// keeps less than every trace. Traces kept only because the caller asked are then bounded.
fn forced_bound(config: TraceSampler) -> Option<Sampler> {
    (config.parent_based && config.ratio < 1.0).then(|| root_sampler(config.ratio))
}

fn logger_provider(
    otel: &OtelConfig,
    collector: &Collector,
    resource: Resource,
    request: RequestContext,
) -> anyhow::Result<SdkLoggerProvider> {
    let exporter = exporter!(
        opentelemetry_otlp::LogExporter::builder(),
        otel,
        collector,
        "/v1/logs"
    );
    let processor = BatchLogProcessor::builder(Counted::new(exporter, "logs"))
        .with_batch_config(
            opentelemetry_sdk::logs::BatchConfigBuilder::default()
                .with_max_queue_size(MAX_QUEUED_LOGS)
                .build(),
        )
        .build();
    Ok(SdkLoggerProvider::builder()
        .with_resource(resource)
        // First: processors run in order, and the batch one queues what it is given.
        .with_log_processor(log_format::RequestAttributes(request))
        .with_log_processor(processor)
        .build())
}
