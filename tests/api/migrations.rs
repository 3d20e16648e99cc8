//! Migrations are safe to run on every start and by several replicas at once. The test drives the
//! same function the service runs at startup.

use todo_service::db::{MIGRATOR, run_migrations};

use crate::helpers::TestDb;

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
