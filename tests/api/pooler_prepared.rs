//! Through a PgBouncer that carries prepared statements (1.21 or later, `max_prepared_statements`)
//! with `DB_POOLER_MODE=transaction-prepared`: every route works with named statements and no
//! per-call transaction, and the service refuses to serve until the pooler's server connections
//! have the timeouts and the pooler renames statements (Debian's 1.18 passes names through).

use std::{process::Command, time::Duration};

use crate::{
    helpers::{AppOptions, TestApp, server_addr, spawn_app_with},
    pgbouncer::{mixed_load_succeeds_through, server_statement_names},
    pgbouncer_harness::PgBouncer,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_prepared_serves_every_route_with_statements_the_pooler_carries() {
    let bouncer = tokio::task::spawn_blocking(|| PgBouncer::start_prepared(server_addr(), 2))
        .await
        .unwrap();
    let app = mixed_load_succeeds_through(&bouncer, "transaction-prepared").await;
    // The statements were prepared under the pooler's names, never the service's own.
    let names = server_statement_names(&bouncer, &app.test_db.name).await;
    assert!(
        !names.is_empty() && names.iter().all(|n| n.starts_with("PGBOUNCER_")),
        "{names:?}"
    );
}

/// The admin listener's `/ready` (which says why) once the service has tried at least once:
/// (status, body).
async fn ready_after_a_try(app: &TestApp) -> (u16, String) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = app.admin_get("/ready").await;
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn transaction_prepared_refuses_a_pooler_that_passes_names_through() {
    let bouncer = tokio::task::spawn_blocking(|| PgBouncer::start(server_addr(), 2))
        .await
        .unwrap();
    let app = spawn_app_with(AppOptions {
        wait_ready: false,
        ..through(&bouncer)
    })
    .await;
    let (status, body) = ready_after_a_try(&app).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("passes statement names through") || body.contains("cannot check"),
        "{body}"
    );
    let r = app.get("/todos").await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
}

fn through(bouncer: &PgBouncer) -> AppOptions {
    let mut opts = AppOptions {
        db_via: Some(("127.0.0.1".into(), bouncer.port)),
        migration_direct: true,
        ..AppOptions::default()
    };
    for (k, v) in [
        ("DB_POOLER_MODE", "transaction-prepared"),
        ("DB_STATEMENT_TIMEOUT", "4s"),
        ("DB_IDLE_IN_TRANSACTION_TIMEOUT", "9s"),
    ] {
        opts.env.insert(k.into(), v.into());
    }
    opts
}

/// Without the timeouts on the server's side the service does not serve, says what to run, and
/// serves once they are in force on new server connections; `doctor` reports both states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_prepared_waits_for_the_timeouts_on_the_server_connections() {
    let bouncer = tokio::task::spawn_blocking(|| PgBouncer::start_prepared(server_addr(), 2))
        .await
        .unwrap();
    let app = spawn_app_with(AppOptions {
        wait_ready: false,
        leave_db_settings: true,
        ..through(&bouncer)
    })
    .await;
    let (status, body) = ready_after_a_try(&app).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("statement_timeout on the pooler's server connections is 0 (off)")
            && body.contains("SET statement_timeout = '4000ms'")
            && body.contains("SET idle_in_transaction_session_timeout = '9000ms'"),
        "{body}"
    );
    assert_eq!(app.get("/todos").await.status(), 503);
    let report = doctor(&bouncer, &app);
    assert!(
        report.contains("[FAIL] pooler sessions") && report.contains("0 (off)"),
        "{report}"
    );

    // As the hint says, then the pooler's server connections renewed.
    app.test_db
        .set("statement_timeout", Duration::from_secs(4))
        .await;
    app.test_db
        .set(
            "idle_in_transaction_session_timeout",
            Duration::from_secs(9),
        )
        .await;
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(app.test_db.admin.as_str())
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&app.test_db.name)
        .execute(&mut admin)
        .await
        .unwrap();
    let waited = app.wait_until_ready(Duration::from_secs(10)).await;
    eprintln!("ready {waited:?} after the timeouts were set");
    assert_eq!(app.get("/todos").await.status(), 200);
    let report = doctor(&bouncer, &app);
    assert!(
        report.contains("[pass] pooler sessions") && report.contains("statement_timeout 4000ms"),
        "{report}"
    );
}

/// `todo-service doctor` with the app's database settings, through `bouncer`.
fn doctor(bouncer: &PgBouncer, app: &TestApp) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_todo-service"))
        .arg("doctor")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "DATABASE_URL",
            format!(
                "postgres://postgres@127.0.0.1:{}/{}",
                bouncer.port, app.test_db.name
            ),
        )
        .env("DATABASE_MIGRATION_URL", app.test_db.url().as_str())
        .env("DB_POOLER_MODE", "transaction-prepared")
        .env("DB_STATEMENT_TIMEOUT", "4s")
        .env("DB_IDLE_IN_TRANSACTION_TIMEOUT", "9s")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}
