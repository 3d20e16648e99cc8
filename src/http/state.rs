//! What every handler can reach: the database handle and the few settings the handlers read.
//! Apart from the router, so the routes depend on it and the router on both, one way.

use std::{sync::Arc, time::Duration};

use crate::db::Db;

/// What every handler can reach. One `Arc`: axum clones the state for every request, and one
/// shared counter is cheaper than one per field when both cores touch it.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The fields of [`AppState`].
pub struct Shared {
    pub db: Db,
    /// `PUBLIC_BASE_URL` without a trailing slash, when configured.
    pub public_base_url: Option<Arc<str>>,
    /// Used when neither `PUBLIC_BASE_URL` nor a usable Host header is present.
    pub fallback_base_url: Arc<str>,
    /// The Host headers links may be built from (`ALLOWED_HOSTS`).
    pub allowed_hosts: crate::config::AllowedHosts,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_key_ttl: Duration,
    /// Set when a shutdown began: `/ready` answers 503 so load balancers stop routing here,
    /// while every route still serves (`startup` sets it, `SHUTDOWN_READINESS_DELAY`).
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}
