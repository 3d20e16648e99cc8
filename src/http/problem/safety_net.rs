//! The safety net behind the rule "every error is a problem", in one layer: a panicking handler
//! or layer becomes a logged `500` problem instead of a dropped connection, and an error answer
//! that is not yet `application/problem+json` (a library's own, such as the docs UI's asset
//! handler or the request timeout's `504`) is rewritten into one.
//!
//! Written here rather than tower-http's `CatchPanicLayer` plus a `then` step: `CatchPanicLayer`
//! boxes every response body (its `UnsyncBoxBody`, then boxed again into axum's `Body`), two
//! allocations per answer that only a panic needs; here the inner future is polled under
//! `catch_unwind` in place, and only the rare rewrite allocates. The cost of each layer is in
//! loadtest/RESULTS.md#layer-costs.

use std::{
    any::Any,
    convert::Infallible,
    future::Future,
    panic::{AssertUnwindSafe, catch_unwind},
    pin::Pin,
    task::{Context, Poll},
};

use axum::{
    body::Body,
    extract::Request,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::{ApiError, PROBLEM_JSON, code::Code};

/// See the module doc.
#[derive(Clone, Copy, Debug, Default)]
pub struct SafetyNetLayer;

impl<S> Layer<S> for SafetyNetLayer {
    type Service = SafetyNet<S>;

    fn layer(&self, inner: S) -> SafetyNet<S> {
        SafetyNet { inner }
    }
}

/// The service of [`SafetyNetLayer`].
#[derive(Clone, Debug)]
pub struct SafetyNet<S> {
    inner: S,
}

impl<S> Service<Request> for SafetyNet<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = SafetyNetFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        match catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(inner) => SafetyNetFuture::Running { inner },
            Err(panic) => SafetyNetFuture::Answered {
                res: Some(panic_response(panic)),
            },
        }
    }
}

pin_project! {
    /// The inner service's answer, checked; the rewrite of one that is not a problem; or the
    /// answer to a panic.
    #[project = SafetyNetProj]
    pub enum SafetyNetFuture<F> {
        Running { #[pin] inner: F },
        Rewriting { rewrite: Pin<Box<dyn Future<Output = Response> + Send>> },
        Answered { res: Option<Response> },
    }
}

impl<F> Future for SafetyNetFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res = match self.as_mut().project() {
            SafetyNetProj::Running { inner } => {
                // After a panic the inner future is never polled again: it is dropped with this
                // one, and the answer is the 500.
                match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(Ok(res))) => res,
                    Err(panic) => return Poll::Ready(Ok(panic_response(panic))),
                }
            }
            SafetyNetProj::Rewriting { rewrite } => return rewrite.as_mut().poll(cx).map(Ok),
            SafetyNetProj::Answered { res } => {
                return Poll::Ready(Ok(res.take().expect("polled after completion")));
            }
        };
        if !needs_rewrite(&res) {
            return Poll::Ready(Ok(res));
        }
        self.set(SafetyNetFuture::Rewriting {
            rewrite: Box::pin(rewrite(res)),
        });
        self.poll(cx)
    }
}

/// An error answer that is not already a problem.
fn needs_rewrite(res: &Response) -> bool {
    let status = res.status();
    let is_problem = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    (status.is_client_error() || status.is_server_error()) && !is_problem
}

/// The problem for an error answer that was not one, keeping its status, headers and short text
/// as the detail.
async fn rewrite(res: Response) -> Response {
    let status = res.status();
    let (mut parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .filter(|t| {
            !t.trim().is_empty()
                && parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .is_none_or(|v| v.as_bytes().starts_with(b"text/plain"))
        });
    let title = status.canonical_reason().unwrap_or("Error");
    let detail = text.unwrap_or_else(|| title.to_lowercase());
    let problem = ApiError::new(status, Code::for_status(status.as_u16()), title, detail);
    let new = problem.into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in new.headers() {
        parts.headers.insert(name.clone(), value.clone());
    }
    Response::from_parts(parts, Body::new(new.into_body()))
}

/// The 500 a panic becomes, logged with the panic's message (never returned to the client).
fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into());
    tracing::error!(panic = %message, "handler panicked");
    let mut res = ApiError::unexpected().into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use tower::{ServiceExt as _, service_fn};

    use super::*;

    async fn answer(
        svc: impl Service<Request, Response = Response, Error = Infallible>,
    ) -> Response {
        SafetyNetLayer
            .layer(svc)
            .oneshot(Request::new(Body::empty()))
            .await
            .unwrap()
    }

    async fn problem(res: Response) -> serde_json::Value {
        assert_eq!(res.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let body = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn a_handler_that_panics_while_polled_is_a_500_problem_not_a_dropped_connection() {
        let res = answer(service_fn(|_: Request| async {
            tokio::task::yield_now().await;
            panic!("boom at an await");
            #[allow(unreachable_code)]
            Ok::<Response, Infallible>(Response::new(Body::empty()))
        }))
        .await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
        let body = problem(res).await;
        assert_eq!(body["code"], "internal_error");
        assert!(
            !body.to_string().contains("boom"),
            "the panic stays in the log: {body}"
        );
    }

    #[tokio::test]
    async fn a_service_that_panics_when_called_is_a_500_problem() {
        let res = answer(service_fn(
            |_: Request| -> std::future::Ready<Result<Response, Infallible>> {
                panic!("boom in call")
            },
        ))
        .await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(problem(res).await["code"], "internal_error");
    }

    #[tokio::test]
    async fn a_plain_text_error_is_rewritten_keeping_its_status_headers_and_text() {
        let res = answer(service_fn(|_: Request| async {
            let mut res = (StatusCode::NOT_FOUND, "no such asset").into_response();
            res.headers_mut()
                .insert("x-kept", HeaderValue::from_static("yes"));
            Ok::<_, Infallible>(res)
        }))
        .await;
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        assert_eq!(res.headers()["x-kept"], "yes");
        let body = problem(res).await;
        assert_eq!(body["detail"], "no such asset");
    }

    #[tokio::test]
    async fn answers_that_are_not_errors_or_already_problems_pass_unchanged() {
        let ok = answer(service_fn(|_: Request| async {
            Ok::<_, Infallible>((StatusCode::OK, "fine").into_response())
        }))
        .await;
        assert_eq!(
            ok.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        let already = answer(service_fn(|_: Request| async {
            Ok::<_, Infallible>(ApiError::unexpected().into_response())
        }))
        .await;
        assert_eq!(problem(already).await["code"], "internal_error");
    }
}
