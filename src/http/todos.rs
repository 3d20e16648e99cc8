//! `/todos`: the TodoBackend-compatible collection and item resources.
//!
//! Wire format and validation live here; SQL lives in `db::todos`. The problem responses every
//! route shares (503, and 400/413/415/422 for bodies, 400/404 for ids) are added to the OpenAPI
//! document centrally by `http::add_common_problems`. The collection GET answers a
//! plain JSON array (what TodoBackend clients expect), so the next page is announced in a
//! `Link: <…>; rel="next"` header rather than in an envelope.

use std::fmt::Write as _;

use axum::{
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{
    AppState, BaseUrl,
    code::Code,
    conditional::{IfMatch, IfNoneMatch, etag},
    error::{ApiError, FieldError},
    extract::{JsonBody, Query, TodoId},
};
use crate::db::{
    idempotency::Idempotent,
    todos::{Conditional, Cursor, NewTodo, TodoChanges, TodoRow},
};

/// The request header that makes `POST /todos` safe to retry.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;
pub const MAX_TITLE_CHARS: usize = 1000;

/// A todo as the API returns it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Todo {
    pub id: i64,
    /// Absolute URL of this todo.
    pub url: String,
    pub title: String,
    pub completed: bool,
    /// Optional position; lists sort by it (todos without one come last), then by id.
    pub order: Option<i64>,
    #[serde(serialize_with = "rfc3339_micros")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339_micros")]
    pub updated_at: DateTime<Utc>,
}

/// RFC 3339 in UTC with exactly six fractional digits (`2026-11-23T10:00:00.123456Z`): one fixed
/// form, which every ISO 8601 parser takes (Python's `fromisoformat` before 3.11 refuses other
/// fraction lengths). Written digit by digit: chrono's `Display` goes through the `fmt`
/// machinery and was most of a 20-row page's serialisation cost in the profile.
fn rfc3339_micros<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    use chrono::{Datelike, Timelike};
    let year = t.year();
    if !(0..=9999).contains(&year) {
        return s.collect_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    }
    fn put(b: &mut [u8], at: usize, width: usize, mut v: u32) {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    put(&mut b, 0, 4, year as u32);
    put(&mut b, 5, 2, t.month());
    put(&mut b, 8, 2, t.day());
    put(&mut b, 11, 2, t.hour());
    put(&mut b, 14, 2, t.minute());
    put(&mut b, 17, 2, t.second());
    // A leap second shows as nanoseconds past 1e9 on second 59.
    put(&mut b, 20, 6, (t.nanosecond() / 1000).min(999_999));
    s.serialize_str(std::str::from_utf8(&b).expect("ASCII digits"))
}

impl Todo {
    fn from_row(row: TodoRow, base: &BaseUrl) -> Todo {
        Todo {
            url: base.todo_url(row.id),
            id: row.id,
            title: row.title,
            completed: row.completed,
            order: row.position,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// Body of `POST /todos`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTodo {
    /// Required; 1 to 1000 characters, not blank.
    #[schema(required = true)]
    #[serde(default)]
    pub title: Option<String>,
    /// Defaults to `false`.
    #[serde(default)]
    pub completed: Option<bool>,
    #[serde(default)]
    pub order: Option<i64>,
}

/// Body of `PATCH /todos/{id}`: any subset of the fields; `"order": null` clears the order.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTodo {
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub title: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<bool>)]
    pub completed: Option<Option<bool>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    pub order: Option<Option<i64>>,
}

/// Tells "absent" (outer `None`, via `default`) from "null" (`Some(None)`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Query of `GET /todos`. Values are parsed by hand so a bad one gets a 422 naming it.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only todos with this `completed` value.
    #[param(value_type = Option<bool>)]
    pub completed: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// Opaque position to continue from, taken from the previous page's `Link: rel="next"` URL.
    pub cursor: Option<String>,
}

struct ListParams {
    completed: Option<bool>,
    limit: i64,
    after: Cursor,
}

