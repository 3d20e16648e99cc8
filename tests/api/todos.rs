//! CRUD details beyond the TodoBackend suite: Location, timestamps, filters, paging.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::helpers::{next_link, spawn_app};

#[tokio::test]
async fn create_returns_201_with_location_and_rfc3339_timestamps() {
    let app = spawn_app().await;
    let r = app
        .post_json(
            "/todos",
            &json!({"title": "x", "completed": true, "order": -3}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let todo: Value = r.json().await.unwrap();
    assert_eq!(location, todo["url"].as_str().unwrap());
    assert_eq!(location, app.url(&format!("/todos/{}", todo["id"])));
    assert_eq!(todo["completed"], true);
    assert_eq!(todo["order"], -3);
    for key in ["created_at", "updated_at"] {
        let ts = todo[key].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(ts).unwrap_or_else(|e| panic!("{key}={ts}: {e}"));
        // One fixed form (UTC, six fractional digits): what older ISO 8601 parsers need.
        assert_eq!(ts.len(), "2026-01-01T00:00:00.000000Z".len(), "{key}={ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{key}={ts}");
    }
    // The database builds this JSON; the OpenAPI type must describe it exactly (it refuses
    // unknown fields).
    let typed: todo_service::http::routes::todos::Todo =
        serde_json::from_value(todo.clone()).unwrap();
    assert_eq!(typed.url, location);
    let listed: Vec<todo_service::http::routes::todos::Todo> =
        app.get("/todos").await.json().await.unwrap();
    assert_eq!(listed.len(), 1);
    let keys: HashSet<&str> = todo
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let expected: HashSet<&str> = [
        "id",
        "url",
        "title",
        "completed",
        "order",
        "created_at",
        "updated_at",
    ]
    .into();
    assert_eq!(keys, expected);
}

#[tokio::test]
async fn the_public_base_url_is_used_for_links_when_configured() {
    let mut opts = crate::helpers::AppOptions::default();
    opts.env.insert(
        "PUBLIC_BASE_URL".into(),
        "https://todos.example.com/api/".into(),
    );
    let app = crate::helpers::spawn_app_with(opts).await;
    let r = app.post_json("/todos", &json!({"title": "x"})).await;
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let todo: Value = r.json().await.unwrap();
    let expected = format!("https://todos.example.com/api/todos/{}", todo["id"]);
    assert_eq!(todo["url"], expected.as_str());
    assert_eq!(location, expected);
}

#[tokio::test]
async fn urls_follow_an_allowed_host_header_and_ignore_any_other() {
    let mut opts = crate::helpers::AppOptions::default();
    opts.env
        .insert("ALLOWED_HOSTS".into(), "todo.test:9000, 127.0.0.1".into());
    let app = crate::helpers::spawn_app_with(opts).await;
    let todo = app.create(json!({"title": "x"})).await;
    let path = format!("/todos/{}", todo["id"]);
    let url_with_host = |host: &'static str| {
        let req = app.client.get(app.url(&path)).header("host", host);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap()["url"].clone() }
    };
    assert_eq!(
        url_with_host("todo.test:9000").await,
        format!("http://todo.test:9000{path}").as_str()
    );
    for (host, why) in [
        ("evil.test/<script>", "a malformed Host"),
        ("evil.test", "a Host ALLOWED_HOSTS does not name"),
        ("todo.test:9001", "an allowed host on another port"),
    ] {
        assert_eq!(
            url_with_host(host).await,
            app.url(&path).as_str(),
            "{why} falls back to the listen address"
        );
    }
}

#[tokio::test]
async fn patch_changes_only_the_given_fields_and_null_order_clears_it() {
    let app = spawn_app().await;
    let todo = app.create(json!({"title": "a", "order": 7})).await;
    let path = format!("/todos/{}", todo["id"]);
    let r = app.patch_json(&path, &json!({"order": null})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["order"], Value::Null);
    assert_eq!(v["title"], "a");
    assert_eq!(v["completed"], false);
    assert!(v["updated_at"].as_str() >= todo["updated_at"].as_str());

    let r = app.patch_json(&path, &json!({})).await;
    assert_eq!(r.status(), 200, "an empty patch is a no-op");
    let unchanged: Value = r.json().await.unwrap();
    assert_eq!(unchanged, v);
}

