//! The front layer: the first thing every request meets on every route. It gives the request
//! its id, observes it (span, metrics, the log lines' request fields; what is observed is in
//! `trace`), answers CORS (the policy is in `cors`) and, on the data routes, refuses early what
//! admission would refuse at once, before any other layer costs anything, and writes the rate
//! limit's standard fields on the way out (`guard::rate_limit::standard_fields`).

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use axum::{
    extract::{MatchedPath, Request},
    http::{HeaderValue, Method, Version, header},
    response::{IntoResponse as _, Response},
};
use opentelemetry::trace::TraceContextExt as _;
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};

use super::{
    cors::CorsPolicy,
    guard::{admission::EarlyRefusal, limiter::LimitPolicy, rate_limit::standard_fields},
    problem::{ApiError, ProblemCode, code::Code},
    trace::{REQUEST, REQUEST_ID, RequestFields, end_server_span, request_id, server_span},
};
use crate::{metrics, telemetry::spans};

/// What the front layer does to every request, in order: give it its id (the client's, or a fresh
/// one); start its server span when it is traced (named by the matched route, low cardinality; a
/// child of the caller's `traceparent` if any); answer a CORS preflight, or, on the data routes,
/// refuse it at once with admission's prerendered 503 when admission would ([`EarlyRefusal`]),
/// before any other layer costs anything; else call the layers beneath with the request's fields
/// (id, method, route) in scope for the log lines written while serving it. On every answer:
/// `http.server.request.duration` (and rejections) recorded, the CORS headers, the request's id
/// and, when traced, the trace id (`x-trace-id`), so a report can quote them. Sits inside the
/// router's layers so the matched route is known.
///
/// The span's context is attached to the thread while the layers beneath are called and while
/// the request's future is polled, so the database spans and log lines find it there.
///
/// One layer of our own rather than tower-http's request-id, CORS and a refusal layer each, or
/// `axum::middleware::from_fn`: each layer is cloned, with everything beneath it, each time axum
/// calls a route, and each moves the future beneath it into its own; `from_fn` also boxes. What
/// each cost is in loadtest/RESULTS.md#layer-costs and archive.md#clones-boxes-moves.
#[derive(Clone, Debug)]
pub(crate) struct FrontLayer {
    policy: Arc<Policy>,
}

/// What the front layer's clones share: one reference count per clone.
#[derive(Debug)]
struct Policy {
    cors: CorsPolicy,
    /// The data routes': admission's immediate refusal.
    early: Option<EarlyRefusal>,
    /// The data routes': the rate limit's policy, stated on its answers.
    limit: Option<LimitPolicy>,
}

impl FrontLayer {
    pub(crate) fn new(
        cors: CorsPolicy,
        early: Option<EarlyRefusal>,
        limit: Option<LimitPolicy>,
    ) -> Self {
        FrontLayer {
            policy: Arc::new(Policy { cors, early, limit }),
        }
    }
}

impl<S> Layer<S> for FrontLayer {
    type Service = Front<S>;

    fn layer(&self, inner: S) -> Front<S> {
        Front {
            inner,
            policy: Arc::clone(&self.policy),
        }
    }
}

/// The service of [`FrontLayer`].
#[derive(Clone, Debug)]
pub(crate) struct Front<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S> Service<Request> for Front<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = FrontFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let started = tokio::time::Instant::now();
        // The client's id, or a fresh one. Not written into the request's headers: nothing
        // beneath reads it there (the span and the log lines take it from here), and an insert
        // into the header map is a hash and often a grow.
        let request_id = request_id(req.headers());
        let traced = server_span(&req, &request_id);
        let fields = RequestFields {
            request_id,
            method: req.method().clone(),
            route: req.extensions().get::<MatchedPath>().cloned(),
        };
        let policy = &self.policy;
        let mut origin = policy.cors.allowed_origin(req.headers());
        let preflight = req.method() == Method::OPTIONS;
        let answer = if let Some(refusal) = host_refusal(&req) {
            Some(refusal)
        } else if preflight {
            Some(policy.cors.preflight(origin.take()))
        } else {
            policy.early.as_ref().and_then(EarlyRefusal::refuse_now)
        };
        let state = match answer {
            Some(res) => State::Answered {
                answer: Some((res, fields)),
            },
            None => {
                // The layers beneath record on the span while called (who the caller is).
                let _attached = traced.clone().map(opentelemetry::Context::attach);
                State::Called {
                    inner: REQUEST.scope(fields, self.inner.call(req)),
                }
            }
        };
        // Polled in place: an `async` block would move the inner future (the whole stack's,
        // hundreds of bytes) from state to state on its first poll. The layers beneath log while
        // polled, inside the scope; what they decide while called (a rate-limit refusal) is
        // logged by the response line below.
        FrontFuture {
            state,
            started,
            traced,
            cors: (!preflight).then(|| (origin, Arc::clone(policy))),
        }
    }
}

