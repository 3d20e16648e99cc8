//! `todo-service doctor`: the post-mortem's manual playbook as a command.
//!
//! When the old service stopped answering, finding out *why* took a person checking DNS, the
//! network, credentials and the schema by hand. This runs those checks in order, as the service
//! would perform them, and prints each with pass/fail and what to do next. Later checks that depend
//! on an earlier failure are skipped rather than reported as noise.

use std::{
    fmt,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::{Connection, PgConnection};

use crate::{
    auth::{Mint, READ_SCOPE, Verifier, jwks, mint_hs256},
    config::{AuthMode, Config, PoolerMode, SslMode, Target},
    db::{
        MIGRATOR,
        budget::ServerConnections,
        connect::{Connector, Transport},
        resolve::Resolver,
    },
};

const STEP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Warn,
    Fail,
    Skip,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        })
    }
}

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do next (for warn and fail).
    pub hint: Option<String>,
}

impl Check {
    fn new(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
        Check {
            name,
            status,
            detail: detail.into(),
            hint: None,
        }
    }

    fn hint(mut self, hint: impl Into<String>) -> Check {
        self.hint = Some(hint.into());
        self
    }
}

/// Every check, in order.
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "todo-service doctor")?;
        for c in &self.checks {
            writeln!(f, "  [{}] {}: {}", c.status, c.name, c.detail)?;
            if let Some(h) = &c.hint {
                writeln!(f, "         next: {h}")?;
            }
        }
        match self.failed() {
            0 => writeln!(f, "all checks passed"),
            n => writeln!(f, "{n} check(s) failed"),
        }
    }
}

