//! A PostgreSQL of a test's own with `ssl = on`, its certificate issued by a CA made in the test.
//!
//! The shared test server runs without TLS (and may be anyone's server, via `TEST_DATABASE_URL`),
//! so TLS tests start their own from the same binaries `scripts/test.sh` found (`TEST_PG_BIN`),
//! as the `postgres` user when the tests run as root. It is stopped and removed on drop.
//! [`TestCa`] also signs the TLS collectors' certificates in `telemetry.rs`.

use std::{
    net::SocketAddr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use url::Url;

/// A certificate authority for one test.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        TestCa {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate with `common_name` and the DNS names `names`, valid until 2099-12-31.
    pub fn issue(&self, common_name: &str, names: &[&str]) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.not_after = rcgen::date_time_ymd(2099, 12, 31);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// The names the server's certificate carries.
pub const SERVER_NAMES: [&str; 2] = ["localhost", "db.tls.test"];
/// A role that may only log in with a client certificate (`hostssl … cert`).
pub const CERT_USER: &str = "certuser";

pub struct TlsPostgres {
    pub port: u16,
    pub ca: TestCa,
    /// Test-owned files (CA, client certificates), readable by the tests.
    pub dir: PathBuf,
    /// The cluster's own directory, owned by the server's user.
    data: PathBuf,
    bin: PathBuf,
}

impl TlsPostgres {
    /// initdb, a server certificate for [`SERVER_NAMES`], `ssl = on`, start. Blocking (~2 s).
    pub fn start() -> TlsPostgres {
        let bin = pg_bin();
        let dir = std::env::temp_dir().join(format!(
            "todo-service-tls-pg-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let server_dir = dir.join("server");
        std::fs::create_dir_all(&server_dir).unwrap();
        let ca = TestCa::new("todo-service test database CA");
        let server = ca.issue("db.tls.test", &SERVER_NAMES);
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        std::fs::write(server_dir.join("ca.crt"), ca.pem()).unwrap();
        std::fs::write(server_dir.join("server.crt"), &server.cert_pem).unwrap();
        std::fs::write(server_dir.join("server.key"), &server.key_pem).unwrap();
        let as_root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
        if as_root {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:")
                .arg(&server_dir));
            // The server's user must reach its directory.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(
            server_dir.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let data = server_dir.join("data");
        run(owner(as_root, &bin.join("initdb"))
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
                "-D",
            ])
            .arg(&data));
        // Certificate-only login for CERT_USER; everyone else as the shared server allows.
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\n\
                 hostssl all {CERT_USER} 127.0.0.1/32 cert\n\
                 host all {CERT_USER} 127.0.0.1/32 reject\n\
                 host all all 127.0.0.1/32 trust\n"
            ),
        )
        .unwrap();
        if as_root {
            run(Command::new("chown")
                .arg("postgres:")
                .arg(data.join("pg_hba.conf")));
        }
        let port = free_port();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {sd} -c ssl=on \
             -c ssl_cert_file={sd}/server.crt -c ssl_key_file={sd}/server.key \
             -c ssl_ca_file={sd}/ca.crt -c fsync=off -c max_connections=100",
            sd = server_dir.display()
        );
        run(owner(as_root, &bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(server_dir.join("server.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"]));
        let pg = TlsPostgres {
            port,
            ca,
            dir,
            data,
            bin,
        };
        pg.psql(&format!("CREATE ROLE {CERT_USER} LOGIN"));
        pg
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A plain-text admin URL (the server also accepts non-TLS connections from loopback).
    pub fn admin_url(&self) -> Url {
        Url::parse(&format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        ))
        .unwrap()
    }

    /// Path of the CA certificate that signed the server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Writes `pem` to a file of the test's own and returns its path.
    pub fn write(&self, name: &str, pem: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, pem).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// `pg_ctl restart`: every connection ends, the server is back when this returns.
    pub fn restart(&self) {
        let as_root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
        // With the log file again: a server started without one writes to pg_ctl's output, whose
        // pipe would then never close.
        run(owner(as_root, &self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.dir.join("server").join("server.log"))
            .args(["-m", "fast", "-w", "-t", "60", "restart"]));
    }

    fn psql(&self, sql: &str) {
        run(Command::new(self.bin.join("psql"))
            .arg(self.admin_url().as_str())
            .args(["-qXc", sql]));
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let as_root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
        let _ = owner(as_root, &self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The directory of initdb and pg_ctl: `TEST_PG_BIN` (set by scripts/test.sh), else the newest
/// Debian install, else `PATH`.
fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server binaries: run the tests with scripts/test.sh, which installs them"
        )
    })
}

/// `program`, run as the `postgres` user when the tests run as root (PostgreSQL refuses root).
fn owner(as_root: bool, program: &Path) -> Command {
    if as_root {
        let mut c = Command::new("runuser");
        c.current_dir("/")
            .args(["-u", "postgres", "--"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
