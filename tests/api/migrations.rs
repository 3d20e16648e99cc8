//! Migrations are safe to run on every start and by several replicas at once. The test drives the
//! same function the service runs at startup.

use std::time::Duration;

use todo_service::db::{MIGRATOR, run_migrations};

use crate::helpers::{AppOptions, TestDb, spawn_app_with};

#[tokio::test]
async fn concurrent_and_repeated_migration_runs_apply_each_migration_once() {
    let db = TestDb::create().await;
    let mut runs = Vec::new();
    for _ in 0..4 {
        let url = db.url();
        runs.push(tokio::spawn(async move {
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url.as_str())
                .await
                .unwrap();
            run_migrations(&mut conn).await
        }));
    }
    for r in runs {
        r.await.unwrap().expect("every concurrent run succeeds");
    }
    // And again, as on a restart.
    let mut conn = db.connect().await;
    run_migrations(&mut conn)
        .await
        .expect("re-running is a no-op");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(applied as usize, MIGRATOR.iter().count());
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'todos'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(tables, 1);
}

/// A newer release's expand-only migration does not stop this one: it serves, and its admin
/// `/ready` and `doctor` show the two schema versions. A contracting one (raising
/// `schema_compatibility`) does: not ready, naming the release the schema needs.
#[tokio::test]
async fn a_newer_schema_is_served_until_it_contracts_past_this_release() {
    let expected = todo_service::db::expected_schema();
    let db = std::sync::Arc::new(TestDb::create().await);
    let mut conn = db.connect().await;
    run_migrations(&mut conn).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, 'a newer release', true, '\\x00', 0)",
    )
    .bind(expected + 1)
    .execute(&mut conn)
    .await
    .unwrap();
    let app = spawn_app_with(AppOptions {
        db: Some(std::sync::Arc::clone(&db)),
        ..AppOptions::default()
    })
    .await;
    let ready: serde_json::Value = app.admin_get("/ready").await.json().await.unwrap();
    assert_eq!(ready["release"], todo_service::release::RELEASE);
    assert_eq!(ready["checks"]["database"]["schema"]["expected"], expected);
    assert_eq!(
        ready["checks"]["database"]["schema"]["applied"],
        expected + 1
    );
    assert_eq!(app.get("/todos").await.status(), 200);
    app.stop().await.unwrap();

    sqlx::query("UPDATE schema_compatibility SET oldest_serving_schema = $1")
        .bind(expected + 1)
        .execute(&mut conn)
        .await
        .unwrap();
    let app = spawn_app_with(AppOptions {
        db: Some(std::sync::Arc::clone(&db)),
        wait_ready: false,
        ..AppOptions::default()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = app.admin_get("/ready").await;
    assert_eq!(r.status(), 503);
    let why = r.text().await.unwrap();
    assert!(
        why.contains(&format!(
            "its migrations end at {expected}, and the schema ({}) serves releases whose \
             migrations reach {} or later",
            expected + 1,
            expected + 1
        )),
        "{why}"
    );
    let r = app.get("/todos").await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
}
