//! The protective layers in front of the data routes (`/todos…`): rate limit, load shedding with a
//! global concurrency limit, and a request timeout. Probes and docs are deliberately outside them,
//! so an operator can always see whether the service is alive and why it refuses work.
//!
//! From the outside in (see [`layer`]):
//! 1. **Rate limit** (tower_governor, per client IP): the cheapest refusal, so a runaway client is
//!    stopped before any work is done for it (the in-flight slot that readiness reserved is
//!    released as soon as the refusal is decided). 429 with `Retry-After`.
//! 2. **Load shed + global concurrency limit** (tower): at most `MAX_IN_FLIGHT` requests run;
//!    the next one is refused at once with 503 + `Retry-After` instead of queueing without bound.
//! 3. **Request timeout** (tower-http): inside the shedder, so a request that times out frees its
//!    slot; answered 504 (turned into a problem by `error::ensure_problem`).
//!
//! The circuit breaker is not a layer here: it sits in `db`, around the database itself, where it
//! sees exactly the failures that mean "database unavailable" and nothing else.

use std::{
    convert::Infallible,
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::{
    BoxError,
    body::Body,
    http::{Request, Response, StatusCode, header},
    response::IntoResponse,
};
use governor::middleware::StateInformationMiddleware;
use pin_project_lite::pin_project;
use tower::{
    Layer, Service, ServiceBuilder,
    layer::util::{Identity, Stack},
    limit::GlobalConcurrencyLimitLayer,
    load_shed::LoadShedLayer,
    util::Either,
};
use tower_governor::{
    GovernorError, GovernorLayer,
    governor::{GovernorConfig, GovernorConfigBuilder},
    key_extractor::{KeyExtractor, PeerIpKeyExtractor, SmartIpKeyExtractor},
};
use tower_http::timeout::TimeoutLayer;

use super::{code::Code, error::ApiError};
use crate::config::{Config, RateLimit};

/// How often idle clients' rate-limit state is dropped, so memory stays bounded however many
/// distinct IPs have called.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The layers described in the module doc (tower's `Stack` names them innermost first).
pub type Protect = Stack<
    TimeoutLayer,
    Stack<
        GlobalConcurrencyLimitLayer,
        Stack<
            LoadShedLayer,
            Stack<Either<RateLimitLayer, Identity>, Stack<AnswerErrorsLayer, Identity>>,
        >,
    >,
>;

type RateLimitLayer = GovernorLayer<ClientIp, StateInformationMiddleware, Body>;

/// The layers for the data routes, to sit innermost in the router's one layer stack (see
/// `http::router`).
///
/// The rate limiter sits outside the shedder, so a refused client is answered before it can take
/// an in-flight slot: the router drives readiness through the whole stack first, which takes a
/// slot, but a refused request never calls further in, and its slot is released as soon as the
/// decision is made (the stack's clone serving it is dropped). Anything stateful shares its state
/// across the router's per-route clones: the global limit one semaphore, the governor one limiter.
pub fn layer(config: &Config) -> Protect {
    ServiceBuilder::new()
        .layer(AnswerErrorsLayer)
        .option_layer(config.rate_limit.map(rate_limit_layer))
        .layer(LoadShedLayer::new())
        .layer(GlobalConcurrencyLimitLayer::new(config.max_in_flight))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            config.request_timeout,
        ))
        .into_inner()
}

/// Turns the shedder's refusal (and any other layer error) into a problem response, as the
/// router needs services that cannot fail.
///
/// Written here rather than using `axum::error_handling::HandleErrorLayer`, which clones the whole
/// stack beneath it on every request so that it can drive readiness itself; this one forwards
/// `poll_ready` (the router drives it) and calls the inner service in place.
#[derive(Clone, Copy, Debug)]
pub struct AnswerErrorsLayer;

impl<S> Layer<S> for AnswerErrorsLayer {
    type Service = AnswerErrors<S>;

    fn layer(&self, inner: S) -> AnswerErrors<S> {
        AnswerErrors {
            inner,
            not_ready: None,
        }
    }
}

#[derive(Debug)]
pub struct AnswerErrors<S> {
    inner: S,
    /// A readiness error, answered by the next call (the router always calls after readiness).
    not_ready: Option<BoxError>,
}

impl<S: Clone> Clone for AnswerErrors<S> {
    fn clone(&self) -> Self {
        AnswerErrors {
            inner: self.inner.clone(),
            not_ready: None,
        }
    }
}

impl<S, B> Service<Request<B>> for AnswerErrors<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = AnswerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if let Err(err) = ready!(self.inner.poll_ready(cx)) {
            self.not_ready = Some(err.into());
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match self.not_ready.take() {
            Some(error) => AnswerFuture::Failed { error: Some(error) },
            None => AnswerFuture::Called {
                inner: self.inner.call(req),
            },
        }
    }
}

