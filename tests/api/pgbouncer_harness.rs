//! A PgBouncer of a test's own, in front of the shared test server: Debian's 1.18 or a release
//! that carries prepared statements. Shared by the API tests and the drills.

use std::{
    net::SocketAddr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::PathBuf,
    process::Command,
    time::Duration,
};

/// A PgBouncer of the test's own in front of the shared test server, stopped on drop.
pub struct PgBouncer {
    pub port: u16,
    dir: PathBuf,
}

/// Which PgBouncer a test runs.
#[derive(Debug, Clone, Copy)]
pub enum Release {
    /// Debian 12's 1.18 (`TEST_PGBOUNCER`): no prepared statements in transaction mode.
    Debian,
    /// One that carries them (`TEST_PGBOUNCER_PREPARED`, from scripts/build-pgbouncer.sh), with
    /// `max_prepared_statements = 200`.
    Prepared,
}

impl PgBouncer {
    /// Debian's, `pool_mode = transaction` with `server_connections` per database and user.
    pub fn start(server: SocketAddr, server_connections: u32) -> PgBouncer {
        Self::start_with(
            Release::Debian,
            server,
            server_connections,
            "extra_float_digits,options",
        )
    }

    /// As [`PgBouncer::start`], of the release that carries prepared statements.
    pub fn start_prepared(server: SocketAddr, server_connections: u32) -> PgBouncer {
        Self::start_with(
            Release::Prepared,
            server,
            server_connections,
            "extra_float_digits,options",
        )
    }

    /// With `ignore_startup_parameters` as given (empty: the line left out, PgBouncer's default,
    /// as a configuration that says only `pool_mode = transaction` has it).
    pub fn start_with(
        release: Release,
        server: SocketAddr,
        server_connections: u32,
        ignored: &str,
    ) -> PgBouncer {
        let (var, default, prepared) = match release {
            Release::Debian => ("TEST_PGBOUNCER", "/usr/sbin/pgbouncer", ""),
            Release::Prepared => (
                "TEST_PGBOUNCER_PREPARED",
                "target/pgbouncer/pgbouncer",
                "max_prepared_statements = 200\n",
            ),
        };
        let binary = std::env::var(var).unwrap_or_else(|_| default.into());
        assert!(
            std::path::Path::new(&binary).exists(),
            "no pgbouncer at {binary} ({var}): run the tests with scripts/test.sh, which provides it"
        );
        let dir = std::env::temp_dir().join(format!(
            "todo-service-pgbouncer-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host={} port={}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
                 listen_port = {port}\nunix_socket_dir =\nauth_type = trust\n\
                 auth_file = {d}/userlist.txt\npool_mode = transaction\n\
                 default_pool_size = {server_connections}\nmax_client_conn = 500\n\
                 {prepared}{ignore}logfile = {d}/pgbouncer.log\n\
                 pidfile = {d}/pgbouncer.pid\n",
                server.ip(),
                server.port(),
                d = dir.display(),
                ignore = if ignored.is_empty() {
                    String::new()
                } else {
                    format!("ignore_startup_parameters = {ignored}\n")
                }
            ),
        )
        .unwrap();
        // A copy beside its configuration: run as the postgres user (PgBouncer refuses to run as
        // root), it may not reach into the checkout.
        let copy = dir.join("pgbouncer");
        std::fs::copy(&binary, &copy).unwrap();
        let binary = copy.to_str().unwrap().to_owned();
        let as_root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
        let mut cmd = if as_root {
            let _ = Command::new("chown")
                .arg("-R")
                .arg("postgres:")
                .arg(&dir)
                .output();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            let mut c = Command::new("runuser");
            c.current_dir("/").args(["-u", "postgres", "--", &binary]);
            c
        } else {
            Command::new(&binary)
        };
        let out = cmd
            .arg("-d")
            .arg(dir.join("pgbouncer.ini"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pgbouncer: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let bouncer = PgBouncer { port, dir };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return bouncer;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("pgbouncer did not listen on {port}");
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            // SIGINT: shut down once no query runs (from 1.23 on, SIGTERM waits for every
            // client to leave).
            let _ = Command::new("kill").args(["-INT", pid.trim()]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
