//! `AUTH_MODE=jwt`: two owners who cannot reach each other's todos through any route, cursor or
//! idempotency key; token attacks answered 401 and changing nothing; scopes; limits per
//! principal, and failed authentication throttled per address.

use std::time::Duration;

use serde_json::{Value, json};
use todo_service::auth::{Mint, mint_hs256};

use crate::helpers::{
    AppOptions, TestApp, assert_problem, next_link, ratelimit_field, spawn_app_with,
};

const SECRET: &str = "an-integration-test-secret-of-48-bytes-or-so!!!!";

async fn jwt_app(extra: &[(&str, &str)]) -> TestApp {
    let mut opts = AppOptions::default();
    opts.env.insert("AUTH_MODE".into(), "jwt".into());
    opts.env.insert("AUTH_JWT_SECRET".into(), SECRET.into());
    for (k, v) in extra {
        opts.env.insert((*k).into(), (*v).into());
    }
    spawn_app_with(opts).await
}

fn token_with(sub: &str, scope: &str) -> String {
    mint_hs256(
        SECRET.as_bytes(),
        &Mint {
            sub,
            scope,
            aud: None,
            iss: None,
        },
        Duration::from_secs(600),
    )
    .unwrap()
}

fn token(sub: &str) -> String {
    token_with(sub, "todos:read todos:write")
}

/// A request builder with `sub`'s bearer token.
struct As<'a> {
    app: &'a TestApp,
    token: String,
}

impl As<'_> {
    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let url = if url.starts_with("http") {
            url.to_string()
        } else {
            self.app.url(url)
        };
        self.app
            .client
            .request(method, url)
            .bearer_auth(&self.token)
    }

    async fn create(&self, title: &str, key: Option<&str>) -> reqwest::Response {
        let mut r = self
            .req(reqwest::Method::POST, "/todos")
            .json(&json!({ "title": title }));
        if let Some(key) = key {
            r = r.header("idempotency-key", key);
        }
        r.send().await.unwrap()
    }

    async fn ids(&self) -> Vec<i64> {
        let r = self
            .req(reqwest::Method::GET, "/todos")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let list: Vec<Value> = r.json().await.unwrap();
        list.iter().map(|t| t["id"].as_i64().unwrap()).collect()
    }
}

fn who<'a>(app: &'a TestApp, sub: &str) -> As<'a> {
    As {
        app,
        token: token(sub),
    }
}

/// `owner`'s rows (every row when `None`), as text, to compare before and after.
async fn rows_of(app: &TestApp, owner: Option<&str>) -> String {
    let mut conn = app.test_db.connect().await;
    let rows: Vec<(i64, String, String, bool, i64)> = sqlx::query_as(
        "SELECT id, owner, title, completed, version FROM todos \
         WHERE $1::text IS NULL OR owner = $1 ORDER BY id",
    )
    .bind(owner)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    format!("{rows:?}")
}

async fn rows(app: &TestApp) -> String {
    rows_of(app, None).await
}

