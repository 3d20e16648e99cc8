//! Counts telemetry that never reached the collector, so its loss shows up as a number.
//!
//! The SDK's batch processors hand a batch to the exporter and forget it: a failed export (the
//! collector down, unreachable, or too slow) silently loses those spans or log records. Wrapping the
//! exporter is the only place that sees the outcome. Records dropped because the queue was full
//! are counted by the SDK itself (`otel.sdk.processor.*.processed` with `error.type=queue_full`).

use std::{fmt, sync::OnceLock, time::Duration};

use opentelemetry::{KeyValue, metrics::Counter};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    logs::{LogBatch, LogExporter},
    trace::{SpanData, SpanExporter},
};

/// `todo.otel.export.lost`: spans or log records whose export failed.
fn lost() -> &'static Counter<u64> {
    static LOST: OnceLock<Counter<u64>> = OnceLock::new();
    LOST.get_or_init(|| {
        opentelemetry::global::meter("todo-service")
            .u64_counter("todo.otel.export.lost")
            .with_description(
                "Spans or log records (signal) lost because their export to the collector failed",
            )
            .build()
    })
}

/// An exporter whose failed batches are counted under `signal`.
pub(super) struct Counted<E> {
    inner: E,
    signal: &'static str,
}

impl<E> Counted<E> {
    pub(super) fn new(inner: E, signal: &'static str) -> Self {
        Self { inner, signal }
    }

    fn count(&self, result: &OTelSdkResult, items: usize) {
        if result.is_err() {
            lost().add(items as u64, &[KeyValue::new("signal", self.signal)]);
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for Counted<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counted")
            .field("signal", &self.signal)
            .field("inner", &self.inner)
            .finish()
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let items = batch.len();
        let result = self.inner.export(batch).await;
        self.count(&result, items);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: LogExporter> LogExporter for Counted<E> {
    async fn export(&self, batch: LogBatch<'_>) -> OTelSdkResult {
        let items = batch.iter().count();
        let result = self.inner.export(batch).await;
        self.count(&result, items);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn event_enabled(
        &self,
        level: opentelemetry::logs::Severity,
        target: &str,
        name: Option<&str>,
    ) -> bool {
        self.inner.event_enabled(level, target, name)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
