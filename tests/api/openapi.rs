//! `/openapi.json` describes exactly the routes the service serves, and `/docs` works offline.

use std::collections::{BTreeSet, HashSet};

use serde_json::{Value, json};

use crate::helpers::spawn_app;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(move |m| (m.to_string(), path.clone()))
        })
        .collect()
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_only_routes_that_exist() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );

    let expected: BTreeSet<(String, String)> = [
        ("get", "/todos"),
        ("post", "/todos"),
        ("delete", "/todos"),
        ("get", "/todos/{id}"),
        ("patch", "/todos/{id}"),
        ("delete", "/todos/{id}"),
        ("get", "/health"),
        ("get", "/ready"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(documented(&doc), expected);

    // Every data operation documents its 503, body operations their 400/413/415/422, all as
    // problem+json.
    for (method, path) in &expected {
        let op = &doc["paths"][path][method];
        let mut statuses = vec![];
        if path.starts_with("/todos") {
            statuses.extend(["429", "503", "504"]);
        }
        if op.get("requestBody").is_some() {
            statuses.extend(["400", "413", "415", "422"]);
        }
        for status in statuses {
            let content = &op["responses"][status]["content"]["application/problem+json"];
            assert!(
                content.is_object(),
                "{method} {path} lacks a problem+json {status}"
            );
        }
        // The rate limit's fields on the data routes' answers, success and 429 alike.
        if path.starts_with("/todos") {
            for (status, response) in op["responses"].as_object().unwrap() {
                let limited = !["401", "403", "503"].contains(&status.as_str());
                for field in ["RateLimit", "RateLimit-Policy"] {
                    assert_eq!(
                        response["headers"][field].is_object(),
                        limited,
                        "{method} {path} {status} {field}"
                    );
                }
            }
        }
    }

    // Each documented path: documented methods are routed, undocumented ones are 405.
    let todo = app.create(json!({"title": "x"})).await;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", &todo["id"].to_string());
        for m in METHODS {
            let method = reqwest::Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
            let r = app
                .client
                .request(method, app.url(&concrete))
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            if item.get(m).is_some() {
                assert_ne!(status, 405, "{m} {path} is documented but not routed");
                assert_ne!(
                    body["code"], "route_not_found",
                    "{m} {path} is documented but not routed"
                );
            } else {
                assert_eq!(status, 405, "{m} {path} is routed but not documented");
            }
        }
    }
}

#[tokio::test]
async fn the_documented_schemas_match_real_responses() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    let schemas = &doc["components"]["schemas"];
    let props = |name: &str| -> HashSet<String> {
        schemas[name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {name}"))
            .keys()
            .cloned()
            .collect()
    };

    let todo = app.create(json!({"title": "x", "order": 1})).await;
    let keys: HashSet<String> = todo.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, props("Todo"));

    let problem: Value = app
        .post_json("/todos", &json!({"title": ""}))
        .await
        .json()
        .await
        .unwrap();
    let keys: HashSet<String> = problem.as_object().unwrap().keys().cloned().collect();
    assert!(
        keys.is_subset(&props("Problem")),
        "{keys:?} vs {:?}",
        props("Problem")
    );

    let create = props("CreateTodo");
    assert_eq!(
        create,
        ["title", "completed", "order"].map(String::from).into()
    );
    let required: Vec<&str> = schemas["CreateTodo"]["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, ["title"]);
    assert_eq!(props("UpdateTodo"), create);

    let ready: Value = app.get("/ready").await.json().await.unwrap();
    let keys: HashSet<String> = ready["checks"]["database"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(keys.is_subset(&props("DatabaseReadiness")), "{keys:?}");
}

/// Conditional requests are part of the contract: a generated client must learn about ETags,
/// If-Match, If-None-Match, 304 and 412 from the document.
#[tokio::test]
async fn the_document_describes_etags_and_conditional_requests() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    let op = |method: &str| &doc["paths"]["/todos/{id}"][method];
    let params = |method: &str| -> Vec<String> {
        op(method)["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                format!(
                    "{} {}",
                    p["in"].as_str().unwrap(),
                    p["name"].as_str().unwrap()
                )
            })
            .collect()
    };
    assert!(params("get").contains(&"header If-None-Match".to_string()));
    assert!(params("patch").contains(&"header If-Match".to_string()));
    assert!(params("delete").contains(&"header If-Match".to_string()));
    assert!(op("get")["responses"]["304"].is_object());
    assert!(op("get")["responses"]["200"]["headers"]["etag"].is_object());
    assert!(op("patch")["responses"]["200"]["headers"]["etag"].is_object());
    assert!(op("patch")["responses"]["412"].is_object());
    assert!(op("delete")["responses"]["412"].is_object());
}

#[tokio::test]
async fn the_interactive_docs_are_served_from_the_binary() {
    let app = spawn_app().await;
    let r = app.get("/docs/").await;
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    // Every script and stylesheet the page loads is local: nothing from a CDN.
    for (attr, quote) in [("src=", '"'), ("href=", '"')] {
        for part in html.split(attr).skip(1) {
            let target = part.trim_start_matches(quote).split(quote).next().unwrap();
            assert!(
                !target.starts_with("http"),
                "docs page loads {target} from the network"
            );
            let url = if target.starts_with('/') {
                app.url(target)
            } else {
                app.url(&format!("/docs/{}", target.trim_start_matches("./")))
            };
            let r = app.client.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200, "{url}");
        }
    }
    let init = app
        .get("/docs/swagger-initializer.js")
        .await
        .text()
        .await
        .unwrap();
    assert!(init.contains("/openapi.json"), "{init}");
}

/// With `AUTH_MODE=jwt` the document declares the bearer scheme, each data operation's scope and
/// the 401/403 answers; probes need no token. Without authentication it declares none.
#[tokio::test]
async fn the_document_declares_bearer_tokens_and_scopes_exactly_when_they_are_required() {
    let mut opts = crate::helpers::AppOptions::default();
    opts.env.insert("AUTH_MODE".into(), "jwt".into());
    opts.env.insert("AUTH_JWT_SECRET".into(), "x".repeat(32));
    let app = crate::helpers::spawn_app_with(opts).await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    assert_eq!(scheme["bearerFormat"], "JWT");
    let mut seen = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if !path.starts_with("/todos") {
                assert!(
                    op.get("security").is_none(),
                    "{method} {path} needs no token"
                );
                continue;
            }
            let scope = if method == "get" {
                "todos:read"
            } else {
                "todos:write"
            };
            assert_eq!(
                op["security"],
                serde_json::json!([{ "bearer": [scope] }]),
                "{method} {path}"
            );
            for status in ["401", "403"] {
                assert!(
                    op["responses"][status]["headers"]["www-authenticate"].is_object(),
                    "{method} {path} {status}"
                );
            }
            seen += 1;
        }
    }
    assert_eq!(seen, 6, "every data operation");
    let open = spawn_app().await;
    let doc: Value = open.get("/openapi.json").await.json().await.unwrap();
    assert!(
        doc["components"]["securitySchemes"].is_null(),
        "{}",
        doc["components"]
    );
    assert!(doc["paths"]["/todos"]["get"]["security"].is_null());
}
