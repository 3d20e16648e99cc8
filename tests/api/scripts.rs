//! The run and test commands are all the set-up a fresh machine needs: when PostgreSQL's server
//! binaries are missing, `scripts/lib/pg.sh` installs them and says so. Exercised with `apt-get`
//! and the binaries' lookup stubbed, so the test installs nothing.

use std::process::Command;

/// Runs `pg_ensure_server` from scripts/lib/pg.sh in bash with the given stubs; returns its exit
/// status, stderr, and what the stubbed apt-get was asked to do.
fn ensure_server(with_apt: bool) -> (bool, String, String) {
    let dir = std::env::temp_dir().join(format!("pg-ensure-{}-{with_apt}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("apt.log");
    let installed = dir.join("installed");
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&installed);
    if with_apt {
        // A fake apt-get that notes its arguments; "install" makes the binaries appear.
        let fake = dir.join("apt-get");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho \"$*\" >> {log}\ncase \"$*\" in *install*) /usr/bin/touch {installed};; esac\n",
                log = log.display(),
                installed = installed.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let script = format!(
        r#"
        . scripts/lib/pg.sh
        # The machine has no server binaries until the fake apt-get "installs" them; run as root.
        pg_find_bindir() {{ [ -e {installed} ] && echo /usr/lib/postgresql/15/bin; }}
        id() {{ echo 0; }}
        pg_ensure_server
        "#,
        installed = installed.display()
    );
    // Only the stub directory and the basics on PATH, so a real apt-get is never found.
    let out = Command::new("/bin/bash")
        .arg("-c")
        .arg(script)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("PATH", &dir)
        .env_remove("PG_BINDIR")
        .output()
        .expect("bash runs");
    let apt = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        apt,
    )
}

#[test]
fn missing_server_binaries_are_installed_and_the_user_is_told() {
    let (ok, stderr, apt) = ensure_server(true);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("installing them (apt-get install postgresql"),
        "{stderr}"
    );
    assert!(
        stderr.contains("installed PostgreSQL server binaries"),
        "{stderr}"
    );
    assert!(apt.contains("update"), "{apt}");
    assert!(apt.contains("install -y -qq postgresql"), "{apt}");
}

#[test]
fn without_a_way_to_install_the_user_is_told_what_to_do() {
    let (ok, stderr, apt) = ensure_server(false);
    assert!(!ok);
    assert!(stderr.contains("cannot be"), "{stderr}");
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    assert!(apt.is_empty());
}

/// The upgrade drill's lost-update detector (scripts/cluster_upgrade.py) finds what it is for: two
/// PATCHes acknowledged against one version, and a todo whose content is not its last acknowledged
/// PATCH's; a clean chain of PATCHes is not flagged.
#[test]
fn the_upgrade_drills_lost_update_detector_finds_lost_updates() {
    let script = r#"
import sys
sys.path.insert(0, "scripts")
import cluster_upgrade as u
p = object.__new__(u.Patchers)
p.acked = [(1, '"1"', '"2"', "a", 0), (1, '"2"', '"3"', "b", 1)]
clean = p.lost_updates({1: ('"3"', "b")})
p.acked.append((1, '"2"', '"3"', "c", 2))
twice = p.lost_updates({1: ('"3"', "c")})
p.acked = p.acked[:2]
overwritten = p.lost_updates({1: ('"4"', "x")})
print(clean, twice, overwritten)
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0 1 1");
}