/// Runs every check with settings from `lookup` (the environment in production).
pub async fn run(lookup: impl Fn(&str) -> Option<String>, resolver: Arc<dyn Resolver>) -> Report {
    let mut checks = Vec::new();
    let config = match Config::from_lookup(&lookup) {
        Ok(c) => {
            checks.push(Check::new(
                "configuration",
                Status::Pass,
                format!("valid; database {}", c.database.redacted_url()),
            ));
            checks.push(authentication(&c).await);
            c
        }
        Err(e) => {
            checks.push(
                Check::new("configuration", Status::Fail, e.to_string()).hint(format!(
                    "Fix {} (see `todo-service --help` or .env.example).",
                    e.var
                )),
            );
            for name in [
                "authentication",
                "DNS",
                "TCP reach",
                "TLS",
                "login",
                "writable",
                "connection budget",
                "migrations",
            ] {
                checks.push(Check::new(
                    name,
                    Status::Skip,
                    "needs a valid configuration",
                ));
            }
            checks.push(otlp(&lookup).await);
            return Report { checks };
        }
    };

    let db = &config.database;
    let addr = match resolve(&db.host, db.port, resolver.as_ref()).await {
        Ok((addr, check)) => {
            checks.push(check);
            Some(addr)
        }
        Err(check) => {
            checks.push(check);
            None
        }
    };
    let reached = match addr {
        None => {
            checks.push(Check::new("TCP reach", Status::Skip, "needs DNS"));
            false
        }
        Some(addr) => {
            let c = tcp(addr).await;
            let ok = c.status == Status::Pass;
            checks.push(c);
            ok
        }
    };
    let connector = Connector::new(
        db.connect_options
            .clone()
            .application_name("todo-service-doctor"),
        &db.tls,
        &db.host,
    );
    let carried = match (&connector, addr, reached) {
        (Err(e), _, _) => {
            checks
                .push(Check::new("TLS", Status::Fail, format!("{e:#}")).hint(
                    "Fix the TLS parameters in DATABASE_URL (sslrootcert, sslcert, sslkey).",
                ));
            false
        }
        (Ok(connector), Some(addr), true) => {
            let c = tls(connector, addr, &db.host).await;
            let ok = c.status != Status::Fail;
            checks.push(c);
            ok
        }
        _ => {
            checks.push(Check::new("TLS", Status::Skip, "needs TCP reach"));
            false
        }
    };
    let conn = match (&connector, addr, carried) {
        (Ok(connector), Some(addr), true) => {
            match tokio::time::timeout(STEP_TIMEOUT, connector.connect(addr)).await {
                Ok(Ok(conn)) => {
                    checks.push(Check::new(
                        "login",
                        Status::Pass,
                        format!(
                            "logged in as {:?} to database {:?}",
                            db.connect_options.get_username(),
                            db.connect_options.get_database().unwrap_or("(default)")
                        ),
                    ));
                    Some(conn)
                }
                Ok(Err(e)) => {
                    checks.push(Check::new("login", Status::Fail, e.to_string()).hint(
                        "Check the user, password and database name in DATABASE_URL, and \
                         pg_hba.conf on the server.",
                    ));
                    None
                }
                Err(_) => {
                    checks.push(
                        Check::new("login", Status::Fail, format!("no answer within {STEP_TIMEOUT:?}"))
                            .hint("The port answers TCP but not the PostgreSQL protocol: is it the right port, or a proxy with nothing behind it?"),
                    );
                    None
                }
            }
        }
        _ => {
            checks.push(Check::new("login", Status::Skip, "needs TCP reach and TLS"));
            None
        }
    };
    match conn {
        Some(mut conn) => {
            // Read-only, in one transaction with unnamed statements: through a transaction pooler
            // (DB_POOLER_MODE=transaction) that keeps both queries on one server connection.
            match conn.begin().await {
                Ok(mut tx) => {
                    checks.push(writable(&mut tx, "DATABASE_URL").await);
                    checks.push(budget(&mut tx, db.pool_max_size, db.pooler_mode).await);
                    checks.push(migrations(&mut tx).await);
                    let _ = tx.rollback().await;
                }
                Err(e) => {
                    for name in ["writable", "connection budget", "migrations"] {
                        checks.push(Check::new(name, Status::Fail, format!("cannot begin: {e}")));
                    }
                }
            }
            let _ = conn.close().await;
        }
        None => {
            for name in ["writable", "connection budget", "migrations"] {
                checks.push(Check::new(name, Status::Skip, "needs login"));
            }
        }
    }
    if let Some(target) = &db.migration {
        let pooler = (db.pooler_mode == PoolerMode::Transaction).then_some((&*db.host, db.port));
        checks.push(migration_route(target, pooler, resolver.as_ref()).await);
    }
    checks.push(otlp(&lookup).await);
    Report { checks }
}

/// How the database connection is carried: TLS with the certificate's subject, names and expiry,
/// or plain text and why; on failure, what the server presents and why it was refused.
async fn tls(connector: &Connector, addr: SocketAddr, host: &str) -> Check {
    let mode = connector.mode();
    match tokio::time::timeout(STEP_TIMEOUT, connector.probe(addr)).await {
        Err(_) => Check::new(
            "TLS",
            Status::Fail,
            format!("no answer to the TLS request within {STEP_TIMEOUT:?}"),
        ),
        Ok(Ok(Transport::Tls(cert))) => {
            let left = cert.not_after.map(|t| t - chrono::Utc::now());
            let verified = match mode {
                SslMode::VerifyFull => format!("verified for {host:?}"),
                SslMode::VerifyCa => "chain verified, name not checked".to_owned(),
                _ => "not verified".to_owned(),
            };
            let detail = format!("sslmode={mode}: {cert}; {verified}");
            match left {
                Some(left) if left < chrono::TimeDelta::days(30) => {
                    Check::new("TLS", Status::Warn, detail).hint(format!(
                        "The server's certificate expires within {} days: renew it.",
                        left.num_days().max(0)
                    ))
                }
                _ if !mode.verifies_chain() => Check::new("TLS", Status::Warn, detail).hint(
                    "Encrypted but the server is not authenticated: use sslmode=verify-full with \
                     sslrootcert=<your provider's CA file> (or sslrootcert=system).",
                ),
                _ => Check::new("TLS", Status::Pass, detail),
            }
        }
        Ok(Ok(Transport::Plain(why))) => {
            let detail = format!("sslmode={mode}: plain text ({why})");
            if addr.ip().is_loopback() {
                Check::new("TLS", Status::Pass, detail)
            } else {
                Check::new("TLS", Status::Warn, detail).hint(
                    "Queries and the password cross the network unencrypted: use \
                     sslmode=verify-full in DATABASE_URL unless the network is private.",
                )
            }
        }
        Ok(Err(e)) => {
            let presented = match connector.inspect(addr).await {
                Some(Ok(Some(cert))) => format!("The server presents {cert}."),
                _ => "The server presents no certificate this service could read.".to_owned(),
            };
            Check::new("TLS", Status::Fail, e.to_string()).hint(presented)
        }
    }
}

