//! Names the release the binary is built from, for the admin listener, `doctor` and the
//! telemetry's `service.version`: the package version with the commit as build metadata
//! (`0.2.0+1a2b3c4d5e6f`) when `git` can tell it, or `TODO_SERVICE_COMMIT` says it (a build without
//! the repository, such as the Docker image's), else the package version alone. Two releases
//! serve side by side during a rolling upgrade; this is how operators tell them apart.

use std::{path::Path, process::Command};

fn main() {
    println!("cargo:rerun-if-env-changed=TODO_SERVICE_COMMIT");
    // The commit moves with HEAD and the branch it names; nothing else here changes the answer.
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let commit = std::env::var("TODO_SERVICE_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(head);
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let release = match &commit {
        Some(c) => format!("{version}+{c}"),
        None => version,
    };
    println!("cargo:rustc-env=TODO_SERVICE_RELEASE={release}");
}

/// The checkout's commit, abbreviated, when this is a git checkout and `git` runs.
fn head() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    let commit = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && commit.bytes().all(|b| b.is_ascii_hexdigit()) && !commit.is_empty())
        .then_some(commit)
}
