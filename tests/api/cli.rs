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
    // A database that is not there: the service logs its connection attempts and failures.
    let mut child = service()
        .env("DATABASE_URL", url)
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("ADMIN_LISTEN_ADDR", "127.0.0.1:0")
        .env("LOG_LEVEL", "trace")
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
    for check in ["configuration", "DNS", "TCP reach", "login", "migrations"] {
        assert!(line(&report, check).contains("[pass]"), "{report}");
    }
    assert!(
        line(&report, "OTLP endpoint").contains("[skip]"),
        "{report}"
    );
    assert!(report.contains("all checks passed"), "{report}");
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
