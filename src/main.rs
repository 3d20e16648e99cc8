//! The `todo-service` binary: parse the command line, read settings, start logging, serve.

use std::{process::ExitCode, sync::Arc};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use todo_service::{
    Application, config::Config, db::resolve::SystemResolver, doctor, startup::shutdown_signal,
    telemetry,
};

// mimalloc instead of glibc's malloc: under load the request path allocates from both worker
// threads at once, and glibc's arena locks and consolidation were a tenth of the service's CPU in
// the profile (loadtest/RESULTS.md). Built without transparent huge pages (Cargo.toml), which
// would otherwise make its arenas resident 2 MiB at a time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A resilient, Postgres-backed todo REST service.
///
/// Configured entirely by environment variables (listed below and in .env.example).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Check configuration, DNS, TCP reach, login, migrations and the OTLP endpoint, printing
    /// each result and what to do next. Exits 1 if any check fails.
    Doctor,
}

fn main() -> ExitCode {
    let matches = Cli::command()
        .after_long_help(todo_service::config::help_text())
        .after_help(todo_service::config::help_text())
        .get_matches();
    let Ok(cli) = Cli::from_arg_matches(&matches) else {
        return ExitCode::from(2);
    };
    if let Some(Command::Doctor) = cli.command {
        return run_doctor();
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}\nSee `todo-service --help` for every variable and its form.");
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(serve(config))
}

/// Logging and trace export first, then the service; the last spans are flushed after it drains.
async fn serve(config: Config) -> ExitCode {
    let telemetry = match telemetry::init(&config, todo_service::http::log_context).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot start logging/telemetry: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = async {
        Application::build(config)
            .await?
            .run_until(shutdown_signal())
            .await
    }
    .await;
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "todo-service stopped with an error"
            );
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}

fn run_doctor() -> ExitCode {
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let report = runtime.block_on(doctor::run(
        |name| std::env::var(name).ok(),
        Arc::new(SystemResolver),
    ));
    print!("{report}");
    if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}
