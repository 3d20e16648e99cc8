//! Integration tests: the app on port 0 against a fresh PostgreSQL database per test, over HTTP.
//! Run them with `scripts/test.sh` (it provides the PostgreSQL server).

// Test code may unwrap: a panic is the failure message (the library may not; see Cargo.toml).
// Its `pub` items are shared between the test binaries (helpers.rs), not a public API.
#![allow(clippy::unwrap_used, unreachable_pub)]

mod auth;
mod cli;
mod compose;
mod compression;
mod conditional;
mod db_tls;
mod errors;
// Shared with the drills binary, which uses parts this one does not.
#[allow(dead_code)]
mod helpers;
mod hostile;
mod kubernetes;
mod layout;
mod limits;
mod migrations;
mod openapi;
mod operations;
// Shared with the drills binary.
#[allow(dead_code)]
mod pg_tls;
mod pgbouncer;
mod pgbouncer_harness;
mod pooler_prepared;
mod scripts;
mod signoz;
mod telemetry;
mod todobackend;
mod todos;
