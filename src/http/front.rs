//! The front layer: the first thing every request meets on every route. It gives the request
//! its id, observes it (span, metrics, the log lines' request fields; what is observed is in
//! `trace`) and returns the id on the answer.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use axum::{
    extract::{MatchedPath, Request},
    http::HeaderValue,
    response::Response,
};
use opentelemetry::trace::TraceContextExt as _;
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};

use super::{
    problem::ProblemCode,
    trace::{REQUEST, REQUEST_ID, RequestFields, end_server_span, new_request_id, server_span},
};
use crate::{metrics, telemetry::spans};

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
                .event_format(crate::telemetry::log_format::Text::new(
                    crate::http::log_context,
                ))
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