impl ListQuery {
    fn validate(self) -> Result<ListParams, ApiError> {
        let mut errors = Vec::new();
        let completed = match self.completed.as_deref() {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(other) => {
                errors.push(field(
                    "completed",
                    format!("{other:?} is not true or false"),
                ));
                None
            }
        };
        let limit = match self.limit.as_deref().map(str::parse::<i64>) {
            None => DEFAULT_LIMIT,
            Some(Ok(n)) if (1..=MAX_LIMIT).contains(&n) => n,
            Some(_) => {
                errors.push(field(
                    "limit",
                    format!("must be an integer from 1 to {MAX_LIMIT}"),
                ));
                DEFAULT_LIMIT
            }
        };
        let after = match self.cursor.as_deref() {
            None => Cursor::START,
            Some(raw) => decode_cursor(raw).unwrap_or_else(|| {
                errors.push(field(
                    "cursor",
                    "is not a cursor from this service; take it from a Link header".into(),
                ));
                Cursor::START
            }),
        };
        if errors.is_empty() {
            Ok(ListParams {
                completed,
                limit,
                after,
            })
        } else {
            Err(ApiError::validation_many(errors))
        }
    }
}

fn field(name: &str, message: String) -> FieldError {
    FieldError {
        field: name.to_owned(),
        message,
    }
}

/// The cursor is `<sort_key>_<id>` of the last row of the previous page. Clients treat it as
/// opaque; it is readable only to make debugging easy.
fn encode_cursor(c: Cursor) -> String {
    format!("{}_{}", c.sort_key, c.id)
}

fn decode_cursor(raw: &str) -> Option<Cursor> {
    let (sort_key, id) = raw.rsplit_once('_')?;
    Some(Cursor {
        sort_key: sort_key.parse().ok()?,
        id: id.parse().ok()?,
    })
}

fn validate_title(title: &str, errors: &mut Vec<FieldError>) {
    if title.trim().is_empty() {
        errors.push(field("title", "must not be empty or blank".into()));
    } else if title.chars().count() > MAX_TITLE_CHARS {
        errors.push(field(
            "title",
            format!("must be at most {MAX_TITLE_CHARS} characters"),
        ));
    } else if title.contains('\0') {
        // PostgreSQL text cannot hold NUL; without this check it would be a 500.
        errors.push(field("title", "must not contain NUL characters".into()));
    }
}

