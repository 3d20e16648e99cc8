//! JWT verification and, for development, minting (see the module doc of [`super`]).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, decode_header, encode,
    errors::ErrorKind,
};
use serde::{Deserialize, Serialize};

use super::keys::{Key, KeySet};

/// Longest accepted `sub`: it is stored with every todo and indexed, and keys the rate limits.
pub const MAX_SUB_BYTES: usize = 255;

/// Whether `sub` can name an owner: not blank, at most [`MAX_SUB_BYTES`], and without NUL, which
/// PostgreSQL's `text` cannot hold (a token naming such a subject would fail every query).
pub fn usable_sub(sub: &str) -> bool {
    !sub.trim().is_empty() && sub.len() <= MAX_SUB_BYTES && !sub.contains('\0')
}

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
    /// The header lists `crit` extensions: this service understands none, so the token is
    /// invalid (RFC 7515 §4.1.11).
    CriticalExtension,
    /// `exp`, `sub` (or a configured `aud`/`iss`) is missing or empty.
    MissingClaim,
    /// `sub` cannot name an owner (see [`usable_sub`]), or `iss` is not a string.
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
            Rejection::CriticalExtension => "critical_extension",
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
            Rejection::CriticalExtension => "the token requires extensions this service lacks",
            Rejection::MissingClaim => "the token lacks a required claim",
            Rejection::InvalidClaim => {
                "the token's subject is over 255 bytes or holds NUL, or its issuer is not a string"
            }
            Rejection::Expired => "the token has expired",
            Rejection::NotYetValid => "the token is not valid yet",
            Rejection::WrongAudience | Rejection::WrongIssuer => {
                "the token was not issued for this service"
            }
        }
    }
}

/// Verifies tokens against the configured keys and claims, remembering the ones it accepted.
pub struct Verifier {
    cache: Cache,
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
    /// Required by the validation; read here for the cache.
    #[serde(default)]
    exp: u64,
    /// Checked against `AUTH_JWT_ISSUER` by the validation, which also takes an array holding
    /// it; RFC 7519 §4.1.1 makes it a string, so anything else is refused here.
    #[serde(default)]
    iss: Option<serde_json::Value>,
}

/// Tokens verified recently, so a caller's next requests with the same token skip the signature:
/// an ES256 or RS256 verification costs several times a whole cached request
/// (`benches/jwt_verify.rs`; loadtest/archive.md#authentication). An entry is the whole token (compared in full, never a
/// hash of it), the principal it names, and when it stops counting: its `exp` plus the leeway,
/// as verification would judge it. Entries verified with keys that have since been replaced are
/// verified again. At [`CACHE_ENTRIES`] the expired entries go, and if that is not enough, all.
///
/// Hand-written rather than a cache crate (moka, quick_cache): what it needs is a bounded map with
/// per-entry expiry read on lookup, about forty lines, and no crate's eviction policy matters here.
/// Hashed with foldhash rather than SipHash, several times cheaper on a token of a few hundred
/// bytes: only tokens that verified are entries, and a caller cannot mint colliding ones, so
/// the map needs no stronger defence against crafted keys than foldhash's random seed.
struct Cache {
    entries: Mutex<HashMap<Box<str>, Cached, foldhash::fast::RandomState>>,
}

struct Cached {
    principal: Principal,
    /// Unix seconds after which the token no longer verifies.
    until: u64,
    /// The key set's generation it was verified with.
    generation: u64,
}

