//! Every problem `code` the service answers with, in one enum: its wire name, and which protective
//! layer a refusal came from. The spans, the metrics and the error table of docs/api.md all read it, so
//! a new code cannot be half-wired.

use serde::{Serialize, Serializer};

/// A problem's stable, machine-readable `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BadRequest,
    MalformedJson,
    UnreadableBody,
    InvalidId,
    InvalidPath,
    InvalidQuery,
    InvalidHost,
    InvalidIdempotencyKey,
    InvalidPrecondition,
    Unauthorized,
    InvalidToken,
    InsufficientScope,
    TodoNotFound,
    RouteNotFound,
    MethodNotAllowed,
    NotAcceptable,
    RequestTimeout,
    PreconditionFailed,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
    IdempotencyKeyReused,
    RateLimited,
    ClientError,
    InternalError,
    Overloaded,
    CircuitOpen,
    DatabaseUnavailable,
    DatabaseTimeout,
    NotReady,
    ServiceUnavailable,
    GatewayTimeout,
}

impl Code {
    /// Every code, for the tests that keep the documentation complete.
    pub const ALL: [Code; 32] = [
        Code::BadRequest,
        Code::MalformedJson,
        Code::UnreadableBody,
        Code::InvalidId,
        Code::InvalidPath,
        Code::InvalidQuery,
        Code::InvalidHost,
        Code::InvalidIdempotencyKey,
        Code::InvalidPrecondition,
        Code::Unauthorized,
        Code::InvalidToken,
        Code::InsufficientScope,
        Code::TodoNotFound,
        Code::RouteNotFound,
        Code::MethodNotAllowed,
        Code::NotAcceptable,
        Code::RequestTimeout,
        Code::PreconditionFailed,
        Code::PayloadTooLarge,
        Code::UnsupportedMediaType,
        Code::ValidationFailed,
        Code::IdempotencyKeyReused,
        Code::RateLimited,
        Code::ClientError,
        Code::InternalError,
        Code::Overloaded,
        Code::CircuitOpen,
        Code::DatabaseUnavailable,
        Code::DatabaseTimeout,
        Code::NotReady,
        Code::ServiceUnavailable,
        Code::GatewayTimeout,
    ];

    /// The wire name: `code` in the problem, and the end of its `type` URN.
    pub const fn as_str(self) -> &'static str {
        match self {
            Code::BadRequest => "bad_request",
            Code::MalformedJson => "malformed_json",
            Code::UnreadableBody => "unreadable_body",
            Code::InvalidId => "invalid_id",
            Code::InvalidPath => "invalid_path",
            Code::InvalidQuery => "invalid_query",
            Code::InvalidHost => "invalid_host",
            Code::InvalidIdempotencyKey => "invalid_idempotency_key",
            Code::InvalidPrecondition => "invalid_precondition",
            Code::Unauthorized => "unauthorized",
            Code::InvalidToken => "invalid_token",
            Code::InsufficientScope => "insufficient_scope",
            Code::TodoNotFound => "todo_not_found",
            Code::RouteNotFound => "route_not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::NotAcceptable => "not_acceptable",
            Code::RequestTimeout => "request_timeout",
            Code::PreconditionFailed => "precondition_failed",
            Code::PayloadTooLarge => "payload_too_large",
            Code::UnsupportedMediaType => "unsupported_media_type",
            Code::ValidationFailed => "validation_failed",
            Code::IdempotencyKeyReused => "idempotency_key_reused",
            Code::RateLimited => "rate_limited",
            Code::ClientError => "client_error",
            Code::InternalError => "internal_error",
            Code::Overloaded => "overloaded",
            Code::CircuitOpen => "circuit_open",
            Code::DatabaseUnavailable => "database_unavailable",
            Code::DatabaseTimeout => "database_timeout",
            Code::NotReady => "not_ready",
            Code::ServiceUnavailable => "service_unavailable",
            Code::GatewayTimeout => "gateway_timeout",
        }
    }

    /// The protective layer that refused the request (`todo.rejected_by` on spans and metrics),
    /// when this code is such a refusal.
    pub const fn rejected_by(self) -> Option<&'static str> {
        match self {
            Code::RateLimited => Some("rate_limit"),
            Code::Overloaded => Some("load_shed"),
            Code::CircuitOpen => Some("circuit_breaker"),
            Code::GatewayTimeout => Some("timeout"),
            _ => None,
        }
    }

    /// The code of an error response some library wrote, by its status alone.
    pub const fn for_status(status: u16) -> Code {
        match status {
            400 => Code::BadRequest,
            401 => Code::Unauthorized,
            403 => Code::InsufficientScope,
            404 => Code::RouteNotFound,
            405 => Code::MethodNotAllowed,
            406 => Code::NotAcceptable,
            408 => Code::RequestTimeout,
            413 => Code::PayloadTooLarge,
            415 => Code::UnsupportedMediaType,
            422 => Code::ValidationFailed,
            429 => Code::RateLimited,
            503 => Code::ServiceUnavailable,
            504 => Code::GatewayTimeout,
            s if s >= 500 => Code::InternalError,
            _ => Code::ClientError,
        }
    }
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn codes_are_distinct_snake_case_names() {
        let names: HashSet<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), Code::ALL.len());
        for name in names {
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
        }
    }

    #[test]
    fn the_documented_error_table_lists_every_code() {
        let page = include_str!("../../../docs/api.md");
        let table = &page[page.find("## Errors").expect("an Errors section")..];
        for code in Code::ALL {
            assert!(
                table.contains(&format!("`{}`", code.as_str())),
                "docs/api.md's error table lacks `{}`",
                code.as_str()
            );
        }
    }
}
