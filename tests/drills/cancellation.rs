//! Drill 11: requests cancelled half-way never cost a write. A fault proxy holds Postgres' traffic
//! at each await point of each write path, the request is cancelled there (the client hangs up,
//! or `REQUEST_TIMEOUT` fires), and the drill checks that the service threw that connection away,
//! that no session is left inside a transaction, that the cancelled write happened whole or not
//! at all, and that every write acknowledged afterwards is visible to other connections and
//! survives the service's restart. Drills 11d and 11e do the same through a PgBouncer that carries
//! prepared statements (`DB_POOLER_MODE=transaction-prepared`), where no per-call transaction
//! wraps a write.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sqlx::PgConnection;

use super::{
    fault_proxy::{Direction, FaultProxy},
    helpers::{AppOptions, TestApp, server_addr, spawn_app_with},
    pgbouncer_harness::PgBouncer,
    serial,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    Post,
    KeyedPost,
    Patch,
    Delete,
}

/// An await point: the request, and the protocol message at which traffic is held.
struct Point {
    write: Write,
    what: &'static str,
    direction: Direction,
    pattern: &'static [u8],
}

const fn point(
    write: Write,
    what: &'static str,
    direction: Direction,
    pattern: &'static [u8],
) -> Point {
    Point {
        write,
        what,
        direction,
        pattern,
    }
}