/// Whether the server takes writes: after a failover, a URL (or a pooler) left pointing at the
/// former primary reaches a standby, where every write fails.
async fn writable(conn: &mut PgConnection, var: &str) -> Check {
    let in_recovery: Result<bool, sqlx::Error> = sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .persistent(false)
        .fetch_one(&mut *conn)
        .await;
    match in_recovery {
        Ok(false) => Check::new("writable", Status::Pass, "a primary: it takes writes"),
        Ok(true) => Check::new(
            "writable",
            Status::Fail,
            format!("{var} reaches a standby (in recovery): every write fails there"),
        )
        .hint(format!(
            "Point {var} (or the pooler in front) at the primary; after a failover, at the \
             promoted server."
        )),
        Err(e) => Check::new("writable", Status::Warn, format!("cannot tell: {e}")),
    }
}

/// This replica's pool beside the server's `max_connections`, which every replica shares.
/// Through a transaction pooler the pool's connections are the pooler's clients, and the server's
/// are the pooler's to spend.
async fn budget(conn: &mut PgConnection, pool_max_size: usize, pooler: PoolerMode) -> Check {
    let s = match ServerConnections::read(conn, false).await {
        Ok(s) => s,
        Err(e) => {
            return Check::new(
                "connection budget",
                Status::Warn,
                format!("cannot read: {e}"),
            );
        }
    };
    let usable = s.max_connections - s.reserved;
    if pooler == PoolerMode::Transaction {
        let detail = format!(
            "through a transaction pooler (DB_POOLER_MODE=transaction): this replica's pool of up \
             to {pool_max_size} are the pooler's clients; the server: max_connections {} ({} \
             reserved), {} in use (the pooler's among them), {} free",
            s.max_connections,
            s.reserved,
            s.in_use,
            s.free()
        );
        return if s.free() == 0 {
            Check::new("connection budget", Status::Warn, detail).hint(
                "The server has no connection left for the pooler to open: lower the pooler's \
                 pool size (default_pool_size) or raise max_connections.",
            )
        } else {
            Check::new("connection budget", Status::Pass, detail)
        };
    }
    let detail = format!(
        "server max_connections {} ({} reserved), {} in use, {} free; this replica's pool up to \
         {pool_max_size} (DB_POOL_MAX_SIZE): room for {} more replicas of that size",
        s.max_connections,
        s.reserved,
        s.in_use,
        s.free(),
        s.more_replicas(pool_max_size)
    );
    if pool_max_size as i64 > i64::from(usable) {
        Check::new("connection budget", Status::Warn, detail).hint(
            "One replica's pool can take every connection the server allows: lower \
             DB_POOL_MAX_SIZE, or put a pooler (PgBouncer) in front.",
        )
    } else if (s.free() as usize) < pool_max_size {
        Check::new("connection budget", Status::Warn, detail).hint(
            "Another replica of this size would not fit: keep replicas × DB_POOL_MAX_SIZE below \
             max_connections less the reserved and other clients' connections, or use a pooler.",
        )
    } else {
        Check::new("connection budget", Status::Pass, detail)
    }
}

