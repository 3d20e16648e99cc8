//! Fault drills: each produces a fault against the running service and asserts the behaviour and
//! its time bound. A separate test binary (cargo runs binaries one at a time) whose tests also take
//! turns (`serial`), so the bounds are not measured while other tests compete for the CPU.
//! Run with `scripts/test.sh --test drills`; add `-- --nocapture` to see the figures.

// Test code may unwrap: a panic is the failure message (the library may not; see Cargo.toml).
// Its `pub` items are shared between the test binaries (helpers.rs), not a public API.
#![allow(clippy::unwrap_used, unreachable_pub)]

#[path = "../api/helpers.rs"]
#[allow(dead_code)]
mod helpers;
#[path = "../api/pg_tls.rs"]
#[allow(dead_code)]
mod pg_tls;
#[path = "../api/pgbouncer_harness.rs"]
#[allow(dead_code)]
mod pgbouncer_harness;

mod cancellation;
mod fault_proxy;
mod tls;

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use helpers::{
    AppOptions, CountingResolver, Load, Outcome, TcpProxy, TestApp, admin_url, server_addr,
    spawn_app_with,
};
use serde_json::json;
use todo_service::db::{
    breaker::BreakerState,
    resolve::{LookupFuture, Resolver},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Mutex,
};

/// Drills take turns.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::const_new(());
    LOCK.lock().await
}

fn opts(env: &[(&str, &str)]) -> AppOptions {
    let mut o = AppOptions::default();
    for (k, v) in env {
        o.env.insert(k.to_string(), v.to_string());
    }
    o
}

/// An app whose database is reached through `proxy` (started here), with extra settings.
async fn app_behind(proxy: &mut TcpProxy, env: &[(&str, &str)]) -> TestApp {
    proxy.start().await;
    spawn_app_with(AppOptions {
        db_via: Some(("127.0.0.1".into(), proxy.addr.port())),
        ..opts(env)
    })
    .await
}

fn summary(outcomes: &[&Outcome]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for o in outcomes {
        let key = match (o.status, &o.code) {
            (Some(s), Some(c)) => format!("{s} {c}"),
            (Some(s), None) => s.to_string(),
            (None, _) => "no response".into(),
        };
        *m.entry(key).or_default() += 1;
    }
    m
}

async fn terminate_app_connections(app: &TestApp) -> i64 {
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(app.test_db.admin.as_str())
        .await
        .unwrap();
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = 'todo-service') t",
    )
    .bind(&app.test_db.name)
    .fetch_one(&mut admin)
    .await
    .unwrap()
}

/// Drill 1: the post-mortem's spike. 120 simultaneous `GET /todos`, five times, default settings:
/// every one 2xx, and the database host resolved exactly once since startup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_1_the_post_mortem_spike_is_answered_and_dns_is_asked_once() {
    let _turn = serial().await;
    let resolver = Arc::new(CountingResolver::default());
    let app = spawn_app_with(AppOptions {
        db_via: Some(("postgres.test".into(), server_addr().port())),
        resolver: resolver.clone(),
        ..AppOptions::default()
    })
    .await;
    app.create(json!({"title": "spike"})).await;
    for round in 1..=5 {
        let started = Instant::now();
        let burst: Vec<_> = (0..120)
            .map(|_| {
                let client = app.client.clone();
                let url = app.url("/todos");
                tokio::spawn(async move { client.get(&url).send().await.map(|r| r.status()) })
            })
            .collect();
        let mut statuses = BTreeMap::new();
        for r in burst {
            let status = r.await.unwrap().expect("every request gets an answer");
            *statuses.entry(status.as_u16()).or_insert(0) += 1;
        }
        eprintln!(
            "spike round {round}: {statuses:?} in {:?}",
            started.elapsed()
        );
        assert_eq!(
            statuses.get(&200),
            Some(&120),
            "round {round}: {statuses:?}"
        );
    }
    assert_eq!(
        resolver.calls.load(Ordering::SeqCst),
        1,
        "resolved once, at startup"
    );
}