/// Every await point of every write path. A `CommandComplete` tag held on its way back means
/// "the statement ran, its answer has not arrived"; a statement held on its way out means "it
/// never reached the server".
const POINTS: &[Point] = &[
    point(
        Write::Post,
        "INSERT ran",
        Direction::ToClient,
        b"INSERT 0 1\0",
    ),
    point(
        Write::KeyedPost,
        "BEGIN ran",
        Direction::ToClient,
        b"BEGIN\0",
    ),
    point(
        Write::KeyedPost,
        "expired-key DELETE ran",
        Direction::ToClient,
        b"DELETE 0\0",
    ),
    point(
        Write::KeyedPost,
        "key claim ran",
        Direction::ToClient,
        b"INSERT 0 1\0",
    ),
    point(
        Write::KeyedPost,
        "todo INSERT ran",
        Direction::ToClient,
        b"UPDATE 1\0",
    ),
    point(
        Write::KeyedPost,
        "COMMIT not yet sent on",
        Direction::ToServer,
        b"COMMIT\0",
    ),
    point(
        Write::KeyedPost,
        "COMMIT ran",
        Direction::ToClient,
        b"COMMIT\0",
    ),
    point(
        Write::Patch,
        "UPDATE ran",
        Direction::ToClient,
        b"UPDATE 1\0",
    ),
    point(
        Write::Delete,
        "DELETE ran",
        Direction::ToClient,
        b"DELETE 1\0",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cancel {
    ClientGone,
    RequestTimeout,
}

/// Where the service's connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    /// Through a PgBouncer that carries prepared statements, two server connections.
    PgBouncer,
}

impl Route {
    /// The pooler, when there is one, and the address the service's connections go to.
    async fn start(self) -> (Option<PgBouncer>, std::net::SocketAddr) {
        match self {
            Route::Direct => (None, server_addr()),
            Route::PgBouncer => {
                let bouncer =
                    tokio::task::spawn_blocking(|| PgBouncer::start_prepared(server_addr(), 2))
                        .await
                        .unwrap();
                let addr = ([127, 0, 0, 1], bouncer.port).into();
                (Some(bouncer), addr)
            }
        }
    }

    /// `opts` for an app whose connections take this route, `via` (a proxy) standing in for its
    /// first hop when given.
    fn app(self, mut opts: AppOptions, via: std::net::SocketAddr) -> AppOptions {
        opts.db_via = Some(("127.0.0.1".into(), via.port()));
        if self == Route::PgBouncer {
            opts.env
                .insert("DB_POOLER_MODE".into(), "transaction-prepared".into());
            opts.migration_direct = true;
        }
        opts
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_11a_a_client_that_hangs_up_mid_write_costs_nothing() {
    let _turn = serial().await;
    cancel_at_every_point(Cancel::ClientGone, Route::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_11b_a_request_timeout_mid_write_costs_nothing() {
    let _turn = serial().await;
    cancel_at_every_point(Cancel::RequestTimeout, Route::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_11d_through_pgbouncer_a_client_that_hangs_up_mid_write_costs_nothing() {
    let _turn = serial().await;
    cancel_at_every_point(Cancel::ClientGone, Route::PgBouncer).await;
}

async fn cancel_at_every_point(cancel: Cancel, route: Route) {
    let (_bouncer, upstream) = route.start().await;
    let proxy = FaultProxy::start(upstream).await;
    let mut env = HashMap::from([
        // One connection, so a connection left in a bad state would serve the next request.
        ("DB_POOL_MAX_SIZE".to_string(), "1".to_string()),
        ("RATE_LIMIT_PER_SECOND".into(), "0".into()),
    ]);
    if cancel == Cancel::RequestTimeout {
        env.insert("REQUEST_TIMEOUT".into(), "1s".into());
    }
    let app = spawn_app_with(route.app(
        AppOptions {
            env,
            ..AppOptions::default()
        },
        proxy.addr,
    ))
    .await;
    let mut direct = app.test_db.connect().await;
    // Every write the service acknowledged: todo id -> title it answered with (None: deleted).
    let mut acknowledged: BTreeMap<i64, Option<String>> = BTreeMap::new();
    let mut figures = Vec::new();

    for (n, p) in POINTS.iter().enumerate() {
        let label = format!("{:?} / {} / {cancel:?} / {route:?}", p.write, p.what);
        let title = format!("cancelled {n}");
        let key = format!("key-{n}");
        let (method, path, body) = match p.write {
            Write::Post | Write::KeyedPost => {
                ("POST", "/todos".to_string(), json!({"title": title}))
            }
            Write::Patch | Write::Delete => {
                let target = app.create(json!({"title": format!("target {n}")})).await;
                let id = target["id"].as_i64().unwrap();
                acknowledged.insert(id, Some(format!("target {n}")));
                let path = format!("/todos/{id}");
                let body = json!({"title": title, "completed": true});
                (
                    if p.write == Write::Patch {
                        "PATCH"
                    } else {
                        "DELETE"
                    },
                    path,
                    body,
                )
            }
        };
        proxy.hold_at(p.direction, p.pattern);
        let mut request = app
            .client
            .request(method.parse().unwrap(), app.url(&path))
            .json(&body);
        if p.write == Write::KeyedPost {
            request = request.header("Idempotency-Key", &key);
        }
        let sent = Instant::now();
        let in_flight = tokio::spawn(request.send());
        assert!(
            proxy.wait_holding(Duration::from_secs(5)).await,
            "{label}: the request never reached the await point"
        );
        match cancel {
            // Dropping the client's future closes its connection.
            Cancel::ClientGone => in_flight.abort(),
            Cancel::RequestTimeout => {
                let r = in_flight.await.unwrap().expect("an answer");
                assert_eq!(r.status(), 504, "{label}");
            }
        }
        let closed = proxy
            .wait_held_connection_closed(Duration::from_secs(3))
            .await;
        let cancelled_after = sent.elapsed();
        proxy.release();
        assert!(
            closed,
            "{label}: the service kept a connection whose call was cancelled mid-way"
        );
        let settled = no_session_in_transaction(&mut direct, &app, Duration::from_secs(3)).await;
        assert!(
            settled.is_some(),
            "{label}: a session stayed idle in transaction"
        );

        // The cancelled write happened whole or not at all.
        match p.write {
            Write::Post => {}
            Write::KeyedPost => {
                let (todos, answered_keys, keys): (i64, i64, i64) = sqlx::query_as(
                    "SELECT (SELECT count(*) FROM todos WHERE title = $1), \
                            (SELECT count(*) FROM idempotency_keys WHERE key = $2 AND response IS NOT NULL), \
                            (SELECT count(*) FROM idempotency_keys WHERE key = $2)",
                )
                .bind(&title)
                .bind(&key)
                .fetch_one(&mut direct)
                .await
                .unwrap();
                assert!(
                    todos <= 1 && todos == answered_keys && keys == answered_keys,
                    "{label}: half a keyed create: {todos} todos, {keys} keys ({answered_keys} answered)"
                );
                // And the client's retry with the same key creates exactly one todo.
                let r = app
                    .client
                    .post(app.url("/todos"))
                    .header("Idempotency-Key", &key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201, "{label}: retry with the same key");
                let todo: Value = r.json().await.unwrap();
                acknowledged.insert(todo["id"].as_i64().unwrap(), Some(title.clone()));
                assert_eq!(count_titled(&mut direct, &title).await, 1, "{label}");
            }
            Write::Patch => {
                let id: i64 = path.rsplit('/').next().unwrap().parse().unwrap();
                let (t, completed): (String, bool) =
                    sqlx::query_as("SELECT title, completed FROM todos WHERE id = $1")
                        .bind(id)
                        .fetch_one(&mut direct)
                        .await
                        .unwrap();
                assert!(
                    (t == title && completed) || (t == format!("target {n}") && !completed),
                    "{label}: half a PATCH: {t:?}, completed {completed}"
                );
                acknowledged.remove(&id);
            }
            Write::Delete => {
                let id: i64 = path.rsplit('/').next().unwrap().parse().unwrap();
                acknowledged.remove(&id);
            }
        }

        // The next acknowledged write is committed: another connection sees it at once.
        let next = app.create(json!({"title": format!("after {n}")})).await;
        let id = next["id"].as_i64().unwrap();
        let seen: Option<String> = sqlx::query_scalar("SELECT title FROM todos WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut direct)
            .await
            .unwrap();
        assert_eq!(
            seen.as_deref(),
            Some(format!("after {n}").as_str()),
            "{label}: an acknowledged write is invisible to other connections"
        );
        acknowledged.insert(id, Some(format!("after {n}")));
        figures.push(format!(
            "{label}: discarded after {cancelled_after:?}, settled in {:?}",
            settled.unwrap()
        ));
    }
    for f in &figures {
        eprintln!("{f}");
    }

    // Every acknowledged write survives the service's restart (a leaked transaction would be
    // rolled back when its connection closes).
    let test_db = std::sync::Arc::clone(&app.test_db);
    app.stop().await.unwrap();
    let mut after_restart = test_db.connect().await;
    for (id, title) in &acknowledged {
        let seen: Option<String> = sqlx::query_scalar("SELECT title FROM todos WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut after_restart)
            .await
            .unwrap();
        assert_eq!(
            seen.as_ref(),
            title.as_ref(),
            "todo {id} after the service stopped"
        );
    }
}

async fn count_titled(conn: &mut PgConnection, title: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM todos WHERE title = $1")
        .bind(title)
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Waits until no session on the app's database is inside a transaction; how long that took.
async fn no_session_in_transaction(
    conn: &mut PgConnection,
    app: &TestApp,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'",
        )
        .bind(&app.test_db.name)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        if open == 0 {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What one stress write's client saw.
enum Seen {
    /// 201 with this id.
    Acknowledged(i64),
    /// An error answer: nothing may have been written.
    Refused(u16),
    /// The client gave up first (its timeout): written whole or not at all.
    Abandoned,
}

/// Drill 11c: writers with very short client timeouts (1-60 ms) under concurrent load, keyed and
/// unkeyed. Afterwards, and after the service stopped: every acknowledged write is in the table
/// with the acknowledged id and content; nothing exists that was never acknowledged except
/// writes whose client went away, each at most once; and retrying an abandoned keyed write with
/// its key yields exactly one todo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_11c_writers_that_give_up_early_lose_nothing_and_invent_nothing() {
    let _turn = serial().await;
    writers_that_give_up_early(Route::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_11e_through_pgbouncer_writers_that_give_up_early_lose_nothing() {
    let _turn = serial().await;
    writers_that_give_up_early(Route::PgBouncer).await;
}

async fn writers_that_give_up_early(route: Route) {
    let (_bouncer, upstream) = route.start().await;
    let app = spawn_app_with(route.app(
        AppOptions {
            env: HashMap::from([
                ("DB_POOL_MAX_SIZE".to_string(), "4".to_string()),
                ("RATE_LIMIT_PER_SECOND".into(), "0".into()),
            ]),
            ..AppOptions::default()
        },
        upstream,
    ))
    .await;
    const WRITERS: usize = 16;
    let run_for = Duration::from_secs(3);
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let url = app.url("/todos");
            tokio::spawn(async move {
                let client = crate::helpers::http_client().no_proxy().build().unwrap();
                let mut seen = Vec::new();
                let mut n: u64 = 0;
                while started.elapsed() < run_for {
                    n += 1;
                    // A cheap, well-spread pseudo-random timeout per request.
                    let mix = (n.wrapping_mul(2_654_435_761) ^ (w as u64 * 40_503)) % 60;
                    let keyed = n.is_multiple_of(2);
                    let title = format!("s{w}-{n}");
                    let mut request = client
                        .post(&url)
                        .timeout(Duration::from_millis(1 + mix))
                        .json(&json!({"title": title}));
                    if keyed {
                        request = request.header("Idempotency-Key", format!("k-{title}"));
                    }
                    let outcome = match request.send().await {
                        Ok(r) if r.status() == 201 => match r.json::<Value>().await {
                            Ok(v) => Seen::Acknowledged(v["id"].as_i64().unwrap()),
                            Err(_) => Seen::Abandoned,
                        },
                        Ok(r) => Seen::Refused(r.status().as_u16()),
                        Err(_) => Seen::Abandoned,
                    };
                    seen.push((title, keyed, outcome));
                }
                seen
            })
        })
        .collect();
    let mut seen = Vec::new();
    for w in writers {
        seen.extend(w.await.unwrap());
    }

    // Retry every abandoned keyed write with its key, as a client would.
    let mut retried = 0;
    for (title, keyed, outcome) in &mut seen {
        if *keyed && matches!(outcome, Seen::Abandoned) {
            let r = app
                .client
                .post(app.url("/todos"))
                .header("Idempotency-Key", format!("k-{title}"))
                .json(&json!({"title": title}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201, "retry of {title}");
            let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
            *outcome = Seen::Acknowledged(id);
            retried += 1;
        }
    }
    let test_db = std::sync::Arc::clone(&app.test_db);
    let mut direct = test_db.connect().await;
    assert!(
        no_session_in_transaction(&mut direct, &app, Duration::from_secs(3))
            .await
            .is_some(),
        "a session stayed idle in transaction"
    );
    app.stop().await.unwrap();

    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, title FROM todos")
        .fetch_all(&mut direct)
        .await
        .unwrap();
    let mut by_title: HashMap<&str, Vec<i64>> = HashMap::new();
    for (id, title) in &rows {
        by_title.entry(title.as_str()).or_default().push(*id);
    }
    let (mut acked, mut refused, mut abandoned, mut abandoned_written) = (0, 0, 0, 0);
    for (title, _, outcome) in &seen {
        let ids = by_title.remove(title.as_str()).unwrap_or_default();
        match outcome {
            Seen::Acknowledged(id) => {
                acked += 1;
                assert_eq!(ids, [*id], "{title}: acknowledged as {id}");
            }
            Seen::Refused(status) => {
                refused += 1;
                assert!(
                    ids.is_empty(),
                    "{title}: answered {status}, yet written as {ids:?}"
                );
            }
            Seen::Abandoned => {
                abandoned += 1;
                abandoned_written += ids.len();
                assert!(ids.len() <= 1, "{title}: written {} times", ids.len());
            }
        }
    }
    assert!(
        by_title.is_empty(),
        "rows nobody asked for: {:?}",
        by_title.keys().take(5).collect::<Vec<_>>()
    );
    eprintln!(
        "{route:?}: {} writes in {run_for:?} by {WRITERS} writers: {acked} acknowledged ({retried} of them \
         by a keyed retry), {abandoned} abandoned ({abandoned_written} of those written), \
         {refused} refused",
        seen.len()
    );
    assert!(
        abandoned + retried > 0,
        "the drill must abandon some writes mid-way"
    );
    assert!(acked > retried, "the drill must complete some writes");
}