/// `DATABASE_MIGRATION_URL`, end to end. The service takes that route only at startup, so a
/// broken one (a typo, a password rotated, a primary that moved) would otherwise show at the next
/// deploy, as a replica that cannot start. `pooler`: DATABASE_URL's address when it is a
/// transaction pooler, which migrations must not go through.
async fn migration_route(
    target: &Target,
    pooler: Option<(&str, u16)>,
    resolver: &dyn Resolver,
) -> Check {
    const NAME: &str = "migration route";
    const VAR: &str = "DATABASE_MIGRATION_URL";
    let fail = |step: &str, inner: Check| {
        let check = Check::new(NAME, Status::Fail, format!("{step}: {}", inner.detail));
        match inner.hint {
            Some(h) => check.hint(h.replace("DATABASE_URL", VAR)),
            None => check,
        }
    };
    if pooler == Some((target.host.as_str(), target.port)) {
        return Check::new(
            NAME,
            Status::Fail,
            format!(
                "{VAR} names {}:{}, as DATABASE_URL does",
                target.host, target.port
            ),
        )
        .hint(
            "Migrations hold an advisory lock for their session, which a transaction pooler does \
             not keep: point DATABASE_MIGRATION_URL at the server itself.",
        );
    }
    let addr = match resolve(&target.host, target.port, resolver).await {
        Ok((addr, _)) => addr,
        Err(c) => return fail("DNS", c),
    };
    let reach = tcp(addr).await;
    if reach.status != Status::Pass {
        return fail("TCP", reach);
    }
    let connector = match Connector::new(
        target
            .connect_options
            .clone()
            .application_name("todo-service-doctor"),
        &target.tls,
        &target.host,
    ) {
        Ok(c) => c,
        Err(e) => {
            return Check::new(NAME, Status::Fail, format!("TLS: {e:#}"))
                .hint(format!("Fix the TLS parameters in {VAR}."));
        }
    };
    let mut conn = match tokio::time::timeout(STEP_TIMEOUT, connector.connect(addr)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            return Check::new(NAME, Status::Fail, format!("login: {e}")).hint(format!(
                "Check the user, password and database name in {VAR}, and pg_hba.conf on the server."
            ));
        }
        Err(_) => {
            return Check::new(
                NAME,
                Status::Fail,
                format!("login: no answer within {STEP_TIMEOUT:?}"),
            );
        }
    };
    let primary = writable(&mut conn, VAR).await;
    let _ = conn.close().await;
    match primary.status {
        Status::Pass => Check::new(
            NAME,
            Status::Pass,
            format!(
                "{}:{} ({addr}, sslmode={}) logged in as {:?}: a primary, where migrations can run",
                target.host,
                target.port,
                connector.mode(),
                target.connect_options.get_username()
            ),
        ),
        _ => fail("writable", primary),
    }
}

async fn resolve(
    host: &str,
    port: u16,
    resolver: &dyn Resolver,
) -> Result<(SocketAddr, Check), Check> {
    if let Some(ip) = crate::net::ip_literal(host) {
        let addr = SocketAddr::new(ip, port);
        return Ok((
            addr,
            Check::new(
                "DNS",
                Status::Pass,
                format!("{host} is an IP address; no lookup needed"),
            ),
        ));
    }
    let started = Instant::now();
    let addrs = match tokio::time::timeout(STEP_TIMEOUT, resolver.lookup(host, port)).await {
        Ok(Ok(addrs)) => addrs,
        Ok(Err(e)) => return Err(Check::new("DNS", Status::Fail, format!("cannot resolve {host:?}: {e}")).hint(
            "Check the host name in DATABASE_URL; in Docker Compose it is the database service's name, \
             and both services must share a network. The service itself starts anyway and retries.",
        )),
        Err(_) => return Err(Check::new("DNS", Status::Fail, format!("no answer for {host:?} within {STEP_TIMEOUT:?}"))
            .hint("The resolver is slow or overloaded (the post-mortem's failure); check /etc/resolv.conf.")),
    };
    let Some(addr) = crate::net::preferred(&addrs) else {
        return Err(Check::new(
            "DNS",
            Status::Fail,
            format!("{host} resolved to no addresses"),
        ));
    };
    let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    Ok((
        addr,
        Check::new(
            "DNS",
            Status::Pass,
            format!(
                "{host} -> {} in {:?}; the service would pin {}",
                list.join(", "),
                started.elapsed(),
                addr.ip()
            ),
        ),
    ))
}

