//! ETags and conditional requests: `If-None-Match` on reads, `If-Match` on writes.

use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, spawn_app};

fn etag(r: &reqwest::Response) -> String {
    r.headers()
        .get("etag")
        .expect("an ETag header")
        .to_str()
        .unwrap()
        .to_owned()
}

async fn create(app: &TestApp, title: &str) -> (i64, String) {
    let r = app.post_json("/todos", &json!({"title": title})).await;
    assert_eq!(r.status(), 201);
    let tag = etag(&r);
    let todo: Value = r.json().await.unwrap();
    (todo["id"].as_i64().unwrap(), tag)
}

#[tokio::test]
async fn every_version_of_a_todo_has_its_own_etag() {
    let app = spawn_app().await;
    let (id, created) = create(&app, "a").await;
    let path = format!("/todos/{id}");
    let got = app.get(&path).await;
    assert_eq!(etag(&got), created, "GET names the version POST returned");
    let patched = app.patch_json(&path, &json!({"completed": true})).await;
    assert_eq!(patched.status(), 200);
    assert_ne!(etag(&patched), created, "a change makes a new version");
    assert_eq!(etag(&app.get(&path).await), etag(&patched));
    // An empty PATCH changes nothing, so neither does the version.
    let empty = app.patch_json(&path, &json!({})).await;
    assert_eq!(etag(&empty), etag(&patched));
}

#[tokio::test]
async fn a_current_copy_is_answered_304_and_a_stale_one_200() {
    let app = spawn_app().await;
    let (id, first) = create(&app, "a").await;
    let path = format!("/todos/{id}");
    let get_if = |tag: String| {
        app.client
            .get(app.url(&path))
            .header("If-None-Match", tag)
            .send()
    };
    let r = get_if(first.clone()).await.unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(etag(&r), first);
    assert!(r.bytes().await.unwrap().is_empty(), "304 has no body");
    assert_eq!(get_if("*".into()).await.unwrap().status(), 304);
    assert_eq!(
        get_if(format!("W/{first}")).await.unwrap().status(),
        304,
        "If-None-Match compares weakly"
    );
    app.patch_json(&path, &json!({"title": "b"})).await;
    let r = get_if(first).await.unwrap();
    assert_eq!(r.status(), 200, "the copy is stale");
    assert_eq!(r.json::<Value>().await.unwrap()["title"], "b");
}

/// The lost update: two clients read the same version and both PATCH it. Exactly one wins; the
/// other gets 412 and the row holds exactly the winner's change.
#[tokio::test]
async fn two_patches_with_the_same_if_match_one_200_one_412() {
    let app = spawn_app().await;
    for round in 0..10 {
        let (id, tag) = create(&app, "start").await;
        let path = format!("/todos/{id}");
        let patch = |title: &'static str| {
            app.client
                .patch(app.url(&path))
                .header("If-Match", tag.clone())
                .json(&json!({"title": title, "order": 1}))
                .send()
        };
        let (a, b) = tokio::join!(patch("from a"), patch("from b"));
        let (a, b) = (a.unwrap(), b.unwrap());
        let mut statuses = [a.status().as_u16(), b.status().as_u16()];
        statuses.sort();
        assert_eq!(statuses, [200, 412], "round {round}");
        let (winner, loser) = if a.status() == 200 { (a, b) } else { (b, a) };
        let won: Value = winner.json().await.unwrap();
        let problem = assert_problem(loser, 412, "precondition_failed").await;
        assert!(problem["hint"].as_str().unwrap().contains("If-Match"));
        let now: Value = app.get(&path).await.json().await.unwrap();
        assert_eq!(now["title"], won["title"], "round {round}");
        assert_eq!(
            now["updated_at"], won["updated_at"],
            "round {round}: one change only"
        );
    }
}

