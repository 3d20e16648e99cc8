//! The OpenAPI document: the handlers' annotations, split into the data routes (behind the
//! protective layers) and the probes, plus the problem responses whole classes of operations share.

use axum::Router;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{AppState, error, health, todos};

/// The OpenAPI document's root; paths are added by `routes!` in [`api_routes`].
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
