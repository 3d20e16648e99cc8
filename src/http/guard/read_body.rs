//! Reads a data request's body whole, under a deadline, *before* the request is admitted, so that
//! a client who sends its body slowly holds a connection but never one of the `MAX_IN_FLIGHT`
//! slots.
//!
//! Before this layer, handlers read bodies in their slots. 300 connections that sent a
//! `POST /todos` head and then one body byte every 5 s held the slots until `REQUEST_TIMEOUT`, and
//! for those 10 s 39 % of another client's `GET /todos` were refused. Now such a body must arrive
//! whole within `HTTP_BODY_READ_TIMEOUT`, or the client gets `408 request_timeout` and the
//! connection is closed. A body larger than `MAX_BODY_BYTES` is refused with 413 as soon as the
//! limit is passed (at once when `Content-Length` says so), without being buffered whole. A
//! request without a body passes straight through.
//!
//! tower-http's `RequestBodyTimeoutLayer` does not fit: its timer restarts with every frame, so a
//! body trickled a byte at a time never times out. The deadline here is for the whole body.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, HttpBody as _},
    http::{HeaderValue, Request, Response, header},
    response::IntoResponse,
};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use pin_project_lite::pin_project;
use tower::{Layer, Service, ServiceExt as _};

use super::BoxedResponse;
use crate::http::problem::ApiError;

/// How bodies are read.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body (`MAX_BODY_BYTES`).
    pub max_bytes: usize,
    /// The whole body must arrive within this (`HTTP_BODY_READ_TIMEOUT`).
    pub deadline: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct ReadBodyLayer(pub BodyLimits);

impl<S> Layer<S> for ReadBodyLayer {
    type Service = ReadBody<S>;

    fn layer(&self, inner: S) -> ReadBody<S> {
        ReadBody {
            inner,
            limits: self.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReadBody<S> {
    inner: S,
    limits: BodyLimits,
}

impl<S> Service<Request<Body>> for ReadBody<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ReadBodyFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // Most data requests (GET, DELETE) have no body: straight on, with no allocation.
        if req.body().is_end_stream() {
            return ReadBodyFuture::Passed {
                inner: self.inner.call(req),
            };
        }
        // The ready service goes with the read; its clone stays, to be driven ready next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let limits = self.limits;
        ReadBodyFuture::Reading {
            read: Box::pin(async move {
                match read(req, limits).await {
                    Ok(req) => inner.oneshot(req).await,
                    Err(refusal) => Ok(refusal),
                }
            }),
        }
    }
}

pin_project! {
    /// A request without a body, passed on; or one whose body is being read first.
    #[project = ReadBodyProj]
    pub enum ReadBodyFuture<F, E> {
        Passed { #[pin] inner: F },
        Reading { read: BoxedResponse<E> },
    }
}

impl<F, E> Future for ReadBodyFuture<F, E>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ReadBodyProj::Passed { inner } => inner.poll(cx),
            ReadBodyProj::Reading { read } => read.as_mut().poll(cx),
        }
    }
}

/// The request with its body in memory, or the answer that refuses it.
async fn read(req: Request<Body>, limits: BodyLimits) -> Result<Request<Body>, Response<Body>> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        return Err(ApiError::payload_too_large().into_response());
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(limits.deadline, whole(body, limits.max_bytes)).await {
        Ok(Ok(body)) => Ok(Request::from_parts(parts, Body::from(body))),
        Ok(Err(Unread::TooLarge)) => Err(ApiError::payload_too_large().into_response()),
        // The client broke off (or sent a malformed chunked body): there is nobody to answer
        // reliably, but hyper writes what it can.
        Ok(Err(Unread::Broken(e))) => {
            Err(ApiError::unreadable_body(&e.to_string()).into_response())
        }
        Err(_) => {
            let mut res = ApiError::body_too_slow(limits.deadline).into_response();
            // The rest of the body is still on its way: the connection cannot carry another
            // request. Closed lingering (see server/linger.rs), so the client reads this answer.
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(res)
        }
    }
}

/// Why a body was not read whole.
enum Unread {
    /// More than `MAX_BODY_BYTES` arrived.
    TooLarge,
    Broken(axum::Error),
}

