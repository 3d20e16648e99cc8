//! The database checks: the steps the service takes to reach its database, each reported (DNS,
//! TCP reach, TLS, login), then what the server says about itself (writable, connection budget,
//! migrations, pooler sessions). `DATABASE_MIGRATION_URL` goes through the same steps, written once
//! in [`open`].

use std::{net::SocketAddr, time::Instant};

use sqlx::{Connection, PgConnection, postgres::PgConnectOptions};

use super::{
    STEP_TIMEOUT,
    report::{Check, Status},
    server::{self, SERVER},
};
use crate::{
    config::{DatabaseConfig, DbTlsSettings, SslMode, Target},
    db::{
        connect::{Connector, Transport},
        resolve::Resolver,
    },
};

/// The steps to a logged-in connection, in order, then the checks made over it.
const STEPS: [&str; 4] = ["DNS", "TCP reach", "TLS", "login"];

/// Every database check's name, in the order of the report.
pub(super) const CHECKS: [&str; 8] = [
    STEPS[0], STEPS[1], STEPS[2], STEPS[3], SERVER[0], SERVER[1], SERVER[2], SERVER[3],
];

/// A database URL's settings: `DATABASE_URL`'s or `DATABASE_MIGRATION_URL`'s.
struct Route<'a> {
    /// The variable that holds them, named in the hints.
    var: &'static str,
    host: &'a str,
    port: u16,
    options: &'a PgConnectOptions,
    tls: &'a DbTlsSettings,
}

/// `DATABASE_URL`'s steps and server checks, then the migration route when there is one.
pub(super) async fn checks(db: &DatabaseConfig, resolver: &dyn Resolver) -> Vec<Check> {
    let route = Route {
        var: "DATABASE_URL",
        host: &db.host,
        port: db.port,
        options: &db.connect_options,
        tls: &db.tls,
    };
    let (mut checks, conn) = open(&route, resolver).await;
    match conn {
        Some((mut conn, ..)) => {
            checks.extend(server::checks(&mut conn, db).await);
            let _ = conn.close().await;
        }
        None => checks.extend(
            SERVER
                .iter()
                .map(|name| Check::new(name, Status::Skip, "needs login")),
        ),
    }
    if let Some(target) = &db.migration {
        let pooler = db
            .pooler_mode
            .pools_transactions()
            .then_some((&*db.host, db.port));
        checks.push(migration_route(target, pooler, resolver).await);
    }
    checks
}

/// Opens a connection as the service would, one check per step ([`STEPS`]); the steps after a
/// failed one are skipped, but TLS settings that cannot be used fail whether or not the server
/// was reached. The connection comes with the address and TLS mode it used.
async fn open(
    route: &Route<'_>,
    resolver: &dyn Resolver,
) -> (Vec<Check>, Option<(PgConnection, SocketAddr, SslMode)>) {
    let connector = Connector::new(
        route
            .options
            .clone()
            .application_name("todo-service-doctor"),
        route.tls,
        route.host,
    )
    .map_err(|e| {
        Check::new("TLS", Status::Fail, format!("{e:#}")).hint(format!(
            "Fix the TLS parameters in {} (sslrootcert, sslcert, sslkey).",
            route.var
        ))
    });
    let mut checks = Vec::new();
    let conn = steps(route, resolver, &connector, &mut checks).await;
    for name in &STEPS[checks.len()..] {
        checks.push(match (&connector, *name) {
            (Err(unusable), "TLS") => unusable.clone(),
            (_, "TCP reach") => Check::new(name, Status::Skip, "needs DNS"),
            (_, "TLS") => Check::new(name, Status::Skip, "needs TCP reach"),
            _ => Check::new(name, Status::Skip, "needs TCP reach and TLS"),
        });
    }
    (checks, conn)
}

/// The steps of [`open`] up to the first that fails, each check pushed as it is made.
async fn steps(
    route: &Route<'_>,
    resolver: &dyn Resolver,
    connector: &Result<Connector, Check>,
    checks: &mut Vec<Check>,
) -> Option<(PgConnection, SocketAddr, SslMode)> {
    let addr = match resolve(route, resolver).await {
        Ok((addr, check)) => {
            checks.push(check);
            addr
        }
        Err(check) => {
            checks.push(check);
            return None;
        }
    };
    let reach = tcp(addr).await;
    let reached = reach.status == Status::Pass;
    checks.push(reach);
    let connector = connector.as_ref().ok().filter(|_| reached)?;
    let carried = tls(connector, addr, route).await;
    let carried_ok = carried.status != Status::Fail;
    checks.push(carried);
    if !carried_ok {
        return None;
    }
    match login(connector, addr, route).await {
        Ok((conn, check)) => {
            checks.push(check);
            Some((conn, addr, connector.mode()))
        }
        Err(check) => {
            checks.push(check);
            None
        }
    }
}

