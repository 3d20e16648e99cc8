//! Log settings: the `EnvFilter` directive and the line format.

use tracing_subscriber::EnvFilter;

use super::{
    Var,
    env::{ConfigError, Env, invalid},
};

pub const VARS: &[Var] = &[
    Var {
        name: "LOG_LEVEL",
        default: Some("info"),
        help: "Log filter in tracing's EnvFilter syntax, e.g. `info` or `info,todo_service=debug`.",
    },
    Var {
        name: "LOG_FORMAT",
        default: Some("text"),
        help: "`text` (human-readable) or `json` (one JSON object per line, for containers).",
    },
];

/// How logs are written to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

pub(super) fn level(env: &Env<'_>) -> Result<String, ConfigError> {
    let raw = env.value("LOG_LEVEL");
    EnvFilter::try_new(&raw).map_err(|e| {
        invalid(
            "LOG_LEVEL",
            format!("{raw:?}: {e}"),
            "an EnvFilter directive such as info or warn,todo_service=debug",
        )
    })?;
    Ok(raw)
}

pub(super) fn format(env: &Env<'_>) -> Result<LogFormat, ConfigError> {
    match env.value("LOG_FORMAT").to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(invalid("LOG_FORMAT", format!("{other:?}"), "text or json")),
    }
}