pin_project! {
    /// The inner service's future, its error answered as a response.
    #[project = AnswerProj]
    pub enum AnswerFuture<F> {
        Failed { error: Option<BoxError> },
        Called { #[pin] inner: F },
    }
}

impl<F, E> Future for AnswerFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(match self.project() {
            AnswerProj::Failed { error } => layer_error(
                error
                    .take()
                    .expect("an AnswerFuture is polled after it completed"),
            ),
            AnswerProj::Called { inner } => match ready!(inner.poll(cx)) {
                Ok(res) => res,
                Err(err) => layer_error(err.into()),
            },
        }))
    }
}

fn layer_error(err: BoxError) -> Response<Body> {
    if err.is::<tower::load_shed::error::Overloaded>() {
        tracing::debug!("shed a request: too many in flight");
        ApiError::overloaded().into_response()
    } else {
        ApiError::internal(err.as_ref()).into_response()
    }
}

/// The rate-limit key: the TCP peer, or the forwarded client address when configured to trust it.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp {
    trust_forwarded_for: bool,
}

impl KeyExtractor for ClientIp {
    type Key = IpAddr;

    fn extract<T>(&self, req: &Request<T>) -> Result<IpAddr, GovernorError> {
        if self.trust_forwarded_for {
            SmartIpKeyExtractor.extract(req)
        } else {
            PeerIpKeyExtractor.extract(req)
        }
    }
}

type Governor = GovernorConfig<ClientIp, StateInformationMiddleware>;

fn rate_limit_layer(limit: RateLimit) -> RateLimitLayer {
    let config: Arc<Governor> = Arc::new(
        GovernorConfigBuilder::default()
            .period(Duration::from_nanos(
                1_000_000_000 / u64::from(limit.per_second),
            ))
            .burst_size(limit.burst)
            .key_extractor(ClientIp {
                trust_forwarded_for: limit.trust_forwarded_for,
            })
            .use_headers()
            .finish()
            .expect("per_second and burst are validated non-zero"),
    );
    spawn_pruner(Arc::downgrade(&config));
    GovernorLayer::new(config).error_handler(rate_limit_response)
}

/// Drops idle clients' state periodically; ends when the app (and so the config) is dropped.
fn spawn_pruner(config: std::sync::Weak<Governor>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PRUNE_EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(config) = config.upgrade() else {
                return;
            };
            let limiter = config.limiter();
            limiter.retain_recent();
            limiter.shrink_to_fit();
            tracing::debug!(clients = limiter.len(), "pruned rate-limit state");
        }
    });
}

fn rate_limit_response(err: GovernorError) -> Response<Body> {
    match err {
        GovernorError::TooManyRequests { wait_time, headers } => {
            // Counted (metrics, spans) and logged at debug only, in the request's "response" line
            // (`rejected_by`): a line each at a default level would let one abusive client flood
            // the logs.
            // governor reports whole seconds rounded down (0 for a wait under a second); one more
            // second is always enough, so a client that honours Retry-After is admitted.
            let mut res = ApiError::rate_limited(wait_time + 1).into_response();
            for (name, value) in headers.iter().flatten() {
                if name != header::RETRY_AFTER {
                    res.headers_mut().insert(name.clone(), value.clone());
                }
            }
            res
        }
        GovernorError::UnableToExtractKey => {
            ApiError::internal(&GovernorError::UnableToExtractKey).into_response()
        }
        GovernorError::Other { code, msg, headers } => {
            let mut res = ApiError::new(
                code,
                Code::for_status(code.as_u16()),
                "Rate limiter error",
                msg.unwrap_or_default(),
            )
            .into_response();
            if let Some(h) = headers {
                res.headers_mut().extend(h);
            }
            res
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::error::ProblemCode;

    /// Fails readiness once, then serves.
    struct NotReadyOnce(bool);

    impl Service<Request<Body>> for NotReadyOnce {
        type Response = Response<Body>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Response<Body>, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            let failed = std::mem::replace(&mut self.0, true);
            Poll::Ready(if failed { Ok(()) } else { Err("broken".into()) })
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            std::future::ready(Ok(Response::new(Body::empty())))
        }
    }

    #[tokio::test]
    async fn layer_errors_become_problems_and_a_shed_request_says_when_to_retry() {
        use tower::ServiceExt as _;
        let shed = AnswerErrorsLayer.layer(tower::service_fn(|_: Request<Body>| async {
            Err::<Response<Body>, _>(tower::load_shed::error::Overloaded::new())
        }));
        let res = shed.oneshot(Request::new(Body::empty())).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(res.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(
            res.extensions().get::<ProblemCode>().unwrap().0,
            Code::Overloaded
        );

        let mut svc = AnswerErrorsLayer.layer(NotReadyOnce(false));
        let res = (&mut svc)
            .oneshot(Request::new(Body::empty()))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let res = svc.oneshot(Request::new(Body::empty())).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "the error is answered once");
    }

    #[test]
    fn retry_after_is_never_zero_and_keeps_the_rate_limit_headers() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("x-ratelimit-limit", "200".parse().unwrap());
        headers.insert(header::RETRY_AFTER, "0".parse().unwrap());
        let res = rate_limit_response(GovernorError::TooManyRequests {
            wait_time: 0,
            headers: Some(headers),
        });
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()[header::RETRY_AFTER], "1");
        assert_eq!(res.headers()["x-ratelimit-limit"], "200");
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }
}
