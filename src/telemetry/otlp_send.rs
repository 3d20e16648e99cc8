//! Delivers one encoded OTLP export request to the collector, over gRPC or http/protobuf, retrying
//! it as the OTLP specification asks.
//!
//! `otlp_spans` writes the protobuf itself, so it cannot use opentelemetry-otlp's clients: they
//! take the SDK's data and convert it on their own. This module is the transport those clients
//! would have been, kept to the same behaviour:
//!
//! - **gRPC**: `TraceService/Export` through tonic's generic client on the `Channel` the caller
//!   built (pinned address, TLS, timeout), with a codec that passes the encoded bytes through
//!   (tonic's stock codec would want prost structs). Created on the service's runtime, which
//!   drives the channel, while the batch processor's thread waits on the answer.
//! - **http/protobuf**: a POST to `/v1/traces` on the shared blocking reqwest client.
//! - `OTEL_EXPORTER_OTLP_HEADERS` on every request: metadata for gRPC, headers for HTTP.
//! - **Retries** (OTLP's "Failures" rules, as opentelemetry-otlp's `RetryPolicy::recommended`):
//!   up to 3 more attempts, 100 ms doubling to at most 1.6 s apart plus up to 100 ms of jitter,
//!   all within one deadline (`EXPORT_TIMEOUT`) that also bounds each attempt. Retried: HTTP 429,
//!   502, 503, 504 and no answer; gRPC UNAVAILABLE, CANCELLED, DEADLINE_EXCEEDED, ABORTED,
//!   OUT_OF_RANGE, DATA_LOSS, and RESOURCE_EXHAUSTED only when the collector says when to come
//!   back. A collector's wait (`Retry-After` seconds, gRPC `RetryInfo`) is honoured when it fits
//!   in the deadline; when it does not, the batch is given up at once, not slept on.
//!
//! The loop is written here rather than taken from a crate: it runs on the batch processor's own
//! thread under a plain `block_on`, where no tokio timer exists, so it sleeps the thread; and its
//! decisions are OTLP's, which no retry crate encodes. The collector's `RetryInfo` is read with
//! tonic-types, as opentelemetry-otlp reads it.

use std::time::{Duration, Instant};

use bytes::{Buf as _, BufMut as _, Bytes};
use http::uri::PathAndQuery;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::MetadataMap,
    transport::Channel,
};
use tonic_types::StatusExt as _;

use crate::config::ExportHeaders;

/// Attempts after the first.
const MAX_RETRIES: u32 = 3;
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_millis(1600);
const MAX_JITTER_MS: u64 = 100;
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Where an export goes (see the module doc).
#[derive(Debug)]
pub(super) struct Sender {
    transport: Transport,
    /// All attempts of one export, and the sleeps between them, end within this.
    deadline: Duration,
}

enum Transport {
    Grpc {
        client: tonic::client::Grpc<Channel>,
        metadata: MetadataMap,
    },
    Http {
        client: reqwest::blocking::Client,
        /// The collector's `/v1/traces`.
        url: String,
        headers: ExportHeaders,
    },
}

/// The headers' values are secrets (an ingestion key): only their names are shown.
impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Grpc { metadata, .. } => f
                .debug_struct("Grpc")
                .field("metadata", &metadata.keys().collect::<Vec<_>>())
                .finish_non_exhaustive(),
            Transport::Http { url, headers, .. } => f
                .debug_struct("Http")
                .field("url", url)
                .field("headers", headers)
                .finish_non_exhaustive(),
        }
    }
}

/// How a failed attempt is treated.
#[derive(Debug, PartialEq)]
enum ExportFailure {
    /// Not retried: the batch is lost.
    Final(String),
    /// Retried after the backoff.
    Retry(String),
    /// Retried after at least the collector's wait.
    RetryAfter(Duration, String),
}

impl Sender {
    /// Over gRPC on `channel` (lazy; built on the service's runtime).
    pub(super) fn grpc(channel: Channel, headers: &ExportHeaders, deadline: Duration) -> Self {
        let mut map = http::HeaderMap::new();
        for (name, value) in &headers.0 {
            map.append(name.clone(), value.clone());
        }
        Sender {
            transport: Transport::Grpc {
                client: tonic::client::Grpc::new(channel),
                metadata: MetadataMap::from_headers(map),
            },
            deadline,
        }
    }

