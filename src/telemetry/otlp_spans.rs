//! Spans to an OTLP collector, written as protobuf straight from the SDK's span data.
//!
//! opentelemetry-otlp's exporter first converts each batch into opentelemetry-proto's message
//! structs, which copies every name and attribute a second time. prost then computes each nested
//! message's length once for every level it is nested in. For a traced GET that was 30k of the 45k
//! instructions tracing added, on the exporter's thread (loadtest/archive.md#tracing-sdk-spans). No maintained crate encodes `SpanData` directly, so this module does, for the one
//! message it needs (`ExportTraceServiceRequest`). Each value is written once, and a nested
//! message's length is put in front of it as soon as it is known.
//!
//! The bytes go out through `otlp_send` (gRPC or http/protobuf, with OTLP's retries); a batch that
//! still fails is lost, and `Counted` counts it. Metrics and logs keep the stock exporters (a few
//! records a second).
//!
//! A test decodes what this writes with opentelemetry-proto and compares it with the stock
//! conversion of the same spans.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use opentelemetry::{
    Array, InstrumentationScope, KeyValue, Value,
    trace::{SpanId, SpanKind, Status},
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{SpanData, SpanExporter},
};

use super::otlp_send::Sender;

/// Exports spans, encoded here, through `otlp_send` (see the module doc).
#[derive(Debug)]
pub(super) struct SpanExporterDirect {
    sender: Sender,
    /// The `Resource` message, encoded once when the provider hands it over.
    resource: Vec<u8>,
    resource_schema: String,
    /// The last request's bytes per span, so the next buffer is allocated once at its size
    /// (batches range from one span to thousands).
    bytes_per_span: AtomicUsize,
}

impl SpanExporterDirect {
    pub(super) fn new(sender: Sender) -> Self {
        SpanExporterDirect {
            sender,
            resource: Vec::new(),
            resource_schema: String::new(),
            bytes_per_span: AtomicUsize::new(0),
        }
    }
}

impl SpanExporter for SpanExporterDirect {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        // A few percent over the last batch's average, so that a batch like it never grows.
        let per_span = self.bytes_per_span.load(Ordering::Relaxed);
        let mut body =
            Vec::with_capacity(self.resource.len() + 64 + batch.len() * (per_span + per_span / 16));
        encode_request(&mut body, &self.resource, &self.resource_schema, &batch);
        if let Some(per_span) = body.len().checked_div(batch.len()) {
            self.bytes_per_span.store(per_span, Ordering::Relaxed);
        }
        self.sender.send(body.into()).await
    }

    fn set_resource(&mut self, resource: &Resource) {
        (self.resource, self.resource_schema) = encode_resource(resource);
    }
}

/// The `Resource` message's fields, and the resource's schema URL.
fn encode_resource(resource: &Resource) -> (Vec<u8>, String) {
    let mut fields = Vec::new();
    for (key, value) in resource.iter() {
        message(&mut fields, 1, |b| key_value(b, key.as_str(), value));
    }
    (fields, resource.schema_url().unwrap_or_default().to_owned())
}

// Wire types and field numbers from opentelemetry-proto's `trace.proto` and `common.proto`.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;
/// `SpanFlags`: the span says whether its parent is remote, and whether it is.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// Appends `ExportTraceServiceRequest { resource_spans: [ one for the resource, its spans grouped
/// by instrumentation scope in order of first appearance ] }` to `buf`.
pub(super) fn encode_request(
    buf: &mut Vec<u8>,
    resource: &[u8],
    resource_schema: &str,
    spans: &[SpanData],
) {
    let mut scopes: Vec<(&InstrumentationScope, Vec<&SpanData>)> = Vec::new();
    for span in spans {
        match scopes
            .iter_mut()
            .find(|(scope, _)| **scope == span.instrumentation_scope)
        {
            Some((_, spans)) => spans.push(span),
            None => scopes.push((&span.instrumentation_scope, vec![span])),
        }
    }
    message(buf, 1, |b| {
        message(b, 1, |b| b.extend_from_slice(resource));
        for (scope, spans) in &scopes {
            message(b, 2, |b| {
                message(b, 1, |b| instrumentation_scope(b, scope));
                for span in spans {
                    message(b, 2, |b| encode_span(b, span));
                }
                bytes(b, 3, scope.schema_url().unwrap_or_default().as_bytes());
            });
        }
        bytes(b, 3, resource_schema.as_bytes());
    });
}