/// Drill 2: 2000 simultaneous connections against a small concurrency limit. Every connection gets
/// an HTTP answer (200, or 503/429 with Retry-After); none is refused or reset; and the service
/// serves normally right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_2_overload_every_connection_gets_an_answer() {
    let _turn = serial().await;
    require_fds(5000);
    let app = spawn_app_with(opts(&[("MAX_IN_FLIGHT", "8")])).await;
    let mut conn = app.test_db.connect().await;
    sqlx::query("INSERT INTO todos (title) SELECT 't' || g FROM generate_series(1, 200) g")
        .execute(&mut conn)
        .await
        .unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..2000)
        .map(|_| tokio::spawn(raw_get(app.addr, "/todos?limit=200")))
        .collect();
    let mut statuses = BTreeMap::new();
    let mut failures = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok((status, retry_after)) => {
                if status != 200 {
                    assert!(matches!(status, 429 | 503), "unexpected status {status}");
                    let ra: u64 = retry_after
                        .unwrap_or_else(|| panic!("{status} without Retry-After"))
                        .parse()
                        .expect("Retry-After in seconds");
                    assert!(ra >= 1, "Retry-After {ra}");
                }
                *statuses.entry(status).or_insert(0usize) += 1;
            }
            Err(e) => failures.push(e),
        }
    }
    let took = started.elapsed();
    eprintln!(
        "2000 connections: {statuses:?}, {} failures, in {took:?}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "connections without an HTTP answer: {:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > 0,
        "some requests must be served"
    );
    assert!(
        statuses.get(&503).copied().unwrap_or(0) > 0,
        "the shedder must have been exercised"
    );
    // Serving normally right after, for a client with quota left: the flood's own address has
    // spent its rate-limit burst, so it may rightly get 429 for a few milliseconds more.
    let other = crate::helpers::http_client()
        .no_proxy()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .build()
        .unwrap();
    let after = Instant::now();
    let r = other.get(app.url("/todos?limit=1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        after.elapsed() < Duration::from_secs(1),
        "serving normally right after"
    );
}

/// Drill 3: the database goes away mid-load (the TCP path to it is cut). Within 1 s the breaker is
/// open and requests get a quick 503; when the path returns the service recovers by itself
/// within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_3_database_outage_opens_the_breaker_and_recovery_is_automatic() {
    let _turn = serial().await;
    let mut proxy = TcpProxy::reserve().await;
    // One load generator is one client IP; the rate limit is drill 6's subject, not this one's.
    let app = app_behind(&mut proxy, &[("RATE_LIMIT_PER_SECOND", "0")]).await;
    let todo = app.create(json!({"title": "x"})).await;
    let path = format!("/todos/{}", todo["id"]);

    let load = Load::start(app.url(&path), 8);
    tokio::time::sleep(Duration::from_millis(800)).await;

    let cut_at = load.start.elapsed();
    proxy.cut();
    let opened_after = wait_for(Duration::from_secs(1), || {
        app.db.breaker().state() == BreakerState::Open
    })
    .await
    .expect("breaker open within 1 s of the outage");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        app.get("/health").await.status(),
        200,
        "liveness unaffected"
    );
    assert_eq!(
        app.get("/ready").await.status(),
        503,
        "readiness reports the outage"
    );
    assert_eq!(
        app.get("/openapi.json").await.status(),
        200,
        "docs unaffected"
    );

    let restored_at = load.start.elapsed();
    proxy.start().await;
    let recovered_after = wait_for(Duration::from_secs(5), || {
        app.db.breaker().state() == BreakerState::Closed
    })
    .await
    .expect("recovered within 5 s of the database's return");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let results: Vec<Outcome> = load.finish().await.into_iter().flatten().collect();

    // Requests in flight at the cut may fail; those that finished before it may not.
    let before: Vec<&Outcome> = results
        .iter()
        .filter(|o| o.at + o.latency < cut_at)
        .collect();
    let open_from = cut_at + opened_after;
    let during: Vec<&Outcome> = results
        .iter()
        .filter(|o| o.at > open_from && o.at + o.latency < restored_at)
        .collect();
    let settled = restored_at + recovered_after + Duration::from_millis(100);
    let after: Vec<&Outcome> = results.iter().filter(|o| o.at > settled).collect();
    let mut during_latency: Vec<Duration> = during.iter().map(|o| o.latency).collect();
    during_latency.sort();
    eprintln!(
        "outage drill: open {opened_after:?} after the cut, recovered {recovered_after:?} after the \
         return; before {:?}; during {:?} (latency p50 {:?}, max {:?}); after {:?}",
        summary(&before),
        summary(&during),
        during_latency.get(during_latency.len() / 2),
        during_latency.last(),
        summary(&after),
    );
    assert!(
        results.iter().all(|o| o.status.is_some()),
        "every request answered"
    );
    assert!(
        before.iter().all(|o| o.status == Some(200)),
        "{:?}",
        summary(&before)
    );
    assert!(!during.is_empty());
    for o in &during {
        assert_eq!(o.status, Some(503), "{o:?}");
        assert!(o.retry_after.is_some(), "503 without Retry-After: {o:?}");
        assert!(
            o.latency < Duration::from_millis(250),
            "slow 503 while open: {o:?}"
        );
    }
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|o| o.status == Some(200)),
        "{:?}",
        summary(&after)
    );
    assert!(app.db.breaker().opened_total() >= 1);
}

/// Drill 4: every service connection is killed during load. No read fails: a read that meets a
/// dead connection (in flight or idle) is retried (up to twice) on another, which the pool checks
/// first; nothing hangs, and the breaker stays closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_4_connections_killed_under_load_fail_no_read() {
    let _turn = serial().await;
    let app = spawn_app_with(opts(&[("RATE_LIMIT_PER_SECOND", "0")])).await;
    let todo = app.create(json!({"title": "x"})).await;
    let path = format!("/todos/{}", todo["id"]);
    // Fill the pool well beyond the number of clients, so stale connections outnumber in-flight
    // requests: without the sibling check, each stale one would fail a later request.
    warm_pool(&app, &path).await;
    let pooled = app.db.pool().status().size;
    assert!(pooled >= 12, "pool warmed to {pooled}");
    const CLIENTS: usize = 4;
    let load = Load::start(app.url(&path), CLIENTS);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let killed = terminate_app_connections(&app).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let per_client = load.finish().await;

    let all: Vec<&Outcome> = per_client.iter().flatten().collect();
    let failed: Vec<&Outcome> = all
        .iter()
        .copied()
        .filter(|o| o.status != Some(200))
        .collect();
    let max_latency = all.iter().map(|o| o.latency).max().unwrap();
    eprintln!(
        "killed {killed} connections ({pooled} pooled, {CLIENTS} clients): {} requests, {:?}, max latency {max_latency:?}",
        all.len(),
        summary(&all)
    );
    assert!(killed > 0, "the drill must kill live connections");
    assert!(
        all.iter().all(|o| o.status.is_some()),
        "every request answered"
    );
    // Before reads were retried, the requests in flight failed (1-2 of 4 clients), and before the
    // stale-connection sweep every pooled connection failed one request.
    assert!(
        failed.is_empty(),
        "{} of {} reads failed: {:?}",
        failed.len(),
        all.len(),
        summary(&failed)
    );
    assert!(
        max_latency < Duration::from_secs(2),
        "a request hung: {max_latency:?}"
    );
    assert_eq!(
        app.db.breaker().opened_total(),
        0,
        "a connection kill is not an outage"
    );
}

