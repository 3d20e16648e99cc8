//! The checks of what the service talks to besides its database: who may call (the secret and
//! the JWK Set verify tokens) and the OTLP collector.

use std::{net::SocketAddr, time::Duration};

use super::{
    STEP_TIMEOUT,
    report::{Check, Status},
};
use crate::{
    auth::{Mint, READ_SCOPE, Verifier, jwks, mint_hs256},
    config::{AuthMode, Config, JwksSource, redact_url},
};

/// The OTLP collector, from the standard OpenTelemetry variable.
pub(super) async fn otlp(lookup: &impl Fn(&str) -> Option<String>) -> Check {
    const NAME: &str = "OTLP endpoint";
    let Some(raw) = lookup("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|v| !v.trim().is_empty()) else {
        return Check::new(NAME, Status::Skip, "OTEL_EXPORTER_OTLP_ENDPOINT is not set");
    };
    // What the report shows of it: never its credentials.
    let shown = redact_url(raw.trim());
    let url = match url::Url::parse(raw.trim()) {
        Ok(u) if u.host_str().is_some() => u,
        _ => {
            return Check::new(NAME, Status::Fail, format!("{shown} is not a URL")).hint(
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
        Ok(Ok(addr)) => Check::new(NAME, Status::Pass, format!("{shown} ({addr}) accepts connections")),
        Ok(Err(e)) => Check::new(NAME, Status::Fail, format!("{shown}: {e}"))
            .hint("Is the collector (SigNoz's otel-collector) up and on the same network? The service keeps serving without it."),
        Err(_) => Check::new(NAME, Status::Fail, format!("{shown}: no answer within {STEP_TIMEOUT:?}"))
            .hint("Check the network path to the collector."),
    }
}

pub(super) const ADMIN_LISTENER: &str = "admin listener";

/// Who can reach the operators' listener, which has no authentication.
pub(super) fn admin_listener(config: &Config) -> Check {
    match config.admin_listen_addr {
        None => Check::new(ADMIN_LISTENER, Status::Skip, "off (ADMIN_LISTEN_ADDR=off)"),
        Some(addr) if addr.ip().is_loopback() => Check::new(
            ADMIN_LISTENER,
            Status::Pass,
            format!("{addr}: this machine only"),
        ),
        Some(addr) => Check::new(
            ADMIN_LISTENER,
            Status::Warn,
            format!(
                "{addr}, reachable from other machines (ADMIN_ALLOW_NETWORK=true): anyone who \
                 reaches it reads the pinned database address, the pool, the breaker and the \
                 driver's errors"
            ),
        )
        .hint("Bind ADMIN_LISTEN_ADDR to 127.0.0.1, or keep the port behind a firewall."),
    }
}

/// Who may call, and whether the configured keys can verify tokens: one is signed with the
/// secret and verified as a request's would be; the JWK Set is read and each key's algorithm
/// shown. Never shows the secret, only its length.
pub(super) async fn authentication(config: &Config) -> Check {
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
    let mut parts = vec![Ok(format!(
        "jwt; audience {}; issuer {}",
        aud.unwrap_or("not checked"),
        iss.unwrap_or("not checked")
    ))];
    if let Some(secret) = &jwt.secret {
        parts.push(secret_verifies(secret, aud, iss));
    }
    if let Some(source) = &jwt.jwks {
        parts.push(key_set(source).await);
    }
    let failed = parts.iter().any(Result::is_err);
    let detail = parts
        .into_iter()
        .map(|p| p.unwrap_or_else(|e| e))
        .collect::<Vec<_>>()
        .join("; ");
    if failed {
        Check::new(NAME, Status::Fail, detail).hint(
            "Check AUTH_JWT_SECRET, AUTH_JWKS_FILE / AUTH_JWKS_URL (readable, a JWK Set of public \
             signing keys), AUTH_JWT_AUDIENCE and AUTH_JWT_ISSUER.",
        )
    } else {
        Check::new(NAME, Status::Pass, detail)
    }
}

/// Whether a token signed with the HS256 secret verifies as a request's would; `Err` says why
/// not. Names the secret's length, never the secret.
fn secret_verifies(
    secret: &secrecy::SecretString,
    aud: Option<&str>,
    iss: Option<&str>,
) -> Result<String, String> {
    use secrecy::ExposeSecret as _;
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
    let bytes = secret.len();
    match verified {
        Ok(_) => Ok(format!(
            "HS256 secret of {bytes} bytes: a test token verifies"
        )),
        Err(why) => Err(format!(
            "HS256 secret of {bytes} bytes: a test token does not verify: {why}"
        )),
    }
}

/// The JWK Set's keys (`kid` and algorithm), or why it cannot be read.
async fn key_set(source: &JwksSource) -> Result<String, String> {
    match tokio::time::timeout(STEP_TIMEOUT, jwks::load(source)).await {
        Ok(Ok(keys)) => {
            let keys: Vec<String> = keys
                .iter()
                .map(|k| format!("{} {:?}", k.kid().unwrap_or("(no kid)"), k.algorithm()))
                .collect();
            Ok(format!("JWK Set {source}: {}", keys.join(", ")))
        }
        Ok(Err(e)) => Err(format!("JWK Set: {e}")),
        Err(_) => Err(format!(
            "JWK Set {source}: no answer within {STEP_TIMEOUT:?}"
        )),
    }
}
