//! What every log line says about where it was written: the request being served (its id,
//! method and route) and, inside a traced request, the trace and span ids.
//!
//! tracing-subscriber's formatters show the fields of the spans the log layer itself sees. Letting
//! it see the request and database spans costs every request a live span (registry slot, enter
//! and exit on every poll, every field formatted into a string when the span opens) even when no
//! line is ever written in it, a large share of a single-todo GET's cost (loadtest/archive.md#logs-at-info). So the log layers see events only ([`EventsOnly`]) and the
//! request's identity comes from a [`RequestContext`] the formatters are built with: the HTTP
//! layer, which knows what a request is, keeps it in a task-local set once per request, read only
//! when a line is actually written. It is there whatever `LOG_LEVEL` hides, which a span-based
//! prefix never was (at `warn` it vanished with the span). The ids come from the OpenTelemetry
//! context, which the HTTP layer attaches to the thread while a traced request is served (see
//! `spans`). No maintained formatter does either (json-subscriber reads the spans its
//! layer can see, the same limit), hence this small wrapper around the stock ones.

use std::{fmt, time::Duration};

use opentelemetry::{InstrumentationScope, logs::LogRecord as _, trace::TraceContextExt as _};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    logs::{LogProcessor, SdkLogRecord},
};
use tracing::{Event, Metadata, Subscriber, level_filters::LevelFilter, subscriber::Interest};
use tracing_subscriber::{
    fmt::{
        FmtContext, FormatEvent, FormatFields,
        format::{self, Format, Full, Json, Writer},
    },
    layer,
    registry::LookupSpan,
};

