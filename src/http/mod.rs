//! The HTTP surface: routes, shared state, and every middleware layer, applied in one place.
//!
//! Read [`router`] first: it merges the feature routers (`todos`, `health`), the OpenAPI document
//! and docs UI, the problem+json fallbacks for unknown routes and methods, and then wraps it all in
//! the layers, whose order is written once, in `layered`.
//!
//! The rooms: [`routes`] (handlers, each module with its `router()`, and the OpenAPI document),
//! [`guard`] (who is calling, and whether the data routes let the request in), [`problem`] (the
//! one error shape and its codes), [`server`] (the accept loop), [`state`] (what every handler
//! can reach), `front` (the layer every request meets first) and `trace` (what it observes:
//! the request's id, span and log fields). Imports point one way: this file uses the
//! rooms, the rooms never use it.

mod front;
pub mod guard;
pub mod problem;
pub mod routes;
pub mod server;
pub mod state;
pub(crate) mod trace;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    http::{HeaderName, Method, header},
};
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa_swagger_ui::SwaggerUi;

use crate::{
    auth::Verifier,
    config::{Config, CorsOrigins},
};
use guard::Guard;
pub use routes::base_url::BaseUrl;
use routes::{
    extract, method_not_allowed,
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
    // The guard protects only the data routes; probes and docs must answer even when clients are
    // being refused.
    let data = layered(
        data.method_not_allowed_fallback(method_not_allowed),
        config,
        Some(Guard::new(config, verifier)),
    );
    let open = layered(
        ops
            // Swagger UI's assets are embedded at build time (the `vendored` feature): /docs
            // works offline, with no CDN.
            .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi))
            .fallback(route_not_found)
            .method_not_allowed_fallback(method_not_allowed),
        config,
        None,
    );
    data.merge(open).with_state(state)
}

/// Wraps every route of `router` in the one stack of layers: the order every request crosses,
/// written here and nowhere else. `guard`'s layers are placed for the data routes.
///
/// One `Router::layer` call per route, because each call boxes the route once more and each box
/// is cloned, with everything beneath it, on every request: the data routes carry their guard in
/// the same stack rather than in a `layer` call of their own (loadtest/archive.md#clones-boxes-moves).
fn layered(router: Router<AppState>, config: &Config, guard: Option<Guard>) -> Router<AppState> {
    let (early_refusal, authenticate, rate_limit, read_body, admission, timeout) = match guard {
        Some(g) => (
            Some(g.early_refusal),
            Some(g.authenticate),
            g.rate_limit,
            Some(g.read_body),
            Some(g.admission),
            Some(g.timeout),
        ),
        None => Default::default(),
    };
    // Listed outermost first:
    router.layer(
        ServiceBuilder::new()
            // 1. Every request gets an id (kept if the client sent one), which goes back on the
            //    response; one server span per request when it is traced, named by the matched
            //    route (low cardinality), a child of the caller's `traceparent` if any; the
            //    request's duration is recorded for the metrics, every log line written while
            //    serving it names it (id, method, route), and the trace id goes back to the
            //    client (x-trace-id), so a report can quote it. See front.rs. Errors are logged
            //    once, where they happen (ApiError), with the request's identity.
            .layer(front::ObserveLayer)
            // 2. Data routes: when admission would refuse at once, refuse here, before the layers
            //    below cost anything; still counted and traced above.
            .option_layer(early_refusal)
            // 3. CORS outside everything that can answer, so errors carry the CORS headers too
            //    and browsers can read them; preflights are answered here without reaching a
            //    handler.
            .layer(cors_layer(&config.cors_allowed_origins))
            // 4. A panic becomes a logged 500 problem instead of a dropped connection, and an
            //    error answer that is not yet problem+json (a library's own) is rewritten.
            .layer(problem::SafetyNetLayer)
            // 5. Data routes: authentication, a cheap check whose answer the rate limit needs
            //    (who the caller is); 401/403, throttled per address.
            .option_layer(authenticate)
            // 6. Data routes: the rate limit, the cheapest refusal after that, so a runaway
            //    caller is stopped before any work is done for it and never takes a place in
            //    the queue (admission takes its slot when called, never in `poll_ready`).
            .option_layer(rate_limit)
            // 7. Data routes: the whole body, before the request may take a slot.
            .option_layer(read_body)
            // 8. Data routes: admission, a slot or a bounded wait for one.
            .option_layer(admission)
            // 9. Data routes: the request timeout, inside admission so a request that times
            //    out frees its slot.
            .option_layer(timeout),
    )
}

fn cors_layer(origins: &CorsOrigins) -> CorsLayer {
    let allow_origin = match origins {
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(list) => AllowOrigin::list(list.clone()),
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::AUTHORIZATION,
            HeaderName::from_static(trace::REQUEST_ID),
            HeaderName::from_static(extract::IDEMPOTENCY_KEY),
            header::IF_MATCH,
            header::IF_NONE_MATCH,
        ])
        .expose_headers([
            HeaderName::from_static("idempotent-replayed"),
            header::LOCATION,
            header::LINK,
            header::ETAG,
            header::RETRY_AFTER,
            HeaderName::from_static(trace::REQUEST_ID),
        ])
        .max_age(Duration::from_secs(3600))
}
