//! Probes, starting with the database down, the host resolved once, graceful shutdown.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::helpers::{
    AppOptions, CountingResolver, TcpProxy, admin_url, assert_problem, spawn_app, spawn_app_with,
};

#[tokio::test]
async fn health_answers_and_ready_reports_the_database_in_detail_only_to_operators() {
    let app = spawn_app().await;
    let r = app.get("/health").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ok");

    let r = app.get("/ready").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"status": "ready", "checks": {"database": {"status": "ok"}}}),
        "the public port says ready and nothing about the database's whereabouts"
    );

    let r = app.admin_get("/ready").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let db = &body["checks"]["database"];
    assert_eq!(db["status"], "ok", "{body}");
    assert_eq!(db["migrations_applied"], true);
    // The address the app pinned at startup: the pooler's when the suite runs through one.
    let expected = match crate::helpers::suite_pooler() {
        Some((host, port)) => format!("{host}:{port}"),
        None => crate::helpers::server_addr().to_string(),
    };
    assert_eq!(db["address"], expected);
    assert_eq!(db["circuit"]["state"], "closed");
    assert!(db["pool"]["max_size"].is_u64(), "{body}");
    assert!(db["pool"]["in_use"].is_u64(), "{body}");
    // The budget every replica shares, read from the server itself.
    let server = &db["server_connections"];
    let (max, reserved, in_use, free) = (
        server["max_connections"].as_i64().unwrap(),
        server["reserved"].as_i64().unwrap(),
        server["in_use"].as_i64().unwrap(),
        server["free"].as_i64().unwrap(),
    );
    assert!(max > 0 && in_use >= 1, "{body}");
    assert_eq!(free, (max - reserved - in_use).max(0), "{body}");
    assert_eq!(
        server["more_replicas_at_this_pool_size"].as_i64().unwrap(),
        free / db["pool"]["max_size"].as_i64().unwrap(),
        "{body}"
    );
    assert_eq!(app.admin_get("/health").await.status(), 200);
    assert_problem(app.admin_get("/todos").await, 404, "route_not_found").await;
}

#[tokio::test]
async fn the_admin_listener_can_be_turned_off_and_a_bad_address_is_named() {
    let mut opts = AppOptions::default();
    opts.env.insert("ADMIN_LISTEN_ADDR".into(), "off".into());
    let app = spawn_app_with(opts).await;
    assert_eq!(app.admin_addr, None);
    assert_eq!(app.get("/ready").await.status(), 200);
    let err = todo_service::config::Config::from_lookup(|k| match k {
        "DATABASE_URL" => Some("postgres://u@localhost/db".into()),
        "ADMIN_LISTEN_ADDR" => Some("localhost:9091".into()),
        _ => None,
    })
    .unwrap_err();
    assert_eq!(err.var, "ADMIN_LISTEN_ADDR");
}

#[tokio::test]
async fn the_service_starts_with_the_database_down_and_recovers_when_it_comes_up() {
    // The database "host" is a port where nothing listens yet.
    let mut proxy = TcpProxy::reserve().await;
    let opts = AppOptions {
        db_via: Some(("127.0.0.1".into(), proxy.addr.port())),
        wait_ready: false,
        ..AppOptions::default()
    };
    let app = spawn_app_with(opts).await;

    // Up and answering: liveness OK, readiness and data requests 503 with Retry-After, quickly.
    let r = app.get("/health").await;
    assert_eq!(r.status(), 200);
    let r = app.get("/ready").await;
    assert!(r.headers().contains_key("retry-after"));
    let p = assert_problem(r, 503, "not_ready").await;
    assert_eq!(p["checks"]["database"], json!({"status": "fail"}), "{p}");
    assert_eq!(p["detail"], "the database cannot be reached", "{p}");
    let r = app.admin_get("/ready").await;
    let p = assert_problem(r, 503, "not_ready").await;
    assert_eq!(p["checks"]["database"]["status"], "fail", "{p}");
    assert!(p["checks"]["database"]["error"].is_string(), "{p}");
    for _ in 0..3 {
        let started = Instant::now();
        let r = app.post_json("/todos", &json!({"title": "early"})).await;
        let elapsed = started.elapsed();
        assert_eq!(r.headers()["retry-after"], "1");
        assert_problem(r, 503, "database_unavailable").await;
        assert!(elapsed < Duration::from_secs(1), "503 took {elapsed:?}");
        let r = app.get("/todos").await;
        assert_problem(r, 503, "database_unavailable").await;
    }

    // The database appears: the service becomes ready by itself, no restart.
    proxy.start().await;
    let took = app.wait_until_ready(Duration::from_secs(10)).await;
    eprintln!("ready {took:?} after the database came up");
    let r = app.post_json("/todos", &json!({"title": "after"})).await;
    assert_eq!(r.status(), 201);
    // The app's database is the proxied one; the early POSTs left nothing behind.
    let mut conn = app.test_db.connect().await;
    let titles: Vec<String> = sqlx::query_scalar("SELECT title FROM todos")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(titles, ["after"]);
}