async fn tcp(addr: SocketAddr) -> Check {
    let started = Instant::now();
    match tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Check::new("TCP reach", Status::Pass, format!("{addr} accepted a connection in {:?}", started.elapsed())),
        Ok(Err(e)) => Check::new("TCP reach", Status::Fail, format!("{addr}: {e}")).hint(format!(
            "Is PostgreSQL running and listening on {addr} (listen_addresses, port)? Is a firewall in the way?"
        )),
        Err(_) => Check::new("TCP reach", Status::Fail, format!("{addr}: no answer within {STEP_TIMEOUT:?}"))
            .hint("Packets are dropped on the way: check the network path and firewalls."),
    }
}

async fn migrations(conn: &mut PgConnection) -> Check {
    let known: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    let applied: Result<Vec<i64>, sqlx::Error> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .persistent(false)
            .fetch_all(&mut *conn)
            .await;
    match applied {
        Ok(applied) => {
            let pending: Vec<&i64> = known.iter().filter(|v| !applied.contains(v)).collect();
            let unknown: Vec<&i64> = applied.iter().filter(|v| !known.contains(v)).collect();
            if !unknown.is_empty() {
                Check::new(
                    "migrations",
                    Status::Warn,
                    format!("the database has migrations this build does not know: {unknown:?}"),
                )
                .hint("A newer version of the service ran against this database; deploy that version.")
            } else if pending.is_empty() {
                Check::new(
                    "migrations",
                    Status::Pass,
                    format!("all {} applied", known.len()),
                )
            } else {
                Check::new(
                    "migrations",
                    Status::Warn,
                    format!("{} of {} pending: {pending:?}", pending.len(), known.len()),
                )
                .hint("The service applies them at startup; nothing to do unless it cannot start.")
            }
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Check::new(
            "migrations",
            Status::Warn,
            format!("none applied yet ({} pending)", known.len()),
        )
        .hint("The service applies them at startup."),
        Err(e) => Check::new(
            "migrations",
            Status::Fail,
            format!("cannot read the migration table: {e}"),
        )
        .hint("The user in DATABASE_URL needs read access to _sqlx_migrations."),
    }
}

/// The OTLP collector, from the standard OpenTelemetry variable.
async fn otlp(lookup: &impl Fn(&str) -> Option<String>) -> Check {
    const NAME: &str = "OTLP endpoint";
    let Some(raw) = lookup("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|v| !v.trim().is_empty()) else {
        return Check::new(NAME, Status::Skip, "OTEL_EXPORTER_OTLP_ENDPOINT is not set");
    };
    let url = match url::Url::parse(raw.trim()) {
        Ok(u) if u.host_str().is_some() => u,
        _ => {
            return Check::new(NAME, Status::Fail, format!("{raw:?} is not a URL")).hint(
                "Use e.g. http://otel-collector:4317 (gRPC) or http://otel-collector:4318 (HTTP).",
            );
        }
    };
    let host = url
        .host_str()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_owned();
    let port = url.port_or_known_default().unwrap_or(4317);
    let reach = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await?
            .collect();
        let addr = *addrs
            .first()
            .ok_or_else(|| std::io::Error::other("no addresses"))?;
        tokio::net::TcpStream::connect(addr).await?;
        Ok::<_, std::io::Error>(addr)
    };
    match tokio::time::timeout(STEP_TIMEOUT, reach).await {
        Ok(Ok(addr)) => Check::new(NAME, Status::Pass, format!("{raw} ({addr}) accepts connections")),
        Ok(Err(e)) => Check::new(NAME, Status::Fail, format!("{raw}: {e}"))
            .hint("Is the collector (SigNoz's otel-collector) up and on the same network? The service keeps serving without it."),
        Err(_) => Check::new(NAME, Status::Fail, format!("{raw}: no answer within {STEP_TIMEOUT:?}"))
            .hint("Check the network path to the collector."),
    }
}

