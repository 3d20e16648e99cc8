//! The one error shape: RFC 9457 problem details (`application/problem+json`).
//!
//! Every error the service answers with goes through [`ApiError`]: handler failures, extractor
//! rejections (see `routes/extract.rs`), unknown routes and methods, panics. Besides the RFC's `type`,
//! `title`, `status` and `detail`, each problem carries a stable machine-readable `code`, a `hint`
//! saying what the client can do, and for validation failures an `errors` list naming each field.
//! Internal details (SQL errors, panics) are logged inside the request span and never returned.

pub mod code;
mod safety_net;

pub use safety_net::SafetyNetLayer;

use std::{borrow::Cow, time::Duration};

use axum::{
    body::Body,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

use self::code::Code;
use crate::db::DbError;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// Seconds a client should wait before retrying when the database is unavailable.
pub const DB_RETRY_AFTER_SECS: u64 = 1;

/// Response extension carrying the problem's `code`, so the request span can record what went
/// wrong (and which protective layer answered) without reading the body.
#[derive(Debug, Clone, Copy)]
pub struct ProblemCode(pub Code);

/// A problem details body. Also the OpenAPI schema for every error response.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// URI identifying the problem type: `urn:todo-service:problem:<code>`.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// Short, human-readable summary of the problem type.
    pub title: Cow<'static, str>,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// Stable machine-readable code, e.g. `validation_failed`, `todo_not_found`.
    #[schema(value_type = String)]
    pub code: Code,
    /// What the client can do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<Cow<'static, str>>,
    /// For `validation_failed`: each offending field and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// The field, as a JSON path (`title`) or a query/path parameter name (`limit`).
    pub field: String,
    /// Why it was rejected.
    pub message: String,
}

/// An error response under construction.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    /// Boxed so `Result<_, ApiError>` stays small on the success path.
    problem: Box<Problem>,
    retry_after: Option<u64>,
    extra: Option<Box<serde_json::Value>>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: Code,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            problem: Box::new(Problem {
                type_uri: format!("urn:todo-service:problem:{}", code.as_str()),
                title: Cow::Borrowed(title),
                status: status.as_u16(),
                detail: detail.into(),
                code,
                hint: None,
                errors: Vec::new(),
            }),
            retry_after: None,
            extra: None,
        }
    }

    pub fn with_hint(mut self, hint: &'static str) -> Self {
        self.problem.hint = Some(Cow::Borrowed(hint));
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// Adds extension members (an object) next to the standard ones, e.g. `/ready`'s checks.
    pub fn with_extra(mut self, extra: serde_json::Value) -> Self {
        self.extra = Some(Box::new(extra));
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn problem(&self) -> &Problem {
        &self.problem
    }

    /// 422 naming one field.
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::validation_many(vec![FieldError {
            field: field.into(),
            message: message.into(),
        }])
    }

    /// 422 naming every offending field.
    pub fn validation_many(errors: Vec<FieldError>) -> Self {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        let mut e = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            Code::ValidationFailed,
            "Request validation failed",
            detail,
        )
        .with_hint("Fix the fields listed in `errors` and send the request again.");
        e.problem.errors = errors;
        e
    }

    pub fn bad_request(code: Code, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, "Bad request", detail)
    }

    pub fn todo_not_found(id: i64) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            Code::TodoNotFound,
            "Todo not found",
            format!("there is no todo with id {id}"),
        )
        .with_hint("List the existing todos with GET /todos.")
    }

    /// A write's `If-Match` named a version the todo is no longer at.
    pub fn precondition_failed(id: i64) -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            Code::PreconditionFailed,
            "Precondition failed",
            format!("todo {id} changed since the version named in If-Match; nothing was changed"),
        )
        .with_hint("GET the todo again, and send your change with its new ETag in If-Match.")
    }

    pub fn route_not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            Code::RouteNotFound,
            "Not found",
            format!("no route matches {path}"),
        )
        .with_hint("See GET /openapi.json or /docs/ for the API.")
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::MethodNotAllowed,
            "Method not allowed",
            format!("{method} is not supported on {path}"),
        )
        .with_hint("The Allow header lists the supported methods.")
    }

    /// 503: the database cannot be used right now.
    /// 503 when the database cannot be used right now. The driver's own words stay in the log
    /// (with the request id): they name addresses and internals a client has no use for.
    pub fn database_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::DatabaseUnavailable,
            "Database unavailable",
            "the database cannot be used right now",
        )
        .with_hint("The service recovers by itself when the database is back; retry after the Retry-After delay.")
        .with_retry_after(DB_RETRY_AFTER_SECS)
    }

    /// 500; `error` is logged here (inside the request span) and not returned.
    pub fn internal(error: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %error, source = ?error.source(), "unexpected error while handling request");
        Self::unexpected()
    }

    /// The 500 problem, once its cause has been logged: nothing internal in it.
    pub fn unexpected() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::InternalError,
            "Internal server error",
            "the service hit an unexpected error; it has been logged",
        )
        .with_hint("Retry later; quote the x-request-id header when reporting this.")
    }

    /// 503 from admission control: the request could not start within `max_wait`. Answered with
    /// a per-response `Retry-After` (see `guard/admission.rs`).
    pub fn overloaded(max_wait: Duration) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Overloaded,
            "Service overloaded",
            format!(
                "the service is at capacity and this request could not start within {} ms; \
                 it was not started",
                max_wait.as_millis()
            ),
        )
        .with_hint("Retry after the Retry-After delay (already jittered).")
    }

    /// 413: the body is over `MAX_BODY_BYTES`.
    pub fn payload_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::PayloadTooLarge,
            "Payload too large",
            "the request body is larger than the service accepts",
        )
        .with_hint("Send a smaller body (see MAX_BODY_BYTES).")
    }

    /// 400: the body could not be read (the client broke off, or bad chunked encoding).
    pub fn unreadable_body(why: &str) -> Self {
        Self::bad_request(Code::UnreadableBody, why)
    }

    /// 408: the body did not arrive whole within `HTTP_BODY_READ_TIMEOUT`.
    pub fn body_too_slow(deadline: Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            Code::RequestTimeout,
            "Request timeout",
            format!(
                "the request body did not arrive whole within {} s",
                deadline.as_secs_f64()
            ),
        )
        .with_hint("Send the whole body promptly; the connection is closed.")
    }

    /// 429 from the rate limiter.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            Code::RateLimited,
            "Too many requests",
            format!("this client is over its request quota; retry in {retry_after_secs} s"),
        )
        .with_hint("Slow down: wait for Retry-After seconds; the RateLimit and RateLimit-Policy fields state the limit.")
        .with_retry_after(retry_after_secs)
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            // Logged at debug: during an outage this fires for every request; the breaker logs
            // the outage once per state change and /ready reports it.
            DbError::Unavailable(reason) => {
                tracing::debug!(%reason, "database unavailable");
                ApiError::database_unavailable()
            }
            DbError::CircuitOpen { retry_after } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::CircuitOpen,
                "Database unavailable",
                "the database has been failing, so requests are refused until it is probed again",
            )
            .with_hint(
                "The service probes the database by itself; retry after the Retry-After delay.",
            )
            // Whole seconds, rounded up, and at least 1 so clients never busy-loop on 0.
            .with_retry_after(retry_after.as_secs_f64().ceil().max(1.0) as u64),
            DbError::Timeout(reason) => {
                tracing::warn!(%reason, "database statement timed out");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::DatabaseTimeout,
                    "Database timeout",
                    "the database did not finish the query in time",
                )
                .with_hint("Retry after the Retry-After delay.")
                .with_retry_after(DB_RETRY_AFTER_SECS)
            }
            DbError::Unexpected(e) => ApiError::internal(&e),
        }
    }
}

