//! The `todo-service` binary: parse the command line, read settings, start logging, serve.

use std::{process::ExitCode, sync::Arc};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use todo_service::{
    Application, config::Config, db::resolve::SystemResolver, doctor, startup::shutdown_signal,
    telemetry,
};

// mimalloc instead of glibc's malloc: under load the request path allocates from both worker
// threads at once, and glibc's arena locks and consolidation were a tenth of the service's CPU in
// the profile (loadtest/archive.md#tuning). Built without transparent huge pages (Cargo.toml), which
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
    /// Print an HS256 token signed with AUTH_JWT_SECRET (with AUTH_JWT_AUDIENCE and
    /// AUTH_JWT_ISSUER when set), for curl and development:
    /// curl -H "Authorization: Bearer $(todo-service token --sub alice)" localhost:8080/todos
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The caller (the token's `sub`): the owner of the todos it creates and sees.
    #[arg(long)]
    sub: String,
    /// Space-separated scopes: todos:read allows GET, todos:write everything else.
    #[arg(long, default_value = "todos:read todos:write")]
    scope: String,
    /// How long the token is valid, e.g. 15m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: std::time::Duration,
}

fn main() -> ExitCode {
    todo_service::net::install_tls_provider();
    let matches = Cli::command()
        .after_long_help(todo_service::config::help_text())
        .after_help(todo_service::config::help_text())
        .get_matches();
    let Ok(cli) = Cli::from_arg_matches(&matches) else {
        return ExitCode::from(2);
    };
    match cli.command {
        Some(Command::Doctor) => return run_doctor(),
        Some(Command::Token(args)) => return mint_token(&args),
        Some(Command::Serve) | None => {}
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

fn mint_token(args: &TokenArgs) -> ExitCode {
    use secrecy::ExposeSecret as _;
    use todo_service::auth::{MAX_SUB_BYTES, Mint, mint_hs256, usable_sub};
    let lookup = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let secret = match todo_service::config::auth::jwt_secret(lookup) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if !usable_sub(&args.sub) {
        eprintln!("error: --sub must be 1 to {MAX_SUB_BYTES} bytes, without NUL");
        return ExitCode::from(2);
    }
    let (aud, iss) = (lookup("AUTH_JWT_AUDIENCE"), lookup("AUTH_JWT_ISSUER"));
    let mint = Mint {
        sub: &args.sub,
        scope: &args.scope,
        aud: aud.as_deref(),
        iss: iss.as_deref(),
    };
    match mint_hs256(secret.expose_secret().as_bytes(), &mint, args.ttl) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot sign the token: {e}");
            ExitCode::FAILURE
        }
    }
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