#[tokio::test]
async fn the_database_host_is_resolved_exactly_once_whatever_the_load() {
    let resolver = Arc::new(CountingResolver::default());
    let port = crate::helpers::server_addr().port();
    let opts = AppOptions {
        db_via: Some(("postgres.test".into(), port)),
        resolver: resolver.clone(),
        // A small pool so the burst below forces connections to be created, recycled and reused.
        env: [
            ("DB_POOL_MAX_SIZE".to_string(), "4".to_string()),
            ("MAX_IN_FLIGHT".to_string(), "200".to_string()),
        ]
        .into(),
        ..AppOptions::default()
    };
    let app = spawn_app_with(opts).await;
    assert_eq!(
        resolver.calls.load(Ordering::SeqCst),
        1,
        "one lookup at startup"
    );

    // The post-mortem's burst: 120 simultaneous requests, several times, plus writes.
    for round in 0..3 {
        let mut burst = Vec::new();
        for i in 0..120 {
            let client = app.client.clone();
            let url = app.url("/todos");
            burst.push(tokio::spawn(async move {
                if i % 10 == 0 {
                    client
                        .post(&url)
                        .json(&json!({"title": format!("r{round}-{i}")}))
                        .send()
                        .await
                } else {
                    client.get(&url).send().await
                }
            }));
        }
        for r in burst {
            let r = r.await.unwrap().expect("every request is answered");
            assert!(r.status().is_success(), "round {round}: {}", r.status());
        }
    }
    // Kill every pooled connection so the pool must reconnect, then use it again.
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(admin_url().as_str())
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'todo-service'")
        .bind(&app.test_db.name)
        .execute(&mut admin)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..20 {
        assert_eq!(app.get("/todos").await.status(), 200);
    }
    assert_eq!(
        resolver.calls.load(Ordering::SeqCst),
        1,
        "no lookup after startup"
    );
    assert_eq!(app.db.address().lookups(), 1);
    let ready: Value = app.admin_get("/ready").await.json().await.unwrap();
    assert_eq!(ready["checks"]["database"]["dns_lookups"], 1);
    assert_eq!(ready["checks"]["database"]["host"], "postgres.test");
}

#[tokio::test]
async fn connections_carry_the_configured_application_name_and_timeouts() {
    let mut opts = AppOptions::default();
    opts.env
        .insert("DB_APPLICATION_NAME".into(), "todo-test-app".into());
    opts.env
        .insert("DB_STATEMENT_TIMEOUT".into(), "1500ms".into());
    opts.env
        .insert("DB_IDLE_IN_TRANSACTION_TIMEOUT".into(), "2500ms".into());
    let app = spawn_app_with(opts).await;
    assert_eq!(app.get("/todos").await.status(), 200);
    let mut conn = app.test_db.connect().await;
    let names: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(
        !names.is_empty() && names.iter().all(|n| n.as_deref() == Some("todo-test-app")),
        "{names:?}"
    );
    if crate::helpers::suite_pooler().is_some() {
        // Through a transaction pooler the timeouts are `SET LOCAL` in each call's transaction,
        // not session settings; `statement_timeout_ends_a_statement_held_by_a_lock` shows they act.
        return;
    }
    // The setting is visible from a pooled connection: ask through a query the app would run.
    let pool = app.db.pool();
    let mut pooled = pool.get().await.unwrap();
    let timeout: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&mut *pooled)
        .await
        .unwrap();
    assert_eq!(timeout, "1500ms");
    let backstop: String = sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
        .fetch_one(&mut *pooled)
        .await
        .unwrap();
    assert_eq!(backstop, "2500ms");
}

/// DB_STATEMENT_TIMEOUT acts, whether it is a login setting (direct) or `SET LOCAL` in each
/// call's transaction (through a transaction pooler, as the suite's second pass runs): a read
/// stuck behind a lock ends at the timeout with a 503 the client may retry, not when the lock goes.
#[tokio::test]
async fn statement_timeout_ends_a_statement_held_by_a_lock() {
    let mut opts = AppOptions::default();
    opts.env
        .insert("DB_STATEMENT_TIMEOUT".into(), "300ms".into());
    opts.env.insert("REQUEST_TIMEOUT".into(), "10s".into());
    let app = spawn_app_with(opts).await;
    assert_eq!(app.get("/todos").await.status(), 200);

    let mut locker = app.test_db.connect().await;
    sqlx::raw_sql("BEGIN; LOCK TABLE todos IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let r = app.get("/todos").await;
    let took = start.elapsed();
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    assert_problem(r, 503, "database_timeout").await;
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "answered after {took:?}, with the statement timeout at 300 ms"
    );
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut locker)
        .await
        .unwrap();
    eprintln!(
        "a read behind a lock: 503 database_timeout after {took:?} (DB_STATEMENT_TIMEOUT=300ms)"
    );
    assert_eq!(app.get("/todos").await.status(), 200);
}

