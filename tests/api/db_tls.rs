//! TLS to PostgreSQL: libpq's sslmodes against a server with `ssl = on` and a CA made here, the
//! certificate checked against the host name while connections go to the pinned address, client
//! certificates, and doctor's report.

use std::{collections::HashMap, sync::Arc, sync::atomic::Ordering};

use todo_service::{
    config::Config,
    db::Db,
    doctor::{self, Status},
};

use crate::{
    helpers::{CountingResolver, admin_url},
    pg_tls::{CERT_USER, TestCa, TlsPostgres},
};

fn config(url: &str) -> Config {
    let env = HashMap::from([("DATABASE_URL".to_owned(), url.to_owned())]);
    Config::from_lookup(|k| env.get(k).cloned()).unwrap()
}

/// A pool for `url` (host names answered by `resolver`) and the outcome of logging in through
/// it: whether the session is encrypted (`pg_stat_ssl`), or the error.
async fn login(url: &str, resolver: &Arc<CountingResolver>) -> Result<bool, String> {
    let config = config(url);
    let db = Db::connect(&config.database, config.breaker, resolver.clone())
        .await
        .map_err(|e| format!("{e:#}"))?;
    let mut conn = db.pool().get().await.map_err(|e| e.to_string())?;
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ssl)
}

#[tokio::test]
async fn verify_full_checks_the_name_while_connecting_to_the_pinned_address() {
    let pg = TlsPostgres::start();
    let port = pg.port;
    let ca = pg.ca_file().display().to_string();
    let other_ca = pg.write("other-ca.crt", &TestCa::new("someone else's CA").pem());
    let resolver = Arc::new(CountingResolver::default());

    // The right CA and a name the certificate carries: encrypted, and the name was looked up once
    // although the pool opened several connections.
    let url = format!(
        "postgres://postgres@db.tls.test:{port}/postgres?sslmode=verify-full&sslrootcert={ca}"
    );
    let config = config(&url);
    let db = Db::connect(&config.database, config.breaker, resolver.clone())
        .await
        .unwrap();
    let held = futures::future::join_all((0..4).map(|_| db.pool().get())).await;
    for conn in held {
        let mut conn = conn.unwrap();
        let ssl: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        assert!(ssl, "the session is encrypted");
    }
    assert!(db.pool().status().size >= 4);
    assert_eq!(resolver.calls.load(Ordering::SeqCst), 1, "one DNS lookup");
    assert_eq!(db.address().get(), Some(pg.addr()), "the pinned address");

    // A CA that did not sign the server's certificate.
    let err = login(
        &format!(
            "postgres://postgres@db.tls.test:{port}/postgres?sslmode=verify-full&sslrootcert={}",
            other_ca.display()
        ),
        &resolver,
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("not signed by a CA in sslrootcert=") && err.contains("sslmode=verify-full"),
        "{err}"
    );

    // A name the certificate does not carry, at the same address.
    let wrong_name = format!(
        "postgres://postgres@db.elsewhere.test:{port}/postgres?sslmode=verify-full&sslrootcert={ca}"
    );
    let err = login(&wrong_name, &resolver).await.unwrap_err();
    assert!(
        err.contains("does not name \"db.elsewhere.test\"") && err.contains("sslmode=verify-ca"),
        "{err}"
    );
    // verify-ca checks the chain only, so the same URL connects.
    let chain_only = wrong_name.replace("verify-full", "verify-ca");
    assert_eq!(login(&chain_only, &resolver).await, Ok(true));
    // ... but not with the wrong CA.
    let err = login(
        &chain_only.replace(&ca, &other_ca.display().to_string()),
        &resolver,
    )
    .await
    .unwrap_err();
    assert!(err.contains("not signed by a CA"), "{err}");
}

