//! Liveness and readiness probes.
//!
//! `/health` proves the process answers HTTP and touches nothing else, so an orchestrator never
//! restarts a healthy service because its database is down (the restart would not help and would
//! drop in-flight work). `/ready` answers from a recent database round trip, so a load balancer
//! can route around an instance that cannot serve data.
//!
//! Two readings of readiness. The public one ([`ready`], on the service's port) says ready or not
//! and the class of trouble, nothing an outsider could use: no address, no pool or breaker
//! counters, no driver text. The operators' one ([`ready_detail`], on the admin listener, see
//! `admin.rs`) says everything this replica knows.

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::db::{DbStatus, breaker::BreakerState, budget::ServerConnections};
use crate::http::{
    problem::{ApiError, Problem, code::Code},
    state::AppState,
};
use crate::release::RELEASE;

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the process answers.
    pub status: &'static str,
    pub version: &'static str,
}

/// The public `/ready` body.
#[derive(Serialize, ToSchema)]
pub struct Ready {
    /// `ready`.
    pub status: &'static str,
    pub checks: Checks,
}

#[derive(Serialize, ToSchema)]
pub struct Checks {
    pub database: DatabaseReadiness,
}

/// What the public `/ready` says about the database.
#[derive(Serialize, ToSchema)]
pub struct DatabaseReadiness {
    /// `ok` or `fail`.
    pub status: &'static str,
}

/// The admin listener's `/ready` body.
#[derive(Serialize)]
pub struct ReadyDetail {
    /// `ready`.
    pub status: &'static str,
    /// Which release this replica runs (`crate::release`).
    pub release: &'static str,
    pub checks: DetailChecks,
}

#[derive(Serialize)]
pub struct DetailChecks {
    pub database: DatabaseCheck,
}

