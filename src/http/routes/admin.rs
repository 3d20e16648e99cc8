//! The operators' listener (`ADMIN_LISTEN_ADDR`, loopback by default): the detail the public port
//! no longer shows. Its `/ready` reports the pinned database address, DNS lookups, the pool, the
//! breaker's counters and the driver's error text. Its `/health` answers like the public one.
//!
//! Why a listener of its own: that detail helps an operator and helps an attacker too (where the
//! database lives, when the breaker is open, what the driver says). It belongs on an address only
//! operators reach, as Envoy's and Linkerd's admin ports do, rather than behind a token on the
//! public port. Metrics go to the collector (OTLP). `todo-service doctor` checks the path to the
//! database from outside the process. No limits sit in front: the admin listener is not for
//! clients, and each request costs at most the one shared readiness probe.

use axum::{Router, routing::get};

use super::health;
use super::{method_not_allowed, route_not_found};
use crate::http::state::AppState;

/// The admin listener's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .route("/ready", get(health::ready_detail))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}