fn instrumentation_scope(buf: &mut Vec<u8>, scope: &InstrumentationScope) {
    bytes(buf, 1, scope.name().as_bytes());
    bytes(buf, 2, scope.version().unwrap_or_default().as_bytes());
    for kv in scope.attributes() {
        message(buf, 3, |b| key_value(b, kv.key.as_str(), &kv.value));
    }
}

fn encode_span(buf: &mut Vec<u8>, span: &SpanData) {
    let context = &span.span_context;
    bytes(buf, 1, &context.trace_id().to_bytes());
    bytes(buf, 2, &context.span_id().to_bytes());
    bytes(buf, 3, context.trace_state().header().as_bytes());
    if span.parent_span_id != SpanId::INVALID {
        bytes(buf, 4, &span.parent_span_id.to_bytes());
    }
    bytes(buf, 5, span.name.as_bytes());
    uint(buf, 6, kind(&span.span_kind));
    fixed64(buf, 7, nanos(span.start_time));
    fixed64(buf, 8, nanos(span.end_time));
    attributes(buf, 9, &span.attributes);
    uint(buf, 10, u64::from(span.dropped_attributes_count));
    for event in &span.events.events {
        message(buf, 11, |b| {
            fixed64(b, 1, nanos(event.timestamp));
            bytes(b, 2, event.name.as_bytes());
            attributes(b, 3, &event.attributes);
            uint(b, 4, u64::from(event.dropped_attributes_count));
        });
    }
    uint(buf, 12, u64::from(span.events.dropped_count));
    for link in &span.links.links {
        message(buf, 13, |b| {
            let context = &link.span_context;
            bytes(b, 1, &context.trace_id().to_bytes());
            bytes(b, 2, &context.span_id().to_bytes());
            bytes(b, 3, context.trace_state().header().as_bytes());
            attributes(b, 4, &link.attributes);
            uint(b, 5, u64::from(link.dropped_attributes_count));
            fixed32(
                b,
                6,
                flags(context.is_remote(), context.trace_flags().to_u8()),
            );
        });
    }
    uint(buf, 14, u64::from(span.links.dropped_count));
    message(buf, 15, |b| match &span.status {
        Status::Unset => {}
        Status::Ok => uint(b, 3, 1),
        Status::Error { description } => {
            bytes(b, 2, description.as_bytes());
            uint(b, 3, 2);
        }
    });
    fixed32(
        buf,
        16,
        flags(span.parent_span_is_remote, context.trace_flags().to_u8()),
    );
}

