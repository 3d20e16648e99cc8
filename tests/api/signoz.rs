//! The `signoz/` folder: the alert rules have every field SigNoz's rule API requires (as read from
//! its validators: `ruletypes.PostableRule`, schema v2alpha1) and cover the alerts an operator
//! needs; the dashboard has the v4 dashboard shape SigNoz imports; both name only metrics and
//! attributes this service really emits; `signoz/provision.py` provisions both idempotently (run
//! twice against a fake SigNoz API); ClickHouse's `histogramQuantile` script computes Prometheus'
//! quantiles. No SigNoz runs here, so the API's shape comes from SigNoz's source and tests, not from
//! a live server.

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
    json_files("signoz/alerts")
}

fn dashboards() -> Vec<(String, Value)> {
    json_files("signoz/dashboards")
}

fn json_files(dir: &str) -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir);
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

/// The service's source, where every metric and span attribute it emits is named.
fn source() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut text = String::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                text.push_str(&std::fs::read_to_string(path).unwrap());
            }
        }
    }
    text
}

/// A metric a rule or panel queries must be one the service exports, or the panel stays empty
/// and the alert never fires.
fn assert_emitted(metric: &str, file: &str) {
    assert!(!metric.is_empty(), "{file}: metric name missing");
    let sdk_own = metric.starts_with("otel.sdk.");
    assert!(
        sdk_own || source().contains(&format!("\"{metric}\"")),
        "{file}: metric {metric} is not emitted by the service"
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
                let agg = &spec["aggregations"][0];
                if spec["signal"] == "metrics" {
                    // Metric aggregations name the metric and how to fold it over time and series.
                    let metric = agg["metricName"].as_str().unwrap_or_default();
                    assert_emitted(metric, file);
                    one_of(
                        &agg["timeAggregation"],
                        &[
                            "latest", "sum", "avg", "min", "max", "count", "rate", "increase",
                        ],
                        "timeAggregation",
                        file,
                    );
                    one_of(
                        &agg["spaceAggregation"],
                        &["sum", "avg", "min", "max", "count"],
                        "spaceAggregation",
                        file,
                    );
                } else {
                    assert!(agg["expression"].is_string(), "{file}: aggregation");
                }
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
    assert!(
        find(&|r| text(r).contains("todo.db.dns.lookups")
            && r["condition"]["thresholds"]["spec"][0]["op"] == "above"
            && r["condition"]["thresholds"]["spec"][0]["target"] == 1)
        .is_some(),
        "DNS resolutions > 1"
    );
    assert!(
        find(&|r| text(r).contains("http.response.status_code = 401")).is_some(),
        "a burst of authentication failures"
    );
}

#[test]
fn the_dashboard_has_signozs_v4_shape_and_queries_what_the_service_emits() {
    let dashboards = dashboards();
    assert_eq!(dashboards.len(), 1);
    let source = source();
    for (file, d) in &dashboards {
        let file = file.as_str();
        assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "{file}");
        assert_eq!(d["version"], "v4", "{file}");
        for key in ["description", "tags", "variables"] {
            assert!(!d[key].is_null(), "{file}: {key}");
        }
        let widgets = d["widgets"].as_array().expect("widgets");
        let layout = d["layout"].as_array().expect("layout");
        let mut ids = std::collections::HashSet::new();
        let mut titles = String::new();
        for w in widgets {
            let id = w["id"].as_str().expect("widget id");
            assert!(ids.insert(id), "{file}: duplicate widget id {id}");
            assert!(
                layout.iter().any(|l| l["i"] == id),
                "{file}: widget {id} has no layout cell"
            );
            assert_eq!(w["panelTypes"], "graph", "{file}");
            let title = w["title"].as_str().expect("title");
            titles.push_str(title);
            titles.push('\n');
            let q = &w["query"];
            assert_eq!(q["queryType"], "builder", "{file}: {title}");
            let data = q["builder"]["queryData"].as_array().expect("queryData");
            assert!(!data.is_empty(), "{file}: {title}");
            let names: Vec<&str> = data
                .iter()
                .map(|qd| qd["queryName"].as_str().expect("queryName"))
                .collect();
            for qd in data {
                one_of(
                    &qd["dataSource"],
                    &["traces", "metrics", "logs"],
                    "dataSource",
                    file,
                );
                assert_eq!(qd["expression"], qd["queryName"], "{file}: {title}");
                let filter = qd["filter"]["expression"].as_str().unwrap_or("");
                assert!(
                    filter.contains("service.name = 'todo-service'"),
                    "{file}: {title}: must filter on the service"
                );
                if qd["dataSource"] == "metrics" {
                    assert_emitted(qd["aggregateAttribute"]["key"].as_str().unwrap(), file);
                }
                for g in qd["groupBy"].as_array().expect("groupBy") {
                    let key = g["key"].as_str().unwrap();
                    assert!(
                        source.contains(key),
                        "{file}: {title}: groups by {key}, which the service never sets"
                    );
                }
            }
            for f in q["builder"]["queryFormulas"].as_array().expect("formulas") {
                let expr = f["expression"].as_str().unwrap();
                for token in expr.split(|c: char| !c.is_ascii_alphanumeric()) {
                    if token.chars().all(|c| c.is_ascii_uppercase()) && !token.is_empty() {
                        assert!(names.contains(&token), "{file}: {title}: {token}");
                    }
                }
            }
        }
        assert_eq!(layout.len(), widgets.len(), "{file}");
        // What the issue asks the dashboard to show.
        let titles = titles.to_lowercase();
        for needle in [
            "requests per second",
            "error rate",
            "latency",
            "pool",
            "breaker",
            "rejections",
            "db call latency",
        ] {
            assert!(titles.contains(needle), "{file}: no panel for {needle}");
        }
    }
}

