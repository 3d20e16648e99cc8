//! The binary itself: `--help`, configuration errors, and no secret in its logs.

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use todo_service::config::VARS;

const BIN: &str = env!("CARGO_BIN_EXE_todo-service");

fn service() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd
}

#[test]
fn help_lists_every_environment_variable() {
    let out = service().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for var in VARS {
        assert!(help.contains(var.name), "--help lacks {}", var.name);
    }
}

#[test]
fn a_bad_setting_stops_startup_with_an_error_naming_the_variable() {
    for (var, value) in [
        ("DB_POOL_MAX_SIZE", "lots"),
        ("LISTEN_ADDR", "localhost"),
        ("LOG_FORMAT", "xml"),
    ] {
        let out = service()
            .env("DATABASE_URL", "postgres://app:pw@127.0.0.1:1/db")
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.contains(var) && stderr.contains(value),
            "{var}={value}: {stderr}"
        );
    }
    let out = service().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("DATABASE_URL")
    );
}

#[test]
fn the_database_password_never_appears_in_the_logs() {
    // In the user info, and as libpq's query parameter.
    for url in [
        "postgres://app:hunter2-secret@127.0.0.1:1/todos",
        "postgres://app@127.0.0.1:1/todos?password=hunter2-secret",
    ] {
        password_stays_out_of_the_logs(url);
    }
}

fn password_stays_out_of_the_logs(url: &str) {
    // A database that is not there: the service logs its connection attempts and failures. The
    // token secret is set too, and must not show either.
    let logs = logs_of_a_short_run(&[
        ("DATABASE_URL", url),
        ("AUTH_MODE", "jwt"),
        ("AUTH_JWT_SECRET", "hunter2-the-token-secret-of-32-bytes"),
    ]);
    assert!(
        logs.contains("127.0.0.1"),
        "expected connection logs, got: {logs}"
    );
    assert!(
        logs.contains("migrations"),
        "expected retry logs, got: {logs}"
    );
    assert!(
        !logs.contains("hunter2"),
        "password leaked into logs:\n{logs}"
    );
}

/// What the service logs (at trace) in its first 2 s with `env`, on free loopback ports unless
/// `env` says otherwise.
fn logs_of_a_short_run(env: &[(&str, &str)]) -> String {
    let mut cmd = service();
    cmd.env("LISTEN_ADDR", "127.0.0.1:0")
        .env("ADMIN_LISTEN_ADDR", "127.0.0.1:0")
        .env("LOG_LEVEL", "trace");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    let mut logs = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    child.wait().unwrap();
    logs
}

fn doctor(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = service();
    cmd.arg("doctor");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap())
}

fn line<'a>(report: &'a str, check: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.contains(&format!("] {check}:")))
        .unwrap_or_else(|| panic!("no {check} line in:\n{report}"))
}

