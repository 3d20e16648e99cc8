//! The two spans every traced request pays for, its server span and one per database call,
//! built with the OpenTelemetry SDK directly and carried in the OpenTelemetry [`Context`].
//!
//! They used to be `tracing` spans exported through `tracing-opentelemetry`. That bridge gives
//! each span a registry slot, converts every field through a visitor into an attribute, asks each
//! layer's filter on every poll's enter and exit, and activates the OTel context on each enter:
//! tracing cost a large share of the single-todo GET's throughput
//! (loadtest/archive.md#tracing-sdk-spans). Here a span is one SDK span with its
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
    trace::{SpanBuilder, SpanKind, TraceContextExt as _, TraceId, Tracer as _},
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

/// A span's name from two parts, `"{first} {second}"` (`GET /todos/{id}`, `SELECT todos`),
/// allocated once at its size rather than through `format!`'s machinery.
pub fn name(first: &str, second: &str) -> Cow<'static, str> {
    let mut name = String::with_capacity(first.len() + 1 + second.len());
    name.push_str(first);
    name.push(' ');
    name.push_str(second);
    name.into()
}

/// A trace id as W3C writes it, 32 lower-case hex digits (for `x-trace-id`); `TraceId`'s
/// `Display` goes through `format!`'s padding machinery.
pub fn trace_id_hex(id: TraceId) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(32);
    for byte in id.to_bytes() {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    hex
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_trace_ids_read_as_display_writes_them() {
        assert_eq!(name("GET", "/todos/{id}"), "GET /todos/{id}");
        assert_eq!(name("SELECT", "todos"), format!("{} {}", "SELECT", "todos"));
        for id in [
            TraceId::INVALID,
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            TraceId::from_bytes([0xff; 16]),
            TraceId::from_bytes([0x0a; 16]),
        ] {
            assert_eq!(trace_id_hex(id), id.to_string());
        }
    }
}
