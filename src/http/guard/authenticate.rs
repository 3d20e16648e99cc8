//! The bearer-token check in front of the data routes: who is calling ([`Caller`], left in the
//! request's extensions for the rate limiter and the handlers' [`Owner`](super::caller::Owner)), and the RFC 6750
//! answers for those who may not call: 401 with `WWW-Authenticate: Bearer …` for a missing or bad
//! token, 403 `insufficient_scope` for a token without the scope the method needs
//! (`todos:read` for GET and HEAD, `todos:write` for the rest).
//!
//! Failed requests are throttled per client address (`RATE_LIMIT_UNAUTHENTICATED_*`): past the
//! burst a caller without a valid token reads 429 with `Retry-After`, so guessing tokens or a
//! misconfigured client cannot fill the logs, metrics and CPU with 401s.
//!
//! Written here rather than taken from `jwt-authorizer` (the maintained axum JWT layer): its last
//! release (0.15, 2024-08) is on jsonwebtoken 9, it fetches keys on the request path when a `kid`
//! is unknown, and answers in its own error format, without a reason a metric can count. The
//! cryptography and claim checks are jsonwebtoken's (see [`crate::auth`]); this is the policy.

use std::{
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::Body,
    http::{HeaderValue, Method, Request, Response, StatusCode, header},
    response::IntoResponse,
};
use governor::{
    clock::{Clock, DefaultClock},
    middleware::NoOpMiddleware,
};
use opentelemetry::{KeyValue, StringValue};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::{
    caller::{Caller, CallerKey},
    limiter::{self, Keyed, LimitPolicy},
};
use crate::{
    auth::{Principal, READ_SCOPE, Rejection, Verifier, WRITE_SCOPE},
    config::AuthConfig,
    http::problem::{ApiError, code::Code},
    telemetry::spans,
};

/// `realm` of every `WWW-Authenticate` challenge.
const REALM: &str = "todo-service";

/// Why a request was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthFailure {
    /// No `Authorization: Bearer` header (no header, or another scheme).
    Missing,
    Invalid(Rejection),
    InsufficientScope(&'static str),
}

impl AuthFailure {
    /// The metrics' `todo.auth.reason`.
    fn reason(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Invalid(r) => r.as_str(),
            AuthFailure::InsufficientScope(_) => "insufficient_scope",
        }
    }

    fn response(self) -> Response<Body> {
        let (error, challenge) = match self {
            AuthFailure::Missing => (
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    Code::Unauthorized,
                    "Authentication required",
                    "this request needs a bearer token",
                )
                .with_hint(
                    "Send Authorization: Bearer <token>, a JWT with sub, exp and the \
                     todos:read / todos:write scopes (see docs/authentication.md).",
                ),
                // RFC 6750 §3.1: no error code when the request had no credentials.
                format!("Bearer realm=\"{REALM}\""),
            ),
            AuthFailure::Invalid(rejection) => (
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    Code::InvalidToken,
                    "Invalid token",
                    rejection.description(),
                )
                .with_hint("Get a new token from your issuer and send the request again."),
                format!(
                    "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"{}\"",
                    rejection.description()
                ),
            ),
            AuthFailure::InsufficientScope(scope) => (
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    Code::InsufficientScope,
                    "Insufficient scope",
                    format!("this request needs a token with the {scope} scope"),
                )
                .with_hint("Ask your issuer for a token that carries the scope named in detail."),
                format!(
                    "Bearer realm=\"{REALM}\", error=\"insufficient_scope\", scope=\"{scope}\""
                ),
            ),
        };
        let mut res = error.into_response();
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        res
    }
}

/// The scope a request's method needs.
fn scope_for(method: &Method) -> &'static str {
    if matches!(*method, Method::GET | Method::HEAD) {
        READ_SCOPE
    } else {
        WRITE_SCOPE
    }
}

/// The token of an `Authorization: Bearer <token>` header; `Ok(None)` when there is no such
/// header or it names another scheme, `Err` when it is a bearer header without one usable token.
fn bearer_token(req: &Request<Body>) -> Result<Option<&str>, Rejection> {
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Rejection::Malformed);
    }
    let value = value.to_str().map_err(|_| Rejection::Malformed)?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let token = token.trim_matches(' ');
    if token.is_empty() || token.contains(' ') {
        return Err(Rejection::Malformed);
    }
    Ok(Some(token))
}