/// Drill 12: the database ends every pooled connection while they sit idle (a restart, a
/// failover behind a pooler, `pg_terminate_backend`), then the post-mortem's spike arrives at
/// once: 5 × 120 simultaneous `GET /todos`. Every one is answered 200: a read that meets a dead
/// connection is retried (up to twice) on another, which the pool checks first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_12_connections_ended_while_idle_fail_no_request() {
    let _turn = serial().await;
    let app = spawn_app_with(opts(&[("RATE_LIMIT_PER_SECOND", "0")])).await;
    app.create(json!({"title": "stale"})).await;
    let mut statuses = BTreeMap::new();
    for round in 1..=5 {
        // Fill the pool, so every pooled connection is one the spike may pick.
        warm_pool(&app, "/todos").await;
        let pooled = app.db.pool().status().size;
        let killed = terminate_app_connections(&app).await;
        let gone = wait_for_async(Duration::from_secs(3), || async {
            app_connections(&app).await == 0
        })
        .await;
        assert!(
            gone.is_some(),
            "round {round}: terminated backends did not go away"
        );
        let started = Instant::now();
        let burst: Vec<_> = (0..120)
            .map(|_| {
                let client = app.client.clone();
                let url = app.url("/todos");
                tokio::spawn(async move {
                    match client.get(&url).send().await {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    }
                })
            })
            .collect();
        let mut round_statuses = BTreeMap::new();
        for r in burst {
            *round_statuses.entry(r.await.unwrap()).or_insert(0usize) += 1;
        }
        eprintln!(
            "stale round {round}: {killed} of {pooled} pooled connections ended, then 120 GETs: \
             {round_statuses:?} in {:?}",
            started.elapsed()
        );
        for (s, n) in round_statuses {
            *statuses.entry(s).or_insert(0) += n;
        }
    }
    assert_eq!(statuses.get(&200), Some(&600), "{statuses:?}");

    // Writes too, when the reply shows the statement never ran: a backend ended while idle sends
    // its termination notice (57P01) before it goes, and that notice is the write's reply.
    warm_pool(&app, "/todos").await;
    terminate_app_connections(&app).await;
    wait_for_async(Duration::from_secs(3), || async {
        app_connections(&app).await == 0
    })
    .await
    .expect("terminated backends go away");
    let writes: Vec<_> = (0..32)
        .map(|i| {
            let (client, url) = (app.client.clone(), app.url("/todos"));
            tokio::spawn(async move {
                let r = client
                    .post(&url)
                    .json(&json!({"title": format!("w{i}")}))
                    .send();
                r.await.map(|r| r.status().as_u16()).unwrap_or(0)
            })
        })
        .collect();
    let mut write_statuses = BTreeMap::new();
    for w in writes {
        *write_statuses.entry(w.await.unwrap()).or_insert(0usize) += 1;
    }
    let mut conn = app.test_db.connect().await;
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT title) FROM todos WHERE title LIKE 'w%'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    eprintln!(
        "stale writes: 32 POSTs after every connection ended: {write_statuses:?}, {rows} rows"
    );
    assert_eq!(write_statuses.get(&201), Some(&32), "{write_statuses:?}");
    assert_eq!((rows, distinct), (32, 32), "each write exactly once");
    assert_eq!(
        app.db.breaker().opened_total(),
        0,
        "idle connections ending is not an outage"
    );
}

/// 64 simultaneous `GET path`, each 200: grows the pool towards its maximum.
async fn warm_pool(app: &TestApp, path: &str) {
    let warm: Vec<_> = (0..64)
        .map(|_| {
            let (client, url) = (app.client.clone(), app.url(path));
            tokio::spawn(async move { client.get(&url).send().await.unwrap().status() })
        })
        .collect();
    for w in warm {
        assert_eq!(w.await.unwrap(), 200);
    }
}

async fn app_connections(app: &TestApp) -> i64 {
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(admin_url().as_str())
        .await
        .unwrap();
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = 'todo-service'",
    )
    .bind(&app.test_db.name)
    .fetch_one(&mut admin)
    .await
    .unwrap()
}