#[tokio::test]
async fn neither_owner_can_see_change_delete_or_page_into_the_others_todos() {
    let app = jwt_app(&[]).await;
    let (alice, bob) = (who(&app, "alice"), who(&app, "bob"));
    let mut alices = Vec::new();
    for i in 0..3 {
        let r = alice.create(&format!("alice {i}"), None).await;
        assert_eq!(r.status(), 201);
        alices.push(r.json::<Value>().await.unwrap()["id"].as_i64().unwrap());
    }
    let r = alice.create("alice keyed", Some("shared-key")).await;
    assert_eq!(r.status(), 201);
    alices.push(r.json::<Value>().await.unwrap()["id"].as_i64().unwrap());
    assert_eq!(alice.ids().await, alices);

    // The same key from bob, even with alice's very body, is bob's own first use: no replay of
    // alice's todo, no 422 telling him the key exists.
    let r = bob.create("alice keyed", Some("shared-key")).await;
    assert_eq!(r.status(), 201);
    assert!(r.headers().get("idempotent-replayed").is_none());
    let bobs_keyed = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    assert!(!alices.contains(&bobs_keyed));
    let r = bob.create("bob 1", None).await;
    let bob1 = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    assert_eq!(bob.ids().await, [bobs_keyed, bob1]);
    assert_eq!(alice.ids().await, alices, "bob's todos are not alice's");

    let before = rows_of(&app, Some("alice")).await;
    // Every item route on every one of alice's todos, as bob: 404, as for a todo that does not
    // exist, with or without conditions.
    use reqwest::Method;
    for id in &alices {
        let path = format!("/todos/{id}");
        let attempts = [
            bob.req(Method::GET, &path),
            bob.req(Method::GET, &path).header("if-none-match", "\"1\""),
            bob.req(Method::PATCH, &path)
                .json(&json!({"title": "bob was here"})),
            bob.req(Method::PATCH, &path)
                .header("if-match", "*")
                .json(&json!({"completed": true})),
            bob.req(Method::PATCH, &path).json(&json!({})),
            bob.req(Method::DELETE, &path),
            bob.req(Method::DELETE, &path).header("if-match", "\"1\""),
        ];
        for attempt in attempts {
            let r = attempt.send().await.unwrap();
            let p = assert_problem(r, 404, "todo_not_found").await;
            assert_eq!(p["detail"], format!("there is no todo with id {id}"));
        }
    }
    // Alice's cursor, used by bob, pages through bob's todos only.
    let r = alice
        .req(Method::GET, "/todos?limit=1")
        .send()
        .await
        .unwrap();
    let next = next_link(&r).expect("alice has a second page");
    let r = bob.req(Method::GET, &next).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let page: Vec<Value> = r.json().await.unwrap();
    assert!(
        page.iter()
            .all(|t| !alices.contains(&t["id"].as_i64().unwrap())),
        "{page:?}"
    );
    // Bob deletes "every todo": his.
    let r = bob.req(Method::DELETE, "/todos").send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(bob.ids().await, Vec::<i64>::new());
    assert_eq!(alice.ids().await, alices);
    let after = rows_of(&app, Some("alice")).await;
    assert_eq!(before, after, "bob changed none of alice's todos");
    assert_eq!(after.matches("\"alice\"").count(), 4, "{after}");

    // Alice's retry of her keyed create still replays her todo.
    let r = alice.create("alice keyed", Some("shared-key")).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.json::<Value>().await.unwrap()["id"], alices[3]);
}

