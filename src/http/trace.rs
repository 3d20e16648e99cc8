//! The request's server span: what SigNoz's service views are built from.
//!
//! SigNoz needs server spans with low-cardinality names (`GET /todos/{id}`, never the raw path),
//! span status ERROR on failures (it counts errors by status, not by HTTP code) and the HTTP
//! semantic-convention attributes. Rejections by the protective layers are spans too, with
//! `todo.rejected_by` naming the layer that answered. Data requests say whether their caller was
//! authenticated (`todo.authenticated`), and name it (`user.id`) only if `AUTH_SPAN_SUBJECT` allows.
//! The span is built with the OpenTelemetry SDK directly (see `telemetry::spans` for why), only for
//! requests that are traced.

use std::net::SocketAddr;

use axum::{
    extract::{ConnectInfo, MatchedPath, Request},
    http::{HeaderMap, HeaderValue, Method, header},
    response::Response,
};
use opentelemetry::{
    KeyValue,
    propagation::TextMapPropagator as _,
    trace::{SpanRef, Status},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;

use super::problem::ProblemCode;
use crate::{
    metrics, net,
    telemetry::{sampling, spans},
};

/// Set on every request (the client's, or a fresh one) before the span and kept on the response.
pub(crate) const REQUEST_ID: &str = "x-request-id";

/// Longest client-sent request id kept: a UUID is 36, a W3C trace id 32.
pub(crate) const MAX_REQUEST_ID_BYTES: usize = 128;

/// The request's id: the client's when it is 1 to [`MAX_REQUEST_ID_BYTES`] visible ASCII
/// characters, else a fresh one (which the answer names, so the client can quote it). A longer id
/// was copied whole into every log line of its request: three 300 KB ids wrote 900 KB of log.
pub(super) fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(REQUEST_ID) {
        Some(id)
            if (1..=MAX_REQUEST_ID_BYTES).contains(&id.len())
                && id.as_bytes().iter().all(u8::is_ascii_graphic) =>
        {
            id.clone()
        }
        _ => new_request_id(),
    }
}

/// A fresh request id: a random (v4) UUID, hyphenated.
fn new_request_id() -> HeaderValue {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    HeaderValue::from_str(text).expect("a UUID is a valid header value")
}

/// The request a log line is written for: cheap clones of what the request already holds.
pub(crate) struct RequestFields {
    /// `x-request-id` as the client sees it (theirs, or the one given to the request).
    pub(super) request_id: HeaderValue,
    pub(super) method: Method,
    /// The matched route (`/todos/{id}`); none when no route matched.
    pub(super) route: Option<MatchedPath>,
}

tokio::task_local! {
    pub(super) static REQUEST: RequestFields;
}

/// The log lines' [`crate::telemetry::log_format::RequestContext`]: the keys of the request being
/// served, read from the task-local the observing layer sets for each request.
pub fn log_context(keys: &mut Vec<(&'static str, String)>) {
    let _ = REQUEST.try_with(|r| {
        keys.push((
            "request_id",
            String::from_utf8_lossy(r.request_id.as_bytes()).into_owned(),
        ));
        keys.push(("http.request.method", r.method.as_str().to_owned()));
        if let Some(route) = &r.route {
            keys.push(("http.route", route.as_str().to_owned()));
        }
    });
}

/// Reads W3C trace context from request headers.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The request's server span in the context that carries it, when the request is traced: spans
/// are exported and the sampler (see `telemetry::sampling`) keeps this request, given the
/// caller's `traceparent`. Nothing is read or built otherwise.
pub(super) fn server_span(
    req: &Request,
    request_id: &HeaderValue,
) -> Option<opentelemetry::Context> {
    if !sampling::exporting() {
        return None;
    }
    // Our own propagator and an empty base: the global one sits behind a lock, and `extract`
    // would clone the thread's current context. Allocates only when the caller sent a
    // `traceparent`.
    let parent = TraceContextPropagator::new().extract_with_context(
        &opentelemetry::Context::new(),
        &HeaderExtractor(req.headers()),
    );
    if !sampling::sampled(&parent) {
        return None;
    }
    let method = req.method().as_str();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let name = match route {
        Some(route) => spans::name(method, route),
        None => method.to_owned().into(),
    };
    let mut attributes = Vec::with_capacity(8);
    attributes.push(KeyValue::new(
        "http.request.method",
        metrics::method_name(req.method()),
    ));
    if let Some(route) = route {
        attributes.push(KeyValue::new("http.route", metrics::route_value(route)));
    }
    attributes.push(KeyValue::new("url.path", req.uri().path().to_owned()));
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
        attributes.push(KeyValue::new("client.address", net::ip_text(peer.ip())));
    }
    let user_agent = req.headers().get(header::USER_AGENT);
    for (key, value) in [
        ("user_agent.original", user_agent),
        ("request_id", Some(request_id)),
    ] {
        if let Some(value) = value.and_then(|v| v.to_str().ok()) {
            attributes.push(KeyValue::new(key, value.to_owned()));
        }
    }
    // Without a valid incoming traceparent `parent` is empty and the span is a root.
    spans::start_server(name, attributes, &parent)
}

/// What the response says about the request, on its server span, which it then ends. SigNoz
/// counts errors by span status, so server errors are ERROR; a refusal names the protective
/// layer that answered.
pub(super) fn end_server_span(span: &SpanRef<'_>, res: &Response) {
    let status = res.status();
    // As i64: SigNoz filters on this attribute as a number.
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status.as_u16()),
    ));
    if status.is_server_error() {
        span.set_status(Status::error(""));
    }
    if let Some(&ProblemCode(code)) = res.extensions().get::<ProblemCode>() {
        span.set_attribute(KeyValue::new("error.type", code.as_str()));
        if let Some(layer) = code.rejected_by() {
            span.set_attribute(KeyValue::new("todo.rejected_by", layer));
        }
    }
    span.end();
}
