//! JWT verification and, for development, minting (see the module doc of [`super`]).

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, decode_header, encode,
    errors::ErrorKind,
};
use serde::{Deserialize, Serialize};

use super::jwks::KeySet;

/// Longest accepted `sub`: it is stored with every todo and indexed, and keys the rate limits.
pub const MAX_SUB_BYTES: usize = 255;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// The scope that allows reading todos.
pub const READ_SCOPE: &str = "todos:read";
/// The scope that allows creating, changing and deleting todos.
pub const WRITE_SCOPE: &str = "todos:write";

/// The scopes of the OAuth2 `scope` claim (space-separated) that this service knows; others are
/// ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes {
    /// `todos:read`
    pub read: bool,
    /// `todos:write`
    pub write: bool,
}

impl Scopes {
    /// Both scopes: what the anonymous caller of `AUTH_MODE=none` has.
    pub const ALL: Scopes = Scopes {
        read: true,
        write: true,
    };

    pub fn parse(claim: &str) -> Scopes {
        claim.split(' ').fold(Scopes::default(), |s, scope| Scopes {
            read: s.read || scope == READ_SCOPE,
            write: s.write || scope == WRITE_SCOPE,
        })
    }
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`: the owner of the todos it creates, and its rate-limit key. Shared, so
    /// the request's extensions and the limiter's key are one allocation.
    pub sub: Arc<str>,
    pub scopes: Scopes,
}

/// Why a token was refused. Each is a 401 (`invalid_token`); the variant is the reason counted
/// in the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Not a JWT, or a header or claims that cannot be read (including `alg: none`, which is not
    /// an algorithm this crate will parse).
    Malformed,
    /// The signature does not match the key.
    BadSignature,
    /// The header names an algorithm other than the one pinned for its key.
    AlgorithmNotAllowed,
    /// The header names a `kid` no configured key has.
    UnknownKey,
    /// `exp`, `sub` (or a configured `aud`/`iss`) is missing or empty.
    MissingClaim,
    /// `sub` is longer than [`MAX_SUB_BYTES`].
    InvalidClaim,
    Expired,
    NotYetValid,
    WrongAudience,
    WrongIssuer,
}

impl Rejection {
    /// A stable label for metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::BadSignature => "bad_signature",
            Rejection::AlgorithmNotAllowed => "algorithm_not_allowed",
            Rejection::UnknownKey => "unknown_key",
            Rejection::MissingClaim => "missing_claim",
            Rejection::InvalidClaim => "invalid_claim",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::WrongAudience => "wrong_audience",
            Rejection::WrongIssuer => "wrong_issuer",
        }
    }

    /// For `WWW-Authenticate: Bearer error="invalid_token", error_description="…"`: says what
    /// is wrong without saying which keys, audiences or issuers would be right.
    pub const fn description(self) -> &'static str {
        match self {
            Rejection::Malformed => "the token is not a readable JWT",
            Rejection::BadSignature | Rejection::AlgorithmNotAllowed | Rejection::UnknownKey => {
                "the token's signature cannot be verified"
            }
            Rejection::MissingClaim => "the token lacks a required claim",
            Rejection::InvalidClaim => "the token's subject is longer than 255 bytes",
            Rejection::Expired => "the token has expired",
            Rejection::NotYetValid => "the token is not valid yet",
            Rejection::WrongAudience | Rejection::WrongIssuer => {
                "the token was not issued for this service"
            }
        }
    }
}

/// One verification key, with the one algorithm it accepts.
pub struct Key {
    /// `None`: the key for tokens without a `kid`.
    pub(super) kid: Option<String>,
    pub(super) alg: Algorithm,
    pub(super) key: DecodingKey,
}

impl Key {
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// Verifies tokens against the configured keys and claims.
pub struct Verifier {
    /// The shared secret's key, if any.
    keys: Vec<Key>,
    /// Public keys from a JWK Set, replaced when it is refreshed.
    jwks: Option<Arc<KeySet>>,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for Verifier {
    // Keys stay out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .field("jwks", &self.jwks.as_ref().map(|s| s.current().len()))
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish()
    }
}

#[derive(Deserialize)]
struct Claims {
    /// Optional here so that a token without it is refused as a missing claim, not as unreadable.
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    scope: Option<String>,
}

impl Verifier {
    /// One shared secret, HS256 only, for tokens without a `kid`.
    pub fn hs256(secret: &[u8], audience: Option<&str>, issuer: Option<&str>) -> Self {
        Self::new(Some(secret), None, audience, issuer)
    }

    /// Tokens signed with `secret` (HS256, no `kid`) or with a key of `jwks` (by `kid`, each in
    /// its own algorithm).
    pub fn new(
        secret: Option<&[u8]>,
        jwks: Option<Arc<KeySet>>,
        audience: Option<&str>,
        issuer: Option<&str>,
    ) -> Self {
        Verifier {
            keys: secret
                .map(|secret| Key {
                    kid: None,
                    alg: Algorithm::HS256,
                    key: DecodingKey::from_secret(secret),
                })
                .into_iter()
                .collect(),
            jwks,
            audience: audience.map(str::to_owned),
            issuer: issuer.map(str::to_owned),
        }
    }

    /// The principal a token names, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Principal, Rejection> {
        let header = decode_header(token).map_err(|_| Rejection::Malformed)?;
        let snapshot;
        let key = match self.keys.iter().find(|k| k.kid == header.kid) {
            Some(key) => key,
            None => {
                let set = self.jwks.as_ref().ok_or(Rejection::UnknownKey)?;
                snapshot = set.current();
                match snapshot.iter().find(|k| k.kid == header.kid) {
                    Some(key) => key,
                    None => {
                        // Perhaps the issuer rotated its keys: have them fetched again (in the
                        // background, rate-limited); this token is refused now.
                        if header.kid.is_some() {
                            set.want_refresh();
                        }
                        return Err(Rejection::UnknownKey);
                    }
                }
            }
        };
        // Pinned: the key decides the algorithm, never the token.
        if header.alg != key.alg {
            return Err(Rejection::AlgorithmNotAllowed);
        }
        let mut validation = Validation::new(key.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let data = decode::<Claims>(token, &key.key, &validation).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => Rejection::BadSignature,
            ErrorKind::InvalidAlgorithm => Rejection::AlgorithmNotAllowed,
            ErrorKind::ExpiredSignature => Rejection::Expired,
            ErrorKind::ImmatureSignature => Rejection::NotYetValid,
            ErrorKind::InvalidAudience => Rejection::WrongAudience,
            ErrorKind::InvalidIssuer => Rejection::WrongIssuer,
            ErrorKind::MissingRequiredClaim(_) => Rejection::MissingClaim,
            _ => Rejection::Malformed,
        })?;
        let claims = data.claims;
        let sub = claims
            .sub
            .filter(|s| !s.trim().is_empty())
            .ok_or(Rejection::MissingClaim)?;
        if sub.len() > MAX_SUB_BYTES {
            return Err(Rejection::InvalidClaim);
        }
        Ok(Principal {
            sub: sub.into(),
            scopes: claims
                .scope
                .as_deref()
                .map(Scopes::parse)
                .unwrap_or_default(),
        })
    }
}

/// What `todo-service token` puts in a token.
#[derive(Debug, Serialize)]
pub struct Mint<'a> {
    pub sub: &'a str,
    /// Space-separated, e.g. `todos:read todos:write`.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub scope: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<&'a str>,
}

#[derive(Serialize)]
struct MintedClaims<'a> {
    #[serde(flatten)]
    mint: &'a Mint<'a>,
    iat: u64,
    exp: u64,
}

/// An HS256 token with `mint`'s claims, valid for `ttl` from now: for `todo-service token`, curl
/// and development.
pub fn mint_hs256(
    secret: &[u8],
    mint: &Mint<'_>,
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    encode(
        &Header::new(Algorithm::HS256),
        &MintedClaims {
            mint,
            iat: now,
            exp: now.saturating_add(ttl.as_secs()),
        },
        &EncodingKey::from_secret(secret),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const SECRET: &[u8] = b"a-test-secret-of-at-least-32-bytes!!";

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn token(header: Header, claims: Value, secret: &[u8]) -> String {
        encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn hs256(claims: Value) -> String {
        token(Header::new(Algorithm::HS256), claims, SECRET)
    }

    /// base64url without padding, for hand-made token parts.
    fn b64(v: &Value) -> String {
        const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = v.to_string().into_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn a_minted_token_verifies_into_its_principal() {
        let v = Verifier::hs256(SECRET, Some("todos"), Some("https://issuer.test"));
        let mint = Mint {
            sub: "alice",
            scope: "todos:read todos:write",
            aud: Some("todos"),
            iss: Some("https://issuer.test"),
        };
        let t = mint_hs256(SECRET, &mint, Duration::from_secs(3600)).unwrap();
        let p = v.verify(&t).unwrap();
        assert_eq!(&*p.sub, "alice");
        assert_eq!(p.scopes, Scopes::ALL);
        let v = Verifier::hs256(SECRET, None, None);
        let bare = |scope| Mint {
            sub: "bob",
            scope,
            aud: None,
            iss: None,
        };
        let t = mint_hs256(SECRET, &bare(""), Duration::from_secs(60)).unwrap();
        assert_eq!(v.verify(&t).unwrap().scopes, Scopes::default());
        // Only exact names count: neither a prefix nor a longer scope is `todos:read`.
        let t = mint_hs256(
            SECRET,
            &bare("todos todos:readx todos:read"),
            Duration::from_secs(60),
        );
        assert_eq!(
            v.verify(&t.unwrap()).unwrap().scopes,
            Scopes {
                read: true,
                write: false
            }
        );
    }

    #[test]
    fn token_attacks_are_each_refused_with_their_reason() {
        let v = Verifier::hs256(SECRET, Some("todo-service"), Some("https://issuer.test"));
        let good = json!({"sub": "alice", "exp": now() + 600, "aud": "todo-service",
                          "iss": "https://issuer.test"});
        assert!(v.verify(&hs256(good.clone())).is_ok());
        let with = |k: &str, val: Value| {
            let mut c = good.clone();
            c[k] = val;
            c
        };
        let without = |k: &str| {
            let mut c = good.clone();
            c.as_object_mut().unwrap().remove(k);
            c
        };
        let cases: Vec<(&str, String, Rejection)> = vec![
            // Beyond the 30 s leeway either way.
            (
                "expired",
                hs256(with("exp", json!(now() - 120))),
                Rejection::Expired,
            ),
            (
                "not yet valid",
                hs256(with("nbf", json!(now() + 120))),
                Rejection::NotYetValid,
            ),
            (
                "wrong audience",
                hs256(with("aud", json!("another"))),
                Rejection::WrongAudience,
            ),
            (
                "wrong issuer",
                hs256(with("iss", json!("https://evil.test"))),
                Rejection::WrongIssuer,
            ),
            ("no exp", hs256(without("exp")), Rejection::MissingClaim),
            ("no sub", hs256(without("sub")), Rejection::MissingClaim),
            (
                "empty sub",
                hs256(with("sub", json!(" "))),
                Rejection::MissingClaim,
            ),
            (
                "sub over 255 bytes",
                hs256(with("sub", json!("a".repeat(256)))),
                Rejection::InvalidClaim,
            ),
            ("no aud", hs256(without("aud")), Rejection::MissingClaim),
            (
                "wrong secret",
                token(
                    Header::new(Algorithm::HS256),
                    good.clone(),
                    b"another-secret-32-bytes-long!!!!",
                ),
                Rejection::BadSignature,
            ),
            (
                "another HMAC algorithm",
                token(Header::new(Algorithm::HS512), good.clone(), SECRET),
                Rejection::AlgorithmNotAllowed,
            ),
            (
                // The classic confusion: an RS256 header, "signed" with HMAC over a public key.
                "RS256 header, HMAC signature",
                format!(
                    "{}.{}.c2lnbmF0dXJl",
                    b64(&json!({"alg": "RS256", "typ": "JWT"})),
                    b64(&good)
                ),
                Rejection::AlgorithmNotAllowed,
            ),
            (
                "alg none",
                format!(
                    "{}.{}.",
                    b64(&json!({"alg": "none", "typ": "JWT"})),
                    b64(&good)
                ),
                Rejection::Malformed,
            ),
            (
                "unknown kid",
                token(
                    Header {
                        kid: Some("k9".into()),
                        ..Header::new(Algorithm::HS256)
                    },
                    good.clone(),
                    SECRET,
                ),
                Rejection::UnknownKey,
            ),
            ("not a JWT", "abc.def".into(), Rejection::Malformed),
            ("empty", String::new(), Rejection::Malformed),
        ];
        for (what, t, want) in cases {
            assert_eq!(v.verify(&t), Err(want), "{what}");
        }
    }

    #[test]
    fn within_the_leeway_a_token_still_counts_and_unconfigured_claims_are_ignored() {
        let v = Verifier::hs256(SECRET, None, None);
        let t = hs256(json!({"sub": "alice", "exp": now() - 10, "nbf": now() + 10,
                             "aud": "whoever", "iss": "whatever"}));
        assert_eq!(&*v.verify(&t).unwrap().sub, "alice");
    }

    #[test]
    fn debug_output_shows_no_key() {
        let v = Verifier::hs256(SECRET, None, None);
        let shown = format!("{v:?}");
        assert!(!shown.contains("a-test-secret"), "{shown}");
    }
}