/// base64url without padding, as JWTs and JWKs write bytes.
fn b64_bytes(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A hand-made token part: `v` as JSON, base64url.
fn b64(v: &Value) -> String {
    b64_bytes(v.to_string().as_bytes())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn hs256(claims: Value, secret: &str, kid: Option<&str>) -> String {
    let header = jsonwebtoken::Header {
        kid: kid.map(str::to_owned),
        ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
    };
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn token_attacks_are_each_answered_401_and_change_nothing() {
    let app = jwt_app(&[
        ("AUTH_JWT_AUDIENCE", "todo-service"),
        ("AUTH_JWT_ISSUER", "https://issuer.test"),
        // Every attack below is answered 401, none throttled.
        ("RATE_LIMIT_UNAUTHENTICATED_BURST", "1000"),
    ])
    .await;
    let good = json!({"sub": "alice", "scope": "todos:read todos:write", "exp": now() + 600,
                      "aud": "todo-service", "iss": "https://issuer.test"});
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    // The good token works, so each refusal below is for its one flaw.
    let ok = hs256(good.clone(), SECRET, None);
    let r = app
        .client
        .post(app.url("/todos"))
        .bearer_auth(&ok)
        .json(&json!({"title": "mine"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let before = rows(&app).await;

    let bearer = |t: &str| format!("Bearer {t}");
    let cases: Vec<(&str, Vec<String>, &str, &str)> = vec![
        (
            "expired",
            vec![bearer(&hs256(
                with("exp", json!(now() - 120)),
                SECRET,
                None,
            ))],
            "invalid_token",
            "expired",
        ),
        (
            "not yet valid",
            vec![bearer(&hs256(
                with("nbf", json!(now() + 120)),
                SECRET,
                None,
            ))],
            "invalid_token",
            "not valid yet",
        ),
        (
            "wrong signature",
            vec![bearer(&hs256(
                good.clone(),
                "another-secret-of-at-least-32-bytes!!",
                None,
            ))],
            "invalid_token",
            "signature",
        ),
        (
            "wrong audience",
            vec![bearer(&hs256(with("aud", json!("another")), SECRET, None))],
            "invalid_token",
            "not issued for this service",
        ),
        (
            "wrong issuer",
            vec![bearer(&hs256(
                with("iss", json!("https://evil.test")),
                SECRET,
                None,
            ))],
            "invalid_token",
            "not issued for this service",
        ),
        (
            "alg none",
            vec![bearer(&format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&good)
            ))],
            "invalid_token",
            "not a readable JWT",
        ),
        (
            "RS256 header on an HMAC signature",
            vec![bearer(&{
                let t = hs256(good.clone(), SECRET, None);
                let (_, rest) = t.split_once('.').unwrap();
                format!("{}.{rest}", b64(&json!({"alg": "RS256", "typ": "JWT"})))
            })],
            "invalid_token",
            "signature",
        ),
        (
            "unknown kid",
            vec![bearer(&hs256(good.clone(), SECRET, Some("k9")))],
            "invalid_token",
            "signature",
        ),
        (
            "no sub",
            vec![bearer(&hs256(
                {
                    let mut c = good.clone();
                    c.as_object_mut().unwrap().remove("sub");
                    c
                },
                SECRET,
                None,
            ))],
            "invalid_token",
            "lacks a required claim",
        ),
        (
            // PostgreSQL's text cannot hold NUL: once a 500 on every route.
            "NUL in sub",
            vec![bearer(&hs256(
                with("sub", json!("ali\u{0}ce")),
                SECRET,
                None,
            ))],
            "invalid_token",
            "holds NUL",
        ),
        (
            // RFC 7519: a string; the validation alone took an array holding the issuer.
            "iss as an array beside a foreign one",
            vec![bearer(&hs256(
                with("iss", json!(["https://evil.test", "https://issuer.test"])),
                SECRET,
                None,
            ))],
            "invalid_token",
            "issuer is not a string",
        ),
        (
            // RFC 7515 §4.1.11: extensions the service does not understand make it invalid.
            "crit header, correctly signed",
            vec![bearer(
                &jsonwebtoken::encode(
                    &jsonwebtoken::Header {
                        crit: Some(vec!["exp".into()]),
                        ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
                    },
                    &good,
                    &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
                )
                .unwrap(),
            )],
            "invalid_token",
            "extensions",
        ),
        ("no header", vec![], "unauthorized", "needs a bearer token"),
        (
            "another scheme",
            vec![format!("Basic {}", b64(&json!("alice:pw")))],
            "unauthorized",
            "needs a bearer token",
        ),
        (
            "bearer without a token",
            vec!["Bearer".into()],
            "invalid_token",
            "not a readable JWT",
        ),
        (
            "two tokens",
            vec![format!("Bearer {ok} {ok}")],
            "invalid_token",
            "not a readable JWT",
        ),
        (
            "two headers",
            vec![bearer(&ok), bearer(&ok)],
            "invalid_token",
            "not a readable JWT",
        ),
        (
            "garbage",
            vec!["Bearer not.a.jwt".into()],
            "invalid_token",
            "not a readable JWT",
        ),
    ];
    for (what, headers, code, says) in cases {
        for (method, path, body) in [
            (reqwest::Method::POST, "/todos", Some(json!({"title": "x"}))),
            (reqwest::Method::DELETE, "/todos", None),
            (reqwest::Method::GET, "/todos", None),
        ] {
            let mut req = app.client.request(method.clone(), app.url(path));
            for h in &headers {
                req = req.header("authorization", h);
            }
            if let Some(body) = &body {
                req = req.json(body);
            }
            let r = req.send().await.unwrap();
            let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
            let p = assert_problem(r, 401, code).await;
            assert!(
                p["detail"].as_str().unwrap().contains(says),
                "{what} {method}: {p}"
            );
            assert!(
                challenge.starts_with("Bearer realm=\"todo-service\""),
                "{what}: {challenge}"
            );
            assert_eq!(
                challenge.contains("error=\"invalid_token\""),
                code == "invalid_token",
                "{what}: {challenge}"
            );
        }
    }
    assert_eq!(
        rows(&app).await,
        before,
        "a refused request changed nothing"
    );
}

#[tokio::test]
async fn a_token_without_the_methods_scope_is_403_and_changes_nothing() {
    let app = jwt_app(&[]).await;
    let writer = who(&app, "alice");
    let r = writer.create("first", None).await;
    let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let before = rows(&app).await;
    let reader = As {
        app: &app,
        token: token_with("alice", "todos:read"),
    };
    assert_eq!(reader.ids().await, [id], "read scope reads");
    use reqwest::Method;
    let path = format!("/todos/{id}");
    for req in [
        reader
            .req(Method::POST, "/todos")
            .json(&json!({"title": "x"})),
        reader
            .req(Method::PATCH, &path)
            .json(&json!({"completed": true})),
        reader.req(Method::DELETE, &path),
        reader.req(Method::DELETE, "/todos"),
    ] {
        let r = req.send().await.unwrap();
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer realm=\"todo-service\", error=\"insufficient_scope\", scope=\"todos:write\""
        );
        assert_problem(r, 403, "insufficient_scope").await;
    }
    let write_only = As {
        app: &app,
        token: token_with("alice", "todos:write"),
    };
    let r = write_only.req(Method::GET, &path).send().await.unwrap();
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .ends_with("scope=\"todos:read\"")
    );
    assert_problem(r, 403, "insufficient_scope").await;
    assert_eq!(rows(&app).await, before);
}

#[tokio::test]
async fn two_principals_behind_one_address_are_limited_separately() {
    let app = jwt_app(&[("RATE_LIMIT_PER_SECOND", "1"), ("RATE_LIMIT_BURST", "3")]).await;
    let mut seen = Vec::new();
    for sub in ["alice", "bob", "alice"] {
        let caller = who(&app, sub);
        let mut statuses = Vec::new();
        for _ in 0..4 {
            let r = caller
                .req(reqwest::Method::GET, "/todos")
                .send()
                .await
                .unwrap();
            statuses.push(r.status().as_u16());
        }
        seen.push(statuses);
    }
    assert_eq!(
        seen,
        [
            [200, 200, 200, 429],
            // Bob's quota is his own, from the same address.
            [200, 200, 200, 429],
            // Alice's is still spent: a new token for the same sub is the same caller.
            [429, 429, 429, 429],
        ]
    );
}

#[tokio::test]
async fn a_burst_of_failed_authentication_is_throttled_per_address() {
    let app = jwt_app(&[
        ("RATE_LIMIT_UNAUTHENTICATED_PER_SECOND", "1"),
        ("RATE_LIMIT_UNAUTHENTICATED_BURST", "3"),
    ])
    .await;
    // Alice's token is verified (and remembered) before the guesses begin.
    let alice = who(&app, "alice");
    let r = alice
        .req(reqwest::Method::GET, "/todos")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..5 {
        let r = app
            .client
            .get(app.url("/todos"))
            .bearer_auth(format!("guess-{i}"))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            retry_after = r.headers().get("retry-after").cloned();
            // The throttle's own policy, stated in the standard fields.
            let policy = ratelimit_field(&r, "ratelimit-policy");
            let limit = ratelimit_field(&r, "ratelimit");
            assert_eq!(policy.len(), 1);
            assert_eq!(policy[0].0, "unauthenticated");
            assert_eq!((policy[0].1["q"], policy[0].1["w"]), (3, 3));
            assert_eq!(limit[0].0, "unauthenticated");
            assert_eq!(limit[0].1["r"], 0);
            let t = limit[0].1["t"].to_string();
            assert_eq!(
                Some(t.as_str()),
                retry_after.as_ref().map(|v| v.to_str().unwrap())
            );
            assert_problem(r, 429, "rate_limited").await;
        }
    }
    // Alice's first request took one of the three.
    assert_eq!(statuses, [401, 401, 429, 429, 429]);
    let secs: u64 = retry_after.unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&secs), "{secs}");
    // A caller whose token was verified before, from the same address, is not held back by the
    // guesses: its token is remembered.
    let r = alice
        .req(reqwest::Method::GET, "/todos")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A token never seen from a throttled address is not even checked (a signature check is
    // what costs; issue 30): valid or not, it waits like the guesses.
    let r = who(&app, "bob")
        .req(reqwest::Method::GET, "/todos")
        .send()
        .await
        .unwrap();
    assert_problem(r, 429, "rate_limited").await;
    // Probes are never behind authentication.
    assert_eq!(app.get("/health").await.status(), 200);
}

