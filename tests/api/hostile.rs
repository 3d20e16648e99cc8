//! What an attacker tried in the second round (issue 30) and the service must not do: each test
//! produces the attack and asserts the answer, and that nothing changed. The token attacks are
//! with the others in `auth.rs`, the `order` values and query parameters with the other
//! validation in `errors.rs`, the forwarded address with the other client-address tests in
//! `limits.rs`.

use crate::helpers::spawn_app;

/// A client's request id is copied into every log line of its request: one over 128 bytes, or
/// with anything but visible ASCII, is replaced by a fresh one, which the answer names.
#[tokio::test]
async fn an_oversized_or_unprintable_request_id_is_replaced_and_the_replacement_returned() {
    let app = spawn_app().await;
    let send = |id: Vec<u8>| {
        app.client
            .get(app.url("/todos"))
            .header(
                "x-request-id",
                reqwest::header::HeaderValue::from_bytes(&id).unwrap(),
            )
            .send()
    };
    let kept = "a".repeat(128);
    let r = send(kept.clone().into_bytes()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], kept.as_str());
    for id in [
        "a".repeat(129).into_bytes(),
        "x".repeat(300 * 1024).into_bytes(),
        b"two words".to_vec(),
        b"caf\xc3\xa9".to_vec(),
    ] {
        let r = send(id.clone()).await.unwrap();
        assert_eq!(r.status(), 200);
        let given = r.headers()["x-request-id"].as_bytes().to_vec();
        assert_ne!(given, id);
        assert!(
            uuid::Uuid::parse_str(std::str::from_utf8(&given).unwrap()).is_ok(),
            "{given:?}"
        );
    }
}
