//! The OpenAPI document: the handlers' annotations, split into the data routes (behind the
//! protective layers) and the probes, plus the problem responses whole classes of operations share.

use axum::Router;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use super::{extract, health, todos, todos::conditional};
use crate::http::{problem, state::AppState};

/// The OpenAPI document's root; each feature router adds its paths (see [`api_routes`]).
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
    components(schemas(problem::Problem, problem::FieldError))
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

/// `bearer`: the data routes need a bearer token (`AUTH_MODE=jwt`), and the document says so.
pub fn api_routes(bearer: bool) -> ApiRoutes {
    let (data, mut openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(todos::router())
        .split_for_parts();
    let (ops, ops_doc) = health::router().split_for_parts();
    openapi.merge(ops_doc);
    add_common_problems(&mut openapi);
    add_rate_limit_fields(&mut openapi);
    state_exact_rules(&mut openapi);
    if bearer {
        require_bearer_tokens(&mut openapi);
    }
    ApiRoutes { data, ops, openapi }
}

/// States in the document exactly what the validators accept where the handlers' annotations
/// cannot say it: the title's pattern (not blank, no NUL), the cursor's, the entity-tag lists' and
/// the Idempotency-Key's, each from the constant its validator is tested against, so a client
/// generated from the document (or a property-based tester) sends nothing the service refuses.
fn state_exact_rules(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{
        RefOr, Schema,
        schema::{ObjectBuilder, Type},
    };
    let string = |pattern: &str, max_length: Option<usize>| {
        RefOr::T(Schema::Object(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(pattern))
                .max_length(max_length)
                .build(),
        ))
    };
    if let Some(components) = api.components.as_mut() {
        for body in ["CreateTodo", "UpdateTodo"] {
            if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(body)
                && let Some(RefOr::T(Schema::Object(title))) = object.properties.get_mut("title")
            {
                title.pattern = Some(todos::TITLE_PATTERN.to_owned());
            }
        }
    }
    for item in api.paths.paths.values_mut() {
        for op in operations(item) {
            for param in op.parameters.iter_mut().flatten() {
                let RefOr::T(param) = param else { continue };
                let schema = match param.name.to_ascii_lowercase().as_str() {
                    "cursor" => string(todos::CURSOR_PATTERN, None),
                    "if-match" | "if-none-match" => string(conditional::ENTITY_TAGS_PATTERN, None),
                    "idempotency-key" => string(extract::IDEMPOTENCY_KEY_PATTERN, Some(255)),
                    _ => continue,
                };
                param.schema = Some(schema);
            }
        }
    }
}

/// Declares the bearer scheme, each data operation's scope (`todos:read` for GET, `todos:write`
/// otherwise, as `http::guard::authenticate` checks) and the 401/403 answers.
fn require_bearer_tokens(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{
        Content, Ref, ResponseBuilder,
        security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme},
    };
    let problem = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .header(
                "www-authenticate",
                utoipa::openapi::HeaderBuilder::new()
                    .schema(Some(utoipa::openapi::schema::Object::with_type(
                        utoipa::openapi::schema::Type::String,
                    )))
                    .description(Some(
                        "RFC 6750 challenge: `Bearer realm=\"todo-service\"`, with `error` \
                         (`invalid_token`, `insufficient_scope`) and `error_description` or \
                         `scope` when the token was refused",
                    ))
                    .build(),
            )
            .content(
                problem::PROBLEM_JSON,
                Content::new(Some(Ref::from_schema_name("Problem"))),
            )
            .build()
    };
    api.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A JWT (HS256) with `sub` (the owner of the todos), `exp`, and `scope` \
                         holding todos:read and/or todos:write; see docs/authentication.md",
                    ))
                    .build(),
            ),
        );
    for (path, item) in api.paths.paths.iter_mut() {
        if !path.starts_with("/todos") {
            continue;
        }
        let operations = [
            (&mut item.get, READ),
            (&mut item.post, WRITE),
            (&mut item.patch, WRITE),
            (&mut item.delete, WRITE),
        ];
        for (op, scope) in operations {
            let Some(op) = op else { continue };
            op.security = Some(vec![SecurityRequirement::new("bearer", [scope])]);
            let r = &mut op.responses.responses;
            r.entry("401".into()).or_insert_with(|| {
                problem("No bearer token, or one that is expired, not yet valid, badly signed, for another audience or issuer, or unreadable").into()
            });
            r.entry("403".into())
                .or_insert_with(|| problem(&format!("The token lacks the {scope} scope")).into());
        }
    }
}

/// The operations of a path that the service serves.
fn operations(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        &mut item.get,
        &mut item.post,
        &mut item.patch,
        &mut item.delete,
    ]
    .into_iter()
    .flatten()
}

const READ: &str = crate::auth::READ_SCOPE;
const WRITE: &str = crate::auth::WRITE_SCOPE;

/// Adds the problem responses that whole classes of operations share, once, instead of repeating
/// them in every handler annotation (so no route can forget them). An annotation's own entry for
/// the same status wins.
fn add_common_problems(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{Content, Ref, RefOr, ResponseBuilder, response::Response};
    let problem = |description: &str| -> RefOr<Response> {
        ResponseBuilder::new()
            .description(description)
            .content(
                problem::PROBLEM_JSON,
                Content::new(Some(Ref::from_schema_name("Problem"))),
            )
            .build()
            .into()
    };
    for (path, item) in api.paths.paths.iter_mut() {
        for op in operations(item) {
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
            if path == "/todos"
                && op
                    .parameters
                    .iter()
                    .flatten()
                    .any(|p| matches!(p, RefOr::T(p) if p.name == "cursor"))
            {
                r.entry("400".into()).or_insert_with(|| {
                    problem("The query string cannot be read, or names a parameter twice")
                });
            }
            if path.starts_with("/todos") {
                r.entry("406".into()).or_insert_with(|| {
                    problem("Accept-Encoding refuses every coding the service has, identity included; nothing was done")
                });
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

/// States the rate limit's fields (`http::guard::limiter::Policy`) on every answer of the data
/// routes that the limiter sees: all but authentication's 401 and 403 (it runs first) and the
/// 503 given before any layer (admission full at once).
fn add_rate_limit_fields(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{Header, HeaderBuilder, RefOr};
    let field = |description: &str| -> RefOr<Header> {
        HeaderBuilder::new()
            .schema(Some(utoipa::openapi::schema::Object::with_type(
                utoipa::openapi::Type::String,
            )))
            .description(Some(description))
            .build()
            .into()
    };
    let policy = field(
        "The caller's limit as a quota over a window, e.g. `\"caller\";q=600;w=3` (a burst of 600, \
         all back in 3 s); present while RATE_LIMIT_PER_SECOND > 0 (draft-ietf-httpapi-ratelimit-headers)",
    );
    let limit = field(
        "What is left of it, e.g. `\"caller\";r=17;t=1`: `r` requests now, more within `t` seconds \
         (absent while whole; on a 429 the same wait as Retry-After)",
    );
    for (path, item) in api.paths.paths.iter_mut() {
        if !path.starts_with("/todos") {
            continue;
        }
        for op in operations(item) {
            for (status, response) in op.responses.responses.iter_mut() {
                let RefOr::T(response) = response else {
                    continue;
                };
                if matches!(status.as_str(), "401" | "403" | "503") {
                    continue;
                }
                response
                    .headers
                    .insert("RateLimit-Policy".into(), policy.clone());
                response.headers.insert("RateLimit".into(), limit.clone());
            }
        }
    }
}