/// The body's bytes, at most `max` of them. The usual body arrives in one frame, which is passed
/// on as it came; only a body in several frames is copied into one buffer. Written here rather
/// than with http-body-util's `Limited` and `Collect`, which queue every frame and then copy them
/// out: ~1.5k instructions of a POST that this does not spend (loadtest/RESULTS.md#layer-costs).
async fn whole(mut body: Body, max: usize) -> Result<Bytes, Unread> {
    let mut first = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        // Trailers carry nothing a handler reads.
        let Ok(data) = frame.map_err(Unread::Broken)?.into_data() else {
            continue;
        };
        let so_far = joined.as_ref().map_or(first.len(), BytesMut::len);
        if so_far + data.len() > max {
            return Err(Unread::TooLarge);
        }
        match &mut joined {
            Some(buf) => buf.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut buf = BytesMut::with_capacity(so_far + data.len());
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
        }
    }
    Ok(joined.map_or(first, BytesMut::freeze))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::problem::{ProblemCode, code::Code};
    use axum::{body::Bytes, http::StatusCode};
    use std::convert::Infallible;

    const LIMITS: BodyLimits = BodyLimits {
        max_bytes: 16,
        deadline: Duration::from_secs(2),
    };

    /// Echoes the body's length, proving what reached the handler.
    fn echo_len() -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Future + Send,
    > + Clone {
        tower::service_fn(|req: Request<Body>| async move {
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            Ok::<_, Infallible>(Response::new(Body::from(bytes.len().to_string())))
        })
    }

    fn code(res: &Response<Body>) -> Code {
        res.extensions().get::<ProblemCode>().unwrap().0
    }

    /// A body that sends one byte, then nothing more until long after any deadline.
    fn trickle() -> Body {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1);
        tokio::spawn(async move {
            let _ = tx.send(Ok(Bytes::from_static(b"{"))).await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(tx);
        });
        Body::from_stream(tokio_stream_from(rx))
    }

    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, Infallible>>,
    ) -> impl futures::Stream<Item = Result<Bytes, Infallible>> {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test]
    async fn a_whole_body_reaches_the_service_and_no_body_passes_through() {
        let svc = ReadBodyLayer(LIMITS).layer(echo_len());
        let res = svc
            .clone()
            .oneshot(Request::new(Body::from("{\"title\":\"x\"}")))
            .await
            .unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"13");
        let res = svc.oneshot(Request::new(Body::empty())).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"0");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413_whether_declared_or_streamed() {
        let svc = ReadBodyLayer(LIMITS).layer(echo_len());
        let declared = Request::builder()
            .header(header::CONTENT_LENGTH, "1000000")
            .body(trickle())
            .unwrap();
        let res = svc.clone().oneshot(declared).await.unwrap();
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(code(&res), Code::PayloadTooLarge);
        let streamed = Request::new(Body::from(vec![b'x'; 17]));
        let res = svc.oneshot(streamed).await.unwrap();
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_trickled_past_the_deadline_is_408_and_closes_the_connection() {
        let svc = ReadBodyLayer(LIMITS).layer(echo_len());
        let started = tokio::time::Instant::now();
        let res = svc.oneshot(Request::new(trickle())).await.unwrap();
        assert_eq!(started.elapsed(), LIMITS.deadline);
        assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(code(&res), Code::RequestTimeout);
        assert_eq!(res.headers()[header::CONNECTION], "close");
    }

    /// A body in several frames reaches the service whole and in order; one whose frames add
    /// up past the limit is refused, though no frame alone is over it.
    #[tokio::test]
    async fn a_body_in_several_frames_is_joined_and_its_total_is_what_is_limited() {
        let frames = |parts: &'static [&'static [u8]]| {
            Body::from_stream(futures::stream::iter(
                parts
                    .iter()
                    .map(|p| Ok::<_, Infallible>(Bytes::from_static(p))),
            ))
        };
        let seen = tower::service_fn(|req: Request<Body>| async move {
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            Ok::<_, Infallible>(Response::new(Body::from(bytes)))
        });
        let svc = ReadBodyLayer(LIMITS).layer(seen);
        let res = svc
            .clone()
            .oneshot(Request::new(frames(&[b"{\"ti", b"", b"tle\":", b"\"x\"}"])))
            .await
            .unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"title\":\"x\"}");
        let res = svc
            .oneshot(Request::new(frames(&[b"0123456789", b"0123456"])))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
