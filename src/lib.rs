//! todo-service: a resilient, Postgres-backed todo REST API.
//!
//! It replaces a service that fell over when 120 simultaneous requests each opened a database
//! connection and resolved the database host through Docker's DNS: the resolver overflowed and the
//! app stopped answering while Postgres sat idle. Here the host is resolved once, connections are
//! pooled, and the service keeps answering (503 with `Retry-After`) while the database is away.
//!
//! # Layout
//! Read in this order. Imports point down this list, never up (`tests/api/layout.rs` checks):
//! - [`config`]: every environment variable, parsed and validated once, one file per concern;
//!   the source of `--help`. Imports nothing of the crate.
//! - [`release`]: which release this binary is (version and commit). Imports nothing.
//! - [`net`]: what is an IP literal, which resolved address to use; shared by all that resolve.
//! - [`auth`]: who is calling: bearer tokens verified into a principal, and minted for
//!   development. Imports only `config` (the HTTP side is `http::guard::authenticate`).
//! - [`telemetry`]: logging (with trace ids on every line) and OTLP export of traces, metrics and
//!   logs (the request span itself is in `http`).
//! - [`db`]: connection policy — the host resolved once and pinned ([`db::resolve`]), the deadpool
//!   manager for sqlx connections ([`db::pool`]), TLS at the pinned address with the certificate
//!   checked against the host name ([`db::connect`], [`db::tls`]), every call's life from breaker permit to a
//!   connection in a known state, cancelled or not (`db::session`), migrations, and the queries
//!   ([`db::todos`], [`db::idempotency`]). Knows nothing of HTTP, OpenAPI or the metrics.
//! - [`metrics`]: request, pool, breaker and DNS metrics, read from `db`, exported with the traces.
//! - [`http`]: the router and all middleware in one place; handlers per resource
//!   ([`http::routes::todos`], [`http::routes::health`]); the problem codes and error type
//!   ([`http::problem::code`], [`http::problem`]).
//! - [`startup`]: binds the listener, builds the database handle and router, runs until shutdown.
//! - [`doctor`]: `todo-service doctor`, the connectivity checks an operator runs when it is down.

pub mod auth;
pub mod config;
pub mod db;
pub mod doctor;
pub mod http;
pub mod metrics;
pub mod net;
pub mod release;
pub mod startup;
pub mod telemetry;

pub use startup::Application;
