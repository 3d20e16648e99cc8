//! Telemetry export, end to end: the real binary exports to a real OTLP gRPC receiver started here,
//! and what arrives is checked — spans (resource, names, kinds, attributes, parent links, DB spans,
//! error status, a rejection by a protective layer), metrics, and log records joined to their
//! trace — after a SIGTERM, which also proves that shutdown flushes. Another test shows an
//! unreachable collector costs requests nothing; the http/protobuf test shows a collector that
//! refuses logs makes the loss visible as a metric.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse,
        logs_service_server::{LogsService, LogsServiceServer},
    },
    collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value as Av},
    metrics::v1::{Metric, metric::Data, number_data_point},
    trace::v1::Span,
};
use serde_json::json;

use crate::helpers::{KillOnDrop, TestDb};

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

impl Receiver {
    /// Every span received so far, across batches and resources.
    fn spans(&self) -> Vec<Span> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| &b.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| ss.spans.iter().cloned())
            .collect()
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[derive(Clone, Default)]
struct MetricsReceiver(Arc<Mutex<Vec<ExportMetricsServiceRequest>>>);

#[tonic::async_trait]
impl MetricsService for MetricsReceiver {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

#[derive(Clone, Default)]
struct LogsReceiver(Arc<Mutex<Vec<ExportLogsServiceRequest>>>);

#[tonic::async_trait]
impl LogsService for LogsReceiver {
    async fn export(
        &self,
        req: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP gRPC collector for traces, metrics and logs on 127.0.0.1:0.
async fn start_receiver() -> (Receiver, MetricsReceiver, LogsReceiver, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::default();
    let metrics = MetricsReceiver::default();
    let logs = LogsReceiver::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .add_service(MetricsServiceServer::new(metrics.clone()))
            .add_service(LogsServiceServer::new(logs.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (receiver, metrics, logs, addr)
}

/// The last exported value of every point of metric `name`, keyed by its attributes.
fn last_points(batches: &[ExportMetricsServiceRequest], name: &str) -> Vec<(Vec<KeyValue>, f64)> {
    let mut out = Vec::new();
    let metrics: Vec<&Metric> = batches
        .iter()
        .flat_map(|b| &b.resource_metrics)
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .filter(|m| m.name == name)
        .collect();
    let Some(last) = metrics.last() else {
        return out;
    };
    let number = |v: &Option<number_data_point::Value>| match v {
        Some(number_data_point::Value::AsInt(i)) => *i as f64,
        Some(number_data_point::Value::AsDouble(d)) => *d,
        None => f64::NAN,
    };
    match &last.data {
        Some(Data::Gauge(g)) => out.extend(
            g.data_points
                .iter()
                .map(|p| (p.attributes.clone(), number(&p.value))),
        ),
        Some(Data::Sum(s)) => out.extend(
            s.data_points
                .iter()
                .map(|p| (p.attributes.clone(), number(&p.value))),
        ),
        Some(Data::Histogram(h)) => out.extend(
            h.data_points
                .iter()
                .map(|p| (p.attributes.clone(), p.count as f64)),
        ),
        other => panic!("{name}: unexpected data {other:?}"),
    }
    out
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Starts the binary; `capture_stdout` pipes its logs (the caller must drain them, or a full pipe
/// would block the service).
fn spawn_service(
    db: &TestDb,
    addr: SocketAddr,
    env: &[(&str, &str)],
    capture_stdout: bool,
) -> KillOnDrop {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_todo-service"));
    cmd.env("DATABASE_URL", db.url().as_str())
        .env("LISTEN_ADDR", addr.to_string())
        .env("ADMIN_LISTEN_ADDR", "127.0.0.1:0")
        .env("SHUTDOWN_TIMEOUT", "2s")
        .env("LOG_LEVEL", "warn")
        .stdout(if capture_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    KillOnDrop(cmd.spawn().unwrap())
}

/// A client over its rate limit is refused cheaply: at the default `LOG_LEVEL=info`, refusals
/// write no log line each (they are counted in the metrics and marked on spans), so an abusive
/// client cannot flood the logs.
#[tokio::test]
async fn rate_limit_refusals_are_not_logged_one_line_each() {
    let db = TestDb::create().await;
    let addr = free_addr();
    let mut child = spawn_service(
        &db,
        addr,
        &[
            ("LOG_LEVEL", "info"),
            ("RATE_LIMIT_PER_SECOND", "1"),
            ("RATE_LIMIT_BURST", "1"),
        ],
        true,
    );
    let logs = drain_stdout(&mut child);
    let client = crate::helpers::http_client().no_proxy().build().unwrap();
    wait_ready(&client, addr).await;
    let mut refused = 0;
    for _ in 0..50 {
        let r = client
            .get(format!("http://{addr}/todos"))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            refused += 1;
        }
    }
    assert!(refused >= 45, "the limit must refuse: {refused} of 50");
    terminate(child).await;
    let logs = logs.join().unwrap();
    let lines = logs.lines().count();
    // Startup and shutdown write a handful of lines; none is about the refusals.
    assert!(
        lines < 15 && !logs.to_lowercase().contains("rate limit"),
        "{refused} refusals, {lines} lines:\n{logs}"
    );
}

/// Reads a service's piped stdout to its end on a thread (so a full pipe never blocks it);
/// join the handle after the service has exited.
fn drain_stdout(child: &mut KillOnDrop) -> std::thread::JoinHandle<String> {
    let mut stdout = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
        text
    })
}

async fn wait_ready(client: &reqwest::Client, addr: SocketAddr) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(r) = client.get(format!("http://{addr}/ready")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("service not ready");
}

async fn terminate(mut child: KillOnDrop) -> Duration {
    let started = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Av> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn s<'a>(attrs: &'a [KeyValue], key: &str) -> &'a str {
    match attr(attrs, key) {
        Some(Av::StringValue(v)) => v,
        other => panic!("{key}: expected a string, got {other:?}"),
    }
}

fn i(attrs: &[KeyValue], key: &str) -> i64 {
    match attr(attrs, key) {
        Some(Av::IntValue(v)) => *v,
        other => panic!("{key}: expected an int, got {other:?}"),
    }
}

const SPAN_KIND_SERVER: i32 = 2;
const SPAN_KIND_CLIENT: i32 = 3;
const STATUS_ERROR: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_reach_an_otlp_collector_with_the_attributes_signoz_needs() {
    let (receiver, metrics, exported_logs, collector) = start_receiver().await;
    let db = TestDb::create().await;
    let addr = free_addr();
    // The database by name, so the DNS-lookup metric has something to count (exactly once).
    let mut by_name = db.url();
    by_name.set_host(Some("localhost")).unwrap();
    // "localhost", not an IP: the service resolves the collector's name once at startup.
    let endpoint = format!("http://localhost:{}", collector.port());
    let mut child = spawn_service(
        &db,
        addr,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
            ("RATE_LIMIT_PER_SECOND", "1"),
            ("RATE_LIMIT_BURST", "6"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
            ("DATABASE_URL", by_name.as_str()),
            ("LOG_FORMAT", "json"),
        ],
        true,
    );
    let logs = drain_stdout(&mut child);
    let client = crate::helpers::http_client().no_proxy().build().unwrap();
    wait_ready(&client, addr).await;
    let base = format!("http://{addr}");

    // A caller that is itself traced: the server span must continue its trace.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let r = client
        .post(format!("{base}/todos"))
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .header("user-agent", "telemetry-test/1")
        .json(&json!({"title": "traced"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_i64()
        .unwrap();
    let r = client
        .get(format!("{base}/todos/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let quoted_trace = r.headers()["x-trace-id"].to_str().unwrap().to_owned();
    assert_eq!(
        client
            .get(format!("{base}/todos/999999"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let mut limited = 0;
    for _ in 0..8 {
        if client
            .get(format!("{base}/todos"))
            .send()
            .await
            .unwrap()
            .status()
            == 429
        {
            limited += 1;
        }
    }
    assert!(limited > 0, "the quota must be exceeded");
    // An unexpected failure: the server span must carry status ERROR.
    let mut conn = db.connect().await;
    sqlx::query("ALTER TABLE todos RENAME COLUMN title TO name")
        .execute(&mut conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        client
            .get(format!("{base}/todos/{id}"))
            .send()
            .await
            .unwrap()
            .status(),
        500
    );

    // Shutdown must flush what is still queued: nothing is asserted before it.
    terminate(child).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = logs.join().unwrap();

    let batches = receiver.0.lock().unwrap().clone();
    let mut spans: Vec<(&[KeyValue], &Span)> = Vec::new();
    for batch in &batches {
        for rs in &batch.resource_spans {
            let res = &rs.resource.as_ref().expect("resource").attributes;
            assert_eq!(s(res, "service.name"), "todo-service");
            assert_eq!(s(res, "service.version"), todo_service::release::RELEASE);
            assert_eq!(s(res, "deployment.environment"), "test");
            for ss in &rs.scope_spans {
                for span in &ss.spans {
                    spans.push((res, span));
                }
            }
        }
    }
    let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    eprintln!(
        "received {} spans in {} batches: {names:?}",
        spans.len(),
        batches.len()
    );
    let known = |n: &str| {
        n.starts_with("GET ")
            || n.starts_with("POST ")
            || n.starts_with("SELECT ")
            || n.starts_with("INSERT ")
            || n.starts_with("PING ")
            || n.starts_with("DELETE ")
    };
    assert!(
        names.iter().all(|n| known(n)),
        "unexpected span names: {names:?}"
    );
    let find = |pred: &dyn Fn(&Span) -> bool| -> Vec<&Span> {
        spans.iter().map(|(_, s)| *s).filter(|s| pred(s)).collect()
    };

    let post = find(&|s| s.name == "POST /todos");
    assert_eq!(post.len(), 1, "{names:?}");
    let post = post[0];
    assert_eq!(post.kind, SPAN_KIND_SERVER);
    assert_eq!(
        hex(&post.trace_id),
        caller_trace,
        "continues the caller's trace"
    );
    assert_eq!(
        hex(&post.parent_span_id),
        caller_span,
        "child of the caller's span"
    );
    let a = &post.attributes;
    assert_eq!(s(a, "http.request.method"), "POST");
    assert_eq!(s(a, "http.route"), "/todos");
    assert_eq!(s(a, "url.path"), "/todos");
    assert_eq!(i(a, "http.response.status_code"), 201);
    assert_eq!(s(a, "client.address"), "127.0.0.1");
    assert_eq!(s(a, "user_agent.original"), "telemetry-test/1");
    assert!(!s(a, "request_id").is_empty());
    // AUTH_MODE=none: said, and no caller named.
    assert_eq!(
        attr(a, "todo.authenticated"),
        Some(&Av::BoolValue(false)),
        "{a:?}"
    );
    assert!(attr(a, "user.id").is_none());

    let insert = find(&|s| s.name == "INSERT todos" && s.parent_span_id == post.span_id);
    assert_eq!(insert.len(), 1, "the INSERT is a child of POST /todos");
    let a = &insert[0].attributes;
    assert_eq!(insert[0].kind, SPAN_KIND_CLIENT);
    assert_eq!(s(a, "db.system"), "postgresql");
    assert_eq!(s(a, "db.namespace"), db.name);
    assert_eq!(s(a, "db.operation.name"), "INSERT");
    assert!(
        s(a, "db.query.text").contains("INSERT INTO todos"),
        "{:?}",
        s(a, "db.query.text")
    );
    assert!(
        !s(a, "db.query.text").contains("traced"),
        "values never appear in the query text"
    );
    assert_eq!(
        s(a, "server.address"),
        "localhost",
        "the host as configured"
    );
    assert_eq!(
        s(a, "network.peer.address"),
        "127.0.0.1",
        "the address pinned at startup"
    );
    assert!(attr(a, "db.client.connection.wait_time_ms").is_some());

    let get = find(&|s| s.name == "GET /todos/{id}" && hex(&s.trace_id) == quoted_trace);
    assert_eq!(get.len(), 1, "x-trace-id names the request's trace");
    let selects = find(&|s| s.name == "SELECT todos" && s.parent_span_id == get[0].span_id);
    assert_eq!(selects.len(), 1);

    let not_found = find(&|s| {
        s.name == "GET /todos/{id}" && i(&s.attributes, "http.response.status_code") == 404
    });
    assert_eq!(not_found.len(), 1);
    assert_ne!(
        not_found[0].status.as_ref().map(|s| s.code),
        Some(STATUS_ERROR),
        "a 404 is not a server error"
    );

    let rejected =
        find(&|s| s.name == "GET /todos" && i(&s.attributes, "http.response.status_code") == 429);
    assert_eq!(rejected.len(), limited);
    assert_eq!(s(&rejected[0].attributes, "todo.rejected_by"), "rate_limit");
    assert_eq!(s(&rejected[0].attributes, "error.type"), "rate_limited");

    let failed = find(&|s| {
        s.name == "GET /todos/{id}" && i(&s.attributes, "http.response.status_code") == 500
    });
    assert_eq!(failed.len(), 1);
    assert_eq!(
        failed[0].status.as_ref().map(|s| s.code),
        Some(STATUS_ERROR)
    );
    // The error is logged once, inside the request, naming the request (id, method, route) and
    // with the ids that join it to this trace — at LOG_LEVEL=warn, where no span is written.
    let error_lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "unexpected error while handling request")
        .collect();
    assert_eq!(error_lines.len(), 1, "logged once: {logs}");
    assert_eq!(
        error_lines[0]["trace_id"],
        hex(&failed[0].trace_id),
        "{}",
        error_lines[0]
    );
    assert_eq!(
        error_lines[0]["span_id"],
        hex(&failed[0].span_id),
        "{}",
        error_lines[0]
    );
    assert_eq!(
        error_lines[0]["request_id"],
        s(&failed[0].attributes, "request_id"),
        "{}",
        error_lines[0]
    );
    assert_eq!(error_lines[0]["http.request.method"], "GET");
    assert_eq!(error_lines[0]["http.route"], "/todos/{id}");
    // The same record went to the collector, stamped with the same trace, under the same
    // resource; the exporters' own chatter never does.
    let batches = exported_logs.0.lock().unwrap().clone();
    let mut records = Vec::new();
    for rl in batches.iter().flat_map(|b| &b.resource_logs) {
        let res = &rl.resource.as_ref().expect("resource").attributes;
        assert_eq!(s(res, "service.name"), "todo-service");
        for sl in &rl.scope_logs {
            records.extend(sl.log_records.iter().cloned());
        }
    }
    let body = |r: &opentelemetry_proto::tonic::logs::v1::LogRecord| match r
        .body
        .as_ref()
        .and_then(|b| b.value.as_ref())
    {
        Some(Av::StringValue(v)) => v.clone(),
        _ => String::new(),
    };
    let exported: Vec<_> = records
        .iter()
        .filter(|r| body(r) == "unexpected error while handling request")
        .collect();
    assert_eq!(exported.len(), 1, "{records:?}");
    assert_eq!(exported[0].severity_text, "ERROR");
    assert_eq!(hex(&exported[0].trace_id), hex(&failed[0].trace_id));
    assert_eq!(hex(&exported[0].span_id), hex(&failed[0].span_id));
    assert!(
        attr(&exported[0].attributes, "error").is_some(),
        "the event's fields are attributes: {:?}",
        exported[0].attributes
    );
    // And the request it was written for, as on stdout: the only join key when a request is not
    // sampled.
    assert_eq!(
        s(&exported[0].attributes, "request_id"),
        s(&failed[0].attributes, "request_id")
    );
    assert_eq!(s(&exported[0].attributes, "http.request.method"), "GET");
    assert_eq!(s(&exported[0].attributes, "http.route"), "/todos/{id}");
    assert!(
        records
            .iter()
            .all(|r| !r.event_name.starts_with("opentelemetry") && !body(r).contains("h2")),
        "{records:?}"
    );
    let failed_db = find(&|s| s.name == "SELECT todos" && s.parent_span_id == failed[0].span_id);
    assert_eq!(
        failed_db[0].status.as_ref().map(|s| s.code),
        Some(STATUS_ERROR)
    );
    assert_eq!(s(&failed_db[0].attributes, "error.type"), "unexpected");

    // Metrics: exported periodically and flushed at shutdown, with the same resource.
    let batches = metrics.0.lock().unwrap().clone();
    assert!(!batches.is_empty(), "no metrics arrived");
    let res = &batches[0].resource_metrics[0]
        .resource
        .as_ref()
        .unwrap()
        .attributes;
    assert_eq!(s(res, "service.name"), "todo-service");
    let durations = last_points(&batches, "http.server.request.duration");
    let post_count: f64 = durations
        .iter()
        .filter(|(a, _)| {
            attr(a, "http.route").is_some()
                && s(a, "http.route") == "/todos"
                && s(a, "http.request.method") == "POST"
                && i(a, "http.response.status_code") == 201
        })
        .map(|(_, c)| c)
        .sum();
    assert_eq!(
        post_count, 1.0,
        "one POST /todos 201 in the duration histogram: {durations:?}"
    );
    let lookups = last_points(&batches, "todo.db.dns.lookups");
    assert_eq!(lookups.len(), 1);
    assert_eq!(
        lookups[0].1, 1.0,
        "the database host was resolved exactly once"
    );
    let rejections = last_points(&batches, "todo.http.rejections");
    let limited_metric: f64 = rejections
        .iter()
        .filter(|(a, _)| s(a, "todo.rejected_by") == "rate_limit")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(limited_metric, limited as f64);
    assert_eq!(
        last_points(&batches, "todo.db.breaker.state")[0].1,
        0.0,
        "closed"
    );
    for name in [
        "db.client.connection.count",
        "db.client.connection.max",
        "db.client.connection.pending_requests",
        "db.client.connection.wait_time",
        "todo.db.breaker.opened",
        // The SDK's own counts, including spans and logs dropped on a full queue.
        "otel.sdk.processor.span.processed",
        "otel.sdk.processor.log.processed",
    ] {
        assert!(!last_points(&batches, name).is_empty(), "{name} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_costs_requests_nothing() {
    let db = TestDb::create().await;
    let addr = free_addr();
    let dead = free_addr();
    let child = spawn_service(
        &db,
        addr,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{dead}")),
            ("RATE_LIMIT_PER_SECOND", "0"),
        ],
        false,
    );
    let client = crate::helpers::http_client().no_proxy().build().unwrap();
    wait_ready(&client, addr).await;
    let mut worst = Duration::ZERO;
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for n in 0..300 {
        let started = Instant::now();
        let r = if n % 3 == 0 {
            client
                .post(format!("http://{addr}/todos"))
                .json(&json!({"title": "t"}))
                .send()
                .await
        } else {
            client
                .get(format!("http://{addr}/todos?limit=5"))
                .send()
                .await
        }
        .unwrap();
        worst = worst.max(started.elapsed());
        *statuses.entry(r.status().as_u16()).or_default() += 1;
    }
    let exit_after = terminate(child).await;
    eprintln!(
        "collector down: {statuses:?}, slowest request {worst:?}, exit {exit_after:?} after SIGTERM"
    );
    assert_eq!(statuses.get(&200), Some(&200));
    assert_eq!(statuses.get(&201), Some(&100));
    assert!(
        worst < Duration::from_secs(1),
        "a request waited on the exporter: {worst:?}"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_http_protobuf_too() {
    use prost::Message as _;
    let received: Arc<Mutex<Vec<ExportTraceServiceRequest>>> = Arc::default();
    let sink = Arc::clone(&received);
    let metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>> = Arc::default();
    let metrics_sink = Arc::clone(&metrics);
    let app = axum::Router::new()
        // A collector that refuses logs: the loss must show up as a number.
        .route(
            "/v1/logs",
            axum::routing::post(|| async { axum::http::StatusCode::BAD_REQUEST }),
        )
        .route(
            "/v1/metrics",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = Arc::clone(&metrics_sink);
                async move {
                    let req = ExportMetricsServiceRequest::decode(body).expect("protobuf body");
                    sink.lock().unwrap().push(req);
                    ExportMetricsServiceResponse {
                        partial_success: None,
                    }
                    .encode_to_vec()
                }
            }),
        )
        .route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = Arc::clone(&sink);
                async move {
                    let req = ExportTraceServiceRequest::decode(body).expect("protobuf body");
                    sink.lock().unwrap().push(req);
                    ExportTraceServiceResponse {
                        partial_success: None,
                    }
                    .encode_to_vec()
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let db = TestDb::create().await;
    let addr = free_addr();
    let child = spawn_service(
        &db,
        addr,
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                &format!("http://{collector}"),
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_SERVICE_NAME", "todo-service-http"),
            ("LOG_LEVEL", "info"),
        ],
        false,
    );
    let client = crate::helpers::http_client().no_proxy().build().unwrap();
    wait_ready(&client, addr).await;
    let r = client
        .get(format!("http://{addr}/todos"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    terminate(child).await;

    let batches = received.lock().unwrap().clone();
    let mut names = Vec::new();
    for rs in batches.iter().flat_map(|b| &b.resource_spans) {
        let res = &rs.resource.as_ref().unwrap().attributes;
        assert_eq!(s(res, "service.name"), "todo-service-http");
        names.extend(
            rs.scope_spans
                .iter()
                .flat_map(|ss| &ss.spans)
                .map(|s| s.name.clone()),
        );
    }
    assert!(names.iter().any(|n| n == "GET /todos"), "{names:?}");
    assert!(names.iter().any(|n| n == "SELECT todos"), "{names:?}");
    let lost = last_points(&metrics.lock().unwrap(), "todo.otel.export.lost");
    let lost_logs: f64 = lost
        .iter()
        .filter(|(a, _)| s(a, "signal") == "logs")
        .map(|(_, v)| v)
        .sum();
    assert!(
        lost_logs >= 1.0,
        "refused log records not counted: {lost:?}"
    );
    assert!(
        lost.iter().all(|(a, _)| s(a, "signal") != "traces"),
        "no span was lost: {lost:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampler_keeps_only_the_chosen_traces_and_every_metric() {
    let (receiver, metrics, _logs, collector) = start_receiver().await;
    let db = TestDb::create().await;
    let addr = free_addr();
    let child = spawn_service(
        &db,
        addr,
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                &format!("http://{collector}"),
            ),
            // Trace only what a traced caller asks for.
            ("OTEL_TRACES_SAMPLER", "parentbased_always_off"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
            ("RATE_LIMIT_PER_SECOND", "0"),
            // Info: the untraced requests' spans exist (for the logs) and must still not export.
            ("LOG_LEVEL", "info"),
        ],
        false,
    );
    let client = crate::helpers::http_client().no_proxy().build().unwrap();
    wait_ready(&client, addr).await;
    let base = format!("http://{addr}");
    let caller_trace = "0af7651916cd43dd8448eb211c80319c";
    let get = |traceparent: Option<String>| {
        let mut req = client.get(format!("{base}/todos?limit=3"));
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.headers()
                .get("x-trace-id")
                .map(|v| v.to_str().unwrap().to_owned())
        }
    };
    for _ in 0..5 {
        assert_eq!(get(None).await, None, "an unsampled request has no trace");
    }
    let unsampled_caller = format!("00-{}-b7ad6b7169203331-00", "1".repeat(32));
    assert_eq!(get(Some(unsampled_caller)).await, None);
    let sampled_caller = format!("00-{caller_trace}-b7ad6b7169203331-01");
    assert_eq!(
        get(Some(sampled_caller)).await.as_deref(),
        Some(caller_trace)
    );
    terminate(child).await;

    let spans = receiver.spans();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let server: Vec<&Span> = spans.iter().filter(|s| s.name == "GET /todos").collect();
    assert_eq!(
        server.len(),
        1,
        "only the sampled caller's request: {names:?}"
    );
    let db_spans: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SPAN_KIND_CLIENT)
        .collect();
    assert!(!db_spans.is_empty(), "{names:?}");
    for s in db_spans {
        assert_eq!(s.parent_span_id, server[0].span_id, "{names:?}");
    }
    assert!(
        spans.iter().all(|s| hex(&s.trace_id) == caller_trace),
        "a span outside the sampled trace: {names:?}"
    );
    // Metrics are never sampled: all seven requests are in the duration histogram.
    let batches = metrics.0.lock().unwrap().clone();
    let counted: f64 = last_points(&batches, "http.server.request.duration")
        .iter()
        .filter(|(attrs, _)| s(attrs, "http.route") == "/todos")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(counted, 7.0);
}

/// A caller that sends the sampled flag on every request cannot have them all traced: past
/// `TRACES_FORCED_PER_SECOND` its requests are served untraced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_cannot_force_more_traces_than_the_bound() {
    let (receiver, _metrics, _logs, collector) = start_receiver().await;
    let db = TestDb::create().await;
    let addr = free_addr();
    let child = spawn_service(
        &db,
        addr,
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                &format!("http://{collector}"),
            ),
            // Every trace is one a caller forces.
            ("OTEL_TRACES_SAMPLER", "parentbased_always_off"),
            ("TRACES_FORCED_PER_SECOND", "5"),
            ("RATE_LIMIT_PER_SECOND", "0"),
        ],
        false,
    );
    let client = crate::helpers::http_client().no_proxy().build().unwrap();
    wait_ready(&client, addr).await;
    let started = std::time::Instant::now();
    let answers = futures::future::join_all((0..200u32).map(|n| {
        let req = client.get(format!("http://{addr}/todos?limit=1")).header(
            "traceparent",
            format!("00-{:032x}-b7ad6b7169203331-01", n + 1),
        );
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.headers().contains_key("x-trace-id")
        }
    }))
    .await;
    let took = started.elapsed();
    terminate(child).await;

    let traced = answers.iter().filter(|t| **t).count();
    let exported = receiver
        .spans()
        .iter()
        .filter(|s| s.name == "GET /todos")
        .count();
    // The burst of 5, and what refilled at 5 a second while the 200 requests ran.
    let bound = 5 + (took.as_secs_f64() * 5.0).ceil() as usize;
    eprintln!(
        "200 requests with a sampled traceparent in {took:?}: {traced} traced, {exported} exported (bound {bound})"
    );
    assert_eq!(
        traced, exported,
        "x-trace-id on exactly the traced requests"
    );
    assert!(
        (5..=bound).contains(&exported),
        "{exported} traces exported, bound {bound}"
    );
}

/// A collector that wants a key (as SigNoz Cloud does): with `OTEL_EXPORTER_OTLP_HEADERS` every
/// export carries it and the spans arrive; without it the collector refuses them, and the loss
/// shows up in `todo.otel.export.lost`, not in the requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingestion_key_goes_with_every_export_and_its_absence_shows_as_lost_spans() {
    use prost::Message as _;
    const KEY: &str = "k-123/with=signs";
    for with_key in [true, false] {
        let spans: Arc<Mutex<Vec<ExportTraceServiceRequest>>> = Arc::default();
        let sink = Arc::clone(&spans);
        let metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>> = Arc::default();
        let metrics_sink = Arc::clone(&metrics);
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                axum::routing::post(
                    move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                        let sink = Arc::clone(&sink);
                        async move {
                            if headers.get("signoz-ingestion-key").map(|v| v.as_bytes())
                                != Some(KEY.as_bytes())
                            {
                                return Err(axum::http::StatusCode::UNAUTHORIZED);
                            }
                            let req = ExportTraceServiceRequest::decode(body).expect("protobuf");
                            sink.lock().unwrap().push(req);
                            Ok(ExportTraceServiceResponse {
                                partial_success: None,
                            }
                            .encode_to_vec())
                        }
                    },
                ),
            )
            .route(
                "/v1/metrics",
                axum::routing::post(move |body: axum::body::Bytes| {
                    let sink = Arc::clone(&metrics_sink);
                    async move {
                        let req = ExportMetricsServiceRequest::decode(body).expect("protobuf");
                        sink.lock().unwrap().push(req);
                        ExportMetricsServiceResponse {
                            partial_success: None,
                        }
                        .encode_to_vec()
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let collector = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let db = TestDb::create().await;
        let addr = free_addr();
        let endpoint = format!("http://{collector}");
        let mut env = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ];
        // URL-encoded, as the variable's form has it.
        let header = format!("signoz-ingestion-key={}", "k-123%2Fwith%3Dsigns");
        if with_key {
            env.push(("OTEL_EXPORTER_OTLP_HEADERS", &header));
        }
        let child = spawn_service(&db, addr, &env, false);
        let client = crate::helpers::http_client().no_proxy().build().unwrap();
        wait_ready(&client, addr).await;
        for _ in 0..5 {
            let r = client
                .get(format!("http://{addr}/todos"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "export trouble never reaches a request");
        }
        terminate(child).await;
        let received = spans.lock().unwrap().len();
        let lost = last_points(&metrics.lock().unwrap(), "todo.otel.export.lost");
        let lost_spans: f64 = lost
            .iter()
            .filter(|(a, _)| s(a, "signal") == "traces")
            .map(|(_, v)| v)
            .sum();
        if with_key {
            assert!(received > 0, "no span arrived with the key");
            assert_eq!(lost_spans, 0.0, "{lost:?}");
        } else {
            assert_eq!(received, 0, "the collector refuses spans without the key");
            assert!(lost_spans >= 1.0, "refused spans not counted: {lost:?}");
        }
    }
}

/// A test CA and a collector certificate it signs for `localhost` only.
struct TestPki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
}

impl Clone for TestPki {
    fn clone(&self) -> Self {
        TestPki {
            ca_pem: self.ca_pem.clone(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            cert: self.cert.clone(),
            // A private key's clone is spelt out in rustls.
            key: self.key.clone_key(),
        }
    }
}

fn test_pki() -> TestPki {
    use rustls::pki_types::pem::PemObject;
    let ca = crate::pg_tls::TestCa::new("todo-service test CA");
    let leaf = ca.issue("localhost", &["localhost"]);
    TestPki {
        ca_pem: ca.pem(),
        cert: rustls::pki_types::CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap(),
        key: rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
        cert_pem: leaf.cert_pem,
        key_pem: leaf.key_pem,
    }
}

/// An OTLP/HTTP collector over TLS on 127.0.0.1:0, counting the span batches it accepts.
async fn start_tls_collector(pki: &TestPki) -> (SocketAddr, Arc<Mutex<usize>>) {
    todo_service::net::install_tls_provider();
    let received: Arc<Mutex<usize>> = Arc::default();
    let sink = Arc::clone(&received);
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(move || {
                let sink = Arc::clone(&sink);
                async move {
                    *sink.lock().unwrap() += 1;
                    use prost::Message as _;
                    ExportTraceServiceResponse {
                        partial_success: None,
                    }
                    .encode_to_vec()
                }
            }),
        )
        .fallback(|| async { Vec::<u8>::new() });
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![pki.cert.clone()], pki.key.clone_key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(tls),
                        hyper_util::service::TowerToHyperService::new(app),
                    )
                    .await;
            });
        }
    });
    (addr, received)
}

/// Runs the service against a TLS collector three ways: the endpoint's name with the test CA (the
/// spans arrive), the name with the system's roots only, and an address the certificate does not
/// name (none arrive); requests are 200 every time. `start` starts a collector and returns its
/// address and a count of the span batches it accepted.
async fn spans_reach_a_tls_collector_only_when_verified<F, Fut>(protocol: &str, start: F)
where
    F: Fn(TestPki) -> Fut,
    Fut: std::future::Future<Output = (SocketAddr, Box<dyn Fn() -> usize>)>,
{
    todo_service::net::install_tls_provider();
    let pki = test_pki();
    let dir = std::env::temp_dir().join(format!("otlp-ca-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let ca_path = ca_file.to_str().unwrap().to_owned();
    let cases = [
        (
            "localhost, the test CA",
            "localhost",
            Some(ca_path.as_str()),
            true,
        ),
        ("localhost, system roots only", "localhost", None, false),
        (
            "an address the certificate does not name",
            "127.0.0.1",
            Some(ca_path.as_str()),
            false,
        ),
    ];
    for (what, host, ca, arrives) in cases {
        let (collector, received) = start(pki.clone()).await;
        let db = TestDb::create().await;
        let addr = free_addr();
        let endpoint = format!("https://{host}:{}", collector.port());
        let mut env = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ];
        if let Some(ca) = ca {
            env.push(("OTEL_EXPORTER_OTLP_CERTIFICATE", ca));
        }
        let child = spawn_service(&db, addr, &env, false);
        let client = crate::helpers::http_client().no_proxy().build().unwrap();
        wait_ready(&client, addr).await;
        for _ in 0..3 {
            let r = client
                .get(format!("http://{addr}/todos"))
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.status(),
                200,
                "{protocol}, {what}: export trouble never reaches a request"
            );
        }
        terminate(child).await;
        let batches = received();
        assert_eq!(
            batches > 0,
            arrives,
            "{protocol}, {what}: {batches} span batches"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An https collector: its certificate is checked against the endpoint's host name while the
/// connection goes to the address resolved once at startup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_collector_is_verified_by_name_at_the_pinned_address() {
    spans_reach_a_tls_collector_only_when_verified("http/protobuf", |pki| async move {
        let (addr, received) = start_tls_collector(&pki).await;
        let count: Box<dyn Fn() -> usize> = Box::new(move || *received.lock().unwrap());
        (addr, count)
    })
    .await;
}

/// The same over gRPC: a TLS collector (tonic) with the test CA's certificate for `localhost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_collector_over_tls_is_verified_by_name_at_the_pinned_address() {
    spans_reach_a_tls_collector_only_when_verified("grpc", |pki| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Receiver::default();
        let identity = tonic::transport::Identity::from_pem(&pki.cert_pem, &pki.key_pem);
        tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .unwrap()
                .add_service(TraceServiceServer::new(receiver.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let count: Box<dyn Fn() -> usize> = Box::new(move || receiver.0.lock().unwrap().len());
        (addr, count)
    })
    .await;
}
