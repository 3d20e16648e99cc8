//! Compression of the data routes' answers for clients that ask (`Accept-Encoding`): zstd, br or
//! gzip, by tower-http's layer, only where it pays.
//!
//! Where it pays: a body of at least [`MIN_BYTES`] (smaller ones fit one TCP segment either way,
//! and the compressor's set-up then costs more than the bytes it saves: loadtest/RESULTS.md has
//! the figures), and never one sent with a strong `ETag` (a single todo's, which names one
//! sequence of bytes: compressing would give two representations one strong tag; those bodies
//! are a few hundred bytes anyway). The level is fixed low ([`LEVEL`]). Only the data routes
//! compress: they are rate-limited and admitted, while the docs' assets (a megabyte of
//! JavaScript) would let anyone buy CPU for free.
//!
//! Our own service around tower-http's for two reasons. A client that refuses every coding we
//! have (`Accept-Encoding: identity;q=0`) is answered `406` by tower-http *after* the handler ran,
//! so a `POST` would create a todo and report failure; here the request is refused before
//! anything is done, as a problem. And a client that does not ask (no `Accept-Encoding`) is
//! served without tower-http at all: nothing is wrapped or boxed, the answer only gains `Vary`.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use axum::body::HttpBody;
use axum::{
    body::Body,
    extract::Request,
    http::{HeaderMap, HeaderValue, Response, StatusCode, header},
    response::IntoResponse as _,
};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tower_http::compression::{
    Compression, CompressionLevel, ResponseFuture as CompressionFuture, predicate::Predicate,
};

use super::problem::{ApiError, code::Code};

/// Bodies smaller than this go as they are: with its headers such an answer fits one 1460-byte
/// TCP segment uncompressed, so compressing it saves no packet and still costs the compressor's
/// set-up, which is most of the work at that size (loadtest/RESULTS.md#compression).
pub(super) const MIN_BYTES: u64 = 1024;

/// One level for every coding, each on its own scale: at level 1 gzip, brotli and zstd already
/// compress a page of 100 todos more than 4×, and higher levels cost about twice the CPU for a
/// few percent fewer bytes (loadtest/RESULTS.md#compression). CPU is what this service runs out
/// of first.
const LEVEL: CompressionLevel = CompressionLevel::Precise(1);

/// Compresses what its routes answer (see the module doc).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct CompressLayer;

impl<S> Layer<S> for CompressLayer {
    type Service = Compress<S>;

    fn layer(&self, inner: S) -> Compress<S> {
        Compress {
            inner: Compression::new(inner)
                .quality(LEVEL)
                .compress_when(Worthwhile),
        }
    }
}

/// The service of [`CompressLayer`].
#[derive(Clone)]
pub(super) struct Compress<S> {
    inner: Compression<S, Worthwhile>,
}

impl<S> Service<Request> for Compress<S>
where
    S: Service<Request, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = CompressFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let state = if !req.headers().contains_key(header::ACCEPT_ENCODING) {
            State::Plain {
                inner: self.inner.get_mut().call(req),
            }
        } else if refuses_every_coding(req.headers()) {
            State::Refused {
                answer: Some(not_acceptable()),
            }
        } else {
            State::Compressed {
                inner: self.inner.call(req),
            }
        };
        CompressFuture { state }
    }
}

pin_project! {
    /// The future of [`Compress`].
    pub(super) struct CompressFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // No Accept-Encoding: the answer as it is.
        Plain { #[pin] inner: F },
        Compressed { #[pin] inner: CompressionFuture<F, Worthwhile> },
        Refused { answer: Option<Response<Body>> },
    }
}

impl<F> Future for CompressFuture<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(match self.project().state.project() {
            StateProj::Plain { inner } => {
                let Ok(mut res) = ready!(inner.poll(cx));
                // The same URL answers compressed to a client that asks: caches must know.
                if Worthwhile.should_compress(&res) {
                    res.headers_mut()
                        .append(header::VARY, HeaderValue::from_static("accept-encoding"));
                }
                res
            }
            StateProj::Compressed { inner } => {
                let Ok(res) = ready!(inner.poll(cx));
                res.map(Body::new)
            }
            StateProj::Refused { answer } => answer.take().expect("polled after completion"),
        }))
    }
}

/// Whether a response is worth compressing (see the module doc).
#[derive(Clone, Copy, Debug)]
pub(super) struct Worthwhile;

impl Predicate for Worthwhile {
    fn should_compress<B: HttpBody>(&self, res: &Response<B>) -> bool {
        let big = res
            .body()
            .size_hint()
            .exact()
            .is_none_or(|n| n >= MIN_BYTES);
        // Most answers are small: the tag is looked up only for the others.
        big && res
            .headers()
            .get(header::ETAG)
            .is_none_or(|tag| tag.as_bytes().starts_with(b"W/"))
    }
}

/// Whether tower-http would find no coding the client accepts, identity included, and so answer
/// 406 after the handler ran. Asked of tower-http itself, on a copy of the header and an empty
/// answer, so that the two can never disagree; only when some quality is zero, the one way to
/// refuse a coding.
fn refuses_every_coding(headers: &HeaderMap) -> bool {
    let values = headers.get_all(header::ACCEPT_ENCODING);
    if !values
        .iter()
        .any(|v| v.as_bytes().windows(2).any(|w| w == b"=0"))
    {
        return false;
    }
    let mut probe = Request::new(Body::empty());
    for value in values {
        probe
            .headers_mut()
            .append(header::ACCEPT_ENCODING, value.clone());
    }
    let empty =
        tower::service_fn(|_: Request| async { Ok::<_, Infallible>(Response::new(Body::empty())) });
    let answer = Compression::new(empty).call(probe);
    let mut answer = std::pin::pin!(answer);
    match answer
        .as_mut()
        .poll(&mut Context::from_waker(std::task::Waker::noop()))
    {
        Poll::Ready(Ok(res)) => res.status() == StatusCode::NOT_ACCEPTABLE,
        Poll::Pending => false,
    }
}

/// The answer to a client that accepts no coding we have, not even none.
fn not_acceptable() -> Response<Body> {
    ApiError::new(
        StatusCode::NOT_ACCEPTABLE,
        Code::NotAcceptable,
        "Not acceptable",
        "Accept-Encoding refuses every coding this service has: identity, gzip, br and zstd",
    )
    .with_hint("Accept at least one of them (or send no Accept-Encoding).")
    .into_response()
}
