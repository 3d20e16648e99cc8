//! The request's guard: the protective layers in front of the data routes (`/todos…`), built
//! once from the settings, their state shared across the router's per-route clones. Probes and
//! docs are deliberately outside them, so an operator can always see whether the service is
//! alive and why it refuses work. Where each sits in the stack, and why there, is written once,
//! in `http::router`.
//!
//! - **Authentication** ([`authenticate`]): who the caller is ([`caller`]), 401/403 for those who
//!   may not, themselves throttled per address.
//! - **Rate limit** ([`rate_limit`], per caller: the token's `sub`, or the client's address as
//!   [`client_ip`] finds it): 429 with `Retry-After`.
//! - **Body read** ([`read_body`]): the whole body, under `HTTP_BODY_READ_TIMEOUT` and
//!   `MAX_BODY_BYTES`, before the request may take a slot: slow senders hold a connection, not
//!   a slot. 408 / 413.
//! - **Admission** ([`admission`]): at most `MAX_IN_FLIGHT` requests are worked on; the next ones
//!   wait their turn for at most `MAX_QUEUE_WAIT`, and what cannot start within that is refused
//!   with 503 + a jittered `Retry-After`; its early refusal, asked by the front layer, answers
//!   before any other layer when the wait is already hopeless.
//! - **Request timeout** (tower-http): 504, turned into a problem by `problem::SafetyNetLayer`.
//!
//! The circuit breaker is not a layer here: it sits in `db`, around the database itself, where it
//! sees exactly the failures that mean "database unavailable" and nothing else.

pub mod admission;
pub mod authenticate;
pub mod caller;
pub mod client_ip;
pub mod limiter;
pub mod rate_limit;
pub mod read_body;

use std::{pin::Pin, sync::Arc};

use axum::{
    body::Body,
    http::{Response, StatusCode},
};
use tower_http::timeout::TimeoutLayer;

use self::{
    admission::{AdmissionLayer, EarlyRefusal},
    authenticate::AuthenticateLayer,
    caller::CallerKey,
    client_ip::ClientAddr,
    limiter::LimitPolicy,
    rate_limit::RateLimitLayer,
    read_body::ReadBodyLayer,
};
use crate::{auth::Verifier, config::Config};

/// A guard's future that had to be boxed: one that waits (admission's queue, the body read)
/// holds the inner service and the request across awaits, and a hand-written state machine for
/// each would be longer than the allocation is dear (it is taken only by requests that wait or
/// carry a body).
pub type BoxedResponse<E> = Pin<Box<dyn Future<Output = Result<Response<Body>, E>> + Send>>;

/// The guard's layers, for `http::router` to place.
pub struct Guard {
    /// Asked by the front layer (`http::front`), before everything else.
    pub early_refusal: EarlyRefusal,
    pub authenticate: AuthenticateLayer,
    /// `None` when `RATE_LIMIT_PER_SECOND` is off.
    pub rate_limit: Option<RateLimitLayer>,
    /// The policy the rate limit's answers state; applied by the front layer on the way out
    /// ([`rate_limit::standard_fields`]).
    pub rate_limit_policy: Option<LimitPolicy>,
    pub read_body: ReadBodyLayer,
    pub admission: AdmissionLayer,
    pub timeout: TimeoutLayer,
}

impl Guard {
    /// `verifier` checks bearer tokens (`AUTH_MODE=jwt`); `None` lets everyone through as the
    /// anonymous caller.
    pub fn new(config: &Config, verifier: Option<Arc<Verifier>>) -> Guard {
        let admission = AdmissionLayer::new(admission::AdmissionLimits {
            max_in_flight: config.max_in_flight,
            max_queue_wait: config.max_queue_wait,
        });
        let key = CallerKey(ClientAddr::new(
            &config.clients.trusted_proxies,
            config.clients.ipv6_prefix,
        ));
        let max_clients = config.clients.max_clients;
        let authenticate = AuthenticateLayer::new(&config.auth, verifier, key.clone(), max_clients);
        let (rate_limit, rate_limit_policy) = config
            .rate_limit
            .map(|limit| rate_limit::layer(limit, key, max_clients))
            .unzip();
        Guard {
            early_refusal: admission.early(),
            authenticate,
            rate_limit,
            rate_limit_policy,
            read_body: ReadBodyLayer(read_body::BodyLimits {
                max_bytes: config.max_body_bytes,
                deadline: config.body_read_timeout,
            }),
            admission,
            timeout: TimeoutLayer::with_status_code(
                StatusCode::GATEWAY_TIMEOUT,
                config.request_timeout,
            ),
        }
    }
}
