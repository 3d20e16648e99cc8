//! The calibration service, rebuilt on this crate's own stack: axum, a deadpool pool of 16
//! sqlx connections, the single-todo GET's very statement, serde JSON — and nothing else (no rate
//! limit, shedder, timeout, breaker, request ids, CORS, tracing or metrics). Run beside the real
//! service under the same load, the difference in CPU per request is what all of that costs; see
//! "Where the get-one gap comes from" in loadtest/RESULTS.md. A measuring instrument, not a
//! product: errors are bare status codes.
//!
//! `cargo build --release --example lean_service`, then
//! `DATABASE_URL=postgres://…/todos LISTEN_ADDR=127.0.0.1:18090 target/release/examples/lean_service`
//! against a database the service has migrated and seeded.

use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    routing::get,
};
use chrono::{DateTime, Utc};
use deadpool::managed::{Manager, Metrics, Pool, RecycleResult};
use serde::Serialize;
use sqlx::{Connection as _, PgConnection, Row as _, postgres::PgConnectOptions};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Connections(PgConnectOptions);

impl Manager for Connections {
    type Type = PgConnection;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<PgConnection, sqlx::Error> {
        PgConnection::connect_with(&self.0).await
    }

    async fn recycle(&self, _: &mut PgConnection, _: &Metrics) -> RecycleResult<sqlx::Error> {
        Ok(())
    }
}

#[derive(Clone)]
struct App {
    pool: Pool<Connections>,
    sql: &'static str,
    owner: &'static str,
}

/// The same fields as the service's `Todo`.
#[derive(Serialize)]
struct Todo {
    id: i64,
    url: String,
    title: String,
    completed: bool,
    order: Option<i64>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

async fn get_one(State(app): State<App>, Path(id): Path<i64>) -> Result<Json<Todo>, StatusCode> {
    let mut conn = app
        .pool
        .get()
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    let row = sqlx::query(app.sql)
        .bind(id)
        .bind(app.owner)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?
        .ok_or(StatusCode::NOT_FOUND)?;
    Ok(Json(Todo {
        id: row.get(0),
        url: format!("http://127.0.0.1/todos/{id}"),
        title: row.get(1),
        completed: row.get(2),
        order: row.get(3),
        created_at: row.get(5),
        updated_at: row.get(6),
    }))
}

#[tokio::main]
async fn main() {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let listen = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:18090".into());
    let script = include_str!("../loadtest/pgbench/get-one.sql");
    let sql = script
        .lines()
        .find(|l| l.starts_with("SELECT"))
        .expect("a SELECT line")
        .trim_end_matches(';')
        .replace(":id", "$1")
        .replace(":owner", "$2");
    // Whose todos it serves: it has no authentication, so the load test names the owner whose
    // rows it seeded (the service learns it from the token).
    let owner = std::env::var("LEAN_TWIN_OWNER").unwrap_or_default();
    let options: PgConnectOptions = url.parse().expect("DATABASE_URL");
    let pool = Pool::builder(Connections(options))
        .max_size(16)
        .build()
        .expect("a pool");
    let app = App {
        pool,
        sql: Box::leak(sql.into_boxed_str()),
        owner: Box::leak(owner.into_boxed_str()),
    };
    let router = Router::new()
        .route("/todos/{id}", get(get_one))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .expect("LISTEN_ADDR");
    axum::serve(listener, router).await.expect("serve");
}
