//! Compressed answers: a client that asks gets a large page in zstd, br or gzip (decoded here to
//! the very bytes an uncompressed answer carries), one that does not gets the page as before, small
//! answers and strong-tagged ones go as they are, and a client that accepts no coding at all is
//! refused before anything is done.

use std::io::Read as _;

use serde_json::json;

use crate::helpers::{TestApp, assert_problem, spawn_app};

/// An app holding 100 todos, with titles such as a user writes.
async fn hundred_todos() -> TestApp {
    let app = spawn_app().await;
    for i in 0..100 {
        app.create(json!({"title": format!("todo number {i}: call the plumber about the sink"), "order": i}))
            .await;
    }
    app
}

async fn get(app: &TestApp, path: &str, accept: Option<&str>) -> reqwest::Response {
    let mut req = app.client.get(app.url(path));
    if let Some(accept) = accept {
        req = req.header("accept-encoding", accept);
    }
    req.send().await.unwrap()
}

/// `POST /todos` with `title`, sent with `Accept-Encoding: accept`.
async fn post(app: &TestApp, accept: &str, title: &str) -> reqwest::Response {
    app.client
        .post(app.url("/todos"))
        .header("accept-encoding", accept)
        .json(&json!({ "title": title }))
        .send()
        .await
        .unwrap()
}

fn decode(coding: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "gzip" => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => {
            brotli_decompressor::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::decode_all(body).unwrap(),
        other => panic!("unexpected coding {other}"),
    }
    out
}

#[tokio::test]
async fn a_page_of_100_todos_is_compressed_4_times_for_a_client_that_asks_and_unchanged_otherwise()
{
    let app = hundred_todos().await;
    let page = "/todos?limit=100";
    let plain = get(&app, page, None).await;
    assert_eq!(plain.status(), 200);
    assert!(plain.headers().get("content-encoding").is_none());
    assert_eq!(
        plain.headers()["vary"],
        "accept-encoding",
        "caches must know"
    );
    let tag = plain.headers()["etag"].clone();
    let plain = plain.bytes().await.unwrap();
    let todos: Vec<serde_json::Value> = serde_json::from_slice(&plain).unwrap();
    assert_eq!(todos.len(), 100);

    for (accept, coding) in [
        ("gzip", "gzip"),
        ("br", "br"),
        ("zstd", "zstd"),
        ("gzip, deflate, br, zstd", "zstd"),
        ("gzip;q=1, br;q=0.5", "gzip"),
    ] {
        let r = get(&app, page, Some(accept)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-encoding"], coding, "{accept}");
        assert_eq!(r.headers()["vary"], "accept-encoding");
        assert_eq!(
            r.headers()["etag"],
            tag,
            "a page's weak tag names it in any coding"
        );
        let wire = r.bytes().await.unwrap();
        assert_eq!(
            decode(coding, &wire),
            plain,
            "{coding} decodes to the same page"
        );
        let ratio = plain.len() as f64 / wire.len() as f64;
        println!(
            "{coding}: {} -> {} bytes ({ratio:.1}x)",
            plain.len(),
            wire.len()
        );
        assert!(ratio >= 4.0, "{coding}: {ratio:.2}x");
    }

    // The tag works with compression too.
    let r = app
        .client
        .get(app.url(page))
        .header("accept-encoding", "br")
        .header("if-none-match", tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert!(r.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn small_answers_problems_and_strong_tagged_ones_go_as_they_are() {
    let app = spawn_app().await;
    let todo = app.create(json!({"title": "x".repeat(1000)})).await;
    // A single todo: over the size, but its ETag is strong (it names these bytes).
    let r = get(&app, &format!("/todos/{}", todo["id"]), Some("gzip, br")).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-encoding").is_none());
    assert!(r.headers().get("vary").is_none());
    assert_eq!(r.headers()["etag"], "\"1\"");
    // A page under the size.
    let r = get(&app, "/todos?limit=1&completed=true", Some("gzip, br")).await;
    assert!(r.headers().get("content-encoding").is_none());
    // A problem.
    let r = post(&app, "gzip, br", "").await;
    assert!(r.headers().get("content-encoding").is_none());
    assert_problem(r, 422, "validation_failed").await;
}

#[tokio::test]
async fn a_client_that_accepts_no_coding_is_refused_before_anything_is_done() {
    let app = spawn_app().await;
    for refusal in [
        "identity;q=0",
        "*;q=0",
        "identity;q=0, compress",
        "*;q=0.000",
    ] {
        let r = post(&app, refusal, "must not be created").await;
        assert!(r.headers().get("content-encoding").is_none());
        assert_problem(r, 406, "not_acceptable").await;
    }
    assert_eq!(app.row_count().await, 0, "no todo was created");
    // Accepting any coding we have is enough, even when identity is refused.
    let r = post(&app, "identity;q=0, gzip", "created").await;
    assert_eq!(r.status(), 201);
    let r = get(&app, "/todos", Some("br;q=0.5, identity;q=0")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.row_count().await, 1);
}