/// What the layer shares across the router's clones.
struct Authenticator {
    /// `None` in `AUTH_MODE=none`.
    verifier: Option<Arc<Verifier>>,
    /// Failed requests per client address, and the policy its 429 states.
    throttle: Option<(Arc<Keyed<IpAddr, NoOpMiddleware>>, LimitPolicy)>,
    key: CallerKey,
    span_subject: bool,
}

impl Authenticator {
    /// The caller's principal, or why not. A token not verified recently costs a signature check
    /// (up to ~0.4 ms of CPU for ES256 or RS256), so one is made only while the client's address
    /// is within its unauthenticated limit, and counts against it: an address already throttled
    /// is refused before any check, whatever it sends (its callers' tokens verified earlier still
    /// pass, from the cache).
    fn authenticate(&self, verifier: &Verifier, req: &Request<Body>) -> Result<Principal, Refusal> {
        let token = bearer_token(req)
            .map_err(|r| Refusal::uncharged(AuthFailure::Invalid(r)))?
            .ok_or(Refusal::uncharged(AuthFailure::Missing))?;
        let (principal, charged) = match verifier.cached(token) {
            Some(principal) => (principal, false),
            None => {
                if let Some(wait) = self.charge(req) {
                    return Err(Refusal::Throttled(wait));
                }
                let principal = verifier.verify(token).map_err(|r| Refusal::Failed {
                    failure: AuthFailure::Invalid(r),
                    charged: true,
                })?;
                (principal, true)
            }
        };
        let scope = scope_for(req.method());
        let granted = if scope == READ_SCOPE {
            principal.scopes.read
        } else {
            principal.scopes.write
        };
        if granted {
            Ok(principal)
        } else {
            Err(Refusal::Failed {
                failure: AuthFailure::InsufficientScope(scope),
                charged,
            })
        }
    }

    /// Counts one request against its address's unauthenticated limit; the wait before another
    /// is allowed when the limit is spent.
    fn charge(&self, req: &Request<Body>) -> Option<Duration> {
        let ((throttle, _), addr) = (self.throttle.as_ref()?, self.key.addr(req)?);
        let not_until = throttle.check_key(&addr).err()?;
        Some(not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// The answer to a request that was not let through: its problem, or 429 once its address is
    /// over the unauthenticated limit.
    fn refuse(&self, refusal: Refusal, req: &Request<Body>) -> Response<Body> {
        let (failure, charged) = match refusal {
            Refusal::Failed { failure, charged } => (failure, charged),
            Refusal::Throttled(wait) => {
                crate::metrics::auth_failure("throttled");
                tracing::debug!("request not authenticated: its address is throttled");
                return self.throttled(wait);
            }
        };
        crate::metrics::auth_failure(failure.reason());
        tracing::debug!(reason = failure.reason(), "request not authenticated");
        if !charged && let Some(wait) = self.charge(req) {
            return self.throttled(wait);
        }
        failure.response()
    }

    /// The 429 of an address over the unauthenticated limit.
    fn throttled(&self, wait: Duration) -> Response<Body> {
        // Rounded up, and at least 1, so a client that honours it is let through.
        let retry_after = wait.as_secs() + 1;
        let mut res = ApiError::rate_limited(retry_after).into_response();
        if let Some((_, policy)) = &self.throttle {
            policy.refused(res.headers_mut(), retry_after);
        }
        res
    }
}

/// Why a request was not let through, and whether its address was already charged for it.
enum Refusal {
    Failed {
        failure: AuthFailure,
        charged: bool,
    },
    /// Its address is over the unauthenticated limit: nothing was checked.
    Throttled(Duration),
}

impl Refusal {
    fn uncharged(failure: AuthFailure) -> Self {
        Refusal::Failed {
            failure,
            charged: false,
        }
    }
}

/// Authenticates every request of the routes it wraps (see the module doc).
#[derive(Clone)]
pub struct AuthenticateLayer(Arc<Authenticator>);

impl AuthenticateLayer {
    /// `verifier`: `None` lets everyone through as the anonymous caller. `key` finds a failed
    /// request's client address; `max_clients` bounds the throttle's memory.
    pub fn new(
        config: &AuthConfig,
        verifier: Option<Arc<Verifier>>,
        key: CallerKey,
        max_clients: usize,
    ) -> Self {
        let throttle = config.unauthenticated_limit.map(|(per_second, burst)| {
            (
                limiter::keyed(per_second, burst, max_clients),
                LimitPolicy::new("unauthenticated", per_second, burst),
            )
        });
        AuthenticateLayer(Arc::new(Authenticator {
            verifier,
            throttle,
            key,
            span_subject: config.span_subject,
        }))
    }
}

impl std::fmt::Debug for AuthenticateLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthenticateLayer")
            .field("jwt", &self.0.verifier.is_some())
            .finish()
    }
}