#[tokio::test]
async fn without_authentication_everyone_is_the_anonymous_owner_of_the_existing_todos() {
    // A todo written before owners existed (owner defaulted by the migration) is the anonymous
    // owner's, which is who every caller is in AUTH_MODE=none.
    let app = crate::helpers::spawn_app().await;
    let mut conn = app.test_db.connect().await;
    sqlx::query("INSERT INTO todos (title) VALUES ('from before')")
        .execute(&mut conn)
        .await
        .unwrap();
    let list: Vec<Value> = app.get("/todos").await.json().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["title"], "from before");
    let owners: Vec<String> = sqlx::query_scalar("SELECT owner FROM todos")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(owners, [""]);
    // The same table through jwt: nobody sees them (no token has an empty sub).
    let jwt = jwt_app(&[]).await;
    let mut conn = jwt.test_db.connect().await;
    sqlx::query("INSERT INTO todos (title) VALUES ('from before')")
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(who(&jwt, "alice").ids().await, Vec::<i64>::new());
}

#[tokio::test]
async fn each_owners_page_is_an_index_range_scan() {
    let app = jwt_app(&[]).await;
    let mut conn = app.test_db.connect().await;
    // Enough rows of other owners that a sequential scan would not be chosen for a small one.
    sqlx::query(
        "INSERT INTO todos (title, owner) \
         SELECT 'todo ' || i, 'owner-' || (i % 50) FROM generate_series(1, 20000) i",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query("ANALYZE todos")
        .execute(&mut conn)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT id, title, completed, position, sort_key, created_at, updated_at, version \
         FROM todos WHERE owner = 'owner-7' AND (NULL::boolean IS NULL OR completed = NULL) \
         AND (sort_key, id) > (-9223372036854775808, 0) ORDER BY sort_key, id LIMIT 21",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan using todos_owner_sort_key_id_idx")
            && plan.contains("Index Cond: ((owner = 'owner-7'::text) AND (ROW(sort_key, id) >"),
        "{plan}"
    );
}

