//! The alert rules in `signoz/alerts/` have every field SigNoz's rule API requires (as read from
//! its validators: `ruletypes.PostableRule`, schema v2alpha1), cover the alerts an operator needs,
//! and `signoz/provision.py` provisions them idempotently (run twice against a fake SigNoz API).
//! No SigNoz runs here, so the API's shape comes from SigNoz's source, not from a live server.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::{get, put},
};
use serde_json::{Value, json};

fn rules() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("signoz/alerts");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn one_of(v: &Value, allowed: &[&str], what: &str, file: &str) {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("{file}: {what} missing"));
    assert!(
        allowed.contains(&s),
        "{file}: {what} {s:?} not in {allowed:?}"
    );
}

#[test]
fn every_alert_rule_has_what_signozs_rule_api_requires() {
    let rules = rules();
    assert!(rules.len() >= 7, "{} rules", rules.len());
    let mut names = std::collections::HashSet::new();
    for (file, r) in &rules {
        let file = file.as_str();
        let alert = r["alert"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: alert"));
        assert!(
            names.insert(alert.to_owned()),
            "{file}: duplicate alert name (provisioning matches on it)"
        );
        one_of(
            &r["alertType"],
            &[
                "METRIC_BASED_ALERT",
                "TRACES_BASED_ALERT",
                "LOGS_BASED_ALERT",
                "EXCEPTIONS_BASED_ALERT",
            ],
            "alertType",
            file,
        );
        one_of(
            &r["ruleType"],
            &["threshold_rule", "promql_rule", "anomaly_rule"],
            "ruleType",
            file,
        );
        assert_eq!(r["version"], "v5", "{file}: version must be v5");
        assert_eq!(r["schemaVersion"], "v2alpha1", "{file}");
        let c = &r["condition"];
        let cq = &c["compositeQuery"];
        one_of(
            &cq["queryType"],
            &["builder", "clickhouse_sql", "promql"],
            "queryType",
            file,
        );
        let queries = cq["queries"]
            .as_array()
            .unwrap_or_else(|| panic!("{file}: queries"));
        assert!(!queries.is_empty(), "{file}");
        let mut query_names = Vec::new();
        for q in queries {
            one_of(
                &q["type"],
                &["builder_query", "builder_formula"],
                "query type",
                file,
            );
            let spec = &q["spec"];
            query_names.push(
                spec["name"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{file}: query name"))
                    .to_owned(),
            );
            if q["type"] == "builder_query" {
                one_of(
                    &spec["signal"],
                    &["traces", "metrics", "logs"],
                    "signal",
                    file,
                );
                assert!(
                    spec["aggregations"][0]["expression"].is_string(),
                    "{file}: aggregation"
                );
                let filter = spec["filter"]["expression"].as_str().unwrap_or("");
                assert!(
                    filter.contains("service.name = 'todo-service'"),
                    "{file}: must filter on the service: {filter}"
                );
            } else {
                assert!(spec["expression"].is_string(), "{file}: formula expression");
            }
        }
        let selected = c["selectedQueryName"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: selectedQueryName"));
        assert!(
            query_names.iter().any(|n| n == selected),
            "{file}: selectedQueryName {selected} names no query"
        );
        assert_eq!(c["thresholds"]["kind"], "basic", "{file}");
        let thresholds = c["thresholds"]["spec"]
            .as_array()
            .unwrap_or_else(|| panic!("{file}: thresholds"));
        assert!(!thresholds.is_empty(), "{file}");
        for t in thresholds {
            assert!(t["name"].is_string(), "{file}: threshold name");
            one_of(
                &t["op"],
                &[
                    "above",
                    "below",
                    "equal",
                    "not_equal",
                    "above_or_equal",
                    "below_or_equal",
                    "outside_bounds",
                ],
                "op",
                file,
            );
            one_of(
                &t["matchType"],
                &[
                    "at_least_once",
                    "all_the_times",
                    "on_average",
                    "in_total",
                    "last",
                ],
                "matchType",
                file,
            );
            assert!(t["target"].is_number(), "{file}: target");
            // Channels named in a rule must already exist in SigNoz; routing is left to policies.
            assert_eq!(t["channels"], json!([]), "{file}: channels");
        }
        if c.get("absentFor").is_some() {
            assert_eq!(
                c["alertOnAbsent"], true,
                "{file}: absentFor without alertOnAbsent"
            );
            assert!(
                c["absentFor"].is_u64(),
                "{file}: absentFor is whole minutes"
            );
        }
        assert_eq!(r["evaluation"]["kind"], "rolling", "{file}");
        for key in ["evalWindow", "frequency"] {
            let d = r["evaluation"]["spec"][key]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: {key}"));
            assert!(humantime::parse_duration(d).is_ok(), "{file}: {key}={d}");
        }
        assert!(
            r["notificationSettings"].is_object(),
            "{file}: notificationSettings"
        );
        one_of(
            &r["labels"]["severity"],
            &["critical", "warning", "info"],
            "severity",
            file,
        );
        for key in ["summary", "description", "runbook"] {
            assert!(
                r["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{file}: annotation {key}"
            );
        }
    }
}

#[test]
fn the_alerts_cover_the_post_mortem_and_the_operators_needs() {
    let rules = rules();
    let find =
        |pred: &dyn Fn(&Value) -> bool| rules.iter().find(|(_, r)| pred(r)).map(|(f, _)| f.clone());
    // The post-mortem's two: silence must fire (on absence, not a threshold) and near-total failure.
    let silence =
        find(&|r| r["condition"]["alertOnAbsent"] == true && r["condition"]["absentFor"] == 2);
    assert!(
        silence.is_some(),
        "no-traces-for-2-minutes must fire on absence"
    );
    let formula_above = |target: f64, window: &str| {
        find(&|r| {
            r["condition"]["selectedQueryName"] == "F1"
                && r["condition"]["thresholds"]["spec"][0]["target"].as_f64() == Some(target)
                && r["evaluation"]["spec"]["evalWindow"] == window
        })
    };
    assert!(
        formula_above(95.0, "1m").is_some(),
        "error rate > 95% over 1 minute"
    );
    assert!(
        formula_above(5.0, "5m").is_some(),
        "error rate > 5% over 5 minutes"
    );
    let text = |r: &Value| r.to_string();
    assert!(
        find(&|r| text(r).contains("p99(duration_nano)")).is_some(),
        "p99 latency"
    );
    assert!(
        find(&|r| text(r).contains("IN (429, 503)")).is_some(),
        "sustained 503/429"
    );
    assert!(
        find(&|r| text(r).contains("todo.rejected_by = 'circuit_breaker'")).is_some(),
        "breaker open"
    );
    assert!(
        find(&|r| text(r).contains("db.client.connection.wait_time_ms")).is_some(),
        "pool waiters"
    );
}

/// A stand-in for SigNoz's rule API, as its source describes it.
#[derive(Clone, Default)]
struct FakeSignoz {
    rules: Arc<Mutex<BTreeMap<u64, Value>>>,
    posts: Arc<Mutex<usize>>,
    puts: Arc<Mutex<usize>>,
}

fn authorised(h: &HeaderMap) -> bool {
    h.get("signoz-api-key").is_some_and(|v| v == "test-key")
}

async fn list(State(s): State<FakeSignoz>, h: HeaderMap) -> (StatusCode, Json<Value>) {
    if !authorised(&h) {
        return (StatusCode::UNAUTHORIZED, Json(json!({"status": "error"})));
    }
    let rules: Vec<Value> = s
        .rules
        .lock()
        .unwrap()
        .iter()
        .map(|(id, r)| json!({"id": id.to_string(), "alert": r["alert"], "state": "inactive"}))
        .collect();
    (
        StatusCode::OK,
        Json(json!({"status": "success", "data": {"rules": rules}})),
    )
}

async fn create(
    State(s): State<FakeSignoz>,
    h: HeaderMap,
    Json(rule): Json<Value>,
) -> (StatusCode, Json<Value>) {
    if !authorised(&h) {
        return (StatusCode::UNAUTHORIZED, Json(json!({"status": "error"})));
    }
    let mut rules = s.rules.lock().unwrap();
    let id = rules.len() as u64 + 1;
    rules.insert(id, rule);
    *s.posts.lock().unwrap() += 1;
    (
        StatusCode::OK,
        Json(json!({"status": "success", "data": {"id": id.to_string()}})),
    )
}

async fn update(
    State(s): State<FakeSignoz>,
    h: HeaderMap,
    Path(id): Path<u64>,
    Json(rule): Json<Value>,
) -> StatusCode {
    if !authorised(&h) {
        return StatusCode::UNAUTHORIZED;
    }
    match s.rules.lock().unwrap().get_mut(&id) {
        Some(r) => {
            *r = rule;
            *s.puts.lock().unwrap() += 1;
            StatusCode::NO_CONTENT
        }
        None => StatusCode::NOT_FOUND,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_creates_the_rules_once_and_updates_them_on_rerun() {
    let fake = FakeSignoz::default();
    let app = Router::new()
        .route(
            "/api/v1/health",
            get(|| async { Json(json!({"status": "ok"})) }),
        )
        .route("/api/v1/rules", get(list).post(create))
        .route("/api/v1/rules/{id}", put(update))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("signoz/provision.py");
    let expected = rules().len();

    let run = |key: &'static str| {
        let script = script.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .arg(script)
                .env("SIGNOZ_URL", format!("http://{addr}"))
                .env("SIGNOZ_API_KEY", key)
                .env("SIGNOZ_WAIT", "10")
                .output()
                .expect("python3 runs")
        })
    };
    let first = run("test-key").await.unwrap();
    let out = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(
        first.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(out.matches("created:").count(), expected, "{out}");
    assert_eq!(fake.rules.lock().unwrap().len(), expected);

    let second = run("test-key").await.unwrap();
    let out = String::from_utf8_lossy(&second.stdout).into_owned();
    assert!(second.status.success(), "{out}");
    assert_eq!(out.matches("updated:").count(), expected, "{out}");
    assert_eq!(
        fake.rules.lock().unwrap().len(),
        expected,
        "re-running must not duplicate"
    );
    assert_eq!(
        (*fake.posts.lock().unwrap(), *fake.puts.lock().unwrap()),
        (expected, expected)
    );

    let denied = run("wrong-key").await.unwrap();
    assert!(!denied.status.success(), "a rejected key must fail the run");
}
