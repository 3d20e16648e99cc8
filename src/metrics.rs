//! The service's metrics, exported over OTLP next to the traces (see `telemetry`).
//!
//! What an operator graphs and alerts on: request duration by route/method/status, rejections by
//! the protective layer that answered, authentication failures by reason, the pool (open, idle, in use, waiting, max, wait time), the
//! circuit breaker (state, times opened) and the number of DNS lookups of the database host — 1 in
//! a healthy run, the invariant the post-mortem's service lacked.
//!
//! Instruments come from the global meter, so when export is off (no endpoint, or in-process
//! tests) they are the API's no-op instruments and cost almost nothing. Pool, breaker and DNS
//! figures are read by callbacks at export time, not counted on the request path.

use std::{sync::OnceLock, time::Duration};

use axum::http::{Method, StatusCode};
use opentelemetry::{
    KeyValue,
    metrics::{BoundHistogram, Counter, Histogram, Meter},
};

use crate::db::{Db, breaker::BreakerState};

fn meter() -> Meter {
    opentelemetry::global::meter("todo-service")
}

/// Instruments recorded per request.
pub struct HttpMetrics {
    duration: Histogram<f64>,
    /// `duration` bound to the attribute sets requests usually have (see [`Bound`]).
    bound: Bound,
    rejections: Counter<u64>,
}

/// The per-request instruments, created on first use (after telemetry has installed the meter
/// provider).
pub fn http() -> &'static HttpMetrics {
    static HTTP: OnceLock<HttpMetrics> = OnceLock::new();
    HTTP.get_or_init(|| {
        let meter = meter();
        HttpMetrics {
            duration: meter
                .f64_histogram("http.server.request.duration")
                .with_unit("s")
                .with_description("Duration of HTTP server requests")
                .with_boundaries(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 10.0,
                ])
                .build(),
            bound: Bound::default(),
            rejections: meter
                .u64_counter("todo.http.rejections")
                .with_description(
                    "Requests refused by a protective layer (todo.rejected_by: rate_limit, \
                     load_shed, circuit_breaker, timeout)",
                )
                .build(),
        }
    })
}

impl HttpMetrics {
    pub fn record(
        &self,
        method: &Method,
        route: Option<&str>,
        status: StatusCode,
        elapsed: Duration,
        rejected_by: Option<&'static str>,
    ) {
        let method_index = KNOWN_METHODS.iter().position(|m| m == method);
        let route_index = match route {
            None => Some(KNOWN_ROUTES.len()),
            Some(route) => KNOWN_ROUTES.iter().position(|r| *r == route),
        };
        let status_index = KNOWN_STATUSES.iter().position(|s| *s == status.as_u16());
        let attributes = || {
            // Static strings where possible: an owned String per attribute was a measurable share
            // of the allocations on the hot path.
            let mut attributes = vec![
                KeyValue::new("http.request.method", method_name(method)),
                KeyValue::new("http.response.status_code", i64::from(status.as_u16())),
            ];
            if let Some(route) = route {
                attributes.push(KeyValue::new("http.route", route_value(route)));
            }
            attributes
        };
        match (method_index, route_index, status_index) {
            (Some(m), Some(r), Some(s)) => self
                .bound
                .get(m, r, s, || self.duration.bind(&attributes()))
                .record(elapsed.as_secs_f64()),
            _ => self.duration.record(elapsed.as_secs_f64(), &attributes()),
        }
        if let Some(layer) = rejected_by {
            self.rejections
                .add(1, &[KeyValue::new("todo.rejected_by", layer)]);
        }
    }
}

/// The request-duration histogram bound once per (method, route, status) among the known ones,
/// on first use: recording into a bound instrument skips hashing the three attributes and looking
/// them up on every request, which was the largest part of the metrics' cost per request
/// (loadtest/archive.md#tracing-sdk-spans). Other combinations are recorded unbound.
struct Bound(Box<[OnceLock<BoundHistogram<f64>>]>);

impl Default for Bound {
    fn default() -> Self {
        let slots = KNOWN_METHODS.len() * (KNOWN_ROUTES.len() + 1) * KNOWN_STATUSES.len();
        Bound((0..slots).map(|_| OnceLock::new()).collect())
    }
}

impl Bound {
    /// `route` may be `KNOWN_ROUTES.len()`: no route matched.
    fn get(
        &self,
        method: usize,
        route: usize,
        status: usize,
        bind: impl FnOnce() -> BoundHistogram<f64>,
    ) -> &BoundHistogram<f64> {
        let index = (method * (KNOWN_ROUTES.len() + 1) + route) * KNOWN_STATUSES.len() + status;
        self.0[index].get_or_init(bind)
    }
}

