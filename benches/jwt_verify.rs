//! What verifying a bearer token costs, per algorithm the service accepts: HS256 (the shared
//! secret), ES256 and RS256 (JWK Set keys), through the service's own `Verifier` (header, key
//! lookup, signature, claims), each beside a hit of the verifier's cache of accepted tokens (what
//! every later request with the same token costs). Evidence for docs/authentication.md
//! and loadtest/archive.md#authentication, not a test.
//!
//! Then what a request from a client address over `RATE_LIMIT_UNAUTHENTICATED_*` costs through
//! the authentication layer: a garbage token, and an ES256 token naming a published key with a
//! made-up signature (before issue 30, that signature was checked before the 429).
//!
//! Run: `cargo bench --bench jwt_verify` (no database needed). `BENCH_ITERATIONS` (default 20000)
//! sets the verifications per algorithm.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use todo_service::auth::{Verifier, jwks, keys};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn claims() -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    json!({"sub": "alice", "scope": "todos:read todos:write", "exp": now + 3600})
}

fn per_call(label: &str, n: u32, f: impl FnMut()) -> Duration {
    per(label, "verification", n, f)
}

fn per(label: &str, unit: &str, n: u32, mut f: impl FnMut()) -> Duration {
    for _ in 0..n / 10 {
        f();
    }
    let started = Instant::now();
    for _ in 0..n {
        f();
    }
    let each = started.elapsed() / n;
    println!("{label:40} {:>8.2} µs per {unit}", each.as_secs_f64() * 1e6);
    each
}

fn main() {
    let n: u32 = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let secret = b"a-benchmark-secret-of-at-least-32-bytes!";

    // EC P-256 and RSA 2048 keys, public halves in a JWK Set as an issuer publishes them.
    use p256::pkcs8::EncodePrivateKey;
    use rsa::{pkcs1::EncodeRsaPrivateKey, traits::PublicKeyParts};
    let ec = p256::SecretKey::random(&mut rsa::rand_core::OsRng);
    let mut ec_jwk: serde_json::Value =
        serde_json::from_str(&ec.public_key().to_jwk_string()).expect("a JWK");
    ec_jwk["kid"] = json!("ec");
    let rsa = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("an RSA key");
    let rsa_jwk = json!({"kty": "RSA", "kid": "rsa", "alg": "RS256",
                         "n": b64(&rsa.n().to_bytes_be()), "e": b64(&rsa.e().to_bytes_be())});
    let set = json!({"keys": [ec_jwk, rsa_jwk]}).to_string();
    let keys = jwks::parse(set.as_bytes()).expect("the set parses");
    let verifier = Verifier::new(Some(secret), Some(keys::KeySet::new(keys)), None, None);

    let sign = |alg, kid: Option<&str>, key: &EncodingKey| {
        let header = Header {
            kid: kid.map(str::to_owned),
            ..Header::new(alg)
        };
        encode(&header, &claims(), key).expect("signed")
    };
    let hs = sign(Algorithm::HS256, None, &EncodingKey::from_secret(secret));
    let es = sign(
        Algorithm::ES256,
        Some("ec"),
        &EncodingKey::from_ec_der(ec.to_pkcs8_der().expect("der").as_bytes()),
    );
    let rs = sign(
        Algorithm::RS256,
        Some("rsa"),
        &EncodingKey::from_rsa_der(rsa.to_pkcs1_der().expect("der").as_bytes()),
    );
    let verifier = Arc::new(verifier);
    println!("{n} verifications each, one thread, release build");
    for (label, token) in [
        ("HS256 (AUTH_JWT_SECRET)", &hs),
        ("ES256 (JWK Set)", &es),
        ("RS256 (JWK Set)", &rs),
    ] {
        assert!(verifier.verify(token).is_ok(), "{label} verifies");
        per_call(&format!("{label}, signature"), n, || {
            let _ = std::hint::black_box(verifier.verify_uncached(std::hint::black_box(token)));
        });
        per_call(&format!("{label}, cached"), n, || {
            let _ = std::hint::black_box(verifier.verify(std::hint::black_box(token)));
        });
    }
    throttled(n, &verifier, &es);
}

/// Requests from one address past its unauthenticated limit, through the authentication layer.
fn throttled(n: u32, verifier: &Arc<Verifier>, es: &str) {
    use axum::{
        body::Body,
        extract::ConnectInfo,
        http::{Request, Response},
    };
    use todo_service::{
        config::{AuthConfig, AuthMode, JwtConfig},
        http::guard::{authenticate::AuthenticateLayer, caller::CallerKey, client_ip::ClientAddr},
    };
    use tower::{Layer as _, ServiceExt as _};

    let config = AuthConfig {
        mode: AuthMode::Jwt(JwtConfig {
            secret: None,
            jwks: None,
            jwks_refresh: Duration::from_secs(300),
            audience: None,
            issuer: None,
        }),
        span_subject: false,
        // One request, then one a second: every request below is over the limit.
        unauthenticated_limit: Some((1, 1)),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    // The throttle's pruner is a task of the runtime.
    let _entered = runtime.enter();
    let layer = AuthenticateLayer::new(
        &config,
        Some(Arc::clone(verifier)),
        CallerKey(ClientAddr::new(&[], 64)),
        1000,
    );
    let service = layer.layer(tower::service_fn(|_: Request<Body>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
    }));
    let peer: std::net::SocketAddr = "198.51.100.7:40000".parse().expect("an address");
    let request = |token: &str| {
        let mut req = Request::new(Body::empty());
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("a header value"),
        );
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    };
    // The made-up signature: 64 bytes, as ES256 writes them.
    let (signed, _) = es.rsplit_once('.').expect("a JWT");
    let forged = format!("{signed}.{}", b64(&[7u8; 64]));
    println!("a client address over its unauthenticated limit, through the authentication layer");
    for (label, token) in [
        ("throttled, garbage token", "not.a.jwt".to_owned()),
        ("throttled, ES256 kid, made-up signature", forged.clone()),
    ] {
        // The first request from the address may spend its one allowed request.
        let mut status = None;
        for _ in 0..2 {
            let res = runtime.block_on(service.clone().oneshot(request(&token)));
            status = Some(res.expect("answered").status());
        }
        assert_eq!(status.map(|s| s.as_u16()), Some(429), "{label}");
        per(label, "request", n, || {
            let res = runtime.block_on(
                service
                    .clone()
                    .oneshot(request(std::hint::black_box(&token))),
            );
            std::hint::black_box(res.expect("answered").status());
        });
    }
    per_call("ES256 made-up signature, checked", n, || {
        let _ = std::hint::black_box(verifier.verify_uncached(std::hint::black_box(&forged)));
    });
}
