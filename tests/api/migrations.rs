//! Migrations are safe to run on every start and by several replicas at once. The test drives the
//! same function the service runs at startup.

use std::time::{Duration, Instant};

use sqlx::Executor;
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

/// The migrations up to, not including, the newest: a database one release behind.
async fn one_migration_behind(db: &TestDb) -> sqlx::PgConnection {
    let known = &MIGRATOR.migrations;
    let previous = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(known[..known.len() - 1].to_vec()),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    let mut conn = db.connect().await;
    previous.run_direct(None, &mut conn, false).await.unwrap();
    conn
}

/// A migration whose lock another session holds for 10 s (a long transaction that wrote to
/// `todos`): it gives up after `DB_MIGRATION_LOCK_TIMEOUT` and tries again with backoff, so the
/// statements of the replicas already serving queue behind its lock request for at most that
/// long at a time, and it completes once the lock is released. Without the lock timeout they would
/// wait the whole 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_behind_a_long_transaction_holds_requests_up_for_its_lock_timeout_at_most() {
    let db = std::sync::Arc::new(TestDb::create().await);
    let mut holder = one_migration_behind(&db).await;
    sqlx::query("INSERT INTO todos (title) SELECT 'row ' || g FROM generate_series(1, 20) g")
        .execute(&mut holder)
        .await
        .unwrap();
    holder.execute("BEGIN").await.unwrap();
    holder
        .execute("UPDATE todos SET title = 'held' WHERE id = 1")
        .await
        .unwrap();

    // What replicas already on this schema keep doing meanwhile: reads and writes of other todos.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|w| {
            let (db, stop) = (std::sync::Arc::clone(&db), std::sync::Arc::clone(&stop));
            tokio::spawn(async move {
                let mut conn = db.connect().await;
                let mut took = Vec::new();
                let mut n: i64 = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let id = 2 + (n * 4 + w) % 19;
                    let start = Instant::now();
                    sqlx::query("UPDATE todos SET completed = NOT completed WHERE id = $1")
                        .bind(id)
                        .execute(&mut conn)
                        .await
                        .expect("a write beside the migration");
                    sqlx::query("SELECT title FROM todos WHERE id = $1")
                        .bind(id)
                        .fetch_one(&mut conn)
                        .await
                        .expect("a read beside the migration");
                    took.push(start.elapsed());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                took
            })
        })
        .collect();

    let lock_timeout = Duration::from_millis(300);
    let app = spawn_app_with(AppOptions {
        wait_ready: false,
        db: Some(std::sync::Arc::clone(&db)),
        env: [("DB_MIGRATION_LOCK_TIMEOUT".to_string(), "300ms".to_string())].into(),
        ..AppOptions::default()
    })
    .await;
    let held = Duration::from_secs(10);
    tokio::time::sleep(held).await;
    let waiting = app.admin_get("/ready").await;
    assert_eq!(waiting.status(), 503, "migrated behind a held lock?");
    let why = waiting.text().await.unwrap();
    assert!(why.contains("lock timeout"), "{why}");
    holder.execute("COMMIT").await.unwrap();
    let released = Instant::now();
    app.wait_until_ready(Duration::from_secs(10)).await;
    let migrated_after = released.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut took: Vec<Duration> = Vec::new();
    for l in load {
        took.extend(l.await.unwrap());
    }
    took.sort();
    let p = |q: f64| took[((took.len() - 1) as f64 * q) as usize];
    eprintln!(
        "{} read+write pairs beside a migration held {held:?} behind a transaction \
         (lock_timeout {lock_timeout:?}): p50 {:?}, p99 {:?}, max {:?}; migrated {migrated_after:?} \
         after the lock was released",
        took.len(),
        p(0.5),
        p(0.99),
        took.last().unwrap()
    );
    assert!(took.len() > 100, "the replicas kept being served");
    assert!(
        *took.last().unwrap() < lock_timeout + Duration::from_millis(700),
        "a statement waited {:?} behind the migration",
        took.last().unwrap()
    );
    assert!(
        migrated_after < Duration::from_secs(5),
        "{migrated_after:?}"
    );
    let version: i64 = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    assert_eq!(version, todo_service::db::expected_schema());
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
    let url = db.url().to_string();
    let doctor = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_todo-service"))
            .arg("doctor")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report = String::from_utf8(doctor.stdout).unwrap();
    assert!(
        report.starts_with(&format!(
            "todo-service doctor ({})",
            todo_service::release::RELEASE
        )) && report.contains(&format!(
            "[warn] migrations: the database has migrations this build does not know: [{}] \
             (this build's schema ends at {expected})",
            expected + 1
        )),
        "{report}"
    );

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

/// An UPDATE that leaves the version alone (a release from before versions, a script) still moves
/// it on, so an If-Match taken before it fails; the service's own PATCH moves it exactly once.
#[tokio::test]
async fn every_update_moves_the_version_on_whoever_makes_it() {
    let app = crate::helpers::spawn_app().await;
    let todo = app.create(serde_json::json!({"title": "shared"})).await;
    let id = todo["id"].as_i64().unwrap();
    let path = format!("/todos/{id}");
    let before = app.get(&path).await;
    let etag = before.headers()["etag"].to_str().unwrap().to_owned();
    let mut direct = app.test_db.connect().await;
    sqlx::query("UPDATE todos SET title = 'changed behind the API' WHERE id = $1")
        .bind(id)
        .execute(&mut direct)
        .await
        .unwrap();
    let r = app
        .client
        .patch(app.url(&path))
        .header("if-match", &etag)
        .json(&serde_json::json!({"completed": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        412,
        "a change made without the version slipped past If-Match"
    );
    let v1 = version_of(&mut direct, id).await;
    assert_eq!(v1, 2);
    let r = app
        .patch_json(&path, &serde_json::json!({"completed": false}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(version_of(&mut direct, id).await, v1 + 1, "once per update");
}

async fn version_of(conn: &mut sqlx::PgConnection, id: i64) -> i64 {
    sqlx::query_scalar("SELECT version FROM todos WHERE id = $1")
        .bind(id)
        .fetch_one(conn)
        .await
        .unwrap()
}