/// An issuer's signing key: its private half signs, its public half goes in the JWK Set.
struct IssuerKey {
    kid: String,
    alg: jsonwebtoken::Algorithm,
    signing: jsonwebtoken::EncodingKey,
    /// The public key as a JWK.
    jwk: Value,
    /// The public key as PEM, for the HS/RS confusion attack.
    public_pem: String,
}

impl IssuerKey {
    fn es256(kid: &str) -> IssuerKey {
        use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let secret = p256::SecretKey::random(&mut rsa::rand_core::OsRng);
        let der = secret.to_pkcs8_der().unwrap();
        let mut jwk: Value = serde_json::from_str(&secret.public_key().to_jwk_string()).unwrap();
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        IssuerKey {
            kid: kid.into(),
            alg: jsonwebtoken::Algorithm::ES256,
            signing: jsonwebtoken::EncodingKey::from_ec_der(der.as_bytes()),
            jwk,
            public_pem: secret
                .public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap(),
        }
    }

    fn rs256(kid: &str) -> IssuerKey {
        use rsa::{
            pkcs1::EncodeRsaPrivateKey, pkcs8::EncodePublicKey, pkcs8::LineEnding,
            traits::PublicKeyParts,
        };
        let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let der = private.to_pkcs1_der().unwrap();
        let public = private.to_public_key();
        IssuerKey {
            kid: kid.into(),
            alg: jsonwebtoken::Algorithm::RS256,
            signing: jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes()),
            jwk: json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
                        "n": b64_bytes(&public.n().to_bytes_be()),
                        "e": b64_bytes(&public.e().to_bytes_be())}),
            public_pem: public.to_public_key_pem(LineEnding::LF).unwrap(),
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let header = jsonwebtoken::Header {
            kid: Some(self.kid.clone()),
            ..jsonwebtoken::Header::new(self.alg)
        };
        jsonwebtoken::encode(&header, claims, &self.signing).unwrap()
    }
}