#[tokio::test]
async fn doctor_passes_against_a_healthy_database() {
    let app = crate::helpers::spawn_app().await;
    let url = app.test_db.url().to_string();
    let (code, report) = tokio::task::spawn_blocking(move || doctor(&[("DATABASE_URL", &url)]))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{report}");
    for check in [
        "configuration",
        "DNS",
        "TCP reach",
        "TLS",
        "login",
        "connection budget",
        "migrations",
    ] {
        assert!(line(&report, check).contains("[pass]"), "{report}");
    }
    assert!(
        line(&report, "TLS").contains("plain text (the server declined TLS"),
        "the shared test server runs without TLS: {report}"
    );
    let budget = line(&report, "connection budget");
    assert!(
        budget.contains("server max_connections")
            && budget.contains("pool up to 16 (DB_POOL_MAX_SIZE)"),
        "{report}"
    );
    assert!(
        line(&report, "OTLP endpoint").contains("[skip]"),
        "{report}"
    );
    assert!(report.contains("all checks passed"), "{report}");

    // A pool as large as the server's whole limit is worth a warning, not a failure.
    let url = app.test_db.url().to_string();
    let (code, report) = tokio::task::spawn_blocking(move || {
        doctor(&[("DATABASE_URL", &url), ("DB_POOL_MAX_SIZE", "1000")])
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{report}");
    assert!(
        line(&report, "connection budget").contains("[warn]"),
        "{report}"
    );
    assert!(
        report.contains("One replica's pool can take every connection"),
        "{report}"
    );
}

/// DATABASE_MIGRATION_URL is checked end to end, because the service only takes that route at
/// startup: a broken one would otherwise show as a replica that cannot start at the next deploy.
#[tokio::test]
async fn doctor_checks_the_migration_route() {
    let app = crate::helpers::spawn_app().await;
    let url = app.test_db.url();
    let run = move |extra: Vec<(&'static str, String)>| {
        let url = url.to_string();
        tokio::task::spawn_blocking(move || {
            let mut env = vec![("DATABASE_URL", url)];
            env.extend(extra);
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            doctor(&env)
        })
    };
    let direct = app.test_db.url().to_string();

    let (code, report) = run(vec![("DATABASE_MIGRATION_URL", direct.clone())])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{report}");
    let route = line(&report, "migration route");
    assert!(
        route.contains("[pass]") && route.contains("a primary, where migrations can run"),
        "{report}"
    );
    assert!(line(&report, "writable").contains("[pass]"), "{report}");

    // Through a transaction pooler, the migration URL must not be the pooler.
    let (code, report) = run(vec![
        ("DB_POOLER_MODE", "transaction".into()),
        ("DATABASE_MIGRATION_URL", direct.clone()),
    ])
    .await
    .unwrap();
    assert_eq!(code, Some(1), "{report}");
    assert!(
        line(&report, "migration route").contains("[FAIL]")
            && report.contains("as DATABASE_URL does")
            && report.contains("point DATABASE_MIGRATION_URL at the server itself"),
        "{report}"
    );

    // A role the server does not know: the login step, named, and no password shown.
    let mut wrong = app.test_db.url();
    wrong.set_username("nobody-here").unwrap();
    wrong.set_password(Some("s3cret-pw")).unwrap();
    let (code, report) = run(vec![("DATABASE_MIGRATION_URL", wrong.to_string())])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{report}");
    let route = line(&report, "migration route");
    assert!(
        route.contains("[FAIL]") && route.contains("login:"),
        "{report}"
    );
    assert!(
        report.contains("password and database name in DATABASE_MIGRATION_URL"),
        "{report}"
    );
    assert!(!report.contains("s3cret-pw"), "password printed:\n{report}");

    let (code, report) = run(vec![(
        "DATABASE_MIGRATION_URL",
        "postgres://app@127.0.0.1:1/todos".into(),
    )])
    .await
    .unwrap();
    assert_eq!(code, Some(1), "{report}");
    assert!(
        line(&report, "migration route").contains("[FAIL] migration route: TCP: 127.0.0.1:1"),
        "{report}"
    );
}

#[test]
fn doctor_names_the_failing_step_and_what_to_do() {
    let (code, report) = doctor(&[("DATABASE_URL", "postgres://app:pw@127.0.0.1:1/todos")]);
    assert_eq!(code, Some(1), "{report}");
    let tcp = line(&report, "TCP reach");
    assert!(
        tcp.contains("[FAIL]") && tcp.contains("127.0.0.1:1"),
        "{report}"
    );
    assert!(report.contains("next: Is PostgreSQL running"), "{report}");
    assert!(line(&report, "login").contains("[skip]"), "{report}");
    assert!(!report.contains("pw@"), "password printed:\n{report}");
    let (_, report) = doctor(&[(
        "DATABASE_URL",
        "postgres://app@127.0.0.1:1/todos?password=hunter2-secret",
    )]);
    assert!(!report.contains("hunter2"), "password printed:\n{report}");

    let (code, report) = doctor(&[
        ("DATABASE_URL", "postgres://app@127.0.0.1:1/todos"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1"),
    ]);
    assert_eq!(code, Some(1));
    assert!(
        line(&report, "OTLP endpoint").contains("[FAIL]"),
        "{report}"
    );

    let (code, report) = doctor(&[("DB_POOL_MAX_SIZE", "x")]);
    assert_eq!(code, Some(1));
    assert!(
        line(&report, "configuration").contains("DATABASE_URL"),
        "{report}"
    );
}

#[test]
fn doctor_checks_the_authentication_settings_without_showing_the_secret() {
    let db = ("DATABASE_URL", "postgres://app@127.0.0.1:1/todos");
    let secret = "doctor-test-secret-hunter2-of-44-bytes-long!";
    let (_, report) = doctor(&[
        db,
        ("AUTH_MODE", "jwt"),
        ("AUTH_JWT_SECRET", secret),
        ("AUTH_JWT_ISSUER", "https://issuer.test"),
    ]);
    let auth = line(&report, "authentication");
    assert!(
        auth.contains("[pass]")
            && auth.contains("HS256 secret of 44 bytes: a test token verifies")
            && auth.contains("issuer https://issuer.test"),
        "{report}"
    );
    assert!(!report.contains("hunter2"), "secret printed:\n{report}");
    let (_, report) = doctor(&[db, ("LISTEN_ADDR", "0.0.0.0:8080"), ("AUTH_MODE", "none")]);
    let auth = line(&report, "authentication");
    assert!(
        auth.contains("[warn]") && auth.contains("0.0.0.0:8080"),
        "{report}"
    );
    let (code, report) = doctor(&[db, ("AUTH_MODE", "jwt"), ("AUTH_JWT_SECRET", "short")]);
    assert_eq!(code, Some(1));
    assert!(
        line(&report, "configuration").contains("AUTH_JWT_SECRET"),
        "{report}"
    );
    assert!(
        line(&report, "authentication").contains("[skip]"),
        "{report}"
    );
}

#[tokio::test]
async fn doctor_reports_a_failing_resolver() {
    struct Broken;
    impl todo_service::db::resolve::Resolver for Broken {
        fn lookup<'a>(&'a self, _: &'a str, _: u16) -> todo_service::db::resolve::LookupFuture<'a> {
            Box::pin(async { Err(std::io::Error::other("could not translate host name")) })
        }
    }
    let env =
        |k: &str| (k == "DATABASE_URL").then(|| "postgres://app@postgres:5432/todos".to_string());
    let report = todo_service::doctor::run(env, std::sync::Arc::new(Broken)).await;
    let text = report.to_string();
    assert_eq!(report.failed(), 1, "{text}");
    assert!(
        line(&text, "DNS").contains("could not translate host name"),
        "{text}"
    );
    assert!(line(&text, "TCP reach").contains("[skip]"), "{text}");
}

#[test]
fn the_token_command_signs_with_the_configured_secret_and_names_what_is_missing() {
    use todo_service::auth::{Scopes, Verifier};
    let secret = "a-development-secret-of-40-bytes-or-more!";
    let out = service()
        .env("AUTH_JWT_SECRET", secret)
        .env("AUTH_JWT_AUDIENCE", "todos")
        .args([
            "token",
            "--sub",
            "alice",
            "--scope",
            "todos:read",
            "--ttl",
            "5m",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    let principal = Verifier::hs256(secret.as_bytes(), Some("todos"), None)
        .verify(token.trim())
        .expect("the minted token verifies with the configured audience");
    assert_eq!(&*principal.sub, "alice");
    assert_eq!(
        principal.scopes,
        Scopes {
            read: true,
            write: false
        }
    );
    for (env, says) in [
        (None, "AUTH_JWT_SECRET"),
        (Some("short-secret"), "12 bytes"),
    ] {
        let mut cmd = service();
        if let Some(s) = env {
            cmd.env("AUTH_JWT_SECRET", s);
        }
        let out = cmd.args(["token", "--sub", "alice"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.contains("AUTH_JWT_SECRET") && stderr.contains(says),
            "{stderr}"
        );
        assert!(!stderr.contains("short-secret"), "{stderr}");
    }
}

#[test]
fn serving_every_interface_without_authentication_must_be_chosen_and_then_warns() {
    let out = service()
        .env("DATABASE_URL", "postgres://app:pw@127.0.0.1:1/db")
        .env("LISTEN_ADDR", "0.0.0.0:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("AUTH_MODE") && stderr.contains("0.0.0.0:0"),
        "{stderr}"
    );
    let logs = logs_of_a_short_run(&[
        ("DATABASE_URL", "postgres://app:pw@127.0.0.1:1/db"),
        ("LISTEN_ADDR", "0.0.0.0:0"),
        ("AUTH_MODE", "none"),
    ]);
    let warning = logs
        .lines()
        .find(|l| l.contains("AUTH_MODE=none on an address other machines can reach"))
        .unwrap_or_else(|| panic!("no warning in:\n{logs}"));
    assert!(warning.contains("WARN"), "{warning}");
    // On loopback there is nothing to warn about.
    let logs = logs_of_a_short_run(&[("DATABASE_URL", "postgres://app:pw@127.0.0.1:1/db")]);
    assert!(!logs.contains("AUTH_MODE=none on an address"), "{logs}");
}

/// Credentials in the other URLs the service is given (the JWK Set's, the OTLP collector's) are
/// no more printed than the database's: not in the logs, not by `doctor`, not in the error for a
/// rejected URL.
#[test]
fn credentials_in_the_jwks_and_otlp_urls_are_never_printed() {
    let jwks = "http://keys:hunter2-jwks@127.0.0.1:1/jwks.json";
    let otlp = "http://otel:hunter2-otlp@127.0.0.1:1";
    let env = [
        ("DATABASE_URL", "postgres://app@127.0.0.1:1/todos"),
        ("AUTH_MODE", "jwt"),
        ("AUTH_JWKS_URL", jwks),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp),
    ];
    let logs = logs_of_a_short_run(&env);
    assert!(
        logs.contains("JWK Set") && logs.contains("OTLP"),
        "expected the key set's and the exporter's lines: {logs}"
    );
    assert!(!logs.contains("hunter2"), "a password in the logs:\n{logs}");
    let (_, report) = doctor(&env);
    assert!(
        report.contains("127.0.0.1:1"),
        "expected both checks: {report}"
    );
    assert!(
        !report.contains("hunter2"),
        "a password in doctor:\n{report}"
    );
    for (var, value) in [
        (
            "AUTH_JWKS_URL",
            "ftp://keys:hunter2-jwks@id.example/jwks.json",
        ),
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "ftp://otel:hunter2-otlp@collector:4317",
        ),
    ] {
        let out = service()
            .env("DATABASE_URL", "postgres://app@127.0.0.1:1/db")
            .env("AUTH_MODE", "jwt")
            .env(
                "AUTH_JWT_SECRET",
                "a-secret-for-the-configuration-error-test",
            )
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(var), "{var}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{var}: {stderr}");
    }
}

/// The admin listener has no authentication: on an address other machines can reach it must be
/// chosen (`ADMIN_ALLOW_NETWORK=true`), and then it warns at startup and in `doctor`.
#[test]
fn an_admin_listener_other_machines_can_reach_must_be_chosen_and_then_warns() {
    let db = ("DATABASE_URL", "postgres://app@127.0.0.1:1/db");
    let out = service()
        .env(db.0, db.1)
        .env("ADMIN_LISTEN_ADDR", "0.0.0.0:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("ADMIN_LISTEN_ADDR") && stderr.contains("ADMIN_ALLOW_NETWORK"),
        "{stderr}"
    );
    let open = [
        db,
        ("ADMIN_LISTEN_ADDR", "0.0.0.0:0"),
        ("ADMIN_ALLOW_NETWORK", "true"),
    ];
    let logs = logs_of_a_short_run(&open);
    let warning = logs
        .lines()
        .find(|l| l.contains("the admin listener is on an address other machines can reach"))
        .unwrap_or_else(|| panic!("no warning in:\n{logs}"));
    assert!(warning.contains("WARN"), "{warning}");
    let (_, report) = doctor(&open);
    assert!(
        line(&report, "admin listener").contains("[warn]"),
        "{report}"
    );
    // On loopback (the default) there is nothing to warn about.
    let (_, report) = doctor(&[db]);
    assert!(
        line(&report, "admin listener").contains("[pass]"),
        "{report}"
    );
    let logs = logs_of_a_short_run(&[db]);
    assert!(
        !logs.contains("the admin listener is on an address"),
        "{logs}"
    );
}