impl<S> Layer<S> for AuthenticateLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Authenticate<S> {
        Authenticate {
            auth: self.0.clone(),
            inner,
        }
    }
}

/// The service of [`AuthenticateLayer`].
#[derive(Clone)]
pub struct Authenticate<S> {
    auth: Arc<Authenticator>,
    inner: S,
}

impl<S> Service<Request<Body>> for Authenticate<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = AuthenticateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // Called while the request's span (when traced) is current: these land on it.
        let Some(verifier) = &self.auth.verifier else {
            spans::on_current(|span| {
                span.set_attribute(KeyValue::new("todo.authenticated", false));
            });
            req.extensions_mut().insert(Caller::Anonymous);
            return AuthenticateFuture::Passed {
                inner: self.inner.call(req),
            };
        };
        match self.auth.authenticate(verifier, &req) {
            Ok(principal) => {
                spans::on_current(|span| {
                    span.set_attribute(KeyValue::new("todo.authenticated", true));
                    if self.auth.span_subject {
                        span.set_attribute(KeyValue::new(
                            "user.id",
                            StringValue::from(principal.sub.clone()),
                        ));
                    }
                });
                req.extensions_mut().insert(Caller::Principal(principal));
                AuthenticateFuture::Passed {
                    inner: self.inner.call(req),
                }
            }
            Err(refusal) => {
                let authenticated = matches!(
                    refusal,
                    Refusal::Failed {
                        failure: AuthFailure::InsufficientScope(_),
                        ..
                    }
                );
                spans::on_current(|span| {
                    span.set_attribute(KeyValue::new("todo.authenticated", authenticated));
                });
                AuthenticateFuture::Refused {
                    res: Some(self.auth.refuse(refusal, &req)),
                }
            }
        }
    }
}

