//! Drill 19: the database faults of drills 3, 4 and 12 with TLS on, plus a real restart.
//!
//! The app reaches a PostgreSQL with `ssl = on` under a name (`db.tls.test`) with
//! `sslmode=verify-full` and a CA made in the test, through a proxy, under load. The path is cut
//! and restored, every connection is terminated, and Postgres is restarted with `pg_ctl`. Each
//! fault gets the answer it gets without TLS, recovery needs no restart of the app, and every
//! connection the app holds afterwards is encrypted.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use serde_json::json;
use todo_service::db::breaker::BreakerState;

use crate::{
    helpers::{AppOptions, CountingResolver, Load, Outcome, TcpProxy, spawn_app_with},
    opts,
    pg_tls::TlsPostgres,
    serial, summary, terminate_app_connections, wait_for,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_19_with_tls_on_a_cut_a_kill_and_a_restart_each_recover() {
    let _turn = serial().await;
    let pg = tokio::task::spawn_blocking(TlsPostgres::start)
        .await
        .unwrap();
    let pg = Arc::new(pg);
    let mut proxy = TcpProxy::reserve_for(pg.addr()).await;
    proxy.start().await;
    let resolver = Arc::new(CountingResolver::default());
    let app = spawn_app_with(AppOptions {
        db_server: Some(pg.admin_url()),
        db_via: Some(("db.tls.test".into(), proxy.addr.port())),
        db_query: Some(format!(
            "sslmode=verify-full&sslrootcert={}",
            pg.ca_file().display()
        )),
        resolver: resolver.clone(),
        ..opts(&[("RATE_LIMIT_PER_SECOND", "0")])
    })
    .await;
    let todo = app.create(json!({"title": "over TLS"})).await;
    let path = format!("/todos/{}", todo["id"]);
    let load = Load::start(app.url(&path), 6);
    tokio::time::sleep(Duration::from_millis(600)).await;

    // 1. The path is cut: the breaker opens, requests get a fast 503; restored, it closes.
    let cut_at = load.start.elapsed();
    proxy.cut();
    let opened_after = wait_for(Duration::from_secs(1), || {
        app.db.breaker().state() == BreakerState::Open
    })
    .await
    .expect("breaker open within 1 s of the cut");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let restored_at = load.start.elapsed();
    proxy.start().await;
    let recovered_after = wait_for(Duration::from_secs(5), || {
        app.db.breaker().state() == BreakerState::Closed
    })
    .await
    .expect("closed within 5 s of the path's return");
    tokio::time::sleep(Duration::from_millis(600)).await;

    // 2. Every connection is terminated: reads are retried on fresh (TLS) connections.
    let kill_at = load.start.elapsed();
    let killed = terminate_app_connections(&app).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // 3. Postgres restarts.
    let restart_at = load.start.elapsed();
    let server = Arc::clone(&pg);
    tokio::task::spawn_blocking(move || server.restart())
        .await
        .unwrap();
    let restarted_at = load.start.elapsed();
    let back_after = wait_for(Duration::from_secs(5), || {
        app.db.breaker().state() == BreakerState::Closed
    })
    .await
    .expect("closed within 5 s of the restart");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let settled = load.start.elapsed();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let results: Vec<Outcome> = load.finish().await.into_iter().flatten().collect();

    let within = |from: Duration, to: Duration| -> Vec<&Outcome> {
        results
            .iter()
            .filter(|o| o.at >= from && o.at + o.latency <= to)
            .collect()
    };
    let before = within(Duration::ZERO, cut_at);
    let open = within(cut_at + opened_after, restored_at);
    let healed = within(
        restored_at + recovered_after + Duration::from_millis(100),
        kill_at,
    );
    let killing = within(kill_at, restart_at);
    let restarting = within(restart_at, settled);
    let after = within(settled, Duration::MAX);
    let lookups = resolver.calls.load(Ordering::SeqCst);
    eprintln!(
        "TLS drill: before {:?}; cut: open after {opened_after:?}, {:?}, closed {recovered_after:?} \
         after the return; healed {:?}; killed {killed}: {:?}; restart took {:?}, back {back_after:?} \
         later: {:?}; after {:?}; DNS lookups {lookups}",
        summary(&before),
        summary(&open),
        summary(&healed),
        summary(&killing),
        restarted_at - restart_at,
        summary(&restarting),
        summary(&after),
    );

    assert!(
        results.iter().all(|o| o.status.is_some()),
        "every request answered"
    );
    for (phase, outcomes) in [
        ("before", &before),
        ("healed", &healed),
        ("killing", &killing),
        ("after", &after),
    ] {
        assert!(!outcomes.is_empty(), "{phase}: no requests");
        assert!(
            outcomes.iter().all(|o| o.status == Some(200)),
            "{phase}: {:?}",
            summary(outcomes)
        );
    }
    assert!(!open.is_empty());
    for o in &open {
        assert_eq!(o.status, Some(503), "{o:?}");
        assert!(o.retry_after.is_some(), "503 without Retry-After: {o:?}");
        assert!(o.latency < Duration::from_millis(250), "slow 503: {o:?}");
    }
    for o in &restarting {
        assert!(
            o.status == Some(200) || (o.status == Some(503) && o.retry_after.is_some()),
            "during the restart only 200 or 503 with Retry-After: {o:?}"
        );
    }
    assert!(killed > 0, "the drill must kill live connections");
    assert_eq!(
        app.db.address().get(),
        Some(proxy.addr),
        "the address stayed pinned"
    );

    // Every connection the app holds now is encrypted.
    let mut admin = app.test_db.connect().await;
    let (sessions, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
         JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1 AND a.application_name = 'todo-service'",
    )
    .bind(&app.test_db.name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(sessions > 0);
    assert_eq!(encrypted, sessions, "every session is TLS");
}
