//! Public keys from a JWK Set (RFC 7517): a file (`AUTH_JWKS_FILE`) or an issuer's URL
//! (`AUTH_JWKS_URL`), loaded at startup and refreshed in the background, never on the request
//! path.
//!
//! Each key accepts one algorithm: its `alg` when the set names one, else the one its type
//! implies (RSA → RS256, EC P-256 → ES256, P-384 → ES384, OKP Ed25519 → EdDSA). Symmetric (`oct`)
//! keys are refused: a key set is public, and a secret in it would let anyone who reads it sign
//! tokens (the shared secret is `AUTH_JWT_SECRET`). Encryption keys (`use: enc`) and keys of types
//! this build cannot verify are skipped with a warning rather than failing the whole set, since
//! issuers publish more than signing keys.
//!
//! A token whose `kid` is in no key asks for a refresh (the issuer may have rotated its keys). At
//! most one such refresh runs per [`UNKNOWN_KID_REFRESH_INTERVAL`], so tokens with made-up key ids
//! cannot make the service hammer the issuer; the token itself is refused at once. A refresh that
//! fails keeps the keys already loaded.

use std::{sync::Arc, time::Duration};

use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse},
};
use tokio::time::Instant;

use super::keys::{Key, KeySet};
use crate::config::{JwksSource, RedactedUrl};

/// At most one refresh asked for by an unknown `kid` per this interval.
pub const UNKNOWN_KID_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// How long one fetch of `AUTH_JWKS_URL` may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest key set read: a real one is a few kilobytes.
const MAX_BYTES: usize = 1 << 20;

/// Why a key set could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read {0}: {1}")]
    Read(String, String),
    #[error("not a JWK Set: {0}")]
    Format(String),
    #[error("{0}")]
    Key(String),
}

/// The signing keys of a JWK Set document.
pub fn parse(json: &[u8]) -> Result<Vec<Key>, JwksError> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(json).map_err(|e| JwksError::Format(e.to_string()))?;
    let mut keys: Vec<Key> = Vec::new();
    for (i, value) in set.keys.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(value) {
            Ok(jwk) => jwk,
            Err(e) => {
                tracing::warn!(index = i, error = %e, "skipped a JWK this service cannot read");
                continue;
            }
        };
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            continue;
        }
        let kid = jwk.common.key_id.clone();
        let alg = algorithm(&jwk).map_err(|why| {
            JwksError::Key(format!("key {}: {why}", kid.as_deref().unwrap_or("#")))
        })?;
        let key =
            DecodingKey::from_jwk(&jwk).map_err(|e| JwksError::Key(format!("key {kid:?}: {e}")))?;
        if keys.iter().any(|k| k.kid == kid) {
            return Err(JwksError::Key(format!(
                "two keys with kid {kid:?}: a token could not say which one signed it"
            )));
        }
        keys.push(Key { kid, alg, key });
    }
    if keys.is_empty() {
        return Err(JwksError::Key("no signing key in the set".into()));
    }
    Ok(keys)
}