fn jwks(keys: &[&IssuerKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "scope": "todos:read todos:write", "exp": now() + 600})
}

async fn status_with(app: &TestApp, token: &str) -> u16 {
    app.client
        .get(app.url("/todos"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn tokens_signed_with_a_published_key_verify_only_in_that_keys_algorithm() {
    let ec = IssuerKey::es256("ec-1");
    let rsa = IssuerKey::rs256("rsa-1");
    let dir = std::env::temp_dir().join(format!("jwks-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("jwks.json");
    // An encryption key beside them is skipped, not an error.
    let mut set = jwks(&[&ec, &rsa]);
    set["keys"].as_array_mut().unwrap().push(
        json!({"kty": "RSA", "kid": "enc-1", "use": "enc", "alg": "RSA-OAEP",
                     "n": rsa.jwk["n"], "e": "AQAB"}),
    );
    std::fs::write(&file, set.to_string()).unwrap();
    let app = jwt_app(&[
        ("AUTH_JWKS_FILE", file.to_str().unwrap()),
        ("RATE_LIMIT_UNAUTHENTICATED_BURST", "1000"),
    ])
    .await;
    assert_eq!(status_with(&app, &ec.sign(&claims("alice"))).await, 200);
    assert_eq!(status_with(&app, &rsa.sign(&claims("bob"))).await, 200);
    // The shared secret (jwt_app sets one) still verifies tokens without a kid.
    assert_eq!(status_with(&app, &token("carol")).await, 200);

    let forged = |header: jsonwebtoken::Header, key: &[u8]| {
        jsonwebtoken::encode(
            &header,
            &claims("mallory"),
            &jsonwebtoken::EncodingKey::from_secret(key),
        )
        .unwrap()
    };
    let hs = |kid: &str| jsonwebtoken::Header {
        kid: Some(kid.into()),
        ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
    };
    let other_rsa = IssuerKey::rs256("rsa-1");
    let before = rows(&app).await;
    for (what, token) in [
        // The classic confusion: HS256, "signed" with the RSA key's public PEM as the secret.
        (
            "HS256 with the RS256 public key",
            forged(hs("rsa-1"), rsa.public_pem.as_bytes()),
        ),
        (
            "HS256 with the EC public key",
            forged(hs("ec-1"), ec.public_pem.as_bytes()),
        ),
        // The EC key's token relabelled as the RSA key's.
        ("ES256 under the RSA kid", {
            let t = ec.sign(&claims("mallory"));
            let (_, rest) = t.split_once('.').unwrap();
            format!(
                "{}.{rest}",
                b64(&json!({"alg": "ES256", "kid": "rsa-1", "typ": "JWT"}))
            )
        }),
        (
            "another key under a known kid",
            other_rsa.sign(&claims("mallory")),
        ),
        (
            "unknown kid",
            IssuerKey {
                kid: "ec-9".into(),
                ..IssuerKey::es256("x")
            }
            .sign(&claims("mallory")),
        ),
    ] {
        let r = app
            .client
            .post(app.url("/todos"))
            .bearer_auth(&token)
            .json(&json!({"title": "forged"}))
            .send()
            .await
            .unwrap();
        let p = assert_problem(r, 401, "invalid_token").await;
        assert!(
            p["detail"].as_str().unwrap().contains("signature"),
            "{what}: {p}"
        );
    }
    assert_eq!(rows(&app).await, before);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A JWK Set server that counts its fetches and serves what the test puts in it.
#[derive(Clone, Default)]
struct Issuer {
    set: std::sync::Arc<std::sync::Mutex<Value>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Issuer {
    async fn start(&self) -> String {
        let state = self.clone();
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let state = state.clone();
                async move {
                    state
                        .fetches
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    axum::Json(state.set.lock().unwrap().clone())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/jwks.json")
    }

    fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_rotated_key_is_fetched_when_a_token_names_it_and_made_up_kids_cannot_hammer_the_issuer()
{
    let (old, new) = (IssuerKey::es256("2026-11"), IssuerKey::es256("2026-12"));
    let issuer = Issuer::default();
    *issuer.set.lock().unwrap() = jwks(&[&old]);
    let url = issuer.start().await;
    let app = jwt_app(&[
        ("AUTH_JWKS_URL", &url),
        ("RATE_LIMIT_UNAUTHENTICATED_BURST", "1000"),
    ])
    .await;
    assert_eq!(issuer.fetches(), 1, "loaded once at startup");
    assert_eq!(status_with(&app, &old.sign(&claims("alice"))).await, 200);

    // The issuer rotates: the first token with the new key is refused at once (the request never
    // waits on the issuer) and asks for a refresh; moments later the key is known.
    *issuer.set.lock().unwrap() = jwks(&[&old, &new]);
    let token = new.sign(&claims("alice"));
    assert_eq!(status_with(&app, &token).await, 401);
    let started = std::time::Instant::now();
    while status_with(&app, &token).await != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the rotated key was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "rotated key usable {:?} after the first token named it",
        started.elapsed()
    );
    assert_eq!(issuer.fetches(), 2);

    // Tokens with made-up kids: all refused, and within the 10 s interval no further fetch.
    for i in 0..50 {
        let made_up = IssuerKey {
            kid: format!("made-up-{i}"),
            ..IssuerKey::es256("x")
        };
        assert_eq!(
            status_with(&app, &made_up.sign(&claims("mallory"))).await,
            401
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(issuer.fetches(), 2, "made-up kids fetched the set again");
}

#[tokio::test]
async fn an_issuer_that_is_away_at_startup_does_not_stop_the_service() {
    // Nothing listens on this port: the fetch fails at startup.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", dead.local_addr().unwrap());
    drop(dead);
    let app = jwt_app(&[("AUTH_JWKS_URL", &url)]).await;
    assert_eq!(app.get("/health").await.status(), 200);
    let key = IssuerKey::es256("k1");
    let r = app
        .client
        .get(app.url("/todos"))
        .bearer_auth(key.sign(&claims("alice")))
        .send()
        .await
        .unwrap();
    assert_problem(r, 401, "invalid_token").await;
}