/// Who may call, and whether the configured keys can verify tokens: one is signed with the
/// secret and verified as a request's would be; the JWK Set is read and each key's algorithm
/// shown. Never shows the secret, only its length.
async fn authentication(config: &Config) -> Check {
    use secrecy::ExposeSecret as _;
    const NAME: &str = "authentication";
    let jwt = match &config.auth.mode {
        AuthMode::None { .. } if config.auth.is_open_to_the_network(config.listen_addr) => {
            return Check::new(
                NAME,
                Status::Warn,
                format!(
                    "none, on LISTEN_ADDR={}: anyone who reaches it can read, change and delete \
                     every todo",
                    config.listen_addr
                ),
            )
            .hint("Set AUTH_MODE=jwt with AUTH_JWT_SECRET, or bind LISTEN_ADDR to 127.0.0.1.");
        }
        AuthMode::None { .. } => {
            return Check::new(
                NAME,
                Status::Pass,
                format!(
                    "none, serving this machine only (LISTEN_ADDR={})",
                    config.listen_addr
                ),
            );
        }
        AuthMode::Jwt(jwt) => jwt,
    };
    let (aud, iss) = (jwt.audience.as_deref(), jwt.issuer.as_deref());
    let mut parts = vec![format!(
        "jwt; audience {}; issuer {}",
        aud.unwrap_or("not checked"),
        iss.unwrap_or("not checked")
    )];
    let mut failed = false;
    if let Some(secret) = &jwt.secret {
        let secret = secret.expose_secret().as_bytes();
        let probe = Mint {
            sub: "todo-service-doctor",
            scope: READ_SCOPE,
            aud,
            iss,
        };
        let verified = mint_hs256(secret, &probe, Duration::from_secs(60))
            .map_err(|e| e.to_string())
            .and_then(|t| {
                Verifier::hs256(secret, aud, iss)
                    .verify(&t)
                    .map_err(|r| r.description().to_owned())
            });
        parts.push(match verified {
            Ok(_) => format!(
                "HS256 secret of {} bytes: a test token verifies",
                secret.len()
            ),
            Err(why) => {
                failed = true;
                format!(
                    "HS256 secret of {} bytes: a test token does not verify: {why}",
                    secret.len()
                )
            }
        });
    }
    if let Some(source) = &jwt.jwks {
        let source = crate::startup::jwks_source(source);
        parts.push(
            match tokio::time::timeout(STEP_TIMEOUT, jwks::load(&source)).await {
                Ok(Ok(keys)) => {
                    let keys: Vec<String> = keys
                        .iter()
                        .map(|k| format!("{} {:?}", k.kid().unwrap_or("(no kid)"), k.algorithm()))
                        .collect();
                    format!("JWK Set {source}: {}", keys.join(", "))
                }
                Ok(Err(e)) => {
                    failed = true;
                    format!("JWK Set: {e}")
                }
                Err(_) => {
                    failed = true;
                    format!("JWK Set {source}: no answer within {STEP_TIMEOUT:?}")
                }
            },
        );
    }
    let detail = parts.join("; ");
    if failed {
        Check::new(NAME, Status::Fail, detail).hint(
            "Check AUTH_JWT_SECRET, AUTH_JWKS_FILE / AUTH_JWKS_URL (readable, a JWK Set of public \
             signing keys), AUTH_JWT_AUDIENCE and AUTH_JWT_ISSUER.",
        )
    } else {
        Check::new(NAME, Status::Pass, detail)
    }
}
