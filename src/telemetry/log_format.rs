//! Puts the current trace and span ids on every log line written inside a traced request.
//!
//! tracing-subscriber's formatters only show the fields of spans the log layer itself sees, and
//! `LOG_LEVEL=warn` hides the request span from it, so an error logged inside a request would lose
//! what joins it to its trace. The ids come instead from the OpenTelemetry context, which
//! `tracing-opentelemetry` activates on the thread whenever one of our spans is entered, whatever
//! the log level. No maintained formatter does this from the active context (json-subscriber reads
//! the span the layer can see, the same limit), hence this small wrapper around the stock ones.

use std::fmt;

use opentelemetry::trace::TraceContextExt as _;
use tracing::{Event, Subscriber};
use tracing_subscriber::{
    fmt::{
        FmtContext, FormatEvent, FormatFields,
        format::{self, Format, Full, Json, Writer},
    },
    registry::LookupSpan,
};

/// The active trace and span ids as hex, when a sampled-or-not valid span is current.
pub fn current_ids() -> Option<(String, String)> {
    let cx = opentelemetry::Context::current();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// Text lines: ` trace_id=… span_id=…` appended to the line.
pub struct Text {
    plain: Format<Full>,
    coloured: Format<Full>,
}

impl Default for Text {
    fn default() -> Self {
        Self {
            plain: format::format().with_ansi(false),
            coloured: format::format().with_ansi(true),
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
        let Some((trace_id, span_id)) = current_ids() else {
            return inner.format_event(ctx, writer, event);
        };
        // Formatted into a buffer first: the ids go at the end of the line, after the message,
        // where they do not push the level and message out of a reader's view.
        let mut line = String::with_capacity(256);
        inner.format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.strip_suffix('\n').unwrap_or(&line);
        writeln!(writer, "{body} trace_id={trace_id} span_id={span_id}")
    }
}

/// JSON lines: top-level `trace_id` and `span_id` keys, where log pipelines (and SigNoz's log
/// parser) look for them.
pub struct JsonLine(pub Format<Json>);

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
        let Some((trace_id, span_id)) = current_ids() else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            // Hex ids need no escaping.
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            ),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::{EnvFilter, Layer as _, layer::SubscriberExt as _};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Logs at `warn` (which hides the info-level span from the log layer) inside a traced span,
    /// and outside any span, in both formats.
    fn lines(json: bool) -> (Vec<String>, String, String) {
        let provider = SdkTracerProvider::builder().build();
        let out = Buffer::default();
        let writer = out.clone();
        let fmt = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone());
        let fmt = if json {
            fmt.json()
                .event_format(JsonLine(format::format().json()))
                .with_filter(EnvFilter::new("warn"))
                .boxed()
        } else {
            fmt.event_format(Text::default())
                .with_filter(EnvFilter::new("warn"))
                .boxed()
        };
        let subscriber = tracing_subscriber::registry()
            .with(fmt)
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let ids = tracing::subscriber::with_default(subscriber, || {
            tracing::warn!("outside");
            let span = tracing::info_span!("request");
            let _entered = span.enter();
            tracing::warn!(answer = 42, "inside");
            current_ids().expect("the span's context is active")
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        (text.lines().map(str::to_owned).collect(), ids.0, ids.1)
    }

    #[test]
    fn json_lines_inside_a_span_carry_its_ids_at_top_level() {
        let (lines, trace_id, span_id) = lines(true);
        assert_eq!(lines.len(), 2, "{lines:?}");
        let outside: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert!(outside.get("trace_id").is_none(), "{outside}");
        let inside: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(inside["trace_id"], trace_id.as_str());
        assert_eq!(inside["span_id"], span_id.as_str());
        assert_eq!(inside["fields"]["answer"], 42);
        assert_eq!(inside["level"], "WARN");
    }

    #[test]
    fn text_lines_inside_a_span_end_with_its_ids() {
        let (lines, trace_id, span_id) = lines(false);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(!lines[0].contains("trace_id"), "{}", lines[0]);
        assert!(
            lines[1].ends_with(&format!(
                "inside answer=42 trace_id={trace_id} span_id={span_id}"
            )),
            "{}",
            lines[1]
        );
    }
}
