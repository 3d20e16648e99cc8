//! Liveness and readiness probes.
//!
//! `/health` proves the process answers HTTP and touches nothing else, so an orchestrator never
//! restarts a healthy service because its database is down (the restart would not help and would
//! drop in-flight work). `/ready` does one cheap database round trip and says what is wrong, so a
//! load balancer can route around an instance that cannot serve data.

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

use super::{
    AppState,
    code::Code,
    error::{ApiError, Problem},
};
use crate::db::{DbStatus, breaker::BreakerState};

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the process answers.
    pub status: &'static str,
    pub version: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct Ready {
    /// `ready`.
    pub status: &'static str,
    pub checks: Checks,
}

#[derive(Serialize, ToSchema)]
pub struct Checks {
    pub database: DatabaseCheck,
}

/// What `/ready` reports about the database.
#[derive(Serialize, ToSchema)]
#[schema(as = DbStatus)]
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
    pub pool: PoolCheck,
    pub circuit: CircuitCheck,
    /// What is wrong, when `status` is `fail`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = PoolStatus)]
pub struct PoolCheck {
    pub max_size: usize,
    pub size: usize,
    pub available: usize,
    pub waiting: usize,
}

#[derive(Serialize, ToSchema)]
#[schema(as = CircuitStatus)]
pub struct CircuitCheck {
    pub state: CircuitState,
    pub consecutive_failures: u32,
    /// Times the breaker opened since startup.
    pub opened_total: u64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = BreakerState)]
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
            pool: PoolCheck {
                max_size: s.pool.max_size,
                size: s.pool.size,
                available: s.pool.available,
                waiting: s.pool.waiting,
            },
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

/// Readiness: one database round trip, bounded to about a second.
#[utoipa::path(
    get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready to serve data", body = Ready),
        (status = 503, description = "Not ready: a problem whose `checks` member says what failed",
         body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn ready(State(state): State<AppState>) -> Response {
    let database = DatabaseCheck::from(state.db.check().await);
    if database.error.is_none() {
        return (
            StatusCode::OK,
            axum::Json(Ready {
                status: "ready",
                checks: Checks { database },
            }),
        )
            .into_response();
    }
    let detail = database
        .error
        .clone()
        .unwrap_or_else(|| "database check failed".into());
    let checks = serde_json::json!({ "checks": { "database": database } });
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Code::NotReady,
        "Not ready",
        detail,
    )
    .with_hint("See `checks` for the failing dependency; the service retries by itself.")
    .with_retry_after(crate::http::error::DB_RETRY_AFTER_SECS)
    .with_extra(checks)
    .into_response()
}