/// Counts a request refused by authentication (`todo.auth.failures`), by reason: `missing`,
/// `insufficient_scope`, or why the token was refused (`expired`, `bad_signature`, …).
pub fn auth_failure(reason: &'static str) {
    static FAILURES: OnceLock<Counter<u64>> = OnceLock::new();
    FAILURES
        .get_or_init(|| {
            meter()
                .u64_counter("todo.auth.failures")
                .with_description(
                    "Requests refused by authentication (401, 403), by todo.auth.reason",
                )
                .build()
        })
        .add(1, &[KeyValue::new("todo.auth.reason", reason)]);
}

/// The routes requests usually match (others are recorded too, at the price of a copy).
const KNOWN_ROUTES: &[&str] = &["/todos", "/todos/{id}", "/health", "/ready"];

/// `route` as an attribute value: a static string for the known routes, a copy otherwise.
pub(crate) fn route_value(route: &str) -> opentelemetry::Value {
    match KNOWN_ROUTES.iter().find(|r| **r == route) {
        Some(r) => (*r).into(),
        None => route.to_owned().into(),
    }
}

/// The methods and statuses the service usually answers with, for [`Bound`].
const KNOWN_METHODS: &[Method] = &[
    Method::GET,
    Method::POST,
    Method::PATCH,
    Method::DELETE,
    Method::HEAD,
    Method::OPTIONS,
    Method::PUT,
];
const KNOWN_STATUSES: &[u16] = &[
    200, 201, 204, 304, 400, 401, 403, 404, 405, 409, 412, 413, 415, 422, 428, 429, 500, 503, 504,
];

/// The method as OpenTelemetry's semantic conventions name it (`_OTHER` for non-standard ones).
pub(crate) fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

/// Records how long a database call waited for a pooled connection
/// (`db.client.connection.wait_time`, seconds).
fn pool_wait(waited: Duration) {
    static WAIT: OnceLock<Histogram<f64>> = OnceLock::new();
    WAIT.get_or_init(|| {
        meter()
            .f64_histogram("db.client.connection.wait_time")
            .with_unit("s")
            .with_description("Time a database call waited for a pooled connection")
            .with_boundaries(vec![
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
            ])
            .build()
    })
    .record(waited.as_secs_f64(), &[]);
}

/// Registers the pool, breaker and DNS instruments, read from `db` at each export, and has `db`
/// report each pool wait into the wait-time histogram. The instruments hold the
/// database weakly, so they report nothing once the application is gone.
pub fn register_db(db: &Db) {
    db.on_pool_wait(pool_wait);
    let meter = meter();
    let weak = db.downgrade();
    let _ = meter
        .i64_observable_gauge("db.client.connection.count")
        .with_description("Open pooled connections by state (idle, used)")
        .with_callback(move |o| {
            if let Some(db) = weak.upgrade() {
                let s = db.pool().status();
                let idle = s.available as i64;
                o.observe(idle, &[KeyValue::new("db.client.connection.state", "idle")]);
                o.observe(
                    s.size as i64 - idle,
                    &[KeyValue::new("db.client.connection.state", "used")],
                );
            }
        })
        .build();
    gauge(
        &meter,
        db,
        "db.client.connection.max",
        "Largest number of pooled connections (DB_POOL_MAX_SIZE)",
        |db| db.pool().status().max_size as i64,
    );
    gauge(
        &meter,
        db,
        "db.client.connection.pending_requests",
        "Requests waiting for a pooled connection",
        |db| db.pool().status().waiting as i64,
    );
    gauge(
        &meter,
        db,
        "todo.db.breaker.state",
        "Database circuit breaker: 0 closed, 1 half-open, 2 open",
        |db| match db.breaker().state() {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        },
    );
    counter(
        &meter,
        db,
        "todo.db.breaker.opened",
        "Times the database circuit breaker opened since startup",
        |db| db.breaker().opened_total(),
    );
    counter(
        &meter,
        db,
        "todo.db.dns.lookups",
        "DNS lookups of the database host since startup: 1 in a healthy run (0 for an IP)",
        |db| db.address().lookups(),
    );
}

/// An unattributed gauge whose value `read` takes from the database handle at export time.
fn gauge(
    meter: &Meter,
    db: &Db,
    name: &'static str,
    description: &'static str,
    read: fn(&Db) -> i64,
) {
    let weak = db.downgrade();
    let _ = meter
        .i64_observable_gauge(name)
        .with_description(description)
        .with_callback(move |o| {
            if let Some(db) = weak.upgrade() {
                o.observe(read(&db), &[]);
            }
        })
        .build();
}

/// An unattributed cumulative counter read from the database handle at export time.
fn counter(
    meter: &Meter,
    db: &Db,
    name: &'static str,
    description: &'static str,
    read: fn(&Db) -> u64,
) {
    let weak = db.downgrade();
    let _ = meter
        .u64_observable_counter(name)
        .with_description(description)
        .with_callback(move |o| {
            if let Some(db) = weak.upgrade() {
                o.observe(read(&db), &[]);
            }
        })
        .build();
}