#[tokio::test]
async fn a_delete_with_a_stale_if_match_is_412_and_deletes_nothing() {
    let app = spawn_app().await;
    let (id, first) = create(&app, "a").await;
    let path = format!("/todos/{id}");
    let second = etag(&app.patch_json(&path, &json!({"completed": true})).await);
    let delete_if = |tag: String| {
        app.client
            .delete(app.url(&path))
            .header("If-Match", tag)
            .send()
    };
    assert_problem(delete_if(first).await.unwrap(), 412, "precondition_failed").await;
    assert_eq!(app.row_count().await, 1);
    // Weak tags never satisfy If-Match.
    assert_problem(
        delete_if(format!("W/{second}")).await.unwrap(),
        412,
        "precondition_failed",
    )
    .await;
    assert_eq!(
        delete_if(format!("\"0\", {second}"))
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(app.row_count().await, 0);
    // A missing todo is 404 whatever the condition (RFC 9110 §13.2.1).
    assert_problem(delete_if(second).await.unwrap(), 404, "todo_not_found").await;
}

#[tokio::test]
async fn conditional_writes_on_missing_todos_and_bad_headers_change_nothing() {
    let app = spawn_app().await;
    let (id, tag) = create(&app, "a").await;
    let before = app.snapshot().await;
    let r = app
        .client
        .patch(app.url("/todos/999"))
        .header("If-Match", tag.clone())
        .json(&json!({"title": "x"}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 404, "todo_not_found").await;
    for bad in ["3", "\"3", "*, \"1\""] {
        let r = app
            .client
            .patch(app.url(&format!("/todos/{id}")))
            .header("If-Match", bad)
            .json(&json!({"title": "x"}))
            .send()
            .await
            .unwrap();
        assert_problem(r, 400, "invalid_precondition").await;
    }
    // An empty PATCH checks the condition too.
    let r = app
        .client
        .patch(app.url(&format!("/todos/{id}")))
        .header("If-Match", "\"999\"")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 412, "precondition_failed").await;
    assert_eq!(app.snapshot().await, before);
}

/// A browser client can only use ETags if CORS lets it read `ETag` and send `If-Match` and
/// `If-None-Match`.
#[tokio::test]
async fn browsers_may_read_etags_and_send_preconditions() {
    let app = spawn_app().await;
    let (id, _) = create(&app, "a").await;
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url(&format!("/todos/{id}")))
        .header("origin", "http://todobackend.com")
        .header("access-control-request-method", "PATCH")
        .header("access-control-request-headers", "if-match,if-none-match")
        .send()
        .await
        .unwrap();
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        allowed.contains("if-match") && allowed.contains("if-none-match"),
        "{allowed}"
    );
    let r = app
        .client
        .get(app.url(&format!("/todos/{id}")))
        .header("origin", "http://todobackend.com")
        .send()
        .await
        .unwrap();
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(exposed.contains("etag"), "{exposed}");
}

/// The pages of the collection at `limit`, each as (its URL, its ETag), walked by `Link`.
async fn pages(app: &TestApp, first: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut next = Some(app.url(first));
    while let Some(url) = next {
        let r = app.client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let tag = etag(&r);
        assert!(tag.starts_with("W/\""), "a page's tag is weak: {tag}");
        next = crate::helpers::next_link(&r);
        out.push((url, tag));
    }
    out
}

/// Each page asked for again with the tag it had: 304 when nothing on it changed, else 200 and a
/// new tag. Returns which pages changed.
async fn changed(app: &TestApp, pages: &[(String, String)]) -> Vec<bool> {
    let mut out = Vec::new();
    for (url, tag) in pages {
        let r = app
            .client
            .get(url)
            .header("If-None-Match", tag)
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            304 => {
                assert_eq!(&etag(&r), tag, "{url}");
                assert!(r.bytes().await.unwrap().is_empty(), "304 has no body");
                out.push(false);
            }
            200 => {
                assert_ne!(&etag(&r), tag, "{url}: a 200 to a current tag");
                out.push(true);
            }
            s => panic!("{url}: {s}"),
        }
    }
    out
}

#[tokio::test]
async fn a_page_of_the_list_is_304_until_a_write_by_any_route_changes_it() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for order in 1..=6 {
        let todo = app
            .create(json!({"title": format!("t{order}"), "order": order}))
            .await;
        ids.push(todo["id"].as_i64().unwrap());
    }
    // Three pages of two: [1 2] [3 4] [5 6]; the later ones start after a cursor.
    let walk = pages(&app, "/todos?limit=2").await;
    assert_eq!(walk.len(), 3);
    assert_eq!(changed(&app, &walk).await, [false, false, false]);
    let star = app
        .client
        .get(app.url("/todos?limit=2"))
        .header("If-None-Match", "*")
        .send()
        .await
        .unwrap();
    assert_eq!(star.status(), 304);

    // PATCH: only the page that shows the todo.
    let r = app
        .patch_json(&format!("/todos/{}", ids[2]), &json!({"title": "t3'"}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(changed(&app, &walk).await, [false, true, false]);
    let walk = pages(&app, "/todos?limit=2").await;

    // POST at the end: the last page now has a next page.
    app.create(json!({"title": "t7", "order": 7})).await;
    assert_eq!(changed(&app, &walk).await, [false, false, true]);
    let walk = pages(&app, "/todos?limit=2").await;
    assert_eq!(walk.len(), 4);

    // DELETE the first todo: the first page shifts; the pages after a cursor show the same rows.
    assert_eq!(
        app.delete(&format!("/todos/{}", ids[0])).await.status(),
        204
    );
    assert_eq!(changed(&app, &walk).await, [true, false, false, false]);
    let walk = pages(&app, "/todos?limit=2").await;

    // A filtered view changes when a todo enters it.
    let open = pages(&app, "/todos?completed=true").await;
    let r = app
        .patch_json(&format!("/todos/{}", ids[4]), &json!({"completed": true}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(changed(&app, &open).await, [true]);
    // [2 3] [4 5] [6 7]: the todo is on the second page.
    assert_eq!(changed(&app, &walk).await, [false, true, false]);
    let walk = pages(&app, "/todos?limit=2").await;

    // DELETE all: every page.
    assert_eq!(app.delete("/todos").await.status(), 204);
    assert_eq!(changed(&app, &walk).await, [true, true, true]);
}
