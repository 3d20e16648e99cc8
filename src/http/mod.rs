//! The HTTP surface: routes, shared state, and every middleware layer, applied in one place.
//!
//! Read [`router`] first: it merges the feature routers (`todos`, `health`), the OpenAPI document
//! and docs UI, the problem+json fallbacks for unknown routes and methods, and then wraps it all in
//! the layers, whose order is written once, in `guarded`.
//!
//! The rooms: [`routes`] (handlers, each module with its `router()`, and the OpenAPI document),
//! [`guard`] (who is calling, and whether the data routes let the request in), [`problem`] (the
//! one error shape and its codes), [`server`] (the accept loop), [`state`] (what every handler
//! can reach), `front` (the layer every request meets first), `cors` (its CORS policy),
//! `compress` (the data routes' answers, compressed) and `trace` (what it observes: the
//! request's id, span and log fields). Imports point one way: this file uses the
//! rooms, the rooms never use it.

mod compress;
mod cors;
mod front;
pub mod guard;
pub mod problem;
pub mod routes;
pub mod server;
pub mod state;
pub(crate) mod trace;

use std::sync::Arc;

use axum::Router;
use tower::ServiceBuilder;
use utoipa_swagger_ui::SwaggerUi;

use crate::{auth::Verifier, config::Config};
use compress::CompressLayer;
use cors::CorsPolicy;
use front::FrontLayer;
use guard::Guard;
pub use routes::base_url::BaseUrl;
use routes::{
    method_not_allowed,
    openapi::{ApiRoutes, api_routes},
    route_not_found,
};
pub use state::{AppState, Shared};
pub use trace::log_context;

/// The whole application: routes, docs, fallbacks and layers.
///
/// `verifier` checks bearer tokens on the data routes (`AUTH_MODE=jwt`); `None` serves them to
/// the anonymous caller.
pub fn router(state: AppState, config: &Config, verifier: Option<Arc<Verifier>>) -> Router {
    let ApiRoutes { data, ops, openapi } = api_routes(verifier.is_some());
    let cors = || CorsPolicy::new(&config.cors_allowed_origins);
    let data = guarded(
        data.method_not_allowed_fallback(method_not_allowed),
        cors(),
        Guard::new(config, verifier),
    );
    let open = unguarded(
        ops
            // Swagger UI's assets are embedded at build time (the `vendored` feature): /docs
            // works offline, with no CDN.
            .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi))
            .fallback(route_not_found)
            .method_not_allowed_fallback(method_not_allowed),
        cors(),
    );
    data.merge(open).with_state(state)
}

/// The data routes' layers, in the order every request crosses them, written here and nowhere
/// else; [`unguarded`] gives the other routes the first two.
///
/// One `Router::layer` call, with concrete layers (no `option_layer`), because each call boxes the
/// route once more, each box is cloned with everything beneath it on every request, and each
/// optional layer moves the future beneath it once more (loadtest/archive.md#clones-boxes-moves).
fn guarded(router: Router<AppState>, cors: CorsPolicy, guard: Guard) -> Router<AppState> {
    // Listed outermost first:
    router.layer(
        ServiceBuilder::new()
            // 1. The front (front.rs): every request gets an id (kept if the client sent one),
            //    which goes back on the answer with the trace id (x-trace-id) so a report can
            //    quote them; one server span when it is traced, named by the matched route;
            //    its duration recorded for the metrics; every log line written while serving it
            //    names it (id, method, route). CORS: preflights answered here, and every answer
            //    (errors and refusals too) carries the CORS headers so browsers can read it.
            //    When admission would refuse at once, the 503 is given here, before the layers
            //    below cost anything. On the way out, the rate limit's RateLimit fields (from
            //    the count it wrote). Errors are logged once, where they happen (ApiError).
            .layer(FrontLayer::new(
                cors,
                Some(guard.early_refusal),
                guard.rate_limit_policy,
            ))
            // 2. A panic becomes a logged 500 problem instead of a dropped connection, and an
            //    error answer that is not yet problem+json (a library's own) is rewritten.
            .layer(problem::SafetyNetLayer)
            // 3. Authentication, a cheap check whose answer the rate limit needs (who the
            //    caller is); 401/403, throttled per address.
            .layer(guard.authenticate)
            // 4. The rate limit, the cheapest refusal after that, so a runaway caller is
            //    stopped before any work is done for it and never takes a place in the queue
            //    (admission takes its slot when called, never in `poll_ready`).
            .option_layer(guard.rate_limit)
            // 5. The whole body, before the request may take a slot.
            .layer(guard.read_body)
            // 6. Admission, a slot or a bounded wait for one.
            .layer(guard.admission)
            // 7. The request timeout, inside admission so a request that times out frees its
            //    slot.
            .layer(guard.timeout)
            // 8. Compression of the answer, for a client that asks and a body worth it
            //    (compress.rs); innermost, so refusals (small) never reach it, and a client that
            //    accepts no coding at all is refused before the handler runs.
            .layer(CompressLayer),
    )
}

/// Probes, metrics and docs: the front and the safety net of [`guarded`], no guard, so they
/// answer even when clients are being refused.
fn unguarded(router: Router<AppState>, cors: CorsPolicy) -> Router<AppState> {
    router.layer(
        ServiceBuilder::new()
            .layer(FrontLayer::new(cors, None, None))
            .layer(problem::SafetyNetLayer),
    )
}
