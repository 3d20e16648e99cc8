//! The request's server span: what SigNoz's service views are built from.
//!
//! SigNoz needs server spans with low-cardinality names (`GET /todos/{id}`, never the raw path),
//! span status ERROR on failures (it counts errors by status, not by HTTP code) and the HTTP
//! semantic-convention attributes. Rejections by the protective layers are spans too, with
//! `todo.rejected_by` naming the layer that answered. Data requests say whether their caller was
//! authenticated (`todo.authenticated`), and name it (`user.id`) only if `AUTH_SPAN_SUBJECT` allows.
//! The span is built with the OpenTelemetry SDK directly (see `telemetry::spans` for why), only for
//! requests that are traced.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, ready},
};

use axum::{
    extract::{ConnectInfo, MatchedPath, Request},
    http::{HeaderMap, HeaderValue, Method, header},
    response::Response,
};
use opentelemetry::{
    KeyValue,
    propagation::TextMapPropagator as _,
    trace::{SpanRef, Status, TraceContextExt as _},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};

use super::problem::ProblemCode;
use crate::{
    metrics, net,
    telemetry::{sampling, spans},
};

/// Set on every request (the client's, or a fresh one) before the span and kept on the response.
pub(crate) const REQUEST_ID: &str = "x-request-id";

/// A fresh request id: a random (v4) UUID, hyphenated.
fn new_request_id() -> HeaderValue {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    HeaderValue::from_str(text).expect("a UUID is a valid header value")
}

/// The request a log line is written for: cheap clones of what the request already holds.
pub(crate) struct RequestFields {
    /// `x-request-id` as the client sees it (theirs, or the one given to the request).
    request_id: HeaderValue,
    method: Method,
    /// The matched route (`/todos/{id}`); none when no route matched.
    route: Option<MatchedPath>,
}

tokio::task_local! {
    static REQUEST: RequestFields;
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
fn server_span(req: &Request, request_id: &HeaderValue) -> Option<opentelemetry::Context> {
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
fn end_server_span(span: &SpanRef<'_>, res: &Response) {
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

/// One server span per request when it is traced (named by the matched route, low cardinality; a
/// child of the caller's `traceparent` if any), `http.server.request.duration` (and rejections)
/// for every request, the request's id, method and route on the log lines written while serving
/// it (see `telemetry::log_format`), and the trace id back to the client (`x-trace-id`), so a
/// report can quote it. Sits inside the router's layers so the matched route is known.
///
/// The span's context is attached to the thread while the layers beneath are called and while
/// the request's future is polled, so the database spans and log lines find it there.
///
/// A tower layer of our own rather than `axum::middleware::from_fn`: that clones (and boxes) the
/// whole stack beneath it on every request, since `Next` owns its service; here the inner service
/// is called in place: clones and drops of layer stacks were a visible share of the service's CPU
/// (loadtest/archive.md#clones-boxes-moves).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

/// The service of [`ObserveLayer`].
#[derive(Clone, Debug)]
pub(crate) struct Observe<S> {
    inner: S,
}

impl<S> Service<Request> for Observe<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let started = tokio::time::Instant::now();
        // The client's id, or a fresh one. Not written into the request's headers: nothing
        // beneath reads it there (the span and the log lines take it from here), and an insert
        // into the header map is a hash and often a grow.
        let request_id = match req.headers().get(REQUEST_ID) {
            Some(id) => id.clone(),
            None => new_request_id(),
        };
        let traced = server_span(&req, &request_id);
        let fields = RequestFields {
            request_id,
            method: req.method().clone(),
            route: req.extensions().get::<MatchedPath>().cloned(),
        };
        let inner = {
            // The layers beneath record on the span while called (who the caller is).
            let _attached = traced.clone().map(opentelemetry::Context::attach);
            REQUEST.scope(fields, self.inner.call(req))
        };
        // Polled in place: an `async` block would move the inner future (the whole stack's,
        // hundreds of bytes) from state to state on its first poll. The layers beneath log while
        // polled, inside the scope; what they decide while called (a rate-limit refusal) is
        // logged by the response line below.
        ObserveFuture {
            inner,
            started,
            traced,
        }
    }
}

pin_project! {
    /// The future of [`Observe`]. Dropped before it completes (the client left), it drops the
    /// span's context with it, which ends the span without a status.
    pub struct ObserveFuture<F: Future> {
        #[pin]
        inner: TaskLocalFuture<RequestFields, F>,
        started: tokio::time::Instant,
        // The request's span, when traced.
        traced: Option<opentelemetry::Context>,
    }
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _attached = this.traced.clone().map(opentelemetry::Context::attach);
        let Ok(mut res) = ready!(this.inner.as_mut().poll(cx));
        let latency = this.started.elapsed();
        let fields = this
            .inner
            .take_value()
            .expect("the request's fields are taken once, when it completes");
        let rejected = res
            .extensions()
            .get::<ProblemCode>()
            .and_then(|ProblemCode(code)| code.rejected_by());
        metrics::http().record(
            &fields.method,
            fields.route.as_ref().map(MatchedPath::as_str),
            res.status(),
            latency,
            rejected,
        );
        let request_id = fields.request_id.clone();
        REQUEST.sync_scope(fields, || {
            tracing::debug!(
                status = res.status().as_u16(),
                ?latency,
                rejected_by = rejected,
                "response"
            );
        });
        // The id goes back to the client, who quotes it when reporting a problem (unless the
        // answer already names one).
        res.headers_mut().entry(REQUEST_ID).or_insert(request_id);
        if let Some(traced) = this.traced.take() {
            let span = traced.span();
            let sc = span.span_context();
            // Hex digits: always a valid value; built from the string's own buffer.
            if let Ok(v) = HeaderValue::from_maybe_shared(axum::body::Bytes::from(
                spans::trace_id_hex(sc.trace_id()),
            )) {
                res.headers_mut().insert("x-trace-id", v);
            }
            end_server_span(&span, &res);
        }
        Poll::Ready(Ok(res))
    }
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::StatusCode};
    use tower::ServiceExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _, layer::SubscriberExt as _};

    use super::*;
    use crate::telemetry::log_format::tests::{Buffer, take_turn};

    /// Lines written while the request runs name it, and so does the debug line written when it
    /// completes (after its future and task-local have finished), which also says which
    /// protective layer refused it.
    #[test]
    fn every_line_of_a_request_names_it_and_the_last_says_who_refused_it() {
        let _turn = take_turn();
        let out = Buffer::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .event_format(crate::telemetry::log_format::Text::new(log_context))
                .with_filter(EnvFilter::new("todo_service=debug")),
        );
        let service = ObserveLayer.layer(tower::service_fn(|_: Request| async {
            tracing::debug!("handling");
            let mut res = Response::new(Body::empty());
            *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            res.extensions_mut()
                .insert(ProblemCode(crate::http::problem::code::Code::RateLimited));
            Ok::<_, Infallible>(res)
        }));
        let mut req = Request::new(Body::empty());
        req.headers_mut()
            .insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let res = tracing::subscriber::with_default(subscriber, || {
            runtime.block_on(service.oneshot(req)).unwrap()
        });
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("handling request_id=abc-123"), "{text}");
        assert!(lines[1].contains(" response status=429 latency="), "{text}");
        assert!(lines[1].contains(" rejected_by=\"rate_limit\" "), "{text}");
        assert!(
            lines[1].ends_with("request_id=abc-123 http.request.method=GET"),
            "{text}"
        );
    }
}