/// What the admin listener's `/ready` reports about the database.
#[derive(Serialize)]
pub struct DatabaseCheck {
    /// `ok` or `fail`.
    pub status: &'static str,
    /// Host name from `DATABASE_URL`.
    pub host: String,
    /// The address the host was resolved to at startup, `null` until it resolves.
    pub address: Option<String>,
    /// DNS lookups performed for the database host since startup (1 in a healthy run, 0 for an IP).
    pub dns_lookups: u64,
    pub migrations_applied: bool,
    pub schema: SchemaCheck,
    pub pool: PoolCheck,
    /// The server's connection limit that every replica's pool shares (when it could be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_connections: Option<ServerConnectionsCheck>,
    pub circuit: CircuitCheck,
    /// What is wrong, when `status` is `fail`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The schema this build's migrations end at, and the one the database had when this replica
/// migrated: during a rolling upgrade a replica of the previous release sees a newer one.
#[derive(Serialize)]
pub struct SchemaCheck {
    pub expected: i64,
    pub applied: Option<i64>,
}

#[derive(Serialize)]
pub struct PoolCheck {
    pub max_size: usize,
    pub size: usize,
    pub available: usize,
    /// Connections lent to calls now (`size - available`).
    pub in_use: usize,
    pub waiting: usize,
}

/// The connection budget: `max_connections` less the reserved ones is shared by every replica.
#[derive(Serialize)]
pub struct ServerConnectionsCheck {
    pub max_connections: i32,
    pub reserved: i32,
    /// Client connections open on the server now, from every replica and anything else.
    pub in_use: i32,
    pub free: i32,
    /// Replicas with this one's `DB_POOL_MAX_SIZE` that would still fit.
    pub more_replicas_at_this_pool_size: i64,
}

impl ServerConnectionsCheck {
    fn new(s: ServerConnections, pool_max_size: usize) -> Self {
        ServerConnectionsCheck {
            max_connections: s.max_connections,
            reserved: s.reserved,
            in_use: s.in_use,
            free: s.free(),
            more_replicas_at_this_pool_size: s.more_replicas(pool_max_size),
        }
    }
}

#[derive(Serialize)]
pub struct CircuitCheck {
    pub state: CircuitState,
    pub consecutive_failures: u32,
    /// Times the breaker opened since startup.
    pub opened_total: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl From<DbStatus> for DatabaseCheck {
    fn from(s: DbStatus) -> Self {
        DatabaseCheck {
            status: if s.error.is_none() { "ok" } else { "fail" },
            host: s.host,
            address: s.address.map(|a| a.to_string()),
            dns_lookups: s.dns_lookups,
            migrations_applied: s.migrations_applied,
            schema: SchemaCheck {
                expected: crate::db::expected_schema(),
                applied: s.schema_applied,
            },
            pool: PoolCheck {
                max_size: s.pool.max_size,
                size: s.pool.size,
                available: s.pool.available,
                in_use: s.pool.size.saturating_sub(s.pool.available),
                waiting: s.pool.waiting,
            },
            server_connections: None,
            circuit: CircuitCheck {
                state: match s.breaker {
                    BreakerState::Closed => CircuitState::Closed,
                    BreakerState::Open => CircuitState::Open,
                    BreakerState::HalfOpen => CircuitState::HalfOpen,
                },
                consecutive_failures: s.consecutive_failures,
                opened_total: s.breaker_opened_total,
            },
            error: s.error,
        }
    }
}

/// The probes, each with its part of the OpenAPI document.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
}

/// Liveness: answers as long as the process serves HTTP. Never touches the database.
#[utoipa::path(
    get, path = "/health", tag = "operations",
    responses((status = 200, description = "The process is alive", body = Health))
)]
pub async fn health() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// Readiness for anyone who can reach the port: ready or not, and on 503 the class of trouble.
/// Operators read the details on the admin listener (`ADMIN_LISTEN_ADDR`).
#[utoipa::path(
    get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready to serve data", body = Ready),
        (status = 503, description = "Not ready: a problem whose detail names the class of trouble",
         body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn ready(State(state): State<AppState>) -> Response {
    if let Some(draining) = draining(&state) {
        return draining;
    }
    let status = state.db.check().await;
    if status.error.is_none() {
        return axum::Json(Ready {
            status: "ready",
            checks: Checks {
                database: DatabaseReadiness { status: "ok" },
            },
        })
        .into_response();
    }
    let detail = if status.breaker == BreakerState::Open {
        "the database is unavailable; the circuit breaker is open"
    } else if status.reachable {
        "the database is not ready for requests yet (migrations or startup checks pending)"
    } else {
        "the database cannot be reached"
    };
    not_ready(
        detail,
        serde_json::json!({ "checks": { "database": { "status": "fail" } } }),
    )
}

/// Readiness for operators (the admin listener): everything this replica knows about its
/// database: the host and the address pinned for it, DNS lookups, migrations, the pool, the
/// breaker's counters and, when not ready, the error as the driver gave it.
pub async fn ready_detail(State(state): State<AppState>) -> Response {
    if let Some(draining) = draining(&state) {
        return draining;
    }
    let mut database = DatabaseCheck::from(state.db.check().await);
    if database.error.is_none() {
        database.server_connections = state
            .db
            .server_connections()
            .await
            .ok()
            .map(|s| ServerConnectionsCheck::new(s, database.pool.max_size));
    }
    let Some(detail) = database.error.clone() else {
        return axum::Json(ReadyDetail {
            status: "ready",
            release: RELEASE,
            checks: DetailChecks { database },
        })
        .into_response();
    };
    not_ready(
        &detail,
        serde_json::json!({ "release": RELEASE, "checks": { "database": database } }),
    )
}

/// 503 while a shutdown drains, without asking the database: the answer must not depend on it.
fn draining(state: &AppState) -> Option<Response> {
    state
        .draining
        .load(std::sync::atomic::Ordering::Relaxed)
        .then(|| {
            not_ready(
                "the service is shutting down; it still serves requests until it stops accepting",
                serde_json::json!({ "checks": { "shutdown": { "status": "draining" } } }),
            )
        })
}

fn not_ready(detail: &str, checks: serde_json::Value) -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Code::NotReady,
        "Not ready",
        detail,
    )
    .with_hint("The service retries by itself. Operators: the admin listener's /ready and `todo-service doctor` say why.")
    .with_retry_after(crate::http::problem::DB_RETRY_AFTER_SECS)
    .with_extra(checks)
    .into_response()
}