#[tokio::test]
async fn get_and_delete_of_a_missing_todo_are_404() {
    let app = spawn_app().await;
    let todo = app.create(json!({"title": "a"})).await;
    let path = format!("/todos/{}", todo["id"]);
    assert_eq!(app.delete(&path).await.status(), 204);
    crate::helpers::assert_problem(app.get(&path).await, 404, "todo_not_found").await;
    crate::helpers::assert_problem(app.delete(&path).await, 404, "todo_not_found").await;
    crate::helpers::assert_problem(
        app.patch_json(&path, &json!({"title": "b"})).await,
        404,
        "todo_not_found",
    )
    .await;
}

/// The list's sort key: order, missing orders last, then id.
fn sort_key(t: &Value) -> (i64, i64) {
    (
        t["order"].as_i64().unwrap_or(i64::MAX),
        t["id"].as_i64().unwrap(),
    )
}

#[tokio::test]
async fn list_is_sorted_by_order_then_id_and_filters_by_completed() {
    let app = spawn_app().await;
    for (title, order, completed) in [
        ("c", Some(3), false),
        ("none1", None, true),
        ("a", Some(-1), true),
        ("b", Some(3), false),
        ("none2", None, false),
    ] {
        let mut body = json!({"title": title, "completed": completed});
        if let Some(o) = order {
            body["order"] = json!(o);
        }
        app.create(body).await;
    }
    let all: Vec<Value> = app.get("/todos").await.json().await.unwrap();
    let titles: Vec<&str> = all.iter().map(|t| t["title"].as_str().unwrap()).collect();
    assert_eq!(titles, ["a", "c", "b", "none1", "none2"]);

    let done: Vec<Value> = app.get("/todos?completed=true").await.json().await.unwrap();
    let titles: Vec<&str> = done.iter().map(|t| t["title"].as_str().unwrap()).collect();
    assert_eq!(titles, ["a", "none1"]);
    let open: Vec<Value> = app
        .get("/todos?completed=false")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(open.len(), 3);
}

#[tokio::test]
async fn the_default_page_is_50_and_limit_is_honoured() {
    let app = spawn_app().await;
    let mut conn = app.test_db.connect().await;
    sqlx::query("INSERT INTO todos (title) SELECT 't' || g FROM generate_series(1, 60) g")
        .execute(&mut conn)
        .await
        .unwrap();
    let r = app.get("/todos").await;
    let next = next_link(&r).expect("a next link when more rows exist");
    assert!(next.starts_with(&app.url("/todos?")), "{next}");
    let page: Vec<Value> = r.json().await.unwrap();
    assert_eq!(page.len(), 50);
    let r = app.client.get(&next).send().await.unwrap();
    assert!(next_link(&r).is_none(), "the last page has no next link");
    let rest: Vec<Value> = r.json().await.unwrap();
    assert_eq!(rest.len(), 10);

    let r = app.get("/todos?limit=500").await;
    assert!(next_link(&r).is_none());
    assert_eq!(r.json::<Vec<Value>>().await.unwrap().len(), 60);
}

