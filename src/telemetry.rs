//! Logging setup, built once at startup.
//!
//! Logs go to stdout through `tracing`, filtered by `LOG_LEVEL`, as text for people or JSON for
//! containers (`LOG_FORMAT`). Libraries that log through the `log` crate (sqlx) are bridged into
//! the same output. OTLP export to SigNoz will be added here, next to the log layer.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::{Config, LogFormat};

/// Installs the global subscriber. Fails if one is already installed.
pub fn init(config: &Config) -> anyhow::Result<()> {
    // Validated in config, so this cannot fail on a bad directive.
    let filter = EnvFilter::try_new(&config.log_level)?;
    let registry = tracing_subscriber::registry().with(filter);
    match config.log_format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal()))
            .try_init()?,
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init()?,
    }
    Ok(())
}
