//! An OTLP/gRPC receiver for the load test's telemetry scenario: it accepts traces, metrics and
//! logs as SigNoz's collector would on 4317, decodes them, counts what arrived and drops it. The
//! service exports over gRPC by default, so this is how the default path is measured; the Python
//! sink in `loadtest/run.py` takes http/protobuf. One thread, so what it costs the shared machine is
//! bounded and shows in its own CPU figure.
//!
//! `cargo build --release --example otlp_sink`, then `target/release/examples/otlp_sink
//! 127.0.0.1:4317`: it prints `listening` once bound, and on SIGTERM or SIGINT one JSON line with
//! the requests, items (spans, metric data points' metrics, log records) and encoded bytes per
//! signal, then exits.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use opentelemetry_proto::tonic::collector::{
    logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse,
        logs_service_server::{LogsService, LogsServiceServer},
    },
    metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
    trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
};
use prost::Message as _;
use tokio::signal::unix::{SignalKind, signal};

/// What one signal's exports brought.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    items: AtomicU64,
    bytes: AtomicU64,
}

impl Counts {
    fn add(&self, items: usize, bytes: usize) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.items.fetch_add(items as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn json(&self) -> String {
        format!(
            r#"{{"requests": {}, "items": {}, "bytes": {}}}"#,
            self.requests.load(Ordering::Relaxed),
            self.items.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed)
        )
    }
}

#[derive(Clone, Default)]
struct Sink {
    traces: Arc<Counts>,
    metrics: Arc<Counts>,
    logs: Arc<Counts>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let req = req.into_inner();
        let spans = req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.traces.add(spans, req.encoded_len());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let req = req.into_inner();
        let metrics = req
            .resource_metrics
            .iter()
            .flat_map(|r| &r.scope_metrics)
            .map(|s| s.metrics.len())
            .sum();
        self.metrics.add(metrics, req.encoded_len());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let req = req.into_inner();
        let records = req
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .map(|s| s.log_records.len())
            .sum();
        self.logs.add(records, req.encoded_len());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .ok_or("usage: otlp_sink HOST:PORT")?
        .parse::<std::net::SocketAddr>()?;
    if !addr.ip().is_loopback() {
        return Err("the sink listens on a loopback address only".into());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let sink = Sink::default();
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("listening");
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .add_service(MetricsServiceServer::new(sink.clone()))
            .add_service(LogsServiceServer::new(sink.clone()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                },
            )
            .await?;
        println!(
            r#"{{"traces": {}, "metrics": {}, "logs": {}}}"#,
            sink.traces.json(),
            sink.metrics.json(),
            sink.logs.json()
        );
        Ok(())
    })
}
