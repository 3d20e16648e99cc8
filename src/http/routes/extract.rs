//! Extractors whose rejections come out as problem details, not axum's plain-text defaults.
//!
//! [`JsonBody`] is written out rather than wrapping `axum::Json`: it needs the serde *path* of a
//! bad field (via `serde_path_to_error`, the crate axum itself uses) to tell the client which field
//! is wrong, and it must tell malformed JSON (400) from well-formed JSON with wrong content (422).

use axum::{
    extract::{
        FromRequest, FromRequestParts, Request,
        rejection::{PathRejection, QueryRejection},
    },
    http::{HeaderValue, StatusCode, header, request::Parts},
};
use serde::de::DeserializeOwned;

use crate::http::problem::{ApiError, code::Code};

/// A JSON request body of type `T`.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers().get(header::CONTENT_TYPE)) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Code::UnsupportedMediaType,
                "Unsupported media type",
                "the request body must be JSON",
            )
            .with_hint("Send the header `Content-Type: application/json`."));
        }
        // The guard's body read (guard::read_body) is the one place a body's size is checked: by
        // now the body is in memory within MAX_BODY_BYTES, or empty.
        let bytes = axum::body::to_bytes(req.into_body(), usize::MAX)
            .await
            .map_err(|e| ApiError::unreadable_body(&e.to_string()))?;
        parse_json(&bytes).map(JsonBody)
    }
}

fn is_json(content_type: Option<&axum::http::HeaderValue>) -> bool {
    let Some(ct) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or("").trim().as_bytes();
    // Compared without case rather than lowercased first: no allocation per request.
    let (prefix, suffix) = (b"application/", b"+json");
    essence.eq_ignore_ascii_case(b"application/json")
        || (essence.len() >= prefix.len() + suffix.len()
            && essence[..prefix.len()].eq_ignore_ascii_case(prefix)
            && essence[essence.len() - suffix.len()..].eq_ignore_ascii_case(suffix))
}

/// Parses `bytes` as a JSON object into `T`: syntax errors are 400, type/shape errors 422 naming
/// the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde lets a struct be read from a JSON array (`["x"]` would fill the first field), so
    // anything but an object is refused before it reaches the struct.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            Ok(_) => Err(ApiError::validation("(body)", "must be a JSON object")),
            Err(e) => Err(malformed(&e)),
        };
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let message = inner.to_string();
                let field = if path == "." {
                    missing_or_unknown_field(&message).unwrap_or_else(|| "(body)".to_owned())
                } else {
                    path
                };
                ApiError::validation(field, message)
            }
            _ => malformed(&inner),
        }
    })?;
    de.end().map_err(|e| malformed(&e))?;
    Ok(value)
}

fn malformed(e: &serde_json::Error) -> ApiError {
    ApiError::bad_request(
        Code::MalformedJson,
        format!("the body is not valid JSON: {e}"),
    )
    .with_hint("Send a JSON object, e.g. {\"title\": \"buy milk\"}.")
}

/// serde reports missing and unknown fields at the object's own path; the name is in backticks.
fn missing_or_unknown_field(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("missing field `")
        .or_else(|| message.strip_prefix("unknown field `"))?;
    rest.split('`').next().map(str::to_owned)
}

/// A query string deserialised into `T`; a malformed one (e.g. a repeated parameter) is a 400
/// problem. Per-value checks happen in the handler, which names the parameter in a 422.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::bad_request(Code::InvalidQuery, e.body_text())
            .with_hint("Each query parameter may appear once; see /openapi.json.")
    }
}

/// A todo id from the path.
pub struct TodoId(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for TodoId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e: PathRejection| {
                    ApiError::bad_request(Code::InvalidPath, e.body_text())
                })?;
        match raw.parse::<i64>() {
            Ok(id) if id > 0 => Ok(TodoId(id)),
            _ => Err(ApiError::bad_request(
                Code::InvalidId,
                format!("{raw:?} is not a todo id; ids are positive integers"),
            )
            .with_hint("Use the `url` or `id` returned when the todo was created.")),
        }
    }
}