/// Tokens remembered at most: a few MiB at typical token sizes.
pub const CACHE_ENTRIES: usize = 10_000;
/// Longer tokens are verified every time rather than held.
const CACHE_MAX_TOKEN_BYTES: usize = 4096;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Cache {
    fn get(&self, token: &str, generation: u64) -> Option<Principal> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let hit = entries.get(token)?;
        (hit.generation == generation && unix_now() <= hit.until).then(|| hit.principal.clone())
    }

    fn put(&self, token: &str, cached: Cached) {
        if token.len() > CACHE_MAX_TOKEN_BYTES {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CACHE_ENTRIES {
            let now = unix_now();
            entries.retain(|_, c| now <= c.until);
            if entries.len() >= CACHE_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(token.into(), cached);
    }
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
            cache: Cache {
                entries: Mutex::new(HashMap::default()),
            },
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

    /// The principal of a token this verifier accepted recently and that still counts, found
    /// without checking a signature; `None` when [`Verifier::verify`] would have to check one.
    pub fn cached(&self, token: &str) -> Option<Principal> {
        self.cache.get(token, self.generation())
    }

    fn generation(&self) -> u64 {
        self.jwks.as_ref().map_or(0, |s| s.generation())
    }

    /// The principal a token names, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Principal, Rejection> {
        let generation = self.generation();
        if let Some(principal) = self.cache.get(token, generation) {
            return Ok(principal);
        }
        let (principal, exp) = self.verify_signed(token)?;
        self.cache.put(
            token,
            Cached {
                principal: principal.clone(),
                until: exp.saturating_add(LEEWAY_SECS),
                generation,
            },
        );
        Ok(principal)
    }

    /// [`Verifier::verify`] without the cache: every call checks the signature (what a first
    /// request with a token costs; `benches/jwt_verify.rs` compares the two).
    pub fn verify_uncached(&self, token: &str) -> Result<Principal, Rejection> {
        self.verify_signed(token).map(|(principal, _)| principal)
    }

    /// Verification itself: the principal and the token's `exp`.
    fn verify_signed(&self, token: &str) -> Result<(Principal, u64), Rejection> {
        let header = decode_header(token).map_err(|_| Rejection::Malformed)?;
        if header.crit.is_some() {
            return Err(Rejection::CriticalExtension);
        }
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
        if !usable_sub(&sub) || claims.iss.as_ref().is_some_and(|iss| !iss.is_string()) {
            return Err(Rejection::InvalidClaim);
        }
        let principal = Principal {
            sub: sub.into(),
            scopes: claims
                .scope
                .as_deref()
                .map(Scopes::parse)
                .unwrap_or_default(),
        };
        Ok((principal, claims.exp))
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
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
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
    fn the_cache_answers_only_for_the_same_token_while_it_is_valid_and_its_keys_current() {
        let cache = Cache {
            entries: Mutex::new(HashMap::default()),
        };
        let alice = Principal {
            sub: "alice".into(),
            scopes: Scopes::ALL,
        };
        let now = unix_now();
        let entry = |until, generation| Cached {
            principal: alice.clone(),
            until,
            generation,
        };
        cache.put("t1", entry(now + 60, 0));
        assert_eq!(cache.get("t1", 0), Some(alice.clone()));
        assert_eq!(cache.get("t1x", 0), None, "another token");
        assert_eq!(cache.get("t", 0), None, "a prefix");
        assert_eq!(
            cache.get("t1", 1),
            None,
            "verified with keys since replaced"
        );
        cache.put("t2", entry(now - 1, 0));
        assert_eq!(cache.get("t2", 0), None, "past exp + leeway");
        cache.put(&"x".repeat(CACHE_MAX_TOKEN_BYTES + 1), entry(now + 60, 0));
        assert_eq!(
            cache.entries.lock().unwrap().len(),
            2,
            "oversized tokens are not held"
        );
        // Full: the expired entries go first; the live ones stay if that makes room.
        for i in 0..CACHE_ENTRIES - 2 {
            cache.put(&format!("live-{i}"), entry(now + 60, 0));
        }
        cache.put("one-more", entry(now + 60, 0));
        let entries = cache.entries.lock().unwrap();
        assert_eq!(entries.len(), CACHE_ENTRIES, "t2 made room");
        assert!(entries.contains_key("t1") && !entries.contains_key("t2"));
    }

    #[test]
    fn a_cached_token_is_refused_once_its_key_leaves_the_set() {
        use p256::pkcs8::EncodePrivateKey;
        let ec = p256::SecretKey::random(&mut rsa::rand_core::OsRng);
        let mut jwk: Value = serde_json::from_str(&ec.public_key().to_jwk_string()).unwrap();
        jwk["kid"] = json!("k1");
        let set = KeySet::new(
            crate::auth::jwks::parse(json!({"keys": [jwk]}).to_string().as_bytes()).unwrap(),
        );
        let v = Verifier::new(None, Some(set.clone()), None, None);
        let token = encode(
            &Header {
                kid: Some("k1".into()),
                ..Header::new(Algorithm::ES256)
            },
            &json!({"sub": "alice", "exp": now() + 600}),
            &EncodingKey::from_ec_der(ec.to_pkcs8_der().unwrap().as_bytes()),
        )
        .unwrap();
        assert!(v.verify(&token).is_ok());
        assert!(v.verify(&token).is_ok(), "from the cache");
        // The issuer withdraws the key (another one replaces it).
        let other = p256::SecretKey::random(&mut rsa::rand_core::OsRng);
        let mut jwk: Value = serde_json::from_str(&other.public_key().to_jwk_string()).unwrap();
        jwk["kid"] = json!("k2");
        set.replace(
            crate::auth::jwks::parse(json!({"keys": [jwk]}).to_string().as_bytes()).unwrap(),
        );
        assert_eq!(v.verify(&token), Err(Rejection::UnknownKey));
    }

    #[test]
    fn debug_output_shows_no_key() {
        let v = Verifier::hs256(SECRET, None, None);
        let shown = format!("{v:?}");
        assert!(!shown.contains("a-test-secret"), "{shown}");
    }
}