/// Runs ClickHouse's `histogramQuantile` user script (the stack mounts it, no download) on rows in
/// ClickHouse's TabSeparated form.
fn histogram_quantile(rows: &str) -> Vec<String> {
    use std::io::Write as _;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("signoz/clickhouse/user_scripts/histogramQuantile");
    let mut child = std::process::Command::new(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the script is executable");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rows.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn histogram_quantile_interpolates_like_prometheus() {
    let rows = [
        // 100 observations: 10 ≤ 0.1, 50 ≤ 0.5, 90 ≤ 1. Median: rank 50 ends bucket (0.1, 0.5].
        ("[0.1,0.5,1,inf]\t[10,50,90,100]\t0.5", "0.5"),
        // Rank 30 is halfway through (0.1, 0.5]: 0.1 + 0.4 × 20/40.
        ("[0.1,0.5,1,inf]\t[10,50,90,100]\t0.3", "0.3"),
        // Buckets arrive unordered (groupArray): sorted first. Rank 9 ends bucket (0.5, 1].
        ("[1,inf,0.5]\t[9,10,5]\t0.9", "1"),
        // Rank in the +Inf bucket: the highest finite bound.
        ("[0.1,0.5,inf]\t[10,20,100]\t0.99", "0.5"),
        // No observations, no +Inf bucket, q out of range.
        ("[0.1,inf]\t[0,0]\t0.5", "nan"),
        ("[0.1,0.5]\t[1,2]\t0.5", "nan"),
        ("[0.1,inf]\t[10,10]\t2", "inf"),
        ("[0.1,inf]\t[10,10]\t-1", "-inf"),
    ];
    let input: String = rows.iter().map(|(r, _)| format!("{r}\n")).collect();
    let got = histogram_quantile(&input);
    assert_eq!(got.len(), rows.len(), "{got:?}");
    for ((row, want), got) in rows.iter().zip(&got) {
        let same = match (want.parse::<f64>(), got.parse::<f64>()) {
            (Ok(w), Ok(g)) if w.is_finite() => (w - g).abs() < 1e-9,
            _ => want == got,
        };
        assert!(same, "{row}: want {want}, got {got}");
    }
}

/// A stand-in for SigNoz's rule and dashboard APIs, as its source and tests describe them.
#[derive(Clone, Default)]
struct FakeSignoz {
    rules: Arc<Mutex<BTreeMap<u64, Value>>>,
    posts: Arc<Mutex<usize>>,
    puts: Arc<Mutex<usize>>,
    dashboards: Arc<Mutex<BTreeMap<String, Value>>>,
}

async fn list_dashboards(State(s): State<FakeSignoz>, h: HeaderMap) -> (StatusCode, Json<Value>) {
    if !authorised(&h) {
        return (StatusCode::UNAUTHORIZED, Json(json!({"status": "error"})));
    }
    let items: Vec<Value> = s
        .dashboards
        .lock()
        .unwrap()
        .iter()
        .map(|(id, d)| json!({"id": id, "data": d}))
        .collect();
    (
        StatusCode::OK,
        Json(json!({"status": "success", "data": items})),
    )
}

/// Like SigNoz's: a POST keeps only the title (and version); the rest needs a PUT.
async fn create_dashboard(
    State(s): State<FakeSignoz>,
    h: HeaderMap,
    Json(d): Json<Value>,
) -> (StatusCode, Json<Value>) {
    if !authorised(&h) {
        return (StatusCode::UNAUTHORIZED, Json(json!({"status": "error"})));
    }
    let mut dashboards = s.dashboards.lock().unwrap();
    let id = format!("dash-{}", dashboards.len() + 1);
    let kept = json!({"title": d["title"], "version": d["version"]});
    dashboards.insert(id.clone(), kept.clone());
    (
        StatusCode::CREATED,
        Json(json!({"status": "success", "data": {"id": id, "data": kept}})),
    )
}

async fn update_dashboard(
    State(s): State<FakeSignoz>,
    h: HeaderMap,
    Path(id): Path<String>,
    Json(d): Json<Value>,
) -> StatusCode {
    if !authorised(&h) {
        return StatusCode::UNAUTHORIZED;
    }
    match s.dashboards.lock().unwrap().get_mut(&id) {
        Some(existing) => {
            *existing = d;
            StatusCode::OK
        }
        None => StatusCode::NOT_FOUND,
    }
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
async fn provisioning_creates_rules_and_dashboard_once_and_updates_them_on_rerun() {
    let fake = FakeSignoz::default();
    let app = Router::new()
        .route(
            "/api/v1/health",
            get(|| async { Json(json!({"status": "ok"})) }),
        )
        .route("/api/v1/rules", get(list).post(create))
        .route("/api/v1/rules/{id}", put(update))
        .route(
            "/api/v1/dashboards",
            get(list_dashboards).post(create_dashboard),
        )
        .route("/api/v1/dashboards/{id}", put(update_dashboard))
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
    assert_eq!(out.matches("created:").count(), expected + 1, "{out}");
    assert_eq!(fake.rules.lock().unwrap().len(), expected);
    let full = &dashboards()[0].1;
    let stored = fake.dashboards.lock().unwrap().clone();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored.values().next().unwrap(),
        full,
        "the dashboard is stored in full, not just what POST keeps"
    );

    let second = run("test-key").await.unwrap();
    let out = String::from_utf8_lossy(&second.stdout).into_owned();
    assert!(second.status.success(), "{out}");
    assert_eq!(out.matches("updated:").count(), expected + 1, "{out}");
    assert_eq!(fake.dashboards.lock().unwrap().len(), 1, "{out}");
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