/// A problem rendered once, answered many times: for refusals, which must cost as little as
/// possible when they come by the thousand (see `guard/admission.rs`).
#[derive(Debug, Clone)]
pub struct Prerendered {
    status: StatusCode,
    code: Code,
    body: axum::body::Bytes,
    /// `Retry-After` values for the first minute, rendered once too.
    retry_after: Vec<HeaderValue>,
}

/// Headers a refusal carries on its way out: its own two, and the front layer's request id,
/// CORS pair and trace id.
const REFUSAL_HEADERS: usize = 6;

impl Prerendered {
    /// The answer, with `Retry-After` when given; the body and the header values are shared,
    /// not copied, and the header map is allocated once.
    pub fn response(&self, retry_after_secs: Option<u64>) -> Response {
        let mut res = Response::new(Body::from(self.body.clone()));
        *res.status_mut() = self.status;
        res.extensions_mut().insert(ProblemCode(self.code));
        let mut headers = HeaderMap::with_capacity(REFUSAL_HEADERS);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = retry_after_secs {
            let value = usize::try_from(secs)
                .ok()
                .and_then(|i| self.retry_after.get(i))
                .cloned()
                .unwrap_or_else(|| HeaderValue::from(secs));
            headers.insert(header::RETRY_AFTER, value);
        }
        *res.headers_mut() = headers;
        res
    }
}

impl ApiError {
    /// Renders the body now, for [`Prerendered::response`] to answer with later. A per-response
    /// `Retry-After` is given there; `extra` members are not kept.
    pub fn prerender(self) -> Prerendered {
        Prerendered {
            status: self.status,
            code: self.problem.code,
            body: serde_json::to_vec(&self.problem).unwrap_or_default().into(),
            retry_after: (0..=60u64).map(HeaderValue::from).collect(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.extra.map(|b| *b) {
            None => serde_json::to_vec(&self.problem),
            Some(serde_json::Value::Object(mut extra)) => serde_json::to_value(&self.problem)
                .and_then(|v| {
                    if let serde_json::Value::Object(std) = v {
                        extra.extend(std);
                    }
                    serde_json::to_vec(&extra)
                }),
            Some(_) => serde_json::to_vec(&self.problem),
        }
        .unwrap_or_else(|_| br#"{"title":"Internal server error","status":500}"#.to_vec());
        let mut res = (self.status, body).into_response();
        res.extensions_mut().insert(ProblemCode(self.problem.code));
        let headers = res.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}
