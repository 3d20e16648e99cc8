//! The TodoBackend specification's behaviours (todobackend.com's spec suite), one test each, with
//! `/todos` as the API root the suite is given.

use serde_json::{Value, json};

use crate::helpers::spawn_app;

#[tokio::test]
async fn the_api_root_answers_get_post_and_delete_with_cors_headers() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(app.url("/todos"))
        .header("origin", "http://todobackend.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");

    let r = app.post_json("/todos", &json!({"title": "a todo"})).await;
    assert_eq!(r.status(), 201);
    let todo: Value = r.json().await.unwrap();
    assert_eq!(todo["title"], "a todo");

    let r = app.delete("/todos").await;
    assert_eq!(r.status(), 204);
}

#[tokio::test]
async fn posted_todos_appear_in_the_list_start_not_completed_and_have_a_working_url() {
    let app = spawn_app().await;
    app.create(json!({"title": "walk the dog"})).await;
    let list: Vec<Value> = app.get("/todos").await.json().await.unwrap();
    assert_eq!(list.len(), 1);
    let todo = &list[0];
    assert_eq!(todo["title"], "walk the dog");
    assert_eq!(todo["completed"], false);
    let url = todo["url"].as_str().expect("url is a string");
    let fetched = app.get_json_at(url).await;
    assert_eq!(&fetched, todo);
}

#[tokio::test]
async fn a_todo_can_be_renamed_completed_and_deleted_through_its_url() {
    let app = spawn_app().await;
    app.create(json!({"title": "initial title"})).await;
    let list: Vec<Value> = app.get("/todos").await.json().await.unwrap();
    let url = list[0]["url"].as_str().unwrap().to_owned();

    let r = app
        .client
        .patch(&url)
        .json(&json!({"title": "bathe the cat"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["title"], "bathe the cat");

    let r = app
        .client
        .patch(&url)
        .json(&json!({"completed": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let patched: Value = r.json().await.unwrap();
    assert_eq!(patched["completed"], true);
    assert_eq!(patched["title"], "bathe the cat", "other fields unchanged");

    let refetched = app.get_json_at(&url).await;
    assert_eq!(refetched["title"], "bathe the cat");
    assert_eq!(refetched["completed"], true);

    let r = app.client.delete(&url).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let list: Vec<Value> = app.get("/todos").await.json().await.unwrap();
    assert!(list.is_empty(), "{list:?}");
}

#[tokio::test]
async fn todos_remember_their_order_and_it_can_be_changed() {
    let app = spawn_app().await;
    let todo = app.create(json!({"title": "blah", "order": 523})).await;
    assert_eq!(todo["order"], 523);
    let url = todo["url"].as_str().unwrap();
    let r = app
        .client
        .patch(url)
        .json(&json!({"order": 95}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["order"], 95);
    let refetched = app.get_json_at(url).await;
    assert_eq!(refetched["order"], 95);
}

#[tokio::test]
async fn deleting_the_collection_empties_it() {
    let app = spawn_app().await;
    for i in 0..3 {
        app.create(json!({"title": format!("t{i}")})).await;
    }
    assert_eq!(app.delete("/todos").await.status(), 204);
    let list: Vec<Value> = app.get("/todos").await.json().await.unwrap();
    assert!(list.is_empty());
    assert_eq!(app.row_count().await, 0);
}

#[tokio::test]
async fn cors_preflight_allows_patch_and_delete_with_a_json_content_type() {
    let app = spawn_app().await;
    for method in ["PATCH", "DELETE", "POST"] {
        let r = app
            .client
            .request(reqwest::Method::OPTIONS, app.url("/todos/1"))
            .header("origin", "http://todobackend.com")
            .header("access-control-request-method", method)
            .header("access-control-request-headers", "content-type")
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{method}: {}", r.status());
        let h = r.headers();
        assert_eq!(h["access-control-allow-origin"], "*", "{method}");
        let methods = h["access-control-allow-methods"].to_str().unwrap();
        assert!(methods.contains(method), "{method} not in {methods}");
        let headers = h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_lowercase();
        assert!(headers.contains("content-type"), "{headers}");
    }
}
