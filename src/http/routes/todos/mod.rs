//! `/todos`: the TodoBackend-compatible collection and item resources.
//!
//! The handlers; the wire format and its validation are in `wire`, SQL in `db::todos`. The
//! problem responses every route shares (503, and 400/413/415/422 for bodies, 400/404 for ids) are
//! added to the OpenAPI document centrally (`http::routes::openapi`). The collection GET answers a
//! plain JSON array (what TodoBackend clients expect), so the next page is announced in a
//! `Link: <…>; rel="next"` header rather than in an envelope.

use std::fmt::Write as _;

use axum::{
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use utoipa_axum::{router::OpenApiRouter, routes};

use self::conditional::{IfMatch, IfNoneMatch, etag, page_etag};
use super::base_url::BaseUrl;
use super::extract::{IdempotencyKey, JsonBody, Query, TodoId};
use crate::db::{
    idempotency::Idempotent,
    todos::{Conditional, Cursor},
};
use crate::http::{
    guard::caller::Owner,
    problem::{ApiError, code::Code},
    state::AppState,
};

pub mod conditional;
mod wire;

pub use wire::{
    CURSOR_PATTERN, CreateTodo, DEFAULT_LIMIT, ListQuery, MAX_LIMIT, MAX_TITLE_CHARS,
    TITLE_PATTERN, Todo, UpdateTodo,
};
use wire::{encode_cursor, json_answer};

/// The collection and item routes, each with its part of the OpenAPI document.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_todos, create_todo, delete_all_todos))
        .routes(routes!(get_todo, update_todo, delete_todo))
}

/// List todos, ordered by `order` (missing last) then `id`, one page at a time. Each page has a
/// weak `ETag`: send it back in `If-None-Match` to get `304` while nothing on the page changed.
#[utoipa::path(
    get, path = "/todos", tag = "todos",
    params(ListQuery,
           ("If-None-Match" = Option<String>, Header,
            description = "ETags of pages the client holds (or `*`): when one is current, the answer is 304 without a body")),
    responses(
        (status = 200, description = "One page of todos. When more follow, the `Link` header holds the next page's URL.",
         body = [Todo], headers(("link" = String, description = "`<URL>; rel=\"next\"` when another page exists"),
                                ("etag" = String, description = "The page's weak tag, e.g. `W/\"4821…\"`: it changes when a todo on the page is created, changed or deleted, or a next page appears or goes"))),
        (status = 304, description = "The client's copy of the page (named in If-None-Match) is current",
         headers(("etag" = String, description = "The page's weak tag"))),
        (status = 422, description = "A query parameter is invalid", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_todos(
    State(state): State<AppState>,
    owner: Owner,
    base: BaseUrl,
    Query(query): Query<ListQuery>,
    if_none_match: IfNoneMatch,
) -> Result<Response, ApiError> {
    let params = query.validate()?;
    let mut rows = state
        .db
        .list_todos(
            owner.as_str(),
            params.completed,
            params.after,
            params.limit + 1,
        )
        .await?;
    let more = rows.len() as i64 > params.limit;
    rows.truncate(params.limit as usize);
    let (page, tag) = page_etag(rows.iter().map(|r| (r.id, r.version)), more);
    if if_none_match.is_current(page) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response());
    }
    let mut link = None;
    if more {
        let last = rows.last().expect("limit >= 1");
        let mut next = base.join("/todos", 64);
        write!(
            next,
            "?limit={}&cursor={}",
            params.limit,
            encode_cursor(Cursor {
                sort_key: last.sort_key,
                id: last.id
            })
        )
        .expect("writing to a String cannot fail");
        if let Some(c) = params.completed {
            next.push_str(if c {
                "&completed=true"
            } else {
                "&completed=false"
            });
        }
        link = HeaderValue::from_str(&format!("<{next}>; rel=\"next\"")).ok();
    }
    let todos: Vec<Todo> = rows.into_iter().map(|r| Todo::from_row(r, &base)).collect();
    let mut res = json_answer(StatusCode::OK, &todos)?;
    res.headers_mut().insert(header::ETAG, tag);
    if let Some(link) = link {
        res.headers_mut().insert(header::LINK, link);
    }
    Ok(res)
}

/// Create a todo. New todos start with `completed: false` unless told otherwise.
///
/// With an `Idempotency-Key` header the create is safe to retry: the same key with the same body
/// returns the original `201` (marked `Idempotent-Replayed: true`) without creating another todo;
/// the same key with a different body is `422`.
#[utoipa::path(
    post, path = "/todos", tag = "todos",
    request_body = CreateTodo,
    params(("Idempotency-Key" = Option<String>, Header,
            description = "1-255 visible ASCII characters, unique per intended todo (e.g. a UUID); remembered for IDEMPOTENCY_KEY_TTL")),
    responses(
        (status = 201, description = "Created, or replayed for a repeated Idempotency-Key", body = Todo,
         headers(("location" = String, description = "URL of the new todo"),
                 ("etag" = String, description = "The todo's version, for If-Match and If-None-Match"),
                 ("idempotent-replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same key"))),
    )
)]
pub async fn create_todo(
    State(state): State<AppState>,
    owner: Owner,
    base: BaseUrl,
    key: IdempotencyKey,
    JsonBody(body): JsonBody<CreateTodo>,
) -> Result<Response, ApiError> {
    let new = body.validate()?;
    let (row, replayed) = match key.as_str() {
        None => (state.db.create_todo(owner.as_str(), &new).await?, false),
        Some(key) => match state
            .db
            .create_todo_idempotent(owner.as_str(), key, &new, state.idempotency_key_ttl)
            .await?
        {
            Idempotent::Created(row) => (row, false),
            Idempotent::Replayed(row) => (row, true),
            Idempotent::KeyReused => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    Code::IdempotencyKeyReused,
                    "Idempotency key reused",
                    "this Idempotency-Key was already used for a different request body",
                )
                .with_hint(
                    "Use a new key for a new todo; reuse a key only to retry the same request.",
                ));
            }
        },
    };
    let version = row.version;
    let todo = Todo::from_row(row, &base);
    let location = HeaderValue::from_str(&todo.url).ok();
    let mut res = tagged(StatusCode::CREATED, &todo, version)?;
    if let Some(location) = location {
        res.headers_mut().insert(header::LOCATION, location);
    }
    if replayed {
        res.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(res)
}