    /// Over http/protobuf to `url` (the collector's `/v1/traces`).
    pub(super) fn http(
        client: reqwest::blocking::Client,
        url: String,
        headers: ExportHeaders,
        deadline: Duration,
    ) -> Self {
        Sender {
            transport: Transport::Http {
                client,
                url,
                headers,
            },
            deadline,
        }
    }

    /// Sends `body` (an encoded `ExportTraceServiceRequest`), retrying as the module doc says.
    pub(super) async fn send(&self, body: Bytes) -> OTelSdkResult {
        let start = Instant::now();
        let mut delay = FIRST_DELAY;
        let mut attempt = 0;
        loop {
            let remaining = self.deadline.saturating_sub(start.elapsed());
            let failure = match self.attempt(body.clone(), remaining).await {
                Ok(()) => return Ok(()),
                Err(failure) => failure,
            };
            let (wait, why) = match failure {
                ExportFailure::Final(why) => return Err(OTelSdkError::InternalFailure(why)),
                ExportFailure::Retry(why) => (delay + jitter(), why),
                ExportFailure::RetryAfter(wait, why) => (wait.max(delay) + jitter(), why),
            };
            let remaining = self.deadline.saturating_sub(start.elapsed());
            if attempt == MAX_RETRIES || wait >= remaining {
                return Err(OTelSdkError::InternalFailure(format!(
                    "{why} (given up after {} attempts in {} ms)",
                    attempt + 1,
                    start.elapsed().as_millis()
                )));
            }
            std::thread::sleep(wait);
            attempt += 1;
            delay = (delay * 2).min(MAX_DELAY);
        }
    }

    async fn attempt(&self, body: Bytes, timeout: Duration) -> Result<(), ExportFailure> {
        match &self.transport {
            Transport::Grpc { client, metadata } => {
                let mut client = client.clone();
                let mut request = tonic::Request::from_parts(
                    metadata.clone(),
                    tonic::Extensions::default(),
                    body,
                );
                request.set_timeout(timeout);
                client
                    .ready()
                    .await
                    .map_err(|e| ExportFailure::Retry(format!("span export failed: {e}")))?;
                let path = PathAndQuery::from_static(EXPORT_PATH);
                match client.unary(request, path, RawCodec).await {
                    Ok(_) => Ok(()),
                    Err(status) => Err(classify_grpc(&status)),
                }
            }
            Transport::Http {
                client,
                url,
                headers,
            } => {
                let mut request = client
                    .post(url)
                    .timeout(timeout)
                    .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(body);
                for (name, value) in &headers.0 {
                    request = request.header(name, value);
                }
                // The batch processor runs exports on its own thread, so a blocking call is what
                // it expects (opentelemetry-otlp's blocking client does the same).
                let response = request
                    .send()
                    .map_err(|e| ExportFailure::Retry(format!("span export failed: {e}")))?;
                let status = response.status();
                if status.is_success() {
                    return Ok(());
                }
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                Err(classify_http(status.as_u16(), retry_after))
            }
        }
    }
}

fn jitter() -> Duration {
    Duration::from_millis(rand::random_range(0..=MAX_JITTER_MS))
}

fn classify_http(status: u16, retry_after: Option<Duration>) -> ExportFailure {
    let why = format!("the collector refused the spans: HTTP {status}");
    match (status, retry_after) {
        (429 | 503, Some(wait)) => ExportFailure::RetryAfter(wait, why),
        (429 | 502 | 503 | 504, _) => ExportFailure::Retry(why),
        _ => ExportFailure::Final(why),
    }
}

fn classify_grpc(status: &Status) -> ExportFailure {
    let why = format!(
        "the collector refused the spans: gRPC {:?}: {}",
        status.code(),
        status.message()
    );
    let wait = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay);
    match (status.code(), wait) {
        (Code::ResourceExhausted | Code::Unavailable, Some(wait)) => {
            ExportFailure::RetryAfter(wait, why)
        }
        (
            Code::Unavailable
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::OutOfRange
            | Code::DataLoss,
            _,
        ) => ExportFailure::Retry(why),
        _ => ExportFailure::Final(why),
    }
}