#[tokio::test]
async fn paging_has_no_gaps_or_repeats_while_todos_are_inserted_concurrently() {
    let app = spawn_app().await;
    // 150 todos: orders spread over a few values (ties broken by id) plus some without an order.
    let mut conn = app.test_db.connect().await;
    sqlx::query(
        "INSERT INTO todos (title, position) \
         SELECT 't' || g, CASE WHEN g % 5 = 0 THEN NULL ELSE (g * 7919) % 13 - 6 END \
         FROM generate_series(1, 150) g",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let before: HashSet<i64> = sqlx::query_scalar("SELECT id FROM todos")
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .collect();

    // A writer inserts todos with orders that land before, inside and after the pages read.
    let writer_app_url = app.url("/todos");
    let client = app.client.clone();
    let writer = tokio::spawn(async move {
        for i in 0..100i64 {
            let order = if i % 4 == 0 {
                Value::Null
            } else {
                json!((i * 31) % 15 - 7)
            };
            let r = client
                .post(&writer_app_url)
                .json(&json!({"title": format!("w{i}"), "order": order}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
    });

    let mut seen = Vec::new();
    let mut next = Some(app.url("/todos?limit=7"));
    let mut pages = 0;
    while let Some(url) = next {
        let r = app.client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        next = next_link(&r);
        let page: Vec<Value> = r.json().await.unwrap();
        assert!(page.len() <= 7);
        seen.extend(page);
        pages += 1;
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();

    let ids: Vec<i64> = seen.iter().map(|t| t["id"].as_i64().unwrap()).collect();
    let unique: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "a todo was returned twice");
    let missing: Vec<&i64> = before.difference(&unique).collect();
    assert!(
        missing.is_empty(),
        "todos existing before paging were skipped: {missing:?}"
    );
    let keys: Vec<(i64, i64)> = seen.iter().map(sort_key).collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "pages are not in sort order"
    );
    assert!(pages > 20, "paged in {pages} pages");
}

async fn post_with_key(app: &crate::helpers::TestApp, key: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/todos"))
        .header("idempotency-key", key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_retried_post_with_the_same_idempotency_key_creates_one_todo() {
    let app = spawn_app().await;
    let first = post_with_key(&app, "k-1", json!({"title": "pay rent", "order": 1})).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let location = first.headers()["location"].clone();
    let created: Value = first.json().await.unwrap();

    let retry = post_with_key(&app, "k-1", json!({"order": 1, "title": "pay rent"})).await;
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.headers()["location"], location);
    let replayed: Value = retry.json().await.unwrap();
    assert_eq!(replayed, created, "the original response, field for field");
    assert_eq!(app.row_count().await, 1);

    // A different key is a different todo.
    post_with_key(&app, "k-2", json!({"title": "pay rent", "order": 1})).await;
    assert_eq!(app.row_count().await, 2);
}

#[tokio::test]
async fn reusing_an_idempotency_key_for_another_body_is_422_and_creates_nothing() {
    let app = spawn_app().await;
    post_with_key(&app, "key", json!({"title": "a"})).await;
    for body in [
        json!({"title": "b"}),
        json!({"title": "a", "completed": true}),
        json!({"title": "a", "order": 3}),
    ] {
        let r = post_with_key(&app, "key", body.clone()).await;
        crate::helpers::assert_problem(r, 422, "idempotency_key_reused").await;
    }
    assert_eq!(app.row_count().await, 1);
}

#[tokio::test]
async fn an_invalid_idempotency_key_is_400() {
    let app = spawn_app().await;
    for key in ["", &"k".repeat(256), "tab\there"] {
        let r = post_with_key(&app, key, json!({"title": "a"})).await;
        crate::helpers::assert_problem(r, 400, "invalid_idempotency_key").await;
    }
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn an_expired_idempotency_key_creates_a_new_todo() {
    let app = spawn_app().await;
    let first: Value = post_with_key(&app, "k", json!({"title": "a"}))
        .await
        .json()
        .await
        .unwrap();
    expire_keys(&app).await;
    let r = post_with_key(&app, "k", json!({"title": "a"})).await;
    assert_eq!(r.status(), 201);
    assert!(r.headers().get("idempotent-replayed").is_none());
    let second: Value = r.json().await.unwrap();
    assert_ne!(second["id"], first["id"]);
    expire_keys(&app).await;
    assert_eq!(app.db.sweep_expired_idempotency_keys().await.unwrap(), 1);
}

/// Ages every stored idempotency key past its expiry.
async fn expire_keys(app: &crate::helpers::TestApp) {
    let mut conn = app.test_db.connect().await;
    sqlx::query("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'")
        .execute(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_key_sweep_deletes_a_large_backlog_in_bounded_batches_and_keeps_live_keys() {
    let app = spawn_app().await;
    let mut conn = app.test_db.connect().await;
    sqlx::query(
        "INSERT INTO idempotency_keys (key, request, expires_at) \
         SELECT 'old-' || g, '{}'::jsonb, now() - interval '1 hour' FROM generate_series(1, 2500) g \
         UNION ALL SELECT 'live-' || g, '{}'::jsonb, now() + interval '1 hour' FROM generate_series(1, 10) g",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let batch = todo_service::db::idempotency::SWEEP_BATCH;
    assert_eq!(
        app.db.delete_expired_idempotency_keys(batch).await.unwrap(),
        batch as u64,
        "one statement deletes one batch"
    );
    assert_eq!(
        app.db.sweep_expired_idempotency_keys().await.unwrap(),
        2500 - batch as u64
    );
    let left: Vec<String> = sqlx::query_scalar("SELECT key FROM idempotency_keys ORDER BY key")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(left.len(), 10, "{left:?}");
    assert!(left.iter().all(|k| k.starts_with("live-")));
}