/// Drill 9: the database's TCP path turns into a black hole (half-open connections: no FIN, no
/// answer). No request hangs: each gets a 503 within about `statement_timeout` + 1 s, far inside
/// the request timeout, and the breaker opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_9_half_open_connections_cannot_hang_requests() {
    let _turn = serial().await;
    let mut proxy = TcpProxy::reserve().await;
    let app = app_behind(
        &mut proxy,
        &[
            ("DB_STATEMENT_TIMEOUT", "1s"),
            ("DB_CONNECT_TIMEOUT", "1s"),
            ("REQUEST_TIMEOUT", "30s"),
            ("RATE_LIMIT_PER_SECOND", "0"),
        ],
    )
    .await;
    let todo = app.create(json!({"title": "x"})).await;
    let path = format!("/todos/{}", todo["id"]);
    let load = Load::start(app.url(&path), 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let frozen_at = load.start.elapsed();
    proxy.freeze();
    let opened = wait_for(Duration::from_secs(8), || {
        app.db.breaker().state() == BreakerState::Open
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let results: Vec<Outcome> = load.finish().await.into_iter().flatten().collect();
    let after: Vec<&Outcome> = results
        .iter()
        .filter(|o| o.at + o.latency > frozen_at)
        .collect();
    let worst = after.iter().map(|o| o.latency).max().unwrap_or_default();
    eprintln!(
        "half-open drill: breaker open {opened:?} after the freeze; requests touching it: {:?}, slowest {worst:?}",
        summary(&after)
    );
    assert!(
        opened.is_some(),
        "breaker must open on a black-holed database"
    );
    assert!(
        results.iter().all(|o| o.status.is_some()),
        "every request answered"
    );
    assert!(
        after
            .iter()
            .all(|o| o.status == Some(200) || o.status == Some(503)),
        "{:?}",
        summary(&after)
    );
    assert!(
        worst < Duration::from_millis(3500),
        "a request hung for {worst:?} (deadline is 2 s)"
    );
}

/// Answers the first lookup, then fails every one after it, like a DNS server that went away.
#[derive(Default)]
struct DnsDiesAfterStartup {
    calls: AtomicUsize,
}

impl Resolver for DnsDiesAfterStartup {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> LookupFuture<'a> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let ip = server_addr().ip();
        Box::pin(async move {
            if n == 0 {
                Ok(vec![SocketAddr::new(ip, port)])
            } else {
                Err(io::Error::other(format!(
                    "could not translate host name {host:?}"
                )))
            }
        })
    }
}

/// Drill 5: DNS fails after startup. The pool keeps opening connections (load grows, connections
/// are killed and replaced) and not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_5_dns_failing_after_startup_fails_nothing() {
    let _turn = serial().await;
    let resolver = Arc::new(DnsDiesAfterStartup::default());
    let app = spawn_app_with(AppOptions {
        db_via: Some(("postgres.test".into(), server_addr().port())),
        resolver: resolver.clone(),
        ..AppOptions::default()
    })
    .await;
    let mut statuses = BTreeMap::new();
    for round in 0..3 {
        // A wider burst each round makes the pool open new connections after DNS died.
        let burst: Vec<_> = (0..40 * (round + 1))
            .map(|i| {
                let client = app.client.clone();
                let url = app.url("/todos");
                tokio::spawn(async move {
                    if i % 4 == 0 {
                        client
                            .post(&url)
                            .json(&json!({"title": "dns"}))
                            .send()
                            .await
                    } else {
                        client.get(&url).send().await
                    }
                })
            })
            .collect();
        for r in burst {
            let status = r.await.unwrap().expect("answered").status().as_u16();
            *statuses.entry(status).or_insert(0usize) += 1;
        }
        // Kill the idle connections; the pool replaces them (idle ones are checked before reuse).
        terminate_app_connections(&app).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let size = app.db.pool().status().size;
    eprintln!(
        "dns drill: {statuses:?}, pool size {size}, lookups {}",
        resolver.calls.load(Ordering::SeqCst)
    );
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        [200, 201],
        "{statuses:?}"
    );
    assert_eq!(
        resolver.calls.load(Ordering::SeqCst),
        1,
        "no lookup after startup"
    );
}

/// Drill 6: a client over its quota gets 429 with a Retry-After that is honest; another client is
/// unaffected; the probes are never limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_6_rate_limit_is_per_client_and_spares_the_probes() {
    let _turn = serial().await;
    let app = spawn_app_with(opts(&[
        ("RATE_LIMIT_PER_SECOND", "1"),
        ("RATE_LIMIT_BURST", "5"),
    ]))
    .await;
    for i in 0..5 {
        let r = app.get("/todos").await;
        assert_eq!(r.status(), 200, "request {i} is within the burst");
        assert_eq!(r.headers()["x-ratelimit-limit"], "5");
    }
    let r = app.get("/todos").await;
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let p = helpers::assert_problem(r, 429, "rate_limited").await;
    assert!(
        (1..=2).contains(&retry_after),
        "Retry-After {retry_after}: {p}"
    );

    // The probes and docs are never limited, even for the limited client.
    for _ in 0..20 {
        assert_eq!(app.get("/health").await.status(), 200);
        assert_eq!(app.get("/ready").await.status(), 200);
    }
    // Another client (another source address on loopback) is unaffected.
    let other = crate::helpers::http_client()
        .no_proxy()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .build()
        .unwrap();
    for _ in 0..5 {
        assert_eq!(
            other.get(app.url("/todos")).send().await.unwrap().status(),
            200
        );
    }
    // Honouring Retry-After is enough to be admitted again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(app.get("/todos").await.status(), 200);
}

/// Drill 7: the same POST retried concurrently with one Idempotency-Key creates one row, and every
/// 201 the service sent names a todo that is in the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_7_concurrent_retries_with_one_idempotency_key_create_one_row() {
    let _turn = serial().await;
    let app = spawn_app_with(AppOptions::default()).await;
    for round in 0..5 {
        let key = format!("retry-storm-{round}");
        let retries: Vec<_> = (0..25)
            .map(|_| {
                let (client, url, key) = (app.client.clone(), app.url("/todos"), key.clone());
                tokio::spawn(async move {
                    let r = client
                        .post(&url)
                        .header("idempotency-key", key)
                        .json(&json!({"title": "exactly once"}))
                        .send()
                        .await
                        .expect("answered");
                    assert_eq!(r.status(), 201);
                    r.json::<serde_json::Value>().await.unwrap()["id"]
                        .as_i64()
                        .unwrap()
                })
            })
            .collect();
        let mut ids = std::collections::BTreeSet::new();
        for r in retries {
            ids.insert(r.await.unwrap());
        }
        assert_eq!(
            ids.len(),
            1,
            "round {round}: one todo for one key, got {ids:?}"
        );
    }
    let mut conn = app.test_db.connect().await;
    let (rows, keys): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM todos), (SELECT count(*) FROM idempotency_keys)",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    eprintln!("idempotency drill: 125 POSTs over 5 keys -> {rows} rows");
    assert_eq!((rows, keys), (5, 5));
}

