//! The `todo-service` binary: parse the command line, read settings, start logging, serve.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};
use todo_service::{Application, config::Config, startup::shutdown_signal, telemetry};

/// A resilient, Postgres-backed todo REST service.
///
/// Configured entirely by environment variables (listed below and in .env.example).
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() -> ExitCode {
    let matches = Cli::command()
        .after_long_help(todo_service::config::help_text())
        .after_help(todo_service::config::help_text())
        .get_matches();
    let Ok(_cli) = Cli::from_arg_matches(&matches) else {
        return ExitCode::from(2);
    };
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}\nSee `todo-service --help` for every variable and its form.");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = telemetry::init(&config) {
        eprintln!("error: cannot start logging: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        Application::build(config)
            .await?
            .run_until(shutdown_signal())
            .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "todo-service stopped with an error"
            );
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