/// A write that reaches a read-only server (a standby: after a failover, a URL or pooler still
/// pointing at the former primary) is a 503 to retry, not a 500, and nothing is written; once the
/// server takes writes again, so does the service, without a restart. The server is made
/// read-only here the way a standby refuses writes: SQLSTATE 25006.
#[tokio::test]
async fn writes_on_a_read_only_server_are_a_503_to_retry_and_recover() {
    let mut opts = AppOptions::default();
    // Reads keep working meanwhile: the breaker stays closed through the few refused writes.
    opts.env
        .insert("BREAKER_FAILURE_THRESHOLD".into(), "50".into());
    let app = spawn_app_with(opts).await;
    let kept = app.create(json!({"title": "before"})).await;
    let mut admin = app.test_db.connect().await;
    let set = |on: bool| {
        format!(
            r#"ALTER DATABASE "{}" SET default_transaction_read_only = {on}"#,
            app.test_db.name
        )
    };
    // Sessions opened from now on see the setting; the pool's open ones are ended, as a
    // failover ends them.
    let end_sessions = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
        app.test_db.name
    );
    for sql in [set(true), end_sessions.clone()] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let before = app.row_count().await;
    let mut refused = 0;
    for i in 0..5 {
        let r = app
            .post_json("/todos", &json!({"title": format!("on a standby {i}")}))
            .await;
        if r.status() == 503 {
            assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
            let body = assert_problem(r, 503, "database_unavailable").await;
            assert!(!body.to_string().contains("25006"), "{body}");
            refused += 1;
        } else {
            panic!("a write on a read-only server answered {}", r.status());
        }
    }
    assert_eq!(refused, 5);
    assert_eq!(app.row_count().await, before, "nothing written");
    let r = app.get(&format!("/todos/{}", kept["id"])).await;
    assert_eq!(r.status(), 200, "reads still work");

    for sql in [set(false), end_sessions] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = app.post_json("/todos", &json!({"title": "after"})).await;
        if r.status() == 201 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(Instant::now() < deadline, "writes did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let app = spawn_app().await;
    let client = app.client.clone();
    let url = app.url("/todos");
    // Hold a request in flight with a slow body, then ask the server to stop.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(1);
    let request = tokio::spawn(async move {
        client
            .post(&url)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(tokio_stream(rx)))
            .send()
            .await
    });
    tx.send(Ok(r#"{"title": "#.into())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let test_db = Arc::clone(&app.test_db);
    let stopping = tokio::spawn(app.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    tx.send(Ok(r#""in flight"}"#.into())).await.unwrap();
    drop(tx);
    let r = request.await.unwrap().expect("in-flight request answered");
    assert_eq!(r.status(), 201);
    stopping.await.unwrap().expect("clean shutdown");
    let mut conn = test_db.connect().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM todos")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn on_shutdown_ready_turns_503_first_while_every_request_is_still_served() {
    let mut opts = AppOptions::default();
    opts.env
        .insert("SHUTDOWN_READINESS_DELAY".into(), "1s".into());
    let app = spawn_app_with(opts).await;
    let todo = app.create(json!({"title": "still here"})).await;
    let (client, todo_url) = (
        app.client.clone(),
        app.url(&format!("/todos/{}", todo["id"])),
    );
    let ready = app.url("/ready");
    let admin_ready = format!("http://{}/ready", app.admin_addr.unwrap());
    let addr = app.addr;

    let signalled = Instant::now();
    let stopping = tokio::spawn(app.stop());
    let mut turned = None;
    while signalled.elapsed() < Duration::from_millis(500) {
        if client.get(&ready).send().await.unwrap().status() == 503 {
            turned = Some(signalled.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let turned = turned.expect("/ready answers 503 within 500 ms of the signal");
    let body = assert_problem(client.get(&ready).send().await.unwrap(), 503, "not_ready").await;
    assert!(
        body["detail"].as_str().unwrap().contains("shutting down"),
        "{body}"
    );
    assert!(body["checks"]["shutdown"]["status"] == "draining", "{body}");
    assert_eq!(client.get(&admin_ready).send().await.unwrap().status(), 503);
    // Meanwhile everything is served, on kept-alive and on new connections alike.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.get(&todo_url).send().await.unwrap().status(), 200);
    let fresh = crate::helpers::http_client().build().unwrap();
    assert_eq!(fresh.get(&todo_url).send().await.unwrap().status(), 200);
    assert!(
        signalled.elapsed() < Duration::from_millis(900),
        "still inside the delay"
    );

    stopping.await.unwrap().expect("clean shutdown");
    let stopped = signalled.elapsed();
    eprintln!("/ready 503 after {turned:?}; stopped after {stopped:?} (delay 1 s)");
    assert!(
        stopped >= Duration::from_secs(1),
        "the listener stayed open for the delay: {stopped:?}"
    );
    assert!(stopped < Duration::from_secs(3), "{stopped:?}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

fn tokio_stream(
    mut rx: tokio::sync::mpsc::Receiver<Result<String, std::io::Error>>,
) -> impl futures::Stream<Item = Result<String, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