/// Drill 8: SIGTERM to the real binary during load. Requests in flight finish (a slow upload
/// still gets its 201), a stalled request cannot hold the process past SHUTDOWN_TIMEOUT, and the
/// process exits cleanly within that deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_8_sigterm_drains_in_flight_requests_and_exits_within_the_deadline() {
    let _turn = serial().await;
    let test_db = helpers::TestDb::create().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = helpers::KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_todo-service"))
            .env("DATABASE_URL", test_db.url().as_str())
            .env("LISTEN_ADDR", addr.to_string())
            .env("ADMIN_LISTEN_ADDR", "127.0.0.1:0")
            .env("SHUTDOWN_TIMEOUT", "2s")
            .env("RATE_LIMIT_PER_SECOND", "0")
            .env("LOG_LEVEL", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = crate::helpers::http_client().no_proxy().build().unwrap();
    let ready = wait_for_async(Duration::from_secs(20), || async {
        client
            .get(format!("http://{addr}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready.is_some(), "service never became ready");

    let load = Load::start(format!("http://{addr}/todos?limit=5"), 8);
    // An upload in progress: headers and half the body now, the rest after SIGTERM.
    let body = r#"{"title": "sent across the shutdown"}"#;
    let (first, rest) = body.split_at(12);
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(format!("POST /todos HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{first}", body.len()).as_bytes()).await.unwrap();
    // An upload that never finishes: it must not keep the process alive past the deadline.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled.write_all(format!("POST /todos HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{").as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;

    let term_at = load.start.elapsed();
    let signalled = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    slow.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 201"),
        "in-flight upload after SIGTERM: {answer:?}"
    );

    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited_after = signalled.elapsed();
    let results: Vec<Outcome> = load.finish().await.into_iter().flatten().collect();
    let before: Vec<&Outcome> = results
        .iter()
        .filter(|o| o.at + Duration::from_millis(50) < term_at)
        .collect();
    eprintln!(
        "shutdown drill: exited {exit} {exited_after:?} after SIGTERM (deadline 2 s); requests sent before it: {:?}",
        summary(&before)
    );
    assert!(exit.success(), "exit status {exit}");
    assert!(
        exited_after < Duration::from_millis(3500),
        "exit took {exited_after:?}"
    );
    assert!(
        exited_after >= Duration::from_millis(1500),
        "the deadline, not an abort, ended the stalled upload"
    );
    assert!(
        !before.is_empty() && before.iter().all(|o| o.status == Some(200)),
        "{:?}",
        summary(&before)
    );
    let mut conn = test_db.connect().await;
    let titles: Vec<String> = sqlx::query_scalar("SELECT title FROM todos")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(titles, ["sent across the shutdown"]);
}

async fn wait_for_async<F: std::future::Future<Output = bool>>(
    limit: Duration,
    cond: impl Fn() -> F,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Answers the first lookup with `first`, every later one with `then`; counts calls.
struct Scripted {
    first: Vec<SocketAddr>,
    then: Vec<SocketAddr>,
    calls: AtomicUsize,
}

impl Resolver for Scripted {
    fn lookup<'a>(&'a self, _: &'a str, _: u16) -> LookupFuture<'a> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let answer = if n == 0 {
            self.first.clone()
        } else {
            self.then.clone()
        };
        Box::pin(async move { Ok(answer) })
    }
}

/// Drill 10: the database moves during an outage. The pinned address dies and DNS now names a
/// dead address and the new one; in the background the service looks the name up again, passes
/// over the dead address, switches to the one that answers, and recovers without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_10_a_moved_database_is_found_again_without_a_restart() {
    let _turn = serial().await;
    let mut old_home = TcpProxy::reserve().await;
    old_home.start().await;
    let dead: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let resolver = Arc::new(Scripted {
        first: vec![old_home.addr],
        then: vec![dead, server_addr()],
        calls: AtomicUsize::new(0),
    });
    let app = spawn_app_with(AppOptions {
        db_via: Some(("postgres.test".into(), 5432)),
        resolver: resolver.clone(),
        ..opts(&[("RATE_LIMIT_PER_SECOND", "0")])
    })
    .await;
    let todo = app.create(json!({"title": "x"})).await;
    let path = format!("/todos/{}", todo["id"]);
    assert_eq!(app.db.address().get(), Some(old_home.addr));

    let load = Load::start(app.url(&path), 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cut = Instant::now();
    old_home.cut();
    let opened = wait_for(Duration::from_secs(2), || {
        app.db.breaker().state() == BreakerState::Open
    })
    .await;
    let recovered = wait_for(Duration::from_secs(8), || {
        app.db.breaker().state() == BreakerState::Closed
            && app.db.address().get() == Some(server_addr())
    })
    .await;
    let recovered_at = load.start.elapsed();
    let recovered_after = cut.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let results: Vec<Outcome> = load.finish().await.into_iter().flatten().collect();
    let tail: Vec<&Outcome> = results
        .iter()
        .filter(|o| o.at > recovered_at + Duration::from_millis(100))
        .collect();
    eprintln!(
        "moved-database drill: open {opened:?} after the cut, recovered {recovered_after:?} after it at {:?}; lookups {}; requests after recovery {:?}",
        app.db.address().get(),
        resolver.calls.load(Ordering::SeqCst),
        summary(&tail)
    );
    assert!(
        opened.is_some(),
        "breaker opens when the pinned address dies"
    );
    assert!(
        recovered.is_some(),
        "recovered on the new address within 8 s"
    );
    assert!(
        !tail.is_empty() && tail.iter().all(|o| o.status == Some(200)),
        "{:?}",
        summary(&tail)
    );
    assert_eq!(
        resolver.calls.load(Ordering::SeqCst),
        2,
        "one lookup at startup, one for the outage"
    );
    assert!(
        results.iter().all(|o| o.status.is_some()),
        "every request answered"
    );
    assert_eq!(app.get(&path).await.status(), 200);
}

/// Drill 13: a client that sends a 4 MiB body without `Expect: 100-continue` (like Python's
/// urllib: the whole body first, then read) reads the 413 problem, from a plain socket, within a
/// second: the service refuses the body from its `Content-Length`, then drains the rest before
/// closing (lingering close) instead of resetting the connection under its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_13_an_oversized_body_sent_without_waiting_still_reads_its_413() {
    let _turn = serial().await;
    let app = spawn_app_with(opts(&[])).await;
    const SIZE: usize = 4 * 1024 * 1024;
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /todos HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {SIZE}\r\n\r\n",
        app.addr
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 64 * 1024];
    for sent in (0..SIZE).step_by(chunk.len()) {
        s.write_all(&chunk)
            .await
            .unwrap_or_else(|e| panic!("the service hung up after {sent} body bytes: {e}"));
    }
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .await
        .expect("the answer is readable, not reset");
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&answer);
    eprintln!(
        "4 MiB body without Expect: {} in {took:?}",
        text.lines().next().unwrap_or("")
    );
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("application/problem+json"), "{text}");
    assert!(text.contains(r#""code":"payload_too_large""#), "{text}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(app.row_count().await, 0);
}

/// Drill 14: 2000 connections trickle a request head, one header line every 500 ms, and never
/// finish it. The service closes each after `HTTP_HEADER_READ_TIMEOUT` (2 s here), and meanwhile a
/// normal client is served as usual: `/health` always, and its `GET /todos` with p99 under 200 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_14_slow_header_clients_are_cut_and_nobody_else_waits() {
    let _turn = serial().await;
    require_fds(5000);
    let app = spawn_app_with(opts(&[
        ("HTTP_HEADER_READ_TIMEOUT", "2s"),
        ("RATE_LIMIT_PER_SECOND", "0"),
    ]))
    .await;
    app.create(json!({"title": "served"})).await;
    const SLOW: usize = 2000;
    let started = Instant::now();
    let slow: Vec<_> = (0..SLOW)
        .map(|_| {
            let addr = app.addr;
            // Ok(time until the service closed it), or why it was not closed.
            tokio::spawn(async move {
                trickle(
                    addr,
                    b"GET /todos HTTP/1.1\r\nHost: slow\r\n",
                    b"X-Slow: 1\r\n",
                )
                .await
                .map(|(closed_after, _)| closed_after)
            })
        })
        .collect();
    // A normal client meanwhile, on its own connection pool.
    let mut health = Vec::new();
    let mut gets = Vec::new();
    while started.elapsed() < Duration::from_secs(4) {
        let t = Instant::now();
        let h = app.client.get(app.url("/health")).send().await;
        health.push(h.map(|r| r.status().as_u16()).unwrap_or(0));
        let g = app.client.get(app.url("/todos?limit=1")).send().await;
        gets.push((g.map(|r| r.status().as_u16()).unwrap_or(0), t.elapsed()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut closed_after = Vec::new();
    for task in slow {
        closed_after.push(task.await.unwrap());
    }
    let closed = closed_after.iter().filter(|c| c.is_ok()).count();
    let slowest = closed_after
        .iter()
        .flatten()
        .max()
        .copied()
        .unwrap_or_default();
    let not_connected = closed_after
        .iter()
        .filter(|c| **c == Err("not connected"))
        .count();
    let still_open = closed_after
        .iter()
        .filter(|c| **c == Err("still open after 10 s"))
        .count();
    let mut latencies: Vec<Duration> = gets.iter().map(|(_, l)| *l).collect();
    latencies.sort();
    let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
    let ok = gets.iter().filter(|(s, _)| *s == 200).count();
    eprintln!(
        "slow headers: {closed} of {SLOW} closed by the service, the last {slowest:?} after \
         opening ({still_open} still open after 10 s, {not_connected} not connected); normal \
         client: {ok}/{} GET 200, \
         p99 {p99:?}, /health {}/{} 200",
        gets.len(),
        health.iter().filter(|s| **s == 200).count(),
        health.len()
    );
    assert_eq!(not_connected, 0, "every slow client connects");
    assert_eq!(still_open, 0, "slow-header connections left open");
    assert_eq!(closed, SLOW);
    assert!(
        slowest < Duration::from_millis(3500),
        "a slow-header connection stayed {slowest:?} (timeout 2 s)"
    );
    assert!(health.iter().all(|s| *s == 200), "/health: {health:?}");
    assert!(ok * 100 >= gets.len() * 99, "{ok}/{} GETs 200", gets.len());
    assert!(p99 < Duration::from_millis(200), "p99 {p99:?}");
}

/// Drill 15: `MAX_CONNECTIONS` holds. 100 silent connections fill a cap of 100; the next client
/// waits in the listen backlog (it is not refused) until the header-read timeout frees a slot,
/// then is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_15_the_connection_cap_holds_and_the_next_client_waits_its_turn() {
    let _turn = serial().await;
    let app = spawn_app_with(opts(&[
        ("MAX_CONNECTIONS", "100"),
        ("HTTP_HEADER_READ_TIMEOUT", "2s"),
    ]))
    .await;
    // The app's own client may hold pooled connections from startup; they count too.
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(tokio::net::TcpStream::connect(app.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fresh = crate::helpers::http_client().no_proxy().build().unwrap();
    let started = Instant::now();
    let r = fresh.get(app.url("/health")).send().await.unwrap();
    let waited = started.elapsed();
    eprintln!("connection cap 100 full: the next client was served after {waited:?}");
    assert_eq!(r.status(), 200);
    assert!(
        waited > Duration::from_millis(1000),
        "served at once ({waited:?}): the cap did not hold"
    );
    assert!(waited < Duration::from_secs(4), "waited {waited:?}");
    drop(silent);
}

/// Drill 16: 2000 simultaneous `/ready` callers beside a normal data client. Readiness is answered
/// from a recent probe, so the callers cost about one query a second, the data client keeps its
/// pool, the breaker stays closed, and the host is still looked up once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_16_a_readiness_flood_costs_one_query_a_second() {
    let _turn = serial().await;
    require_fds(5000);
    let resolver = Arc::new(CountingResolver::default());
    let app = spawn_app_with(AppOptions {
        db_via: Some(("postgres.test".into(), server_addr().port())),
        resolver: resolver.clone(),
        ..opts(&[("RATE_LIMIT_PER_SECOND", "0")])
    })
    .await;
    let todo = app.create(json!({"title": "x"})).await;
    let path = format!("/todos/{}", todo["id"]);
    let latency_of = |outcomes: &[Outcome]| {
        let mut l: Vec<Duration> = outcomes.iter().map(|o| o.latency).collect();
        l.sort();
        l[(l.len() * 99 / 100).min(l.len() - 1)]
    };
    let quiet: Vec<Outcome> = Load::start(app.url(&path), 2)
        .run_for(Duration::from_millis(800))
        .await;
    let probes_before = app.db.readiness_probes();
    let started = Instant::now();
    let load = Load::start(app.url(&path), 2);
    let ready: Vec<_> = (0..2000)
        .map(|_| tokio::spawn(raw_get(app.addr, "/ready")))
        .collect();
    let mut ready_statuses = BTreeMap::new();
    for r in ready {
        let status = r.await.unwrap().map(|(s, _)| s).unwrap_or(0);
        *ready_statuses.entry(status).or_insert(0usize) += 1;
    }
    let took = started.elapsed();
    let busy: Vec<Outcome> = load.finish().await.into_iter().flatten().collect();
    let probes = app.db.readiness_probes() - probes_before;
    let (quiet_p99, busy_p99) = (latency_of(&quiet), latency_of(&busy));
    eprintln!(
        "2000 /ready callers in {took:?}: {ready_statuses:?}, {probes} database probes; data \
         client p99 {quiet_p99:?} quiet, {busy_p99:?} during ({} requests, {:?})",
        busy.len(),
        summary(&busy.iter().collect::<Vec<_>>())
    );
    assert_eq!(ready_statuses.get(&200), Some(&2000), "{ready_statuses:?}");
    assert!(
        probes <= took.as_secs() + 2,
        "{probes} probes in {took:?}: readiness must share its probe"
    );
    assert!(
        busy.iter().all(|o| o.status == Some(200)),
        "data requests failed"
    );
    assert!(busy_p99 < Duration::from_secs(1), "data p99 {busy_p99:?}");
    assert_eq!(
        app.db.breaker().opened_total(),
        0,
        "the breaker stays closed"
    );
    assert_eq!(
        resolver.calls.load(Ordering::SeqCst),
        1,
        "one lookup in all"
    );
}

/// Drill 17: pool contention is not an outage. With one pooled connection held by a slow call
/// (its reply held by a fault proxy), 20 more requests wait past `DB_POOL_WAIT_TIMEOUT` and get a
/// quick 503; the breaker stays closed (it opens on evidence the database cannot be reached, not
/// on this service being busy), and the held call then completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_17_waiting_for_a_busy_pool_does_not_open_the_breaker() {
    use fault_proxy::{Direction, FaultProxy};
    let _turn = serial().await;
    let proxy = FaultProxy::start(server_addr()).await;
    let app = spawn_app_with(AppOptions {
        db_via: Some(("127.0.0.1".into(), proxy.addr.port())),
        ..opts(&[
            ("DB_POOL_MAX_SIZE", "1"),
            ("DB_POOL_WAIT_TIMEOUT", "100ms"),
            ("RATE_LIMIT_PER_SECOND", "0"),
        ])
    })
    .await;
    let todo = app.create(json!({"title": "x"})).await;
    let path = format!("/todos/{}", todo["id"]);
    proxy.hold_at(Direction::ToClient, b"SELECT 1\0");
    let held = tokio::spawn({
        let (client, url) = (app.client.clone(), app.url(&path));
        async move { client.get(&url).send().await.map(|r| r.status().as_u16()) }
    });
    assert!(
        proxy.wait_holding(Duration::from_secs(5)).await,
        "the slow call started"
    );
    let mut waited = BTreeMap::new();
    for _ in 0..20 {
        let r = app.get(&path).await;
        let status = r.status().as_u16();
        let p: serde_json::Value = r.json().await.unwrap_or_default();
        *waited
            .entry(format!("{status} {}", p["code"].as_str().unwrap_or("")))
            .or_insert(0usize) += 1;
    }
    let state = app.db.breaker().state();
    proxy.release();
    let held = held.await.unwrap().unwrap();
    eprintln!("busy pool: 20 requests -> {waited:?}; breaker {state:?}; the held call -> {held}");
    assert_eq!(
        waited.get("503 database_unavailable"),
        Some(&20),
        "{waited:?}"
    );
    assert_eq!(state, BreakerState::Closed);
    assert_eq!(app.db.breaker().opened_total(), 0);
    assert_eq!(held, 200);
}

/// What one hostile connection saw: how long until the service ended it, and its status line's
/// code if it got one.
type Cut = Result<(Duration, Option<u16>), &'static str>;

/// One connection that sends `head`, then `drip` every 500 ms, never finishing; the service's
/// answer (if any) and how long until it closed the connection.
async fn trickle(addr: SocketAddr, head: &'static [u8], drip: &'static [u8]) -> Cut {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return Err("not connected");
    };
    let opened = Instant::now();
    if s.write_all(head).await.is_err() {
        return Ok((opened.elapsed(), None));
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while opened.elapsed() < Duration::from_secs(10) {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    let status = std::str::from_utf8(&got)
                        .ok()
                        .and_then(|t| t.split_whitespace().nth(1))
                        .and_then(|c| c.parse().ok());
                    return Ok((opened.elapsed(), status));
                }
                Ok(n) => got.extend_from_slice(&buf[..n]),
            },
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                // A write may fail once the service has closed; the read then reports it.
                let _ = s.write_all(drip).await;
            }
        }
    }
    Err("still open after 10 s")
}