/// Adds the keys of the request a line is written for (`request_id`, `http.request.method`,
/// `http.route`), when one is being served. Supplied by the HTTP layer (`http::log_context`), so
/// that telemetry knows nothing of HTTP; [`no_request`] where there is none.
pub type RequestContext = fn(&mut Vec<(&'static str, String)>);

/// A [`RequestContext`] that adds nothing.
pub fn no_request(_: &mut Vec<(&'static str, String)>) {}

/// A per-layer filter that passes events and no span: the log layers get their context from
/// a [`RequestContext`] and the OpenTelemetry context instead (see the module doc). Decided per
/// callsite, so a span nothing else listens to is never created at all.
pub struct EventsOnly;

impl<S> layer::Filter<S> for EventsOnly {
    fn enabled(&self, meta: &Metadata<'_>, _: &layer::Context<'_, S>) -> bool {
        // Not `is_event`: `tracing::enabled!` asks with a hint, which must follow the level.
        !meta.is_span()
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if meta.is_span() {
            Interest::never()
        } else {
            // `sometimes`, not `always`: per-layer filters hand their decision to their layer
            // through thread-local state that only a fresh `enabled` call rewrites, and an
            // `always` callsite skips that call, reading whatever the previous query left. sqlx
            // asks the `log` crate whether a level is on after every query; when all layers said
            // no, the next always-on line (an error in a request!) was silently dropped
            // (tokio-rs/tracing#2519, still open). One filter pass per written line is the price.
            Interest::sometimes()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        // "No hint" would lift the level the combined filter reports to TRACE (`And` keeps the
        // lower of two hints, and `None` is lowest), so every disabled debug event in every
        // library would be asked about at run time.
        Some(LevelFilter::TRACE)
    }
}

/// The active trace and span ids as hex, when a sampled-or-not valid span is current.
pub fn current_ids() -> Option<(String, String)> {
    let cx = opentelemetry::Context::current();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// The keys added to a line, in order; empty outside requests and traces.
fn context(request: RequestContext) -> Vec<(&'static str, String)> {
    let mut keys = Vec::new();
    request(&mut keys);
    if let Some((trace_id, span_id)) = current_ids() {
        keys.push(("trace_id", trace_id));
        keys.push(("span_id", span_id));
    }
    keys
}

/// Stamps log records exported over OTLP with the request they were written for, as stdout lines
/// are: the bridge exports an event's own fields only, and a request that is not sampled has no
/// trace id, so without this its exported error would join to nothing. Runs first in the
/// provider's chain, on the thread that logs (inside the request's task), before the batch
/// processor queues the record.
#[derive(Debug)]
pub struct RequestAttributes(pub RequestContext);

impl LogProcessor for RequestAttributes {
    fn emit(&self, record: &mut SdkLogRecord, _: &InstrumentationScope) {
        let mut keys = Vec::new();
        (self.0)(&mut keys);
        for (key, value) in keys {
            record.add_attribute(key, value);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Text lines: ` request_id=… http.request.method=… http.route=… trace_id=… span_id=…` appended.
pub struct Text {
    plain: Format<Full>,
    coloured: Format<Full>,
    request: RequestContext,
}

impl Text {
    pub fn new(request: RequestContext) -> Self {
        Self {
            plain: format::format().with_ansi(false),
            coloured: format::format().with_ansi(true),
            request,
        }
    }
}

impl<S, N> FormatEvent<S, N> for Text
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let inner = if writer.has_ansi_escapes() {
            &self.coloured
        } else {
            &self.plain
        };
        let keys = context(self.request);
        if keys.is_empty() {
            return inner.format_event(ctx, writer, event);
        }
        // Formatted into a buffer first: the context goes at the end of the line, after the
        // message, where it does not push the level and message out of a reader's view.
        let mut line = String::with_capacity(256);
        inner.format_event(ctx, Writer::new(&mut line), event)?;
        writer.write_str(line.strip_suffix('\n').unwrap_or(&line))?;
        for (key, value) in keys {
            // A client's request id may hold spaces or quotes: quoted then, so the line still
            // splits into key=value pairs.
            if value.bytes().all(|b| b.is_ascii_graphic() && b != b'"') {
                write!(writer, " {key}={value}")?;
            } else {
                write!(writer, " {key}={value:?}")?;
            }
        }
        writeln!(writer)
    }
}

/// JSON lines: the same keys at top level, where log pipelines (and SigNoz's log parser) look for
/// `trace_id` and `span_id`.
pub struct JsonLine(pub Format<Json>, pub RequestContext);

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let keys = context(self.1);
        if keys.is_empty() {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let Some(rest) = line.strip_prefix('{') else {
            return writer.write_str(&line);
        };
        writer.write_char('{')?;
        for (key, value) in keys {
            let value = serde_json::to_string(&value).map_err(|_| fmt::Error)?;
            write!(writer, "\"{key}\":{value},")?;
        }
        writer.write_str(rest)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::{
        EnvFilter, Layer as _, filter::FilterExt as _, layer::SubscriberExt as _,
    };

    use super::*;

    /// Callsite interest is shared by every live subscriber in the process: one test's subscriber
    /// wanting a span would make it "sometimes" for another's, so these tests take turns.
    static ONE_SUBSCRIBER_AT_A_TIME: Mutex<()> = Mutex::new(());

    pub(crate) fn take_turn() -> std::sync::MutexGuard<'static, ()> {
        ONE_SUBSCRIBER_AT_A_TIME
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Collects what a test's subscriber writes.
    #[derive(Clone, Default)]
    pub(crate) struct Buffer(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    thread_local! {
        static IN_REQUEST: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// What the HTTP layer's context adds while a request is served, here as a fixed request.
    fn fake_request(keys: &mut Vec<(&'static str, String)>) {
        if IN_REQUEST.get() {
            keys.push(("request_id", "my \"id\"".to_owned()));
            keys.push(("http.request.method", "PATCH".to_owned()));
        }
    }

    /// Logs at `warn` outside any span, then inside a traced span while serving a request, in
    /// both formats, through the filter the service uses (events only, then the level).
    fn lines(json: bool) -> (Vec<String>, String, String) {
        let _turn = take_turn();
        let provider = SdkTracerProvider::builder().build();
        let out = Buffer::default();
        let writer = out.clone();
        let fmt = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone());
        let filter = EventsOnly.and(EnvFilter::new("info"));
        let fmt = if json {
            fmt.json()
                .event_format(JsonLine(format::format().json(), fake_request))
                .with_filter(filter)
                .boxed()
        } else {
            fmt.event_format(Text::new(fake_request))
                .with_filter(filter)
                .boxed()
        };
        let subscriber = tracing_subscriber::registry().with(fmt);
        let ids = tracing::subscriber::with_default(subscriber, || {
            tracing::warn!("outside");
            // A tracing span the log layer could show, and a traced request's context.
            let span = tracing::info_span!("request", url.path = "/secret");
            let _entered = span.enter();
            let _attached = opentelemetry::Context::new()
                .with_span(provider.tracer("test").start("request"))
                .attach();
            IN_REQUEST.set(true);
            tracing::warn!(answer = 42, "inside");
            IN_REQUEST.set(false);
            current_ids().expect("the span's context is active")
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        (text.lines().map(str::to_owned).collect(), ids.0, ids.1)
    }

    #[test]
    fn json_lines_in_a_request_carry_its_identity_and_ids_at_top_level() {
        let (lines, trace_id, span_id) = lines(true);
        assert_eq!(lines.len(), 2, "{lines:?}");
        let outside: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert!(outside.get("trace_id").is_none(), "{outside}");
        assert!(outside.get("request_id").is_none(), "{outside}");
        let inside: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(inside["trace_id"], trace_id.as_str());
        assert_eq!(inside["span_id"], span_id.as_str());
        assert_eq!(inside["request_id"], "my \"id\"");
        assert_eq!(inside["http.request.method"], "PATCH");
        assert!(inside.get("http.route").is_none(), "{inside}");
        assert_eq!(inside["fields"]["answer"], 42);
        assert_eq!(inside["level"], "WARN");
        assert!(
            inside.get("span").is_none(),
            "the log layer sees no span: {inside}"
        );
    }

    #[test]
    fn text_lines_in_a_request_end_with_its_identity_and_ids() {
        let (lines, trace_id, span_id) = lines(false);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(!lines[0].contains("trace_id"), "{}", lines[0]);
        assert!(
            lines[1].ends_with(&format!(
                "inside answer=42 request_id=\"my \\\"id\\\"\" http.request.method=PATCH \
                 trace_id={trace_id} span_id={span_id}"
            )),
            "{}",
            lines[1]
        );
        assert!(
            !lines[1].contains("/secret"),
            "the log layer sees no span: {}",
            lines[1]
        );
    }

    /// tokio-rs/tracing#2519: a `log` query (as sqlx makes after every query) that every layer
    /// declines must not swallow the next line. Two filtered layers, as in the service with
    /// export on (stdout and the OTLP log bridge).
    #[test]
    fn a_declined_log_crate_query_does_not_swallow_the_next_line() {
        let _turn = take_turn();
        let _ = tracing_log::LogTracer::init();
        let (a, b) = (Buffer::default(), Buffer::default());
        let (wa, wb) = (a.clone(), b.clone());
        let directives = "chatty_dependency=debug,info";
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || wa.clone())
                    .with_filter(EventsOnly.and(EnvFilter::new(directives))),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || wb.clone())
                    .with_filter(EventsOnly.and(EnvFilter::new(directives))),
            );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("first");
            let query = log::Metadata::builder()
                .level(log::Level::Debug)
                .target("sqlx::query")
                .build();
            // The answer is wrong too (`true`: with per-layer filters, "all declined" reads as
            // enabled); only what it leaves behind matters here.
            let _ = log::logger().enabled(&query);
            tracing::error!("second");
        });
        for out in [a, b] {
            let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
            assert!(text.contains("first") && text.contains("second"), "{text}");
        }
    }
}
