//! The routes and their handlers, one module per resource, with what the handlers read from a
//! request (extractors, the links' base) and the OpenAPI document that describes them.

pub mod admin;
pub mod base_url;
pub mod extract;
pub mod health;
pub mod openapi;
pub mod todos;