fn kind(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn flags(remote: bool, trace_flags: u8) -> u32 {
    u32::from(trace_flags) | HAS_IS_REMOTE | if remote { IS_REMOTE } else { 0 }
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

fn attributes(buf: &mut Vec<u8>, field: u32, attributes: &[KeyValue]) {
    for kv in attributes {
        let key = kv.key.as_str().as_bytes();
        match &kv.value {
            Value::String(s) => text_attribute(buf, field, key, s.as_str().as_bytes()),
            Value::I64(v) => int_attribute(buf, field, key, 3, *v as u64),
            Value::Bool(v) => int_attribute(buf, field, key, 2, u64::from(*v)),
            value => message(buf, field, |b| key_value(b, kv.key.as_str(), value)),
        }
    }
}

// Nearly every attribute is a short key with a text or integer value, a dozen of them on the two
// spans of every traced request. Those are written with their lengths computed first, the buffer
// reserved once and the small writers inlined, which is most of what the encoder's time went to
// (callgrind; loadtest/archive.md#issue-20-full-run). The bytes are `key_value`'s, which writes the other kinds;
// the equivalence test covers both.

/// `KeyValue { key, value: AnyValue { string_value: value } }` as field `field`.
fn text_attribute(buf: &mut Vec<u8>, field: u32, key: &[u8], value: &[u8]) {
    let any = 1 + varint_len(value.len() as u64) + value.len();
    attribute_head(buf, field, key, any);
    tag(buf, 1, LEN);
    varint(buf, value.len() as u64);
    buf.extend_from_slice(value);
}

/// `KeyValue { key, value: AnyValue { <any_field>: value } }` as field `field`, for the varint
/// kinds (bool 2, int64 3).
fn int_attribute(buf: &mut Vec<u8>, field: u32, key: &[u8], any_field: u32, value: u64) {
    attribute_head(buf, field, key, 1 + varint_len(value));
    tag(buf, any_field, VARINT);
    varint(buf, value);
}

/// A `KeyValue` up to its `AnyValue`'s body, which is `any` bytes long and comes next; with room
/// reserved for the whole attribute.
#[inline]
fn attribute_head(buf: &mut Vec<u8>, field: u32, key: &[u8], any: usize) {
    let kv = key_len(key) + 1 + varint_len(any as u64) + any;
    buf.reserve(2 + varint_len(kv as u64) + kv);
    tag(buf, field, LEN);
    varint(buf, kv as u64);
    bytes(buf, 1, key);
    tag(buf, 2, LEN);
    varint(buf, any as u64);
}

/// The bytes of a `KeyValue`'s key field: nothing for an empty key (proto3's default, as `bytes`
/// writes it).
#[inline]
fn key_len(key: &[u8]) -> usize {
    if key.is_empty() {
        0
    } else {
        1 + varint_len(key.len() as u64) + key.len()
    }
}

#[inline]
fn varint_len(v: u64) -> usize {
    // 7 bits a byte; 0 takes one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn key_value(buf: &mut Vec<u8>, key: &str, value: &Value) {
    bytes(buf, 1, key.as_bytes());
    message(buf, 2, |b| any_value(b, value));
}

/// `AnyValue`: a oneof, so its one field is written even when it holds the default.
fn any_value(buf: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(s) => {
            tag(buf, 1, LEN);
            varint(buf, s.as_str().len() as u64);
            buf.extend_from_slice(s.as_str().as_bytes());
        }
        Value::Bool(v) => {
            tag(buf, 2, VARINT);
            varint(buf, u64::from(*v));
        }
        Value::I64(v) => {
            tag(buf, 3, VARINT);
            // int64: two's complement, as a 10-byte varint when negative.
            varint(buf, *v as u64);
        }
        Value::F64(v) => {
            tag(buf, 4, FIXED64);
            buf.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        Value::Array(array) => message(buf, 5, |b| {
            let mut element = |value: Value| message(b, 1, |b| any_value(b, &value));
            match array {
                Array::Bool(values) => values.iter().for_each(|v| element(Value::Bool(*v))),
                Array::I64(values) => values.iter().for_each(|v| element(Value::I64(*v))),
                Array::F64(values) => values.iter().for_each(|v| element(Value::F64(*v))),
                Array::String(values) => values
                    .iter()
                    .for_each(|v| element(Value::String(v.clone()))),
                // Newer kinds the SDK may add: as text rather than lost.
                other => element(Value::String(other.to_string().into())),
            }
        }),
        // Newer kinds the SDK may add: as text rather than lost.
        other => any_value(buf, &Value::String(other.to_string().into())),
    }
}

/// A nested message: `write` appends its fields, then their length is filled in ahead of them.
/// One byte is kept for it, which is enough for the attributes and values that make up most
/// messages; a longer body (a span, the batch) has the extra bytes inserted once it is written,
/// which moves it once. prost instead computes every nested length ahead, once per level.
fn message(buf: &mut Vec<u8>, field: u32, write: impl FnOnce(&mut Vec<u8>)) {
    tag(buf, field, LEN);
    let at = buf.len();
    buf.push(0);
    write(buf);
    let len = buf.len() - at - 1;
    if len < 0x80 {
        buf[at] = len as u8;
    } else {
        let (prefix, n) = varint_bytes(len as u64);
        buf[at] = prefix[0];
        buf.splice(at + 1..at + 1, prefix[1..n].iter().copied());
    }
}

#[inline]
fn tag(buf: &mut Vec<u8>, field: u32, wire: u32) {
    varint(buf, u64::from((field << 3) | wire));
}

#[inline]
fn varint(buf: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        buf.push(v as u8);
    } else {
        long_varint(buf, v);
    }
}
#[cold]
fn long_varint(buf: &mut Vec<u8>, v: u64) {
    let (bytes, n) = varint_bytes(v);
    buf.extend_from_slice(&bytes[..n]);
}

/// `v` as a protobuf varint: seven bits a byte, low first, the high bit saying more follow.
fn varint_bytes(mut v: u64) -> ([u8; 10], usize) {
    let mut bytes = [0u8; 10];
    let mut n = 0;
    while v >= 0x80 {
        bytes[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    bytes[n] = v as u8;
    (bytes, n + 1)
}

/// A `bytes` or `string` field; proto3 leaves an empty one out.
#[inline]
fn bytes(buf: &mut Vec<u8>, field: u32, value: &[u8]) {
    if value.is_empty() {
        return;
    }
    tag(buf, field, LEN);
    varint(buf, value.len() as u64);
    buf.extend_from_slice(value);
}

fn uint(buf: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        tag(buf, field, VARINT);
        varint(buf, v);
    }
}

fn fixed64(buf: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        tag(buf, field, FIXED64);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

fn fixed32(buf: &mut Vec<u8>, field: u32, v: u32) {
    if v != 0 {
        tag(buf, field, FIXED32);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use opentelemetry::trace::{Event, Link, SpanContext, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::{
        tonic::collector::trace::v1::ExportTraceServiceRequest,
        transform::{
            common::tonic::ResourceAttributesWithSchema,
            trace::tonic::group_spans_by_resource_and_scope,
        },
    };
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message as _;

    use super::*;

    fn context(trace: u128, span: u64, sampled: bool, remote: bool, state: &str) -> SpanContext {
        SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            if sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            remote,
            state.parse::<TraceState>().unwrap(),
        )
    }

    /// Spans with every field the SDK can fill: two scopes, interleaved; roots and children of
    /// local and remote parents; every kind of value, negative and empty ones too; events, links,
    /// dropped counts; each status.
    fn spans() -> Vec<SpanData> {
        let start = UNIX_EPOCH + Duration::from_nanos(1_764_000_000_123_456_789);
        let todo = InstrumentationScope::builder("todo-service").build();
        let other = InstrumentationScope::builder("other")
            .with_version("1.2.3")
            .with_schema_url("https://opentelemetry.io/schemas/1.26.0")
            .with_attributes([KeyValue::new("scope.attr", true)])
            .build();
        let values = vec![
            KeyValue::new("http.request.method", "GET"),
            KeyValue::new("empty", ""),
            KeyValue::new("status", 200_i64),
            KeyValue::new("negative", -42_i64),
            KeyValue::new("zero", 0_i64),
            KeyValue::new("ratio", 0.25),
            KeyValue::new("flag", false),
            KeyValue::new("unicode", "tâche ✓"),
            KeyValue::new("bools", Value::Array(Array::Bool(vec![true, false]))),
            KeyValue::new("ints", Value::Array(Array::I64(vec![1, -1, i64::MAX]))),
            KeyValue::new("floats", Value::Array(Array::F64(vec![1.5, -0.0]))),
            KeyValue::new(
                "strings",
                Value::Array(Array::String(vec!["a".into(), "".into()])),
            ),
            KeyValue::new("long", "x".repeat(300)),
            // A value just under and a key just over one length byte's reach.
            KeyValue::new("edge", "y".repeat(120)),
            KeyValue::new("k".repeat(130), true),
            KeyValue::new("", "no key"),
            KeyValue::new("min", i64::MIN),
        ];
        let mut events = SpanEvents::default();
        events.events.push(Event::new(
            "exception",
            start + Duration::from_micros(5),
            vec![KeyValue::new("exception.message", "boom")],
            1,
        ));
        events.dropped_count = 2;
        let mut links = SpanLinks::default();
        links.links.push(Link::new(
            context(7, 8, true, true, "vendor=value"),
            vec![KeyValue::new("link.attr", 3_i64)],
            4,
        ));
        links.dropped_count = 5;
        let span = |scope: &InstrumentationScope, id: u64, parent: u64, remote: bool| SpanData {
            span_context: context(
                0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
                id,
                true,
                false,
                "",
            ),
            parent_span_id: SpanId::from(parent),
            parent_span_is_remote: remote,
            span_kind: SpanKind::Server,
            name: format!("GET /todos/{{id}} #{id}").into(),
            start_time: start,
            end_time: start + Duration::from_millis(3),
            attributes: values.clone(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: scope.clone(),
        };
        let mut all = vec![
            span(&todo, 1, 0, false),
            span(&other, 2, 0x00f0_67aa_0ba9_02b7, true),
            span(&todo, 3, 1, false),
        ];
        all[0].status = Status::error("the database did not answer");
        all[1].status = Status::Ok;
        all[1].span_kind = SpanKind::Client;
        all[1].events = events;
        all[1].links = links;
        all[1].dropped_attributes_count = 6;
        all[2].span_kind = SpanKind::Internal;
        all[2].span_context = context(9, 3, false, false, "a=b,c=d");
        all[2].attributes = Vec::new();
        all[2].status = Status::error("");
        all
    }

    /// The resource's attributes come out of a hash map, in no fixed order.
    fn sorted(mut request: ExportTraceServiceRequest) -> ExportTraceServiceRequest {
        for rs in &mut request.resource_spans {
            if let Some(resource) = &mut rs.resource {
                resource.attributes.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        request
    }

    #[test]
    fn the_request_decodes_to_what_opentelemetry_otlp_sends() {
        let resource = Resource::builder_empty()
            .with_schema_url(
                [
                    KeyValue::new("service.name", "todo-service"),
                    KeyValue::new("service.version", "0.1.0"),
                    KeyValue::new("replicas", 3_i64),
                ],
                "https://opentelemetry.io/schemas/1.21.0",
            )
            .build();
        let spans = spans();
        let (fields, schema) = encode_resource(&resource);
        let mut ours = Vec::new();
        encode_request(&mut ours, &fields, &schema, &spans);
        let ours = ExportTraceServiceRequest::decode(ours.as_slice()).expect("valid protobuf");
        let stock = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                spans,
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        assert_eq!(sorted(ours), sorted(stock));
    }

    #[test]
    fn an_empty_batch_is_one_resource_without_scopes() {
        let resource = Resource::builder_empty()
            .with_attributes([KeyValue::new("service.name", "todo-service")])
            .build();
        let (fields, schema) = encode_resource(&resource);
        let mut ours = Vec::new();
        encode_request(&mut ours, &fields, &schema, &[]);
        let ours = ExportTraceServiceRequest::decode(ours.as_slice()).unwrap();
        let stock = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                Vec::new(),
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        assert_eq!(ours, stock);
    }

    #[test]
    fn varints_are_minimal_and_round_trip() {
        for v in [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let (bytes, n) = varint_bytes(v);
            let decoded = prost::encoding::decode_varint(&mut &bytes[..n]).unwrap();
            assert_eq!(decoded, v);
            assert_eq!(n, prost::encoding::encoded_len_varint(v), "{v}");
            assert_eq!(varint_len(v), n, "{v}");
        }
    }
}
