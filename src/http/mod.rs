//! The HTTP surface: routes, shared state, and every middleware layer, applied in one place.
//!
//! Read [`router`] first: it merges the feature routers (`todos`, `health`), the OpenAPI document
//! and docs UI, the problem+json fallbacks for unknown routes and methods, and then wraps it all in
//! the layers, whose order is commented there.

pub mod conditional;
pub mod error;
pub mod extract;
pub mod health;
pub mod linger;
pub mod resilience;
pub mod todos;
pub(crate) mod trace;

use std::{any::Any, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::{DefaultBodyLimit, FromRequestParts},
    http::{HeaderName, HeaderValue, Method, StatusCode, Uri, header, request::Parts},
    response::{IntoResponse, Response},
};
use tower::ServiceBuilder;
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{AllowOrigin, CorsLayer},
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};
use utoipa_swagger_ui::SwaggerUi;

use crate::{
    config::{Config, CorsOrigins},
    db::Db,
};
use error::ApiError;

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
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_key_ttl: Duration,
}

/// The absolute base URL for links in a response: `PUBLIC_BASE_URL`, else `http://<Host>`.
///
/// Links are written straight into the string they end up in: every todo in a response carries
/// one, and formatting a base string first, then each link from it, took ~550 instructions more
/// per single-todo GET (`loadtest/compare.py --instructions`).
pub struct BaseUrl(Base);

enum Base {
    /// `PUBLIC_BASE_URL`, or the fallback: a whole base URL.
    Url(Arc<str>),
    /// The request's validated Host header (a cheap reference-counted clone).
    Host(HeaderValue),
}

impl BaseUrl {
    /// `<base><path>`, with room for `extra` more bytes.
    pub fn join(&self, path: &str, extra: usize) -> String {
        let (scheme, base) = match &self.0 {
            Base::Url(url) => ("", url.as_ref()),
            // Validated as ASCII when extracted.
            Base::Host(host) => ("http://", host.to_str().unwrap_or_default()),
        };
        let mut url = String::with_capacity(scheme.len() + base.len() + path.len() + extra);
        url.push_str(scheme);
        url.push_str(base);
        url.push_str(path);
        url
    }

    pub fn todo_url(&self, id: i64) -> String {
        let mut digits = itoa::Buffer::new();
        let id = digits.format(id);
        let mut url = self.join("/todos/", id.len());
        url.push_str(id);
        url
    }
}

impl FromRequestParts<AppState> for BaseUrl {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(base) = &state.public_base_url {
            return Ok(BaseUrl(Base::Url(Arc::clone(base))));
        }
        let host = match parts.headers.get(header::HOST) {
            Some(host) => Some(host.clone()),
            None => parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        Ok(BaseUrl(
            match host.filter(|h| is_plain_authority(h.as_bytes())) {
                Some(host) => Base::Host(host),
                None => Base::Url(Arc::clone(&state.fallback_base_url)),
            },
        ))
    }
}

/// Whether `host` is a plain `host[:port]` (a name, IPv4, or bracketed IPv6): only such a Host
/// header is echoed back, so a hostile one cannot inject a path, credentials or markup into the
/// URLs we return. Stricter than RFC 3986's authority (no user info, percent-encoding or
/// sub-delimiters), which no client needs here.
fn is_plain_authority(host: &[u8]) -> bool {
    !host.is_empty()
        && host.iter().all(|&b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']')
        })
}

/// The OpenAPI document's root; paths are added by `routes!` in [`router`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "todo-service",
        description = "A resilient, Postgres-backed todo REST API, compatible with the TodoBackend specification. \
                       Every error is an RFC 9457 problem (application/problem+json) with a machine-readable `code`."
    ),
    tags(
        (name = "todos", description = "The todo collection and its items"),
        (name = "operations", description = "Liveness and readiness probes")
    ),
    components(schemas(error::Problem, error::FieldError))
)]
pub struct ApiDoc;

/// The routes, before state and layers: `data` (everything that needs the database, to be
/// protected by the resilience layers) and `ops` (probes, never limited), plus the OpenAPI
/// document describing both.
pub struct ApiRoutes {
    pub data: Router<AppState>,
    pub ops: Router<AppState>,
    pub openapi: utoipa::openapi::OpenApi,
}

pub fn api_routes() -> ApiRoutes {
    let (data, mut openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(
            todos::list_todos,
            todos::create_todo,
            todos::delete_all_todos
        ))
        .routes(routes!(
            todos::get_todo,
            todos::update_todo,
            todos::delete_todo
        ))
        .split_for_parts();
    let (ops, ops_doc) = OpenApiRouter::new()
        .routes(routes!(health::health))
        .routes(routes!(health::ready))
        .split_for_parts();
    openapi.merge(ops_doc);
    add_common_problems(&mut openapi);
    ApiRoutes { data, ops, openapi }
}

