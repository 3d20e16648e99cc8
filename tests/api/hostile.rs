//! What an attacker tried in the second round (issue 30) and the service must not do: each test
//! produces the attack and asserts the answer, and that nothing changed. The token attacks are
//! with the others in `auth.rs`, the `order` values and query parameters with the other
//! validation in `errors.rs`, the forwarded address with the other client-address tests in
//! `limits.rs`.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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
        "\u{e9}t\u{e9}".as_bytes().to_vec(),
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

/// What the service answers to `head` sent as is on a fresh connection: the status line.
async fn raw_status(app: &crate::helpers::TestApp, head: &str) -> String {
    let addr = app
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer.lines().next().unwrap_or_default().to_owned()
}

/// An HTTP/1.1 request without Host is a 400 (RFC 9112 §3.2); so is one with two, whose first
/// once built the links (`Host: evil.example` + `Host: 127.0.0.1` gave
/// `location: http://evil.example/todos/6`), and nothing is created.
#[tokio::test]
async fn a_request_without_exactly_one_host_is_400_and_changes_nothing() {
    let app = spawn_app().await;
    let body = r#"{"title": "x"}"#;
    let post = |hosts: &str| {
        format!(
            "POST /todos HTTP/1.1\r\n{hosts}content-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    for hosts in ["", "host: evil.example\r\nhost: 127.0.0.1\r\n"] {
        let status = raw_status(&app, &post(hosts)).await;
        assert!(status.starts_with("HTTP/1.1 400"), "{hosts:?}: {status}");
    }
    assert_eq!(app.row_count().await, 0);
    let status = raw_status(&app, "GET /health HTTP/1.1\r\nconnection: close\r\n\r\n").await;
    assert!(status.starts_with("HTTP/1.1 400"), "probes too: {status}");
    // HTTP/1.0 may leave it out.
    let status = raw_status(&app, "GET /todos HTTP/1.0\r\n\r\n").await;
    assert!(
        status.starts_with("HTTP/1.0 200") || status.starts_with("HTTP/1.1 200"),
        "{status}"
    );
    let status = raw_status(&app, &post("host: 127.0.0.1\r\n")).await;
    assert!(status.starts_with("HTTP/1.1 201"), "{status}");
}