/// What to do about a refused login. PgBouncer refuses the startup parameters sqlx sends
/// (`extra_float_digits`, and `options` with a statement timeout) unless told to ignore them:
/// its words name the parameter, and the fix is one line of pgbouncer.ini.
fn login_hint(error: &str, var: &str) -> String {
    if error.contains("unsupported startup parameter") {
        return "A PgBouncer refuses the service's startup parameters: add \
                `ignore_startup_parameters = extra_float_digits,options` to pgbouncer.ini \
                (the whole configuration the service needs: docs/scaling-out.md)."
            .to_owned();
    }
    format!("Check the user, password and database name in {var}, and pg_hba.conf on the server.")
}

async fn login(
    connector: &Connector,
    addr: SocketAddr,
    route: &Route<'_>,
) -> Result<(PgConnection, Check), Check> {
    match tokio::time::timeout(STEP_TIMEOUT, connector.connect(addr)).await {
        Ok(Ok(conn)) => {
            let detail = format!(
                "logged in as {:?} to database {:?}",
                route.options.get_username(),
                route.options.get_database().unwrap_or("(default)")
            );
            Ok((conn, Check::new("login", Status::Pass, detail)))
        }
        Ok(Err(e)) => {
            let text = e.to_string();
            let hint = login_hint(&text, route.var);
            Err(Check::new("login", Status::Fail, text).hint(hint))
        }
        Err(_) => Err(
            Check::new("login", Status::Fail, format!("no answer within {STEP_TIMEOUT:?}"))
                .hint("The port answers TCP but not the PostgreSQL protocol: is it the right port, or a proxy with nothing behind it?"),
        ),
    }
}

/// How the database connection is carried: TLS with the certificate's subject, names and expiry,
/// or plain text and why; on failure, what the server presents and why it was refused.
async fn tls(connector: &Connector, addr: SocketAddr, route: &Route<'_>) -> Check {
    let (host, var) = (route.host, route.var);
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
                Check::new("TLS", Status::Warn, detail).hint(format!(
                    "Queries and the password cross the network unencrypted: use \
                         sslmode=verify-full in {var} unless the network is private."
                ))
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
            Some(h) => check.hint(h),
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
    let route = Route {
        var: VAR,
        host: &target.host,
        port: target.port,
        options: &target.connect_options,
        tls: &target.tls,
    };
    let (steps, conn) = open(&route, resolver).await;
    let Some((mut conn, addr, mode)) = conn else {
        let failed = steps.into_iter().find(|c| c.status == Status::Fail);
        let failed = failed.expect("a step failed when no connection came back");
        let step = if failed.name == "TCP reach" {
            "TCP"
        } else {
            failed.name
        };
        return fail(step, failed);
    };
    let primary = server::writable(&mut conn, VAR).await;
    let _ = conn.close().await;
    match primary.status {
        Status::Pass => Check::new(
            NAME,
            Status::Pass,
            format!(
                "{}:{} ({addr}, sslmode={mode}) logged in as {:?}: a primary, where migrations can run",
                target.host,
                target.port,
                target.connect_options.get_username()
            ),
        ),
        _ => fail("writable", primary),
    }
}

async fn resolve(route: &Route<'_>, resolver: &dyn Resolver) -> Result<(SocketAddr, Check), Check> {
    let (host, port) = (route.host, route.port);
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
        Ok(Err(e)) => return Err(Check::new("DNS", Status::Fail, format!("cannot resolve {host:?}: {e}")).hint(format!(
            "Check the host name in {}; in Docker Compose it is the database service's name, \
             and both services must share a network. The service itself starts anyway and retries.",
            route.var
        ))),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pooler_refusing_the_startup_parameters_is_told_the_line_that_fixes_it() {
        let hint = login_hint(
            "error returned from database: unsupported startup parameter: extra_float_digits",
            "DATABASE_URL",
        );
        assert!(
            hint.contains("ignore_startup_parameters = extra_float_digits,options"),
            "{hint}"
        );
        let hint = login_hint(
            "password authentication failed for user \"app\"",
            "DATABASE_URL",
        );
        assert!(
            hint.contains("user, password and database name in DATABASE_URL"),
            "{hint}"
        );
    }
}
