//! Every error status the service produces comes out as problem+json, and bad input changes
//! nothing in the database.

use serde_json::json;

use crate::helpers::{AppOptions, TestApp, assert_problem, spawn_app, spawn_app_with};

async fn app_with_one_todo() -> (TestApp, String) {
    let app = spawn_app().await;
    let todo = app.create(json!({"title": "keep me", "order": 1})).await;
    let path = format!("/todos/{}", todo["id"]);
    (app, path)
}

#[tokio::test]
async fn malformed_json_is_400_and_changes_nothing() {
    let (app, path) = app_with_one_todo().await;
    let before = app.snapshot().await;
    for body in [
        r#"{"title": "x""#,
        "not json",
        r#"{"title": "x"} trailing"#,
        "",
    ] {
        for (method, url) in [
            (reqwest::Method::POST, "/todos"),
            (reqwest::Method::PATCH, path.as_str()),
        ] {
            let r = app
                .client
                .request(method.clone(), app.url(url))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let p = assert_problem(r, 400, "malformed_json").await;
            assert!(p["hint"].is_string(), "{p}");
        }
    }
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn validation_failures_are_422_naming_each_field_and_change_nothing() {
    let (app, path) = app_with_one_todo().await;
    let before = app.snapshot().await;
    let long = "x".repeat(1001);
    let create_cases = [
        (json!({}), "title"),
        (json!({"title": ""}), "title"),
        (json!({"title": "   "}), "title"),
        (json!({"title": long}), "title"),
        (json!({"title": "a\u{0}b"}), "title"),
        (json!({"title": 5}), "title"),
        (json!({"title": null}), "title"),
        (json!({"title": "a", "completed": "yes"}), "completed"),
        (json!({"title": "a", "order": 1.5}), "order"),
        (json!({"title": "a", "order": "1"}), "order"),
        (json!({"title": "a", "priority": 1}), "priority"),
        (json!(["title"]), "(body)"),
    ];
    for (body, field) in create_cases {
        let p = assert_problem(
            app.post_json("/todos", &body).await,
            422,
            "validation_failed",
        )
        .await;
        assert_eq!(p["errors"][0]["field"], field, "POST {body}: {p}");
        assert!(
            p["detail"].as_str().unwrap().contains(field),
            "POST {body}: {p}"
        );
    }
    let patch_cases = [
        (json!({"title": ""}), "title"),
        (json!({"title": null}), "title"),
        (json!({"completed": null}), "completed"),
        (json!({"completed": 1}), "completed"),
        (json!({"order": "first"}), "order"),
        (json!({"id": 99}), "id"),
        (json!({"url": "http://x"}), "url"),
    ];
    for (body, field) in patch_cases {
        let p = assert_problem(app.patch_json(&path, &body).await, 422, "validation_failed").await;
        assert_eq!(p["errors"][0]["field"], field, "PATCH {body}: {p}");
    }
    // Several bad fields at once are all reported.
    let p = assert_problem(
        app.patch_json(&path, &json!({"title": "", "completed": null}))
            .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(p["errors"].as_array().unwrap().len(), 2, "{p}");
    assert_eq!(app.snapshot().await, before);
}

/// An `order` is stored exactly or refused: a float reading of the text once rounded
/// 9007199254740993.0 to …992 and 1e-400 to 0 and stored them.
#[tokio::test]
async fn an_order_that_is_not_exactly_an_integer_in_range_is_422_and_one_that_is_kept_exactly() {
    let (app, path) = app_with_one_todo().await;
    let send = |method: reqwest::Method, path: &str, order: &str| {
        let body = if method == reqwest::Method::POST {
            format!(r#"{{"title": "a", "order": {order}}}"#)
        } else {
            format!(r#"{{"order": {order}}}"#)
        };
        app.client
            .request(method, app.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let before = app.snapshot().await;
    for order in [
        "9007199254740993.5",
        "1.0000000000000000001",
        "1e-400",
        "-9223372036854775808.5",
        "9223372036854775808",
        "1e19",
    ] {
        for (method, at) in [
            (reqwest::Method::POST, "/todos"),
            (reqwest::Method::PATCH, path.as_str()),
        ] {
            let r = send(method.clone(), at, order).await.unwrap();
            let p = assert_problem(r, 422, "validation_failed").await;
            assert_eq!(p["errors"][0]["field"], "order", "{method} {order}: {p}");
        }
    }
    assert_eq!(app.snapshot().await, before);
    let r = send(reqwest::Method::POST, "/todos", "9007199254740993.0")
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Read as text: the exact digits, not a float's.
    let created = r.text().await.unwrap();
    assert!(created.contains(r#""order":9007199254740993"#), "{created}");
    let r = send(reqwest::Method::PATCH, &path, "-9223372036854775808.0")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains(r#""order":-9223372036854775808"#)
    );
}

#[tokio::test]
async fn bad_list_parameters_are_422_naming_the_parameter() {
    let app = spawn_app().await;
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("completed=maybe", "completed"),
        ("cursor=abc", "cursor"),
        // Unknown or misspelt parameters are named, not ignored.
        ("foo=1", "foo"),
        ("Limit=1", "Limit"),
        ("limit=5&completed=true&sort=title", "sort"),
    ] {
        let p = assert_problem(
            app.get(&format!("/todos?{query}")).await,
            422,
            "validation_failed",
        )
        .await;
        assert_eq!(p["errors"][0]["field"], field, "{query}: {p}");
    }
}

#[tokio::test]
async fn a_non_json_body_is_415() {
    let (app, path) = app_with_one_todo().await;
    let before = app.snapshot().await;
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut req = app.client.post(app.url("/todos")).body(r#"{"title":"x"}"#);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        assert_problem(req.send().await.unwrap(), 415, "unsupported_media_type").await;
    }
    let r = app
        .client
        .patch(app.url(&path))
        .body(r#"{"title":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_problem(r, 415, "unsupported_media_type").await;
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_and_changes_nothing() {
    let mut opts = AppOptions::default();
    opts.env.insert("MAX_BODY_BYTES".into(), "2048".into());
    let app = spawn_app_with(opts).await;
    let body = json!({"title": "x".repeat(900), "pad": "y".repeat(3000)});
    assert_problem(
        app.post_json("/todos", &body).await,
        413,
        "payload_too_large",
    )
    .await;
    // Also when the size is not announced up front (chunked body).
    let chunks: Vec<Result<String, std::io::Error>> = vec![
        Ok(r#"{"title": ""#.into()),
        Ok("z".repeat(4000)),
        Ok(r#""}"#.into()),
    ];
    let r = app
        .client
        .post(app.url("/todos"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_problem(r, 413, "payload_too_large").await;
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn an_invalid_id_is_400_and_unknown_routes_are_404() {
    let app = spawn_app().await;
    for path in [
        "/todos/abc",
        "/todos/0",
        "/todos/-1",
        "/todos/99999999999999999999",
    ] {
        assert_problem(app.get(path).await, 400, "invalid_id").await;
    }
    let p = assert_problem(app.get("/nope").await, 404, "route_not_found").await;
    assert!(p["detail"].as_str().unwrap().contains("/nope"));
    assert_problem(app.get("/todos/1/extra").await, 404, "route_not_found").await;
}

#[tokio::test]
async fn an_unsupported_method_is_405_with_an_allow_header() {
    let app = spawn_app().await;
    for (method, path, allowed) in [
        (reqwest::Method::PUT, "/todos/1", "PATCH"),
        (reqwest::Method::PATCH, "/todos", "POST"),
        (reqwest::Method::POST, "/health", "GET"),
    ] {
        let r = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        let allow = r
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_problem(r, 405, "method_not_allowed").await;
        let allow = allow.expect("Allow header");
        assert!(allow.contains(allowed), "{method} {path}: Allow: {allow}");
    }
}

#[tokio::test]
async fn an_unexpected_database_error_is_a_500_without_internal_details() {
    let (app, path) = app_with_one_todo().await;
    let mut conn = app.test_db.connect().await;
    sqlx::query("ALTER TABLE todos RENAME COLUMN title TO name")
        .execute(&mut conn)
        .await
        .unwrap();
    for r in [app.get("/todos").await, app.get(&path).await] {
        let p = assert_problem(r, 500, "internal_error").await;
        let text = p.to_string().to_lowercase();
        for leak in ["column", "select", "sqlx", "todos", "42703"] {
            assert!(!text.contains(leak), "500 leaks {leak:?}: {p}");
        }
    }
}

#[tokio::test]
async fn a_malformed_query_string_is_a_400_problem() {
    let app = spawn_app().await;
    let p = assert_problem(
        app.get("/todos?limit=1&limit=2").await,
        400,
        "invalid_query",
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("limit"), "{p}");
}

#[tokio::test]
async fn errors_from_library_routes_are_problems_too() {
    let app = spawn_app().await;
    // The docs UI's own asset handler answers unknown files with a bare 404.
    assert_problem(
        app.get("/docs/no-such-asset.js").await,
        404,
        "route_not_found",
    )
    .await;
    let r = app
        .client
        .get(app.url("/docs/no-such-asset.js"))
        .header("origin", "http://x.test")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "*",
        "problems keep CORS headers"
    );
}

/// A 503 says what class of trouble it is and what to do; the driver's words (addresses, OS
/// errors) stay in the service's log.
#[tokio::test]
async fn a_database_outage_is_a_503_without_the_drivers_internals() {
    let mut proxy = crate::helpers::TcpProxy::reserve().await;
    proxy.start().await;
    let app = spawn_app_with(AppOptions {
        db_via: Some(("127.0.0.1".into(), proxy.addr.port())),
        ..AppOptions::default()
    })
    .await;
    proxy.cut();
    let r = app.get("/todos").await;
    let retry_after = r.headers().get("retry-after").cloned();
    let p = assert_problem(r, 503, "database_unavailable").await;
    assert!(retry_after.is_some(), "{p}");
    let text = p.to_string();
    for internal in [
        "os error",
        "refused",
        &proxy.addr.port().to_string(),
        "sqlx",
    ] {
        assert!(!text.contains(internal), "{internal:?} in {text}");
    }
}
