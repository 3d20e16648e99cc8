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
    error::{ApiError, Problem},
};
use crate::db::DbStatus;

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
    pub database: DbStatus,
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
    let database = state.db.check().await;
    if database.status == "ok" {
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
        "not_ready",
        "Not ready",
        detail,
    )
    .with_hint("See `checks` for the failing dependency; the service retries by itself.")
    .with_retry_after(crate::http::error::DB_RETRY_AFTER_SECS)
    .with_extra(checks)
    .into_response()
}