#[tokio::test]
async fn modes_without_verification_follow_libpq() {
    let pg = TlsPostgres::start();
    let port = pg.port;
    let resolver = Arc::new(CountingResolver::default());
    let at = |mode: &str| format!("postgres://postgres@db.tls.test:{port}/postgres?sslmode={mode}");
    assert_eq!(login(&at("require"), &resolver).await, Ok(true));
    assert_eq!(login(&at("prefer"), &resolver).await, Ok(true));
    assert_eq!(
        login(
            &format!("postgres://postgres@db.tls.test:{port}/postgres"),
            &resolver
        )
        .await,
        Ok(true),
        "prefer is the default"
    );
    assert_eq!(login(&at("disable"), &resolver).await, Ok(false));

    // The shared test server runs with ssl = off.
    let mut plain = admin_url();
    plain.set_query(Some("sslmode=prefer"));
    assert_eq!(
        login(plain.as_str(), &resolver).await,
        Ok(false),
        "prefer falls back"
    );
    plain.set_query(Some("sslmode=require"));
    let err = login(plain.as_str(), &resolver).await.unwrap_err();
    assert!(
        err.contains("does not offer TLS") && err.contains("sslmode=require"),
        "{err}"
    );
}

#[tokio::test]
async fn a_client_certificate_logs_in_where_only_certificates_are_accepted() {
    let pg = TlsPostgres::start();
    let port = pg.port;
    let ca = pg.ca_file().display().to_string();
    let client = pg.ca.issue(CERT_USER, &[]);
    let cert = pg
        .write("client.crt", &client.cert_pem)
        .display()
        .to_string();
    let key = pg
        .write("client.key", &client.key_pem)
        .display()
        .to_string();
    let resolver = Arc::new(CountingResolver::default());
    let base = format!(
        "postgres://{CERT_USER}@db.tls.test:{port}/postgres?sslmode=verify-full&sslrootcert={ca}"
    );
    assert_eq!(
        login(&format!("{base}&sslcert={cert}&sslkey={key}"), &resolver).await,
        Ok(true)
    );
    let err = login(&base, &resolver).await.unwrap_err();
    assert!(err.contains("certificate"), "without one: {err}");
    // A missing key file stops startup, naming the setting.
    let err = login(
        &format!("{base}&sslcert={cert}&sslkey=/nonexistent/client.key"),
        &resolver,
    )
    .await
    .unwrap_err();
    assert!(err.contains("sslkey=/nonexistent/client.key"), "{err}");
    assert!(!err.contains("PRIVATE KEY"), "{err}");
}

#[tokio::test]
async fn doctor_reports_the_certificate_and_why_verification_failed() {
    let pg = TlsPostgres::start();
    let port = pg.port;
    let ca = pg.ca_file().display().to_string();
    let tls_check = |report: doctor::Report| {
        report
            .checks
            .into_iter()
            .find(|c| c.name == "TLS")
            .expect("a TLS check")
    };
    let run = |url: String| async move {
        let env = HashMap::from([("DATABASE_URL".to_owned(), url)]);
        doctor::run(
            |k| env.get(k).cloned(),
            Arc::new(CountingResolver::default()),
        )
        .await
    };

    let good = tls_check(
        run(format!(
            "postgres://postgres@db.tls.test:{port}/postgres?sslmode=verify-full&sslrootcert={ca}"
        ))
        .await,
    );
    assert_eq!(good.status, Status::Pass, "{good:?}");
    for part in [
        "sslmode=verify-full",
        "TLSv1_3",
        "CN=db.tls.test",
        "localhost, db.tls.test",
        "expires 2099-12-31",
        "verified for \"db.tls.test\"",
    ] {
        assert!(good.detail.contains(part), "{part}: {}", good.detail);
    }

    let wrong = tls_check(
        run(format!(
            "postgres://postgres@db.elsewhere.test:{port}/postgres?sslmode=verify-full&sslrootcert={ca}"
        ))
        .await,
    );
    assert_eq!(wrong.status, Status::Fail, "{wrong:?}");
    assert!(wrong.detail.contains("does not name"), "{}", wrong.detail);
    let hint = wrong.hint.unwrap_or_default();
    assert!(
        hint.contains("CN=db.tls.test") && hint.contains("localhost, db.tls.test"),
        "what the server presents: {hint}"
    );

    let unverified = tls_check(
        run(format!(
            "postgres://postgres@db.tls.test:{port}/postgres?sslmode=require"
        ))
        .await,
    );
    assert_eq!(unverified.status, Status::Warn, "{unverified:?}");
    assert!(unverified.detail.contains("not verified"), "{unverified:?}");
}
