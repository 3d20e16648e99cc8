//! The routes and their handlers, one module per resource, with what the handlers read from a
//! request (extractors, the links' base), the fallbacks for unknown paths and methods, and the
//! OpenAPI document that describes them.

pub mod admin;
pub mod base_url;
pub mod extract;
pub mod health;
pub mod openapi;
pub mod todos;

use axum::http::{Method, Uri};

use crate::http::problem::ApiError;

/// The answer for a path no route serves.
pub(crate) async fn route_not_found(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

/// The answer for a method the path's route does not serve.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}
