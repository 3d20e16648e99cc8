//! The two spans every traced request pays for, its server span and one per database call,
//! built with the OpenTelemetry SDK directly and carried in the OpenTelemetry [`Context`].
//!
//! They used to be `tracing` spans exported through `tracing-opentelemetry`. That bridge gives
//! each span a registry slot, converts every field through a visitor into an attribute, asks each
//! layer's filter on every poll's enter and exit, and activates the OTel context on each enter:
//! a traced request cost about a quarter of the single-todo GET's throughput
//! (loadtest/RESULTS.md, "Tracing every request"). Here a span is one SDK span with its
//! attributes handed over in one `Vec`, and the request's context is attached to the thread only
//! while the request's future is polled. `tracing` stays for the logs and the libraries'
//! instrumentation; the log lines and exported log records read the trace and span ids from the
//! same context (see `log_format` and the SDK's logger).
//!
//! Nothing here runs for a request that is not traced: no span, no context, no attribute.
//! A span ends when it is dropped, so a request or call dropped at an await still ends its span
//! (without a status, as the bridge did).

use std::{borrow::Cow, sync::OnceLock};

use opentelemetry::{
    Context, KeyValue,
    trace::{SpanBuilder, SpanKind, TraceContextExt as _, Tracer as _},
};
use opentelemetry_sdk::trace::{SdkTracer, Span};

/// Set once when span export starts.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

pub(super) fn install(tracer: SdkTracer) {
    // A second telemetry init (only tests build several) keeps the first tracer.
    let _ = TRACER.set(tracer);
}

/// A request's server span, started under `parent` (the caller's context, or an empty one), and
/// the context that carries it to the request's children and log lines. `None` while spans are
/// not exported.
pub fn start_server(
    name: Cow<'static, str>,
    attributes: Vec<KeyValue>,
    parent: &Context,
) -> Option<Context> {
    let tracer = TRACER.get()?;
    let span = tracer.build_with_context(
        SpanBuilder::from_name(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes),
        parent,
    );
    Some(parent.with_span(span))
}

/// A client span under the current context's span: only inside a traced request (work outside
/// any request, like the idempotency-key sweeper, is not traced). `attributes` is called only
/// then.
pub fn start_client(
    name: impl FnOnce() -> Cow<'static, str>,
    attributes: impl FnOnce() -> Vec<KeyValue>,
) -> Option<Span> {
    let tracer = TRACER.get()?;
    Context::map_current(|cx| {
        cx.has_active_span().then(|| {
            tracer.build_with_context(
                SpanBuilder::from_name(name())
                    .with_kind(SpanKind::Client)
                    .with_attributes(attributes()),
                cx,
            )
        })
    })
}

/// Runs `f` on the current request's server span, when the request is traced. For the layers
/// and handlers that learn something about the request on its way (who the caller is).
pub fn on_current(f: impl FnOnce(&opentelemetry::trace::SpanRef<'_>)) {
    Context::map_current(|cx| {
        if cx.has_active_span() {
            f(&cx.span());
        }
    });
}
