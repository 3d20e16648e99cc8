//! The protective layers in front of the data routes (`/todos…`): authentication, rate limit,
//! admission control and a request timeout. Probes and docs are deliberately outside them,
//! so an operator can always see whether the service is alive and why it refuses work.
//!
//! From the outside in (see [`layer`]):
//! 0. **Authentication** ([`authenticate`]): who the caller is, 401/403 for those who may
//!    not, themselves throttled per address; a cheap check, and the rate limit needs its answer.
//! 1. **Rate limit** ([`rate_limit`], per caller: the token's `sub`, or the client's
//!    address): the cheapest refusal after that, so a runaway caller is stopped before any work
//!    is done for it and never takes a place in the queue. 429 with `Retry-After`.
//! 2. **Body read** ([`read_body`]): the whole body, under `HTTP_BODY_READ_TIMEOUT` and
//!    `MAX_BODY_BYTES`, before the request may take a slot: slow senders hold a connection, not
//!    a slot. 408 / 413.
//! 3. **Admission** ([`admission`]): at most `MAX_IN_FLIGHT` requests are worked on; the
//!    next ones wait their turn for at most `MAX_QUEUE_WAIT`, and what cannot start within that
//!    is refused with 503 + a jittered `Retry-After`.
//! 4. **Request timeout** (tower-http): inside admission, so a request that times out frees its
//!    slot; answered 504 (turned into a problem by `error::ensure_problem`).
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

use std::sync::Arc;

use axum::http::StatusCode;
use tower::{
    ServiceBuilder,
    layer::util::{Identity, Stack},
    util::Either,
};
use tower_http::timeout::TimeoutLayer;

use self::{
    admission::{AdmissionLayer, EarlyRefusalLayer},
    authenticate::AuthenticateLayer,
    caller::CallerKey,
    client_ip::ClientAddr,
    rate_limit::RateLimitLayer,
    read_body::ReadBodyLayer,
};
use crate::{auth::Verifier, config::Config};

/// The layers described in the module doc (tower's `Stack` names them innermost first).
pub type Protect = Stack<
    TimeoutLayer,
    Stack<
        AdmissionLayer,
        Stack<
            ReadBodyLayer,
            Stack<Either<RateLimitLayer, Identity>, Stack<AuthenticateLayer, Identity>>,
        >,
    >,
>;

/// The layers for the data routes, to sit innermost in the router's one layer stack (see
/// `http::router`).
///
/// The rate limiter sits outside admission, so a refused client is answered before it can take a
/// place in the queue or a slot (admission takes its slot when called, never in `poll_ready`).
/// Anything stateful shares its state across the router's per-route clones: admission one gate,
/// the governor one limiter, authentication one verifier.
///
/// Also returns admission's early refusal, for the router to place in front of its costlier
/// layers (see [`admission::EarlyRefusal`]).
pub fn layer(config: &Config, verifier: Option<Arc<Verifier>>) -> (EarlyRefusalLayer, Protect) {
    let admission = AdmissionLayer::new(admission::Limits {
        max_in_flight: config.max_in_flight,
        max_queue_wait: config.max_queue_wait,
    });
    let early = admission.early();
    let key = CallerKey(ClientAddr::new(
        &config.clients.trusted_proxies,
        config.clients.ipv6_prefix,
    ));
    let protect = ServiceBuilder::new()
        .layer(AuthenticateLayer::new(
            &config.auth,
            verifier,
            key.clone(),
            config.clients.max_clients,
        ))
        .option_layer(
            config
                .rate_limit
                .map(|limit| rate_limit::layer(limit, key, config.clients.max_clients)),
        )
        .layer(ReadBodyLayer(read_body::Limits {
            max_bytes: config.max_body_bytes,
            deadline: config.body_read_timeout,
        }))
        .layer(admission)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            config.request_timeout,
        ))
        .into_inner();
    (early, protect)
}
