//! Authentication settings: whether callers must present a bearer token, the key tokens are
//! verified with, the claims they must carry, and the tighter rate limit for callers who do not
//! authenticate.
//!
//! The one rule that is not a plain parse: serving without authentication on an address other
//! machines can reach must be chosen explicitly (`AUTH_MODE=none`), because then anyone who can
//! reach the port can read and delete every todo. Unset, the mode is `none` on loopback (one
//! command to run it locally) and a startup error anywhere else.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::{
    Var,
    env::{ConfigError, Env, invalid},
    redact::{RedactedUrl, redact_url},
};

pub const VARS: &[Var] = &[
    Var {
        name: "AUTH_MODE",
        default: None,
        help: "`jwt`: every /todos request needs `Authorization: Bearer <token>`, and each caller \
               (the token's sub) sees only their own todos. `none`: no authentication, every \
               caller is the same anonymous owner. Unset: `none` when LISTEN_ADDR is a loopback \
               address, otherwise startup fails; AUTH_MODE=none on another address is allowed \
               and warns at startup.",
    },
    Var {
        name: "AUTH_JWT_SECRET",
        default: None,
        help: "Shared secret that verifies HS256 tokens (and that `todo-service token` signs \
               with): at least 32 bytes, e.g. from `openssl rand -base64 48`. AUTH_MODE=jwt needs \
               it, AUTH_JWKS_FILE or AUTH_JWKS_URL (or several). Never logged or shown.",
    },
    Var {
        name: "AUTH_JWKS_FILE",
        default: None,
        help: "A JWK Set file (RFC 7517) of the issuer's public keys (RS*, PS*, ES256, ES384, \
               EdDSA): tokens with a `kid` are verified with its key, in that key's algorithm. \
               Read at startup (a bad file stops it) and every AUTH_JWKS_REFRESH.",
    },
    Var {
        name: "AUTH_JWKS_URL",
        default: None,
        help: "The issuer's JWK Set URL (http or https, e.g. \
               https://issuer.example.com/.well-known/jwks.json), fetched at startup and every \
               AUTH_JWKS_REFRESH in the background, never while a request waits; a token with an \
               unknown kid triggers a refresh (at most one per 10 s). Not with AUTH_JWKS_FILE.",
    },
    Var {
        name: "AUTH_JWKS_REFRESH",
        default: Some("5m"),
        help: "How often the JWK Set is read again (10s to 24h).",
    },
    Var {
        name: "AUTH_JWT_AUDIENCE",
        default: None,
        help: "When set, a token's `aud` must contain this value.",
    },
    Var {
        name: "AUTH_JWT_ISSUER",
        default: None,
        help: "When set, a token's `iss` must be this value.",
    },
    Var {
        name: "AUTH_SPAN_SUBJECT",
        default: Some("false"),
        help: "true records the token's sub on request spans (user.id). Off by default: spans \
               then say only whether the request was authenticated.",
    },
    Var {
        name: "RATE_LIMIT_UNAUTHENTICATED_PER_SECOND",
        default: Some("10"),
        help: "With AUTH_MODE=jwt: requests per second each client address may sustain on /todos \
               without a valid token (each answered 401; beyond this 429), counting every \
               token not verified before (its signature check is what costs), so a burst of bad \
               tokens is throttled and a throttled address gets no signature checked. Tokens \
               verified before still pass. Authenticated requests are limited per sub by \
               RATE_LIMIT_PER_SECOND. 0 disables it.",
    },
    Var {
        name: "RATE_LIMIT_UNAUTHENTICATED_BURST",
        default: Some("20"),
        help: "Unauthenticated requests a client address may send at once before \
               RATE_LIMIT_UNAUTHENTICATED_PER_SECOND applies.",
    },
];

/// Shortest accepted `AUTH_JWT_SECRET`: HS256's key should be at least as long as its hash
/// (RFC 7518 §3.2).
pub const MIN_SECRET_BYTES: usize = 32;

/// Who may call the data routes.
#[derive(Debug, Clone)]
pub enum AuthMode {
    /// No authentication; `explicit` when `AUTH_MODE=none` was set rather than implied by a
    /// loopback address.
    None {
        explicit: bool,
    },
    Jwt(JwtConfig),
}

/// Where public keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    File(PathBuf),
    /// Printed without its credentials.
    Url(RedactedUrl),
}

impl std::fmt::Display for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwksSource::File(path) => write!(f, "{}", path.display()),
            JwksSource::Url(url) => write!(f, "{url}"),
        }
    }
}

/// How tokens are verified in `jwt` mode: with the shared secret, the key set, or both.
#[derive(Clone)]
pub struct JwtConfig {
    pub secret: Option<SecretString>,
    pub jwks: Option<JwksSource>,
    pub jwks_refresh: Duration,
    pub audience: Option<String>,
    pub issuer: Option<String>,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("jwks", &self.jwks)
            .field("jwks_refresh", &self.jwks_refresh)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish()
    }
}

