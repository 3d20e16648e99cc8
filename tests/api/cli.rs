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
    // A database that is not there: the service logs its connection attempts and failures.
    let mut child = service()
        .env(
            "DATABASE_URL",
            "postgres://app:hunter2-secret@127.0.0.1:1/todos",
        )
        .env("LISTEN_ADDR", "127.0.0.1:0")
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