/// The request header that makes `POST /todos` safe to retry.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// What an `Idempotency-Key` may be, as the OpenAPI document states it: 1 to 255 visible ASCII
/// characters, spaces allowed inside (HTTP drops them at the ends).
pub const IDEMPOTENCY_KEY_PATTERN: &str = "^[!-~]([ -~]{0,253}[!-~])?$";
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The `Idempotency-Key` header, validated. An extractor that reads the one header, rather than
/// taking a copy of the whole `HeaderMap`.
pub struct IdempotencyKey(Option<HeaderValue>);

impl IdempotencyKey {
    pub fn as_str(&self) -> Option<&str> {
        // Checked to be visible ASCII when extracted.
        self.0.as_ref().and_then(|k| k.to_str().ok())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
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

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[test]
    fn idempotency_keys_are_accepted_exactly_when_the_documented_pattern_matches() {
        let pattern = regex::Regex::new(IDEMPOTENCY_KEY_PATTERN).unwrap();
        let accepts = |key: &str| {
            let mut parts = axum::http::Request::builder()
                .header(IDEMPOTENCY_KEY, key)
                .body(())
                .unwrap()
                .into_parts()
                .0;
            futures_lite(IdempotencyKey::from_request_parts(&mut parts, &())).is_ok()
        };
        let long = "k".repeat(255);
        let too_long = "k".repeat(256);
        for key in [
            "a",
            "a b",
            "uuid-1234",
            "~!",
            "",
            long.as_str(),
            too_long.as_str(),
            "a\tb",
            "é",
        ] {
            // Values a header cannot carry are not sent.
            if axum::http::HeaderValue::from_str(key).is_err() {
                continue;
            }
            assert_eq!(accepts(key), pattern.is_match(key), "{key:?}");
        }
    }

    /// Polls a future that never waits.
    fn futures_lite<T>(f: impl std::future::Future<Output = T>) -> T {
        let mut f = std::pin::pin!(f);
        match f
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
        {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("the extractor waited"),
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        title: String,
        done: Option<bool>,
    }

    #[test]
    fn json_errors_name_the_field_and_pick_400_or_422() {
        let cases: &[(&str, StatusCode, &str)] = &[
            (r#"{"title": 5}"#, StatusCode::UNPROCESSABLE_ENTITY, "title"),
            (
                r#"{"title": "a", "done": "yes"}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                "done",
            ),
            (r#"{}"#, StatusCode::UNPROCESSABLE_ENTITY, "title"),
            (
                r#"{"title": "a", "colour": 1}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                "colour",
            ),
            (r#"["a title"]"#, StatusCode::UNPROCESSABLE_ENTITY, "(body)"),
            (r#" "a title""#, StatusCode::UNPROCESSABLE_ENTITY, "(body)"),
            ("null", StatusCode::UNPROCESSABLE_ENTITY, "(body)"),
            ("[1", StatusCode::BAD_REQUEST, ""),
            (r#"{"title": "a""#, StatusCode::BAD_REQUEST, ""),
            (r#"{"title": "a"} x"#, StatusCode::BAD_REQUEST, ""),
            ("", StatusCode::BAD_REQUEST, ""),
        ];
        for (body, status, field) in cases {
            let err = parse_json::<Body>(body.as_bytes()).expect_err(body);
            assert_eq!(err.status(), *status, "{body}");
            let problem = err.problem();
            if status == &StatusCode::UNPROCESSABLE_ENTITY {
                assert_eq!(problem.code, Code::ValidationFailed, "{body}");
                assert_eq!(problem.errors[0].field, *field, "{body}: {problem:?}");
            } else {
                assert_eq!(problem.code, Code::MalformedJson, "{body}");
            }
        }
    }

    #[test]
    fn json_content_types_are_recognised() {
        use axum::http::HeaderValue;
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "application/merge-patch+json",
            "Application/JSON",
        ] {
            assert!(is_json(Some(&HeaderValue::from_static(ok))), "{ok}");
        }
        for bad in ["text/plain", "application/x-www-form-urlencoded", "json"] {
            assert!(!is_json(Some(&HeaderValue::from_static(bad))), "{bad}");
        }
        assert!(!is_json(None));
    }
}