/// Delete every todo of the caller.
#[utoipa::path(
    delete, path = "/todos", tag = "todos",
    responses(
        (status = 204, description = "All todos deleted"),
    )
)]
pub async fn delete_all_todos(
    State(state): State<AppState>,
    owner: Owner,
) -> Result<StatusCode, ApiError> {
    let n = state.db.delete_all_todos(owner.as_str()).await?;
    tracing::info!(deleted = n, "deleted all todos");
    Ok(StatusCode::NO_CONTENT)
}

/// Fetch one todo. Its `ETag` is its version: send it back in `If-None-Match` to get `304` while
/// it is unchanged, or in `If-Match` to make a `PATCH` or `DELETE` conditional.
#[utoipa::path(
    get, path = "/todos/{id}", tag = "todos",
    params(("id" = i64, Path, description = "Todo id", minimum = 1),
           ("If-None-Match" = Option<String>, Header,
            description = "ETags of copies the client holds (or `*`): when one is current, the answer is 304 without a body")),
    responses(
        (status = 200, description = "The todo", body = Todo,
         headers(("etag" = String, description = "The todo's version, e.g. `\"3\"`"))),
        (status = 304, description = "The client's copy (named in If-None-Match) is current",
         headers(("etag" = String, description = "The todo's version"))),
    )
)]
pub async fn get_todo(
    State(state): State<AppState>,
    owner: Owner,
    base: BaseUrl,
    TodoId(id): TodoId,
    if_none_match: IfNoneMatch,
) -> Result<Response, ApiError> {
    let Some(row) = state.db.get_todo(owner.as_str(), id).await? else {
        return Err(ApiError::todo_not_found(id));
    };
    if if_none_match.is_current(row.version) {
        return Ok((
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, etag(row.version))],
        )
            .into_response());
    }
    let version = row.version;
    tagged(StatusCode::OK, &Todo::from_row(row, &base), version)
}

/// Change any of `title`, `completed` and `order`; other fields are rejected. With `If-Match` the
/// change is made only while the todo is still at a version the client names.
#[utoipa::path(
    patch, path = "/todos/{id}", tag = "todos",
    params(("id" = i64, Path, description = "Todo id", minimum = 1),
           ("If-Match" = Option<String>, Header,
            description = "ETags of the versions this write may change (from GET, POST or an earlier PATCH), or `*`; at another version the answer is 412 and nothing changes")),
    request_body = UpdateTodo,
    responses(
        (status = 200, description = "The updated todo", body = Todo,
         headers(("etag" = String, description = "The todo's new version"))),
        (status = 412, description = "The todo is no longer at a version named in If-Match; nothing changed",
         body = crate::http::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update_todo(
    State(state): State<AppState>,
    owner: Owner,
    base: BaseUrl,
    TodoId(id): TodoId,
    IfMatch(if_match): IfMatch,
    JsonBody(body): JsonBody<UpdateTodo>,
) -> Result<Response, ApiError> {
    let changes = body.validate()?;
    match state
        .db
        .update_todo(owner.as_str(), id, &changes, if_match.as_deref())
        .await?
    {
        Conditional::Done(row) => {
            let version = row.version;
            tagged(StatusCode::OK, &Todo::from_row(row, &base), version)
        }
        Conditional::NotFound => Err(ApiError::todo_not_found(id)),
        Conditional::VersionMismatch => Err(ApiError::precondition_failed(id)),
    }
}

/// Delete one todo; with `If-Match`, only while it is still at a version the client names.
#[utoipa::path(
    delete, path = "/todos/{id}", tag = "todos",
    params(("id" = i64, Path, description = "Todo id", minimum = 1),
           ("If-Match" = Option<String>, Header,
            description = "ETags of the versions this write may change (from GET, POST or an earlier PATCH), or `*`; at another version the answer is 412 and nothing changes")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 412, description = "The todo is no longer at a version named in If-Match; nothing changed",
         body = crate::http::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete_todo(
    State(state): State<AppState>,
    owner: Owner,
    TodoId(id): TodoId,
    IfMatch(if_match): IfMatch,
) -> Result<StatusCode, ApiError> {
    match state
        .db
        .delete_todo(owner.as_str(), id, if_match.as_deref())
        .await?
    {
        Conditional::Done(()) => Ok(StatusCode::NO_CONTENT),
        Conditional::NotFound => Err(ApiError::todo_not_found(id)),
        Conditional::VersionMismatch => Err(ApiError::precondition_failed(id)),
    }
}

/// A todo's JSON answer with its version's `ETag`.
fn tagged(status: StatusCode, todo: &Todo, version: i64) -> Result<Response, ApiError> {
    let mut res = json_answer(status, todo)?;
    res.headers_mut().insert(header::ETAG, etag(version));
    Ok(res)
}