/// The 400 for a request whose `Host` cannot be trusted to say which site it is for: an
/// HTTP/1.1 request without one (RFC 9112 §3.2), or any request with more than one (the first
/// once built the links while a proxy may have routed by another).
fn host_refusal(req: &Request) -> Option<Response> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let detail = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => "the request has more than one Host header",
        (None, _) if req.version() == Version::HTTP_11 => "an HTTP/1.1 request needs a Host header",
        _ => return None,
    };
    Some(
        ApiError::bad_request(Code::InvalidHost, detail)
            .with_hint("Send exactly one Host header naming the service.")
            .into_response(),
    )
}

pin_project! {
    /// The future of [`Front`]. Dropped before it completes (the client left), it drops the
    /// span's context with it, which ends the span without a status.
    pub(crate) struct FrontFuture<F: Future> {
        #[pin]
        state: State<F>,
        started: tokio::time::Instant,
        // The request's span, when traced.
        traced: Option<opentelemetry::Context>,
        // Its `Access-Control-Allow-Origin` (if any) and the policy that adds the CORS headers
        // to the answer; none for a preflight, whose answer has its own.
        cors: Option<(Option<HeaderValue>, Arc<Policy>)>,
    }
}

pin_project! {
    /// Answered by the front layer itself, or by the layers beneath.
    #[project = StateProj]
    enum State<F: Future> {
        Answered { answer: Option<(Response, RequestFields)> },
        Called { #[pin] inner: TaskLocalFuture<RequestFields, F> },
    }
}

impl<F> Future for FrontFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let (mut res, fields) = match this.state.project() {
            StateProj::Answered { answer } => answer.take().expect("polled after completion"),
            StateProj::Called { mut inner } => {
                let _attached = this.traced.clone().map(opentelemetry::Context::attach);
                let Ok(res) = ready!(inner.as_mut().poll(cx));
                let fields = inner
                    .take_value()
                    .expect("the request's fields are taken once, when it completes");
                (res, fields)
            }
        };
        let latency = this.started.elapsed();
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
        let headers = res.headers_mut();
        // Room for what is added here at once, rather than a grow on the way.
        headers.reserve(4);
        // The id goes back to the client, who quotes it when reporting a problem (unless the
        // answer already names one).
        headers.entry(REQUEST_ID).or_insert(request_id);
        if let Some((origin, policy)) = this.cors.take() {
            policy.cors.apply(origin, headers);
            if let Some(limit) = &policy.limit {
                standard_fields(limit, &mut res);
            }
        }
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
    use crate::{
        config::CorsOrigins,
        http::guard::admission::{AdmissionLayer, AdmissionLimits},
        telemetry::log_format::tests::{Buffer, take_turn},
    };

    fn front(early: Option<EarlyRefusal>) -> FrontLayer {
        FrontLayer::new(CorsPolicy::new(&CorsOrigins::Any), early, None)
    }

    /// A request as HTTP/1.1 clients send them: with a Host.
    fn hosted() -> Request {
        Request::builder()
            .header(header::HOST, "todo.test")
            .body(Body::empty())
            .unwrap()
    }

    /// An HTTP/1.1 request without Host, or any with two, is a 400 before anything beneath
    /// runs; HTTP/1.0 may leave it out.
    #[test]
    fn a_request_without_one_host_is_refused_before_the_layers_beneath() {
        let _turn = take_turn();
        block_on(async {
            let reached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let svc = front(None).layer(counted(&reached));
            let two = Request::builder()
                .header(header::HOST, "evil.example")
                .header(header::HOST, "127.0.0.1")
                .body(Body::empty())
                .unwrap();
            for req in [Request::new(Body::empty()), two] {
                let res = svc.clone().oneshot(req).await.unwrap();
                assert_eq!(res.status(), StatusCode::BAD_REQUEST);
                assert_eq!(
                    res.extensions().get::<ProblemCode>().unwrap().0,
                    Code::InvalidHost
                );
                assert!(res.headers().contains_key(REQUEST_ID));
            }
            assert_eq!(reached.load(std::sync::atomic::Ordering::Relaxed), 0);
            let old = Request::builder()
                .version(Version::HTTP_10)
                .body(Body::empty())
                .unwrap();
            assert_eq!(
                svc.clone().oneshot(old).await.unwrap().status(),
                StatusCode::OK
            );
            assert_eq!(
                svc.oneshot(hosted()).await.unwrap().status(),
                StatusCode::OK
            );
        });
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// A service that counts the requests that reach it and answers 200.
    fn counted(
        reached: &Arc<std::sync::atomic::AtomicUsize>,
    ) -> impl Service<Request, Response = Response, Error = Infallible, Future: Send> + Clone + use<>
    {
        let reached = Arc::clone(reached);
        tower::service_fn(move |_: Request| {
            reached.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async { Ok::<_, Infallible>(Response::new(Body::empty())) }
        })
    }

    /// A preflight is answered by the front itself, with the CORS policy's headers and the
    /// request's id; any other answer gets the CORS headers for a reader beside it.
    #[test]
    fn a_preflight_never_reaches_the_route_and_other_answers_carry_cors_headers() {
        // The log test beside these counts the lines of one request.
        let _turn = take_turn();
        block_on(async {
            let reached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let svc = front(None).layer(counted(&reached));
            let preflight = Request::builder()
                .header(header::HOST, "todo.test")
                .method(Method::OPTIONS)
                .header("origin", "https://a.example")
                .header("access-control-request-method", "PATCH")
                .body(Body::empty())
                .unwrap();
            let res = svc.clone().oneshot(preflight).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(reached.load(std::sync::atomic::Ordering::Relaxed), 0);
            let h = res.headers();
            assert_eq!(h["access-control-allow-origin"], "*");
            assert!(
                h["access-control-allow-methods"]
                    .to_str()
                    .unwrap()
                    .contains("PATCH")
            );
            assert!(h.get("access-control-expose-headers").is_none());
            assert_eq!(h[REQUEST_ID].len(), 36, "a fresh id");

            let get = Request::builder()
                .header(header::HOST, "todo.test")
                .header(REQUEST_ID, "mine")
                .body(Body::empty())
                .unwrap();
            let res = svc.oneshot(get).await.unwrap();
            assert_eq!(reached.load(std::sync::atomic::Ordering::Relaxed), 1);
            let h = res.headers();
            assert_eq!(h["access-control-allow-origin"], "*");
            assert!(
                h["access-control-expose-headers"]
                    .to_str()
                    .unwrap()
                    .contains("etag")
            );
            assert_eq!(h[REQUEST_ID], "mine");
        });
    }

    /// With every slot busy and no wait allowed, a request is refused by the front before any
    /// layer beneath it runs, and the refusal still carries the id and the CORS headers.
    #[test]
    fn what_admission_would_refuse_at_once_is_refused_before_the_layers_beneath() {
        let _turn = take_turn();
        block_on(async {
            let admission = AdmissionLayer::new(AdmissionLimits {
                max_in_flight: 1,
                max_queue_wait: std::time::Duration::ZERO,
            });
            let busy = admission.layer(tower::service_fn(|_: Request| {
                std::future::pending::<Result<Response, Infallible>>()
            }));
            let holder = tokio::spawn(busy.oneshot(Request::new(Body::empty())));
            tokio::task::yield_now().await;
            let reached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let svc = front(Some(admission.early())).layer(counted(&reached));
            let res = svc.oneshot(hosted()).await.unwrap();
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(reached.load(std::sync::atomic::Ordering::Relaxed), 0);
            assert!(res.headers().contains_key("retry-after"));
            assert_eq!(res.headers()["access-control-allow-origin"], "*");
            assert!(res.headers().contains_key(REQUEST_ID));
            holder.abort();
        });
    }

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
        let service = front(None).layer(tower::service_fn(|_: Request| async {
            tracing::debug!("handling");
            let mut res = Response::new(Body::empty());
            *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            res.extensions_mut()
                .insert(ProblemCode(crate::http::problem::code::Code::RateLimited));
            Ok::<_, Infallible>(res)
        }));
        let mut req = hosted();
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