/// List todos, ordered by `order` (missing last) then `id`, one page at a time.
#[utoipa::path(
    get, path = "/todos", tag = "todos",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of todos. When more follow, the `Link` header holds the next page's URL.",
         body = [Todo], headers(("link" = String, description = "`<URL>; rel=\"next\"` when another page exists"))),
        (status = 422, description = "A query parameter is invalid", body = super::error::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_todos(
    State(state): State<AppState>,
    base: BaseUrl,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let params = query.validate()?;
    let mut rows = state
        .db
        .list_todos(params.completed, params.after, params.limit + 1)
        .await?;
    let mut headers = HeaderMap::new();
    if rows.len() as i64 > params.limit {
        rows.truncate(params.limit as usize);
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
        if let Ok(v) = HeaderValue::from_str(&format!("<{next}>; rel=\"next\"")) {
            headers.insert(header::LINK, v);
        }
    }
    let todos: Vec<Todo> = rows.into_iter().map(|r| Todo::from_row(r, &base)).collect();
    Ok((headers, axum::Json(todos)).into_response())
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
    base: BaseUrl,
    key: IdempotencyKey,
    JsonBody(body): JsonBody<CreateTodo>,
) -> Result<Response, ApiError> {
    let mut errors = Vec::new();
    match &body.title {
        Some(t) => validate_title(t, &mut errors),
        None => errors.push(field("title", "is required".into())),
    }
    if !errors.is_empty() {
        return Err(ApiError::validation_many(errors));
    }
    let new = NewTodo {
        title: body.title.unwrap_or_default(),
        completed: body.completed.unwrap_or(false),
        position: body.order,
    };
    let (row, replayed) = match key.as_str() {
        None => (state.db.create_todo(&new).await?, false),
        Some(key) => match state
            .db
            .create_todo_idempotent(key, &new, state.idempotency_key_ttl)
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
    let mut res = (
        StatusCode::CREATED,
        [(header::ETAG, etag(version))],
        axum::Json(todo),
    )
        .into_response();
    if let Some(location) = location {
        res.headers_mut().insert(header::LOCATION, location);
    }
    if replayed {
        res.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(res)
}

/// The `Idempotency-Key` header, validated. An extractor that reads the one header, rather than
/// taking a copy of the whole `HeaderMap`.
pub struct IdempotencyKey(Option<HeaderValue>);

impl IdempotencyKey {
    fn as_str(&self) -> Option<&str> {
        // Checked to be visible ASCII when extracted.
        self.0.as_ref().and_then(|k| k.to_str().ok())
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        let Some(raw) = parts.headers.get(IDEMPOTENCY_KEY) else {
            return Ok(IdempotencyKey(None));
        };
        let k = raw.as_bytes();
        if !k.is_empty()
            && k.len() <= MAX_IDEMPOTENCY_KEY_LEN
            && k.iter().all(|&b| b.is_ascii_graphic() || b == b' ')
        {
            return Ok(IdempotencyKey(Some(raw.clone())));
        }
        Err(ApiError::bad_request(
            Code::InvalidIdempotencyKey,
            format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
            ),
        )
        .with_hint("Send a UUID, for example."))
    }
}

/// Delete every todo.
#[utoipa::path(
    delete, path = "/todos", tag = "todos",
    responses(
        (status = 204, description = "All todos deleted"),
    )
)]
pub async fn delete_all_todos(State(state): State<AppState>) -> Result<StatusCode, ApiError> {
    let n = state.db.delete_all_todos().await?;
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
    base: BaseUrl,
    TodoId(id): TodoId,
    if_none_match: IfNoneMatch,
) -> Result<Response, ApiError> {
    let Some(row) = state.db.get_todo(id).await? else {
        return Err(ApiError::todo_not_found(id));
    };
    let tag = [(header::ETAG, etag(row.version))];
    if if_none_match.is_current(row.version) {
        return Ok((StatusCode::NOT_MODIFIED, tag).into_response());
    }
    Ok((tag, axum::Json(Todo::from_row(row, &base))).into_response())
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
         body = super::error::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update_todo(
    State(state): State<AppState>,
    base: BaseUrl,
    TodoId(id): TodoId,
    IfMatch(if_match): IfMatch,
    JsonBody(body): JsonBody<UpdateTodo>,
) -> Result<Response, ApiError> {
    let mut errors = Vec::new();
    let title = match body.title {
        None => None,
        Some(None) => {
            errors.push(field("title", "must be a string, not null".into()));
            None
        }
        Some(Some(t)) => {
            validate_title(&t, &mut errors);
            Some(t)
        }
    };
    let completed = match body.completed {
        None => None,
        Some(None) => {
            errors.push(field("completed", "must be true or false, not null".into()));
            None
        }
        Some(c) => c,
    };
    if !errors.is_empty() {
        return Err(ApiError::validation_many(errors));
    }
    let changes = TodoChanges {
        title,
        completed,
        position: body.order,
    };
    match state
        .db
        .update_todo(id, &changes, if_match.as_deref())
        .await?
    {
        Conditional::Done(row) => Ok((
            [(header::ETAG, etag(row.version))],
            axum::Json(Todo::from_row(row, &base)),
        )
            .into_response()),
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
         body = super::error::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete_todo(
    State(state): State<AppState>,
    TodoId(id): TodoId,
    IfMatch(if_match): IfMatch,
) -> Result<StatusCode, ApiError> {
    match state.db.delete_todo(id, if_match.as_deref()).await? {
        Conditional::Done(()) => Ok(StatusCode::NO_CONTENT),
        Conditional::NotFound => Err(ApiError::todo_not_found(id)),
        Conditional::VersionMismatch => Err(ApiError::precondition_failed(id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_including_negative_and_max_sort_keys() {
        for c in [
            Cursor {
                sort_key: -5,
                id: 10,
            },
            Cursor {
                sort_key: i64::MAX,
                id: 1,
            },
            Cursor::START,
        ] {
            assert_eq!(decode_cursor(&encode_cursor(c)), Some(c));
        }
        for bad in ["", "5", "a_b", "1_", "_1", "1_2_x"] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }

    #[test]
    fn timestamps_have_one_fixed_form_that_matches_chrono() {
        use chrono::{SecondsFormat, TimeZone};
        let cases = [
            Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0).unwrap(),
            Utc.timestamp_opt(1_795_000_000, 123_456_000).unwrap(),
            Utc.timestamp_opt(1_795_000_000, 7_000).unwrap(),
            Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
        ];
        for t in cases {
            let mut out = Vec::new();
            rfc3339_micros(&t, &mut serde_json::Serializer::new(&mut out)).unwrap();
            let expected = format!("\"{}\"", t.to_rfc3339_opts(SecondsFormat::Micros, true));
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }

    #[test]
    fn titles_are_checked_in_characters_not_bytes() {
        let mut errors = Vec::new();
        validate_title(&"é".repeat(MAX_TITLE_CHARS), &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        validate_title(&"é".repeat(MAX_TITLE_CHARS + 1), &mut errors);
        validate_title("  \t", &mut errors);
        validate_title("a\0b", &mut errors);
        assert_eq!(errors.len(), 3, "{errors:?}");
    }
}