pin_project! {
    /// An authenticated request on its way, or the refusal of one that was not.
    #[project = AuthenticateProj]
    pub enum AuthenticateFuture<F> {
        Passed { #[pin] inner: F },
        Refused { res: Option<Response<Body>> },
    }
}

impl<F, E> Future for AuthenticateFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AuthenticateProj::Passed { inner } => inner.poll(cx),
            AuthenticateProj::Refused { res } => {
                Poll::Ready(Ok(res.take().expect("polled after completion")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(values: &[&str]) -> Request<Body> {
        let mut req = Request::new(Body::empty());
        for v in values {
            req.headers_mut()
                .append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        req
    }

    #[test]
    fn the_bearer_header_is_read_as_rfc_6750_writes_it() {
        assert_eq!(bearer_token(&with(&[])), Ok(None));
        assert_eq!(
            bearer_token(&with(&["Bearer abc.def.ghi"])),
            Ok(Some("abc.def.ghi"))
        );
        // The scheme is case-insensitive (RFC 9110 §11.1).
        assert_eq!(bearer_token(&with(&["bearer  abc "])), Ok(Some("abc")));
        // Another scheme is no bearer credential at all: 401 without an error code.
        assert_eq!(bearer_token(&with(&["Basic YWxpY2U6cHc="])), Ok(None));
        assert_eq!(bearer_token(&with(&["Bearerabc"])), Ok(None));
        for bad in [
            &["Bearer"][..],
            &["Bearer  "],
            &["Bearer a b"],
            &["Bearer a", "Bearer b"],
        ] {
            assert_eq!(
                bearer_token(&with(bad)),
                Err(Rejection::Malformed),
                "{bad:?}"
            );
        }
    }

    use std::time::SystemTime;

    use opentelemetry::trace::SpanContext;

    use crate::config::AuthMode;

    /// A request's span that keeps the attributes it is given, as (name, value) pairs.
    #[derive(Clone)]
    struct Recorded(Arc<std::sync::Mutex<Vec<(String, String)>>>, SpanContext);

    impl opentelemetry::trace::Span for Recorded {
        fn add_event_with_timestamp<T>(&mut self, _: T, _: SystemTime, _: Vec<KeyValue>)
        where
            T: Into<std::borrow::Cow<'static, str>>,
        {
        }
        fn span_context(&self) -> &SpanContext {
            &self.1
        }
        fn is_recording(&self) -> bool {
            true
        }
        fn set_attribute(&mut self, attribute: KeyValue) {
            self.0
                .lock()
                .unwrap()
                .push((attribute.key.to_string(), attribute.value.to_string()));
        }
        fn set_status(&mut self, _: opentelemetry::trace::Status) {}
        fn update_name<T>(&mut self, _: T)
        where
            T: Into<std::borrow::Cow<'static, str>>,
        {
        }
        fn add_link(&mut self, _: SpanContext, _: Vec<KeyValue>) {}
        fn end_with_timestamp(&mut self, _: SystemTime) {}
    }

    /// Runs one request through the layer while a request's span is current; the status and what the
    /// span was told.
    fn authenticate(
        mode: AuthMode,
        span_subject: bool,
        authorization: Option<&str>,
    ) -> (StatusCode, Vec<(String, String)>) {
        use opentelemetry::trace::TraceContextExt as _;
        use tower::ServiceExt as _;
        let verifier = matches!(mode, AuthMode::Jwt(_))
            .then(|| Arc::new(Verifier::hs256(SECRET.as_bytes(), None, None)));
        let config = AuthConfig {
            mode,
            span_subject,
            unauthenticated_limit: None,
        };
        let layer = AuthenticateLayer::new(
            &config,
            verifier,
            CallerKey(crate::http::guard::client_ip::ClientAddr::new(&[], 64)),
            1000,
        );
        let service = layer.layer(tower::service_fn(|req: Request<Body>| async move {
            assert!(
                req.extensions().get::<Caller>().is_some(),
                "the caller is left for the handler"
            );
            Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
        }));
        let mut req = Request::new(Body::empty());
        if let Some(v) = authorization {
            req.headers_mut()
                .insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        let recorded = Recorded(Default::default(), SpanContext::empty_context());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let status = {
            let _attached = opentelemetry::Context::new()
                .with_span(recorded.clone())
                .attach();
            runtime.block_on(service.oneshot(req)).unwrap().status()
        };
        let fields = recorded.0.lock().unwrap().clone();
        (status, fields)
    }

    const SECRET: &str = "a-span-test-secret-of-32-bytes-or-more";

    #[test]
    fn spans_say_whether_the_caller_was_authenticated_and_name_it_only_when_allowed() {
        let jwt = || {
            AuthMode::Jwt(crate::config::JwtConfig {
                secret: None,
                jwks: None,
                jwks_refresh: std::time::Duration::from_secs(300),
                audience: None,
                issuer: None,
            })
        };
        let token = crate::auth::mint_hs256(
            SECRET.as_bytes(),
            &crate::auth::Mint {
                sub: "alice",
                scope: "todos:read",
                aud: None,
                iss: None,
            },
            std::time::Duration::from_secs(60),
        )
        .unwrap();
        let bearer = format!("Bearer {token}");
        let field = |name: &str, value: &str| (name.to_owned(), value.to_owned());
        assert_eq!(
            authenticate(jwt(), false, Some(&bearer)),
            (StatusCode::OK, vec![field("todo.authenticated", "true")])
        );
        assert_eq!(
            authenticate(jwt(), true, Some(&bearer)),
            (
                StatusCode::OK,
                vec![
                    field("todo.authenticated", "true"),
                    field("user.id", "alice")
                ]
            )
        );
        assert_eq!(
            authenticate(jwt(), true, Some("Bearer forged")),
            (
                StatusCode::UNAUTHORIZED,
                vec![field("todo.authenticated", "false")]
            )
        );
        assert_eq!(
            authenticate(AuthMode::None { explicit: false }, true, None),
            (StatusCode::OK, vec![field("todo.authenticated", "false")])
        );
    }

    #[test]
    fn reads_need_the_read_scope_and_everything_else_the_write_scope() {
        assert_eq!(scope_for(&Method::GET), READ_SCOPE);
        assert_eq!(scope_for(&Method::HEAD), READ_SCOPE);
        for m in [
            Method::POST,
            Method::PATCH,
            Method::DELETE,
            Method::PUT,
            Method::OPTIONS,
        ] {
            assert_eq!(scope_for(&m), WRITE_SCOPE);
        }
    }
}