/// Drill 18: the issue's hostile mix, kept up for 30 s: 300 connections that send a `POST /todos`
/// head and then one body byte every 500 ms, and 2000 that trickle a header line every 500 ms,
/// each reconnecting as soon as it is cut, with `MAX_IN_FLIGHT=8`. Bodies are read before a
/// request takes a slot, so the slow bodies never hold one: each gets `408` after
/// `HTTP_BODY_READ_TIMEOUT` (2 s here) and is closed; slow heads are closed after
/// `HTTP_HEADER_READ_TIMEOUT` (2 s). Meanwhile a normal client gets at least 99 % 200 with p99
/// under 200 ms, `/health` always answers, and no slow body created a todo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_18_slow_bodies_and_slow_heads_hold_no_slot_and_starve_nobody() {
    let _turn = serial().await;
    require_fds(5000);
    let app = spawn_app_with(opts(&[
        ("HTTP_HEADER_READ_TIMEOUT", "2s"),
        ("HTTP_BODY_READ_TIMEOUT", "2s"),
        ("MAX_IN_FLIGHT", "8"),
        ("REQUEST_TIMEOUT", "5s"),
        ("RATE_LIMIT_PER_SECOND", "0"),
    ]))
    .await;
    app.create(json!({"title": "served"})).await;
    const BODIES: usize = 300;
    const HEADS: usize = 2000;
    const HOLD: Duration = Duration::from_secs(30);
    let started = Instant::now();
    let attackers: Vec<_> = (0..BODIES + HEADS)
        .map(|i| {
            let addr = app.addr;
            tokio::spawn(async move {
                let mut cuts: Vec<Cut> = Vec::new();
                while started.elapsed() < HOLD {
                    cuts.push(if i < BODIES {
                        trickle(
                            addr,
                            b"POST /todos HTTP/1.1\r\nHost: slow\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{",
                            b" ",
                        )
                        .await
                    } else {
                        trickle(addr, b"GET /todos HTTP/1.1\r\nHost: slow\r\n", b"X-Slow: 1\r\n").await
                    });
                    if cuts.last().is_some_and(|c| c.is_err()) {
                        break;
                    }
                }
                (i < BODIES, cuts)
            })
        })
        .collect();
    // Let the attackers connect and take whatever they can take.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut health = Vec::new();
    let mut gets = Vec::new();
    while started.elapsed() < HOLD {
        let t = Instant::now();
        let h = app.client.get(app.url("/health")).send().await;
        health.push(h.map(|r| r.status().as_u16()).unwrap_or(0));
        let g = app.client.get(app.url("/todos?limit=1")).send().await;
        gets.push((g.map(|r| r.status().as_u16()).unwrap_or(0), t.elapsed()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut body_cuts, mut head_cuts, mut failures) = (Vec::new(), Vec::new(), Vec::new());
    for a in attackers {
        let (is_body, cuts) = a.await.unwrap();
        for c in cuts {
            match c {
                Ok(cut) if is_body => body_cuts.push(cut),
                Ok(cut) => head_cuts.push(cut),
                Err(e) => failures.push(e),
            }
        }
    }
    let slowest =
        |cuts: &[(Duration, Option<u16>)]| cuts.iter().map(|c| c.0).max().unwrap_or_default();
    let mut statuses = BTreeMap::new();
    for (_, s) in &body_cuts {
        *statuses.entry(*s).or_insert(0usize) += 1;
    }
    let mut latencies: Vec<Duration> = gets.iter().map(|(_, l)| *l).collect();
    latencies.sort();
    let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
    let ok = gets.iter().filter(|(s, _)| *s == 200).count();
    let mut conn = app.test_db.connect().await;
    let todos: i64 = sqlx::query_scalar("SELECT count(*) FROM todos")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    eprintln!(
        "slow bodies: {} cut (answers {statuses:?}), the slowest after {:?}; slow heads: {} cut, \
         the slowest after {:?}; failures {failures:?}; normal client: {ok}/{} GET 200, p99 \
         {p99:?}, /health {}/{} 200; todos {todos}",
        body_cuts.len(),
        slowest(&body_cuts),
        head_cuts.len(),
        slowest(&head_cuts),
        gets.len(),
        health.iter().filter(|s| **s == 200).count(),
        health.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert!(body_cuts.len() >= BODIES && head_cuts.len() >= HEADS);
    assert!(
        body_cuts.iter().all(|(_, s)| *s == Some(408)),
        "every slow body is answered 408: {statuses:?}"
    );
    assert!(slowest(&body_cuts) < Duration::from_millis(3500));
    assert!(slowest(&head_cuts) < Duration::from_millis(3500));
    assert!(health.iter().all(|s| *s == 200), "/health: {health:?}");
    assert!(ok * 100 >= gets.len() * 99, "{ok}/{} GETs 200", gets.len());
    assert!(p99 < Duration::from_millis(200), "p99 {p99:?}");
    assert_eq!(todos, 1, "a slow body created nothing");
}

/// Polls `cond` every 5 ms for up to `limit`; returns how long it took.
async fn wait_for(limit: Duration, cond: impl Fn() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// One HTTP/1.1 request on its own connection; the status and Retry-After, or what went wrong
/// at the connection level.
async fn raw_get(addr: SocketAddr, path: &'static str) -> Result<(u16, Option<String>), String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(60), io)
        .await
        .map_err(|_| "no answer within 60 s".to_string())??;
    let text = String::from_utf8_lossy(&buf);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {:?}", &text[..text.len().min(80)]))?;
    let retry_after = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
        .map(|(_, v)| v.trim().to_owned());
    Ok((status, retry_after))
}

/// Fails early with a clear message when the open-files limit cannot hold the drill's sockets.
fn require_fds(needed: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(soft) = soft {
        assert!(
            soft >= needed,
            "open-files limit {soft} < {needed}: run via scripts/test.sh, which raises `ulimit -n`"
        );
    }
}
