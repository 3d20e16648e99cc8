//! Which release this binary is. During a rolling upgrade two releases serve side by side, one
//! migration apart; the admin listener's `/ready`, `doctor` and the telemetry's `service.version`
//! say which each replica runs and which schema it expects, so an operator can tell them apart.
//! Imports nothing of the crate.

/// The package version with the commit as build metadata when the build knew it
/// (`0.2.0+1a2b3c4d5e6f`; build.rs), else the package version alone.
pub const RELEASE: &str = env!("TODO_SERVICE_RELEASE");
