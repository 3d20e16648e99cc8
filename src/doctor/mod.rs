//! `todo-service doctor`: the post-mortem's manual playbook as a command.
//!
//! When the old service stopped answering, finding out *why* took a person checking DNS, the
//! network, credentials and the schema by hand. This runs those checks in order, as the service
//! would perform them, and prints each with pass/fail and what to do next. Later checks that depend
//! on an earlier failure are skipped rather than reported as noise.
//!
//! [`run`] is the order; the checks are in `database` (the steps to PostgreSQL), `server` (what
//! the server reached says about itself) and `services` (authentication, the OTLP collector); the
//! printed report in `report`.

mod database;
mod report;
mod server;
mod services;

use std::{sync::Arc, time::Duration};

pub use report::{Check, Report, Status};

use crate::{config::Config, db::resolve::Resolver};

/// How long any one step may take before it is reported as unanswered.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs every check with settings from `lookup` (the environment in production).
pub async fn run(lookup: impl Fn(&str) -> Option<String>, resolver: Arc<dyn Resolver>) -> Report {
    let mut checks = Vec::new();
    match Config::from_lookup(&lookup) {
        Ok(config) => {
            checks.push(Check::new(
                "configuration",
                Status::Pass,
                format!("valid; database {}", config.database.redacted_url()),
            ));
            checks.push(services::authentication(&config).await);
            checks.push(services::admin_listener(&config));
            checks.extend(database::checks(&config.database, resolver.as_ref()).await);
        }
        Err(e) => {
            checks.push(
                Check::new("configuration", Status::Fail, e.to_string()).hint(format!(
                    "Fix {} (see `todo-service --help` or .env.example).",
                    e.var
                )),
            );
            let needs_config = ["authentication", services::ADMIN_LISTENER]
                .into_iter()
                .chain(database::CHECKS);
            checks.extend(
                needs_config
                    .map(|name| Check::new(name, Status::Skip, "needs a valid configuration")),
            );
        }
    }
    checks.push(services::otlp(&lookup).await);
    Report { checks }
}