/// The one algorithm a key accepts.
fn algorithm(jwk: &Jwk) -> Result<Algorithm, String> {
    let implied = match &jwk.algorithm {
        AlgorithmParameters::OctetKey(_) => {
            return Err(
                "a symmetric (oct) key in a public key set; a shared secret belongs \
                        in AUTH_JWT_SECRET"
                    .into(),
            );
        }
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            ref other => return Err(format!("curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => Algorithm::EdDSA,
            ref other => return Err(format!("curve {other:?} is not supported")),
        },
    };
    let Some(named) = jwk.common.key_algorithm else {
        return Ok(implied);
    };
    // KeyAlgorithm's names are the JOSE names, which Algorithm parses; encryption algorithms
    // (RSA-OAEP, …) are not among them.
    let named: Algorithm = format!("{named:?}")
        .parse()
        .map_err(|_| format!("alg {named:?} is not a signature algorithm"))?;
    let same_family = matches!(
        (implied, named),
        (
            Algorithm::RS256,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ) | (Algorithm::ES256, Algorithm::ES256)
            | (Algorithm::ES384, Algorithm::ES384)
            | (Algorithm::EdDSA, Algorithm::EdDSA)
    );
    if same_family {
        Ok(named)
    } else {
        Err(format!("alg {named:?} does not fit a key of this type"))
    }
}

/// The HTTP client for `AUTH_JWKS_URL`: rustls with ring, the platform's roots, a timeout.
fn client() -> Result<reqwest::Client, JwksError> {
    // What `net::install_tls_provider` does; `auth` imports nothing of the crate.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .redirect(reqwest::redirect::Policy::limited(3))
        .build()
        .map_err(|e| JwksError::Read("the JWKS client".into(), e.to_string()))
}

/// Reads and parses the set once.
pub async fn load(source: &JwksSource) -> Result<Vec<Key>, JwksError> {
    let bytes = match source {
        JwksSource::File(path) => {
            let read = |e: std::io::Error| JwksError::Read(source.to_string(), e.to_string());
            let meta = tokio::fs::metadata(path).await.map_err(read)?;
            if meta.len() > MAX_BYTES as u64 {
                return Err(JwksError::Format(format!("over {MAX_BYTES} bytes")));
            }
            tokio::fs::read(path).await.map_err(read)?
        }
        JwksSource::Url(url) => fetch(&client()?, url).await?,
    };
    parse(&bytes)
}

async fn fetch(client: &reqwest::Client, url: &RedactedUrl) -> Result<Vec<u8>, JwksError> {
    // Named as printed (no credentials); reqwest's own text without its copy of the URL.
    let failed = |e: reqwest::Error| JwksError::Read(url.to_string(), e.without_url().to_string());
    let mut res = client
        .get(url.url().clone())
        .send()
        .await
        .map_err(failed)?
        .error_for_status()
        .map_err(failed)?;
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(failed)? {
        if body.len() + chunk.len() > MAX_BYTES {
            return Err(JwksError::Format(format!("over {MAX_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Loads the set for a verifier and keeps it fresh: reloaded every `every`, and soon after a
/// token names an unknown `kid` (at most once per [`UNKNOWN_KID_REFRESH_INTERVAL`]).
///
/// A file must load now (it is local: a failure is a configuration error). A URL that cannot be
/// fetched now is retried in the background every [`UNKNOWN_KID_REFRESH_INTERVAL`] until it
/// loads; meanwhile tokens signed with its keys are refused (401) rather than the service not
/// starting because the issuer is briefly away.
pub async fn start(source: JwksSource, every: Duration) -> Result<Arc<KeySet>, JwksError> {
    let (keys, loaded) = match load(&source).await {
        Ok(keys) => {
            tracing::info!(source = %source, keys = keys.len(), "loaded the JWK Set");
            (keys, true)
        }
        Err(e) if matches!(source, JwksSource::Url(_)) => {
            tracing::error!(source = %source, error = %e,
                "cannot load the JWK Set; retrying in the background, tokens it signs are refused until then");
            (Vec::new(), false)
        }
        Err(e) => return Err(e),
    };
    let set = KeySet::new(keys);
    tokio::spawn(refresh(source, set.clone(), every, loaded));
    Ok(set)
}

/// The background refresher; ends at its first wake-up after the verifier (the set's only
/// other owner) is dropped.
async fn refresh(source: JwksSource, set: Arc<KeySet>, every: Duration, mut loaded: bool) {
    let mut last_asked: Option<Instant> = None;
    let delay = |loaded: bool| {
        if loaded {
            every
        } else {
            UNKNOWN_KID_REFRESH_INTERVAL
        }
    };
    let mut next = Instant::now() + delay(loaded);
    loop {
        let asked = tokio::select! {
            () = tokio::time::sleep_until(next) => false,
            () = set.wanted.notified() => true,
        };
        if Arc::strong_count(&set) == 1 {
            return;
        }
        if asked {
            if last_asked.is_some_and(|t| t.elapsed() < UNKNOWN_KID_REFRESH_INTERVAL) {
                continue;
            }
            last_asked = Some(Instant::now());
        }
        match load(&source).await {
            Ok(keys) => {
                tracing::info!(source = %source, keys = keys.len(), asked, "refreshed the JWK Set");
                set.replace(keys);
                loaded = true;
            }
            Err(e) => tracing::warn!(
                source = %source,
                error = %e,
                "cannot refresh the JWK Set; keeping the keys loaded before"
            ),
        }
        next = Instant::now() + delay(loaded);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rsa(kid: &str, alg: Option<&str>) -> serde_json::Value {
        let mut k = json!({"kty": "RSA", "kid": kid, "n": "u1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0_IzW7yWR7QkrmBL7jTKEn5u-qKhbwKfBstIs-bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW_VDL5AaWTg0nLVkjRo9z-40RQzuVaE8AkAFmxZzow3x-VJYKdjykkJ0iT9wCS0DRTXu269V264Vf_3jvredZiKRkgwlL9xNAwxXFg0x_XFw005UWVRIkdgcKWTjpBP2dPwVZ4WWC-9aGVd-Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbcmw", "e": "AQAB"});
        if let Some(alg) = alg {
            k["alg"] = json!(alg);
        }
        k
    }

    fn set(keys: Vec<serde_json::Value>) -> Vec<u8> {
        json!({ "keys": keys }).to_string().into_bytes()
    }

    #[test]
    fn each_key_gets_its_named_or_implied_algorithm_and_non_signing_keys_are_passed_over() {
        let keys = parse(&set(vec![
            rsa("a", None),
            rsa("b", Some("PS384")),
            json!({"kty": "EC", "crv": "P-256", "kid": "c",
                   "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
                   "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}),
            json!({"kty": "OKP", "crv": "Ed25519", "kid": "d",
                   "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}),
            // Passed over: an encryption key, and a key type this build cannot read.
            json!({"kty": "RSA", "kid": "e", "use": "enc", "n": "AQAB", "e": "AQAB"}),
            json!({"kty": "XYZ", "kid": "f"}),
        ]))
        .unwrap();
        let got: Vec<(Option<&str>, Algorithm)> =
            keys.iter().map(|k| (k.kid(), k.algorithm())).collect();
        assert_eq!(
            got,
            [
                (Some("a"), Algorithm::RS256),
                (Some("b"), Algorithm::PS384),
                (Some("c"), Algorithm::ES256),
                (Some("d"), Algorithm::EdDSA),
            ]
        );
    }

    #[test]
    fn sets_a_token_could_abuse_are_refused_whole() {
        let cases = [
            (
                set(vec![json!({"kty": "oct", "kid": "s", "k": "c2VjcmV0"})]),
                "symmetric",
            ),
            (set(vec![rsa("a", Some("ES256"))]), "does not fit"),
            (set(vec![rsa("a", Some("HS256"))]), "does not fit"),
            (set(vec![rsa("a", None), rsa("a", None)]), "two keys"),
            (set(vec![]), "no signing key"),
            (b"{\"keys\": 3}".to_vec(), "not a JWK Set"),
        ];
        for (json, says) in cases {
            let err = parse(&json).err().expect("refused").to_string();
            assert!(err.contains(says), "{err}");
        }
    }
}