/// A gRPC codec that sends bytes already encoded and ignores the answer's body: the
/// `ExportTraceServiceResponse` only reports a partial success, which the stock exporter logs and
/// does not retry either.
#[derive(Clone, Copy)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{
            Arc, Mutex,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use http::{HeaderName, HeaderValue};
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    };
    use prost::Message as _;
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    use tonic_types::{ErrorDetails, StatusExt as _};

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(3);

    fn key_header() -> ExportHeaders {
        ExportHeaders(vec![(
            HeaderName::from_static("signoz-ingestion-key"),
            HeaderValue::from_static("k-1"),
        )])
    }

    /// A request with one span in it, as bytes and as the message.
    fn request() -> (Bytes, ExportTraceServiceRequest) {
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
        let message = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        name: "GET /todos/{id}".into(),
                        trace_id: vec![7; 16],
                        span_id: vec![9; 8],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        (message.encode_to_vec().into(), message)
    }

    /// Runs `send` on a thread of its own under a plain `block_on`, as the batch processor does.
    async fn send_from_a_plain_thread(
        sender: Arc<Sender>,
        body: Bytes,
    ) -> (OTelSdkResult, Duration) {
        // A std thread, not tokio's blocking pool: the batch processor's thread has no runtime
        // context, and the gRPC path must work without one.
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let result = futures::executor::block_on(sender.send(body));
            (result, start.elapsed())
        });
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap()
    }

    #[test]
    fn failures_are_retried_as_otlp_says() {
        assert_eq!(
            classify_http(503, Some(Duration::from_secs(2))),
            ExportFailure::RetryAfter(
                Duration::from_secs(2),
                "the collector refused the spans: HTTP 503".into()
            )
        );
        for status in [429, 502, 503, 504] {
            assert!(
                matches!(classify_http(status, None), ExportFailure::Retry(_)),
                "{status}"
            );
        }
        for status in [400, 401, 403, 404, 413, 500] {
            assert!(
                matches!(classify_http(status, None), ExportFailure::Final(_)),
                "{status}"
            );
        }
        for code in [
            Code::Unavailable,
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Aborted,
        ] {
            assert!(
                matches!(
                    classify_grpc(&Status::new(code, "x")),
                    ExportFailure::Retry(_)
                ),
                "{code:?}"
            );
        }
        for code in [
            Code::ResourceExhausted,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::Internal,
        ] {
            assert!(
                matches!(
                    classify_grpc(&Status::new(code, "x")),
                    ExportFailure::Final(_)
                ),
                "{code:?}"
            );
        }
        let throttled = Status::with_error_details(
            Code::ResourceExhausted,
            "slow down",
            ErrorDetails::with_retry_info(Some(Duration::from_millis(1500))),
        );
        assert!(matches!(
            classify_grpc(&throttled),
            ExportFailure::RetryAfter(wait, _) if wait == Duration::from_millis(1500)
        ));
    }

    /// An OTLP/HTTP collector that answers the first `refusals` posts with `refusal` (a status
    /// line's code and reason, and a `Retry-After`), then 200; it counts posts and keeps the last
    /// body and the key header. Plain HTTP/1.1 over a socket: this layer knows no HTTP framework.
    async fn http_collector(
        refusals: usize,
        refusal: (&'static str, Option<&'static str>),
    ) -> (
        SocketAddr,
        Arc<AtomicUsize>,
        Arc<Mutex<Option<(Bytes, String)>>>,
    ) {
        let posts = Arc::new(AtomicUsize::new(0));
        let last = Arc::new(Mutex::new(None));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (counter, keep) = (Arc::clone(&posts), Arc::clone(&last));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (counter, keep) = (Arc::clone(&counter), Arc::clone(&keep));
                tokio::spawn(async move {
                    let mut stream = tokio::io::BufReader::new(stream);
                    loop {
                        let (mut length, mut key) = (0, String::new());
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let header = line.trim_end().to_ascii_lowercase();
                            if header.is_empty() {
                                break;
                            }
                            if let Some(v) = header.strip_prefix("content-length:") {
                                length = v.trim().parse().unwrap();
                            }
                            if let Some(v) = header.strip_prefix("signoz-ingestion-key:") {
                                key = v.trim().to_owned();
                            }
                        }
                        let mut body = vec![0; length];
                        stream.read_exact(&mut body).await.unwrap();
                        let n = counter.fetch_add(1, Ordering::SeqCst);
                        *keep.lock().unwrap() = Some((Bytes::from(body), key));
                        let answer = match refusal {
                            _ if n >= refusals => "200 OK\r\n".to_owned(),
                            (status, None) => format!("{status}\r\n"),
                            (status, Some(wait)) => format!("{status}\r\nretry-after: {wait}\r\n"),
                        };
                        let answer = format!("HTTP/1.1 {answer}content-length: 0\r\n\r\n");
                        stream.get_mut().write_all(answer.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (addr, posts, last)
    }

    fn http_sender(addr: SocketAddr) -> Arc<Sender> {
        crate::net::install_tls_provider();
        let client = std::thread::spawn(|| {
            reqwest::blocking::Client::builder()
                .timeout(DEADLINE)
                .build()
                .unwrap()
        })
        .join()
        .unwrap();
        Arc::new(Sender::http(
            client,
            format!("http://{addr}/v1/traces"),
            key_header(),
            DEADLINE,
        ))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http_collector_that_is_briefly_unavailable_gets_the_batch_on_a_retry() {
        let (addr, posts, last) = http_collector(2, ("503 Service Unavailable", None)).await;
        let (body, _) = request();
        let (result, took) = send_from_a_plain_thread(http_sender(addr), body.clone()).await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(
            posts.load(Ordering::SeqCst),
            3,
            "two refusals, then delivered"
        );
        // Backoff 100 ms then 200 ms, each with up to 100 ms of jitter.
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert_eq!(
            last.lock().unwrap().clone(),
            Some((body, "k-1".to_owned())),
            "the same bytes and the key on the last attempt"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http_refusal_that_retrying_cannot_mend_loses_the_batch_at_once() {
        let (addr, posts, _) = http_collector(usize::MAX, ("400 Bad Request", None)).await;
        let (result, _) = send_from_a_plain_thread(http_sender(addr), request().0).await;
        let error = result.expect_err("a 400 is final").to_string();
        assert!(error.contains("HTTP 400"), "{error}");
        assert_eq!(posts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retries_stop_at_the_limit_and_never_sleep_past_the_deadline() {
        // Always 503: the first attempt and three retries.
        let (addr, posts, _) = http_collector(usize::MAX, ("503 Service Unavailable", None)).await;
        let (result, took) = send_from_a_plain_thread(http_sender(addr), request().0).await;
        assert!(result.is_err());
        assert_eq!(posts.load(Ordering::SeqCst), 4);
        assert!(took < DEADLINE, "{took:?}");
        // A wait longer than the deadline: given up at once rather than slept on.
        let (addr, posts, _) =
            http_collector(usize::MAX, ("429 Too Many Requests", Some("30"))).await;
        let (result, took) = send_from_a_plain_thread(http_sender(addr), request().0).await;
        assert!(result.is_err());
        assert_eq!(posts.load(Ordering::SeqCst), 1);
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    /// A request as the collector decoded it, and its key.
    type Received = (ExportTraceServiceRequest, Option<String>);

    /// A gRPC TraceService that refuses its first call with `refusal`, then keeps what it gets.
    struct GrpcCollector {
        refusal: Mutex<Option<Status>>,
        got: Arc<Mutex<Vec<Received>>>,
        calls: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl TraceService for GrpcCollector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Some(refusal) = self.refusal.lock().unwrap().take() {
                return Err(refusal);
            }
            let key = request
                .metadata()
                .get("signoz-ingestion-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            self.got.lock().unwrap().push((request.into_inner(), key));
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grpc_sends_the_encoded_bytes_with_the_key_and_retries_unavailable() {
        let got = Arc::default();
        let calls = Arc::default();
        let collector = GrpcCollector {
            refusal: Mutex::new(Some(Status::unavailable("starting"))),
            got: Arc::clone(&got),
            calls: Arc::clone(&calls),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        // Built here, on the runtime, as `telemetry::tracer_provider` builds it.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .timeout(DEADLINE)
            .connect_lazy();
        let sender = Arc::new(Sender::grpc(channel, &key_header(), DEADLINE));
        let shown = format!("{sender:?}");
        assert!(
            shown.contains("signoz-ingestion-key") && !shown.contains("k-1"),
            "{shown}"
        );
        let (body, message) = request();
        let (result, _) = send_from_a_plain_thread(sender, body).await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "refused once, then delivered"
        );
        assert_eq!(
            got.lock().unwrap().clone(),
            vec![(message, Some("k-1".to_owned()))],
            "decoded as the request, with the key as metadata"
        );
    }
}
