//! Through PgBouncer in transaction mode (Debian's 1.18, which does not track prepared
//! statements): with `DB_POOLER_MODE=transaction` every route works under concurrency, with more
//! of the service's connections than the pooler has server connections, and no named statement is
//! left on a server; with the default mode the same load fails, which is why the setting exists.

use std::process::Command;

use futures::future::join_all;
use serde_json::json;

use crate::{
    helpers::{AppOptions, TestApp, server_addr, spawn_app_with},
    pgbouncer_harness::{PgBouncer, Release},
};

/// An app whose DATABASE_URL is the pooler (migrations straight to the server). The pooler drops
/// the `options` login parameter (where the default mode sets its timeouts), so the default mode
/// gets as far as its statements.
pub async fn app_through(bouncer: &PgBouncer, mode: &str) -> TestApp {
    let mut opts = AppOptions {
        db_via: Some(("127.0.0.1".into(), bouncer.port)),
        ..AppOptions::default()
    };
    for (k, v) in [
        ("DB_POOLER_MODE", mode),
        ("RATE_LIMIT_PER_SECOND", "0"),
        ("DB_POOL_MAX_SIZE", "16"),
    ] {
        opts.env.insert(k.into(), v.into());
    }
    opts.migration_direct = true;
    spawn_app_with(opts).await
}

/// 32 clients, each creating, reading, updating and listing: the statuses that came back.
pub async fn mixed_load(app: &TestApp) -> Vec<u16> {
    let clients = (0..32).map(|i| async move {
        let mut statuses = Vec::new();
        for round in 0..6 {
            let r = app
                .post_json(
                    "/todos",
                    &json!({"title": format!("client {i} round {round}")}),
                )
                .await;
            statuses.push(r.status().as_u16());
            let Ok(todo) = r.json::<serde_json::Value>().await else {
                continue;
            };
            let path = format!("/todos/{}", todo["id"]);
            statuses.push(app.get(&path).await.status().as_u16());
            statuses.push(
                app.patch_json(&path, &json!({"completed": true}))
                    .await
                    .status()
                    .as_u16(),
            );
            statuses.push(app.get("/todos?limit=5").await.status().as_u16());
        }
        statuses
    });
    join_all(clients).await.into_iter().flatten().collect()
}

/// An app through `bouncer` in `mode` under [`mixed_load`], with none of its requests failing
/// and more of the app's connections than the pooler has server connections.
pub async fn mixed_load_succeeds_through(bouncer: &PgBouncer, mode: &str) -> TestApp {
    let app = app_through(bouncer, mode).await;
    let statuses = mixed_load(&app).await;
    let failed: Vec<&u16> = statuses
        .iter()
        .filter(|s| !(200..300).contains(*s))
        .collect();
    assert!(
        failed.is_empty(),
        "{mode}: {} of {} requests failed: {failed:?}",
        failed.len(),
        statuses.len()
    );
    assert!(statuses.len() >= 32 * 6 * 4);
    assert!(
        app.db.pool().status().size > 2,
        "more clients than server connections"
    );
    app
}

/// The statement names on whichever server connections the pooler hands out, read a few times.
pub async fn server_statement_names(bouncer: &PgBouncer, database: &str) -> Vec<String> {
    let through = sqlx::postgres::PgConnectOptions::new()
        .host("127.0.0.1")
        .port(bouncer.port)
        .username("postgres")
        .database(database)
        .statement_cache_capacity(0);
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect_with(&through)
        .await
        .unwrap();
    let mut names = Vec::new();
    for _ in 0..6 {
        let rows = sqlx::raw_sql("SELECT name FROM pg_prepared_statements")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        names.extend(rows.iter().map(|row| sqlx::Row::get::<String, _>(row, 0)));
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_works_through_pgbouncer_and_leaves_no_named_statement() {
    let bouncer = tokio::task::spawn_blocking(|| PgBouncer::start(server_addr(), 2))
        .await
        .unwrap();
    let app = mixed_load_succeeds_through(&bouncer, "transaction").await;
    let names = server_statement_names(&bouncer, &app.test_db.name).await;
    assert!(names.is_empty(), "named statements left behind: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_transaction_mode_the_same_load_fails_through_pgbouncer() {
    let bouncer = tokio::task::spawn_blocking(|| PgBouncer::start(server_addr(), 2))
        .await
        .unwrap();
    let app = app_through(&bouncer, "none").await;
    let statuses = mixed_load(&app).await;
    let failed = statuses.iter().filter(|s| **s >= 500).count();
    eprintln!(
        "named statements through a transaction pooler: {failed} of {} requests failed",
        statuses.len()
    );
    assert!(failed > 0, "named statements survived transaction pooling?");
}

/// Configured as a pooler is at its plainest (`pool_mode = transaction`, nothing else), PgBouncer
/// refuses the startup parameters sqlx sends; `doctor` says which pgbouncer.ini line fixes it.
#[tokio::test]
async fn doctor_names_the_pgbouncer_setting_a_refused_login_needs() {
    let bouncer = tokio::task::spawn_blocking(|| {
        PgBouncer::start_with(Release::Debian, server_addr(), 2, "")
    })
    .await
    .unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", bouncer.port);
    let direct = format!("postgres://postgres@{}/postgres", server_addr());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_todo-service"))
            .arg("doctor")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", url)
            .env("DB_POOLER_MODE", "transaction")
            .env("DATABASE_MIGRATION_URL", direct)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report = String::from_utf8(out.stdout).unwrap();
    let login = report
        .lines()
        .skip_while(|l| !l.contains("login"))
        .take(2)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        login.contains("[FAIL]") && login.contains("unsupported startup parameter"),
        "{report}"
    );
    assert!(
        report.contains("ignore_startup_parameters = extra_float_digits,options"),
        "{report}"
    );
}