/// Adds the problem responses that whole classes of operations share, once, instead of repeating
/// them in every handler annotation (so no route can forget them). An annotation's own entry for
/// the same status wins.
fn add_common_problems(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{Content, Ref, RefOr, ResponseBuilder, response::Response};
    let problem = |description: &str| -> RefOr<Response> {
        ResponseBuilder::new()
            .description(description)
            .content(
                error::PROBLEM_JSON,
                Content::new(Some(Ref::from_schema_name("Problem"))),
            )
            .build()
            .into()
    };
    for (path, item) in api.paths.paths.iter_mut() {
        let operations = [
            &mut item.get,
            &mut item.post,
            &mut item.patch,
            &mut item.delete,
        ];
        for op in operations.into_iter().flatten() {
            let has_body = op.request_body.is_some();
            let r = &mut op.responses.responses;
            if path.contains("{id}") {
                r.entry("400".into()).or_insert_with(|| {
                    problem("Malformed JSON body, or the id is not a positive integer")
                });
                r.entry("404".into())
                    .or_insert_with(|| problem("No such todo"));
            }
            if has_body {
                r.entry("400".into())
                    .or_insert_with(|| problem("Malformed JSON body"));
                r.entry("413".into())
                    .or_insert_with(|| problem("Body larger than MAX_BODY_BYTES"));
                r.entry("415".into())
                    .or_insert_with(|| problem("Body sent without Content-Type: application/json"));
                r.entry("422".into()).or_insert_with(|| {
                    problem("A field is invalid or unknown; `errors` names each")
                });
            }
            if path.starts_with("/todos") {
                r.entry("429".into()).or_insert_with(|| {
                    problem("Over this client's rate limit; retry after Retry-After seconds")
                });
                r.entry("503".into()).or_insert_with(|| {
                    problem("Overloaded, or the database is unavailable (`code` says which); retry after Retry-After")
                });
                r.entry("504".into())
                    .or_insert_with(|| problem("The request took longer than REQUEST_TIMEOUT"));
            }
        }
    }
}

/// The whole application: routes, docs, fallbacks and layers.
pub fn router(state: AppState, config: &Config) -> Router {
    let ApiRoutes { data, ops, openapi } = api_routes();
    // Rate limit, load shedding and the request timeout guard only the data routes; probes and
    // docs must answer even when clients are being refused (see resilience.rs).
    let data = with_layers(
        data.method_not_allowed_fallback(method_not_allowed),
        config,
        Some(resilience::layer(config)),
    );
    let open = with_layers(
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

/// Wraps every route of `router` in one stack of layers: the common ones, and `protect` innermost
/// when given.
///
/// One `Router::layer` call per route, because each call boxes the route once more and each box
/// is cloned, with everything beneath it, on every request: the data routes carry their
/// protective layers in the same stack rather than in a `layer` call of their own (measured in
/// loadtest/RESULTS.md).
fn with_layers(
    router: Router<AppState>,
    config: &Config,
    protect: Option<resilience::Protect>,
) -> Router<AppState> {
    let x_request_id = HeaderName::from_static(trace::REQUEST_ID);
    // Listed outermost first:
    router.layer(
        ServiceBuilder::new()
            // 1. Give every request an id (kept if the client sent one).
            .layer(SetRequestIdLayer::new(
                x_request_id.clone(),
                MakeRequestUuid,
            ))
            // 2. One server span per request, named by the matched route (low cardinality), a
            //    child of the caller's `traceparent` if any; see trace.rs.
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(trace::request_span)
                    .on_response(trace::on_response)
                    // Errors are logged once, where they happen (ApiError), with the request's
                    // identity; the span notes them in on_response.
                    .on_failure(()),
            )
            // 3. The request's duration is recorded for the metrics, every log line written
            //    while serving it names it (id, method, route), and the trace id goes back to the
            //    client (x-trace-id), so a report can quote it.
            .layer(trace::ObserveLayer)
            // 4. The request id is copied to the response (clients quote it when reporting
            //    problems).
            .layer(PropagateRequestIdLayer::new(x_request_id))
            // 5. CORS outside everything that can answer, so errors carry the CORS headers too
            //    and browsers can read them; preflights are answered here without reaching a
            //    handler.
            .layer(cors_layer(&config.cors_allowed_origins))
            // 6. Any error response that is not yet problem+json (a library's own) is rewritten.
            .then(error::ensure_problem_result)
            .map_response(from_catch_panic)
            // 7. A panicking handler becomes a logged 500 problem instead of a dropped
            //    connection.
            .layer(CatchPanicLayer::custom(panic_response))
            // 8. Body limit: a body larger than MAX_BODY_BYTES is refused while it is read
            //    (413), never buffered whole.
            .layer(DefaultBodyLimit::max(config.max_body_bytes))
            // 9. For the data routes: rate limit, load shedding, timeout (resilience.rs).
            .option_layer(protect),
    )
}

/// CatchPanic boxes every response body; the layers above it take axum's body type.
fn from_catch_panic(
    res: Response<tower_http::body::UnsyncBoxBody<axum::body::Bytes, axum::BoxError>>,
) -> Response {
    res.map(Body::new)
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
            HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers([
            HeaderName::from_static("idempotent-replayed"),
            header::LOCATION,
            header::LINK,
            header::RETRY_AFTER,
            HeaderName::from_static(trace::REQUEST_ID),
        ])
        .max_age(Duration::from_secs(3600))
}

async fn route_not_found(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into());
    tracing::error!(panic = %message, "handler panicked");
    let mut res = ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "Internal server error",
        "the service hit an unexpected error; it has been logged",
    )
    .into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_host_and_port_is_echoed_into_links() {
        for ok in [
            "todo.test",
            "todo.test:9000",
            "127.0.0.1:8080",
            "[::1]:80",
            "todo_service",
        ] {
            assert!(is_plain_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "evil.test/<script>",
            "user@evil.test",
            "evil.test?x",
            "evil.test#x",
            "a b",
            "evil.test\"",
        ] {
            assert!(!is_plain_authority(bad.as_bytes()), "{bad}");
        }
        let base = BaseUrl(Base::Host(HeaderValue::from_static("todo.test:9000")));
        assert_eq!(base.todo_url(42), "http://todo.test:9000/todos/42");
        let base = BaseUrl(Base::Url(Arc::from("https://api.example/v1")));
        assert_eq!(base.todo_url(-1), "https://api.example/v1/todos/-1");
        assert_eq!(base.join("/todos", 0), "https://api.example/v1/todos");
    }
}