/// The authentication settings.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// `AUTH_SPAN_SUBJECT`.
    pub span_subject: bool,
    /// `RATE_LIMIT_UNAUTHENTICATED_*` as (per second, burst); `None` when 0 or not in `jwt` mode.
    pub unauthenticated_limit: Option<(u32, u32)>,
}

impl AuthConfig {
    /// Serving without authentication where other machines can reach it.
    pub fn is_open_to_the_network(&self, listen_addr: SocketAddr) -> bool {
        matches!(self.mode, AuthMode::None { .. }) && !listen_addr.ip().is_loopback()
    }
}

/// The `AUTH_JWT_SECRET` alone, for `todo-service token`, which needs no other setting.
pub fn jwt_secret(lookup: impl Fn(&str) -> Option<String>) -> Result<SecretString, ConfigError> {
    let env = Env { lookup: &lookup };
    secret(&env)?.ok_or_else(|| {
        invalid(
            "AUTH_JWT_SECRET",
            "unset".into(),
            "a secret of at least 32 bytes",
        )
    })
}

fn secret(env: &Env<'_>) -> Result<Option<SecretString>, ConfigError> {
    let Some(raw) = env.optional("AUTH_JWT_SECRET") else {
        return Ok(None);
    };
    let raw = SecretString::from(raw);
    let len = raw.expose_secret().len();
    if len < MIN_SECRET_BYTES {
        // The length only: the value never appears in an error.
        return Err(invalid(
            "AUTH_JWT_SECRET",
            format!("{len} bytes"),
            "a secret of at least 32 bytes, e.g. from `openssl rand -base64 48`",
        ));
    }
    Ok(Some(raw))
}

fn jwks(env: &Env<'_>) -> Result<Option<JwksSource>, ConfigError> {
    match (
        env.optional("AUTH_JWKS_FILE"),
        env.optional("AUTH_JWKS_URL"),
    ) {
        (Some(_), Some(_)) => Err(invalid(
            "AUTH_JWKS_URL",
            "set together with AUTH_JWKS_FILE".into(),
            "one source of keys: unset one of them",
        )),
        (Some(path), None) => Ok(Some(JwksSource::File(PathBuf::from(path.trim())))),
        (None, Some(raw)) => {
            const EXPECTED: &str =
                "an http or https URL, e.g. https://issuer.example.com/jwks.json";
            let shown = redact_url(raw.trim());
            let url = Url::parse(raw.trim())
                .map_err(|e| invalid("AUTH_JWKS_URL", format!("{shown}: {e}"), EXPECTED))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(invalid("AUTH_JWKS_URL", shown, EXPECTED));
            }
            Ok(Some(JwksSource::Url(RedactedUrl::new(url))))
        }
        (None, None) => Ok(None),
    }
}

pub(super) fn parse(env: &Env<'_>, listen_addr: SocketAddr) -> Result<AuthConfig, ConfigError> {
    let mode = match env.optional("AUTH_MODE").as_deref().map(str::trim) {
        Some("jwt") => {
            let secret = secret(env)?;
            let jwks = jwks(env)?;
            if secret.is_none() && jwks.is_none() {
                return Err(invalid(
                    "AUTH_JWT_SECRET",
                    "unset while AUTH_MODE=jwt, and so are AUTH_JWKS_FILE and AUTH_JWKS_URL".into(),
                    "a secret of at least 32 bytes (HS256), or a JWK Set in AUTH_JWKS_FILE or \
                     AUTH_JWKS_URL",
                ));
            }
            AuthMode::Jwt(JwtConfig {
                secret,
                jwks,
                jwks_refresh: env.duration_within(
                    "AUTH_JWKS_REFRESH",
                    Duration::from_secs(10)..=Duration::from_secs(24 * 3600),
                    "a duration from 10s to 24h, such as 5m",
                )?,
                audience: env.optional("AUTH_JWT_AUDIENCE"),
                issuer: env.optional("AUTH_JWT_ISSUER"),
            })
        }
        Some("none") => AuthMode::None { explicit: true },
        None if listen_addr.ip().is_loopback() => AuthMode::None { explicit: false },
        None => {
            return Err(invalid(
                "AUTH_MODE",
                format!("unset while LISTEN_ADDR={listen_addr} is reachable from other machines"),
                "jwt (with AUTH_JWT_SECRET or a JWK Set), or none to serve every todo to anyone \
                 who reaches the port",
            ));
        }
        Some(other) => return Err(invalid("AUTH_MODE", format!("{other:?}"), "jwt or none")),
    };
    let per_second = env.bounded("RATE_LIMIT_UNAUTHENTICATED_PER_SECOND", 0, 1_000_000)? as u32;
    let burst = env.bounded("RATE_LIMIT_UNAUTHENTICATED_BURST", 1, 1_000_000)? as u32;
    Ok(AuthConfig {
        unauthenticated_limit: (matches!(mode, AuthMode::Jwt(_)) && per_second > 0)
            .then_some((per_second, burst)),
        mode,
        span_subject: env.boolean("AUTH_SPAN_SUBJECT")?,
    })
}
