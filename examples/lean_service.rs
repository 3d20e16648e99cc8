//! The calibration service, rebuilt on this crate's own stack: axum, a deadpool pool of 16
//! sqlx connections, the load test's very statements (taken from `loadtest/pgbench/`, which unit
//! tests keep identical to the service's), serde JSON — and nothing else (no rate limit, shedder,
//! timeout, breaker, request ids, CORS, authentication, validation beyond serde's, tracing or
//! metrics). It serves the four workloads the load test measures: GET one todo, a page of the list
//! (with each todo's `url` and the next page's `Link`, as the service answers), POST and PATCH.
//! Run beside the real service under the same load, the difference in CPU per request is what all
//! of that costs; see loadtest/archive.md#get-one-gap. A measuring
//! instrument, not a product: errors are bare status codes.
//!
//! `cargo build --release --example lean_service`, then
//! `DATABASE_URL=postgres://…/todos LISTEN_ADDR=127.0.0.1:18090 target/release/examples/lean_service`
//! against a database the service has migrated and seeded.

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use chrono::{DateTime, Utc};
use deadpool::managed::{Manager, Metrics, Pool, RecycleResult};
use serde::{Deserialize, Serialize};
use sqlx::{
    Connection as _, PgConnection, Row as _,
    postgres::{PgConnectOptions, PgRow},
};

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

/// The statements, each the SELECT/INSERT/UPDATE line of its pgbench script with pgbench's
/// variables turned into parameters.
struct Sql {
    get_one: &'static str,
    list: &'static str,
    create: &'static str,
    update: &'static str,
}

#[derive(Clone)]
struct App {
    pool: Pool<Connections>,
    sql: &'static Sql,
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

impl Todo {
    /// Columns: id, title, completed, position, sort_key, created_at, updated_at, version.
    fn from_row(row: &PgRow) -> Todo {
        let id: i64 = row.get(0);
        Todo {
            id,
            url: format!("http://127.0.0.1/todos/{id}"),
            title: row.get(1),
            completed: row.get(2),
            order: row.get(3),
            created_at: row.get(5),
            updated_at: row.get(6),
        }
    }
}

type Conn = deadpool::managed::Object<Connections>;

async fn conn(app: &App) -> Result<Conn, StatusCode> {
    app.pool
        .get()
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)
}

fn failed(_: sqlx::Error) -> StatusCode {
    StatusCode::INTERNAL_SERVER_ERROR
}

async fn get_one(State(app): State<App>, Path(id): Path<i64>) -> Result<Json<Todo>, StatusCode> {
    let mut conn = conn(&app).await?;
    let row = sqlx::query(app.sql.get_one)
        .bind(id)
        .bind(app.owner)
        .fetch_optional(&mut *conn)
        .await
        .map_err(failed)?
        .ok_or(StatusCode::NOT_FOUND)?;
    Ok(Json(Todo::from_row(&row)))
}

#[derive(Deserialize)]
struct Page {
    limit: Option<i64>,
}

/// A first page: `limit` rows and, when more follow, the next page's URL in `Link`.
async fn list(
    State(app): State<App>,
    Query(page): Query<Page>,
) -> Result<impl IntoResponse, StatusCode> {
    let limit = page.limit.unwrap_or(20).clamp(1, 100);
    let mut conn = conn(&app).await?;
    let mut rows = sqlx::query(app.sql.list)
        .bind(app.owner)
        .bind(i64::MIN)
        .bind(limit + 1)
        .fetch_all(&mut *conn)
        .await
        .map_err(failed)?;
    drop(conn);
    let mut headers = HeaderMap::new();
    if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        let last = rows.last().expect("a row");
        let (sort_key, id): (i64, i64) = (last.get(4), last.get(0));
        let next = format!(
            "<http://127.0.0.1/todos?limit={limit}&cursor={sort_key:016x}_{id:016x}>; rel=\"next\""
        );
        headers.insert(header::LINK, HeaderValue::try_from(next).expect("ASCII"));
    }
    let todos: Vec<Todo> = rows.iter().map(Todo::from_row).collect();
    Ok((headers, Json(todos)))
}

#[derive(Deserialize)]
struct NewTodo {
    title: String,
}

async fn create(
    State(app): State<App>,
    Json(new): Json<NewTodo>,
) -> Result<impl IntoResponse, StatusCode> {
    let mut conn = conn(&app).await?;
    let row = sqlx::query(app.sql.create)
        .bind(new.title)
        .bind(app.owner)
        .fetch_one(&mut *conn)
        .await
        .map_err(failed)?;
    drop(conn);
    let todo = Todo::from_row(&row);
    let location = HeaderValue::try_from(todo.url.as_str()).expect("ASCII");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(todo),
    ))
}

#[derive(Deserialize)]
struct Changes {
    completed: Option<bool>,
}

async fn update(
    State(app): State<App>,
    Path(id): Path<i64>,
    Json(changes): Json<Changes>,
) -> Result<Json<Todo>, StatusCode> {
    let mut conn = conn(&app).await?;
    let row = sqlx::query(app.sql.update)
        .bind(changes.completed)
        .bind(id)
        .bind(app.owner)
        .fetch_optional(&mut *conn)
        .await
        .map_err(failed)?
        .ok_or(StatusCode::NOT_FOUND)?;
    Ok(Json(Todo::from_row(&row)))
}

/// The statement line of a pgbench script, pgbench's variables replaced as given.
fn statement(script: &str, replacements: &[(&str, &str)]) -> &'static str {
    let mut sql = script
        .lines()
        .find(|l| {
            ["SELECT", "INSERT", "UPDATE"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .expect("a statement line")
        .trim_end_matches(';')
        .to_owned();
    for (from, to) in replacements {
        assert!(sql.contains(from), "{from} in {sql}");
        sql = sql.replace(from, to);
    }
    Box::leak(sql.into_boxed_str())
}

#[tokio::main]
async fn main() {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let listen = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:18090".into());
    let sql = Sql {
        get_one: statement(
            include_str!("../loadtest/pgbench/get-one.sql"),
            &[(":id", "$1"), (":owner", "$2")],
        ),
        list: statement(
            include_str!("../loadtest/pgbench/list.sql"),
            &[(":owner", "$1"), (":start", "$2"), (":limit", "$3")],
        ),
        create: statement(
            include_str!("../loadtest/pgbench/post.sql"),
            &[("'load test'", "$1"), (":owner", "$2")],
        ),
        update: statement(
            include_str!("../loadtest/pgbench/patch.sql"),
            &[
                ("COALESCE(true, completed)", "COALESCE($1, completed)"),
                (":id", "$2"),
                (":owner", "$3"),
            ],
        ),
    };
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
        sql: Box::leak(Box::new(sql)),
        owner: Box::leak(owner.into_boxed_str()),
    };
    let router = Router::new()
        .route("/todos", get(list).post(create))
        .route("/todos/{id}", get(get_one).patch(update))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .expect("LISTEN_ADDR");
    axum::serve(listener, router).await.expect("serve");
}
