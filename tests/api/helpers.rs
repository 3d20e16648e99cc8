//! The test harness: a fresh, uniquely named database per test and the app on port 0.
//!
//! `TEST_DATABASE_URL` names a PostgreSQL server the tests may create databases on;
//! `scripts/test.sh` starts a throwaway one and sets it. Each [`TestApp`] gets its own database,
//! dropped when the test ends (also when it fails, from `Drop`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Once,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{Connection, Executor, PgConnection};
use todo_service::{
    Application,
    config::{Config, PoolerMode},
    db::{
        Db,
        resolve::{LookupFuture, Resolver, SystemResolver},
    },
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use url::Url;

/// A reqwest client builder. reqwest is built without a TLS provider of its own (see
/// `todo_service::net::install_tls_provider`), so one is installed first.
pub fn http_client() -> reqwest::ClientBuilder {
    todo_service::net::install_tls_provider();
    reqwest::Client::builder()
}

/// Admin URL of the test server.
pub fn admin_url() -> Url {
    let raw = std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "TEST_DATABASE_URL is not set. Run the tests with `scripts/test.sh`, which starts a \
             throwaway PostgreSQL, or set TEST_DATABASE_URL to a server where you may CREATE DATABASE."
        )
    });
    Url::parse(&raw).expect("TEST_DATABASE_URL is a URL")
}

/// The server's address, for proxies and resolvers that must point at it.
pub fn server_addr() -> SocketAddr {
    let url = admin_url();
    let host = url.host_str().expect("TEST_DATABASE_URL has a host");
    let port = url.port().unwrap_or(5432);
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .expect("TEST_DATABASE_URL host resolves")
        .next()
        .expect("an address")
}

fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Silent unless TEST_LOG is set, so test output stays readable.
        if let Ok(level) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(level)
                .with_test_writer()
                .try_init();
        }
    });
}

/// A database created for one test and dropped after it.
pub struct TestDb {
    pub name: String,
    /// The server's admin URL (the shared test server's unless a test started its own).
    pub admin: Url,
}

impl TestDb {
    pub async fn create() -> TestDb {
        TestDb::create_on(admin_url()).await
    }

    pub async fn create_on(admin_url: Url) -> TestDb {
        let name = format!("todo_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(admin_url.as_str())
            .await
            .expect("connect to the test server");
        admin
            .execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .await
            .expect("create test database");
        TestDb {
            name,
            admin: admin_url,
        }
    }

    /// URL of this database on the test server.
    pub fn url(&self) -> Url {
        let mut url = self.admin.clone();
        url.set_path(&self.name);
        url
    }

    /// `ALTER DATABASE … SET setting = 'value ms'`: what every later session on it starts with.
    pub async fn set(&self, setting: &str, value: Duration) {
        let mut admin = PgConnection::connect(self.admin.as_str())
            .await
            .expect("connect to the test server");
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                r#"ALTER DATABASE "{}" SET {setting} = '{}ms'"#,
                self.name,
                value.as_millis()
            )))
            .await
            .expect("set the test database's setting");
    }

    /// A direct connection, for arranging and inspecting state behind the API's back.
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(self.url().as_str())
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin_url = self.admin.clone();
        // Drop runs outside async context (possibly during a panic), so use a private runtime on
        // its own thread. FORCE ends the app's pooled connections.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(admin_url.as_str()).await {
                    let _ = admin
                        .execute(sqlx::AssertSqlSafe(format!(
                            r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#
                        )))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Answers every lookup with the test server's IP and counts the calls.
#[derive(Default)]
pub struct CountingResolver {
    pub calls: AtomicUsize,
}

impl Resolver for CountingResolver {
    fn lookup<'a>(&'a self, _host: &'a str, port: u16) -> LookupFuture<'a> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let ip = server_addr().ip();
        Box::pin(async move { Ok(vec![SocketAddr::new(ip, port)]) })
    }
}

/// A running app on 127.0.0.1:0 with its own database.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The admin listener (`ADMIN_LISTEN_ADDR`), unless a test turned it off.
    pub admin_addr: Option<SocketAddr>,
    pub client: reqwest::Client,
    pub db: Db,
    pub test_db: Arc<TestDb>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Options for [`spawn_app_with`].
pub struct AppOptions {
    /// Environment for `Config::from_lookup`; DATABASE_URL and LISTEN_ADDR are filled in.
    pub env: HashMap<String, String>,
    pub resolver: Arc<dyn Resolver>,
    /// Reach this test's own database through another host and port (a proxy, a name the test
    /// resolver answers for).
    pub db_via: Option<(String, u16)>,
    /// Wait until `/ready` says 200 before returning.
    pub wait_ready: bool,
    /// Create the test database on this server (its admin URL) instead of the shared one.
    pub db_server: Option<Url>,
    /// Replaces the query of the app's `DATABASE_URL` (TLS settings).
    pub db_query: Option<String>,
    /// Set `DATABASE_MIGRATION_URL` to the test database on its server directly (when
    /// `DATABASE_URL` goes through a pooler).
    pub migration_direct: bool,
    /// Serve this database (arranged by the test) instead of a fresh one.
    pub db: Option<Arc<TestDb>>,
    /// With `DB_POOLER_MODE=transaction-prepared`, leave the test database's settings alone
    /// instead of giving it the app's timeouts (which the app then requires of the pooler's
    /// server connections).
    pub leave_db_settings: bool,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            env: HashMap::new(),
            resolver: Arc::new(SystemResolver),
            db_via: None,
            wait_ready: true,
            db_server: None,
            db_query: None,
            migration_direct: false,
            leave_db_settings: false,
            db: None,
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

/// The PgBouncer every app should reach its database through, when the suite runs a second time
/// in front of one (`scripts/test.sh` sets `TEST_THROUGH_PGBOUNCER=host:port`, and
/// `TEST_THROUGH_PGBOUNCER_MODE` to the apps' `DB_POOLER_MODE`, `transaction-prepared` unless set).
pub fn suite_pooler() -> Option<(String, u16)> {
    let raw = std::env::var("TEST_THROUGH_PGBOUNCER").ok()?;
    let (host, port) = raw
        .rsplit_once(':')
        .expect("TEST_THROUGH_PGBOUNCER is host:port");
    Some((
        host.to_owned(),
        port.parse().expect("TEST_THROUGH_PGBOUNCER's port"),
    ))
}

pub async fn spawn_app_with(mut opts: AppOptions) -> TestApp {
    init_logging();
    // Under TEST_THROUGH_PGBOUNCER the apps of ordinary tests go through the pooler in
    // transaction mode, migrations straight to the server. Tests that choose the route themselves
    // (a fault proxy, a server of their own, TLS settings, a pooler mode) keep it.
    if let Some(pooler) = suite_pooler()
        && opts.db_via.is_none()
        && opts.db_server.is_none()
        && opts.db_query.is_none()
        && !opts.env.contains_key("DB_POOLER_MODE")
    {
        opts.db_via = Some(pooler);
        let mode = std::env::var("TEST_THROUGH_PGBOUNCER_MODE")
            .unwrap_or_else(|_| "transaction-prepared".into());
        opts.env.insert("DB_POOLER_MODE".into(), mode);
        opts.migration_direct = true;
    }
    let test_db = match (opts.db, opts.db_server) {
        (Some(db), _) => db,
        (None, Some(admin)) => Arc::new(TestDb::create_on(admin).await),
        (None, None) => Arc::new(TestDb::create().await),
    };
    let mut env = opts.env;
    let mut url = test_db.url();
    if let Some(query) = &opts.db_query {
        url.set_query(Some(query));
    }
    let url = match opts.db_via {
        Some((host, port)) => with_host(&url, &host, port),
        None => url.to_string(),
    };
    env.insert("DATABASE_URL".into(), url);
    if opts.migration_direct {
        env.insert("DATABASE_MIGRATION_URL".into(), test_db.url().to_string());
    }
    env.insert("LISTEN_ADDR".into(), "127.0.0.1:0".into());
    env.entry("ADMIN_LISTEN_ADDR".into())
        .or_insert("127.0.0.1:0".into());
    env.entry("SHUTDOWN_TIMEOUT".into()).or_insert("2s".into());
    let config = Config::from_lookup(|k| env.get(k).cloned()).expect("valid test config");
    if config.database.pooler_mode == PoolerMode::TransactionPrepared && !opts.leave_db_settings {
        // Where an operator keeps them for a pooler's server sessions (docs/scaling-out.md).
        for (setting, value) in [
            ("statement_timeout", config.database.statement_timeout),
            (
                "idle_in_transaction_session_timeout",
                config.database.idle_in_transaction_timeout,
            ),
        ] {
            test_db.set(setting, value).await;
        }
    }
    let app = Application::build_with_resolver(config, opts.resolver)
        .await
        .expect("app builds");
    let addr = app.local_addr();
    let admin_addr = app.admin_addr();
    let db = app.db().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    let client = http_client()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let app = TestApp {
        addr,
        admin_addr,
        client,
        db,
        test_db,
        shutdown: Some(tx),
        server: Some(server),
    };
    if opts.wait_ready {
        app.wait_until_ready(Duration::from_secs(15)).await;
    }
    app
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn wait_until_ready(&self, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if let Ok(r) = self.client.get(self.url("/ready")).send().await
                && r.status() == 200
            {
                return start.elapsed();
            }
            assert!(start.elapsed() < limit, "app not ready within {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET on the admin listener.
    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        let admin = self.admin_addr.expect("the admin listener is on");
        self.client
            .get(format!("http://{admin}{path}"))
            .send()
            .await
            .expect("GET on the admin listener")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("POST")
    }

    pub async fn patch_json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .patch(self.url(path))
            .json(body)
            .send()
            .await
            .expect("PATCH")
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client
            .delete(self.url(path))
            .send()
            .await
            .expect("DELETE")
    }

    /// GETs an absolute URL (e.g. a todo's `url`) and parses the JSON body.
    pub async fn get_json_at(&self, url: &str) -> serde_json::Value {
        let r = self.client.get(url).send().await.expect("GET");
        r.json().await.expect("JSON body")
    }

    /// Creates a todo through the API and returns its JSON.
    pub async fn create(&self, body: serde_json::Value) -> serde_json::Value {
        let r = self.post_json("/todos", &body).await;
        assert_eq!(r.status(), 201, "create {body}");
        r.json().await.unwrap()
    }

    /// Rows in `todos`, read directly from the database.
    pub async fn row_count(&self) -> i64 {
        let mut conn = self.test_db.connect().await;
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM todos")
            .fetch_one(&mut conn)
            .await
            .expect("count todos")
    }

    /// Every row as JSON text, for "nothing changed" comparisons.
    pub async fn snapshot(&self) -> String {
        let mut conn = self.test_db.connect().await;
        sqlx::query_scalar::<_, Option<String>>("SELECT json_agg(t ORDER BY id)::text FROM todos t")
            .fetch_one(&mut conn)
            .await
            .expect("snapshot")
            .unwrap_or_default()
    }

    /// Stops the server (graceful shutdown) and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.server.take() {
            Some(h) => h.await.expect("server task"),
            None => Ok(()),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
            h.abort();
        }
    }
}

/// Asserts a problem+json response and returns its body.
pub async fn assert_problem(r: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(r.status(), status, "status for expected {code}");
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(ct, "application/problem+json", "content type for {code}");
    let body: serde_json::Value = r.json().await.expect("problem body is JSON");
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(
        body["type"],
        format!("urn:todo-service:problem:{code}"),
        "{body}"
    );
    for key in ["title", "detail"] {
        assert!(
            body[key].as_str().is_some_and(|s| !s.is_empty()),
            "{key} missing in {body}"
        );
    }
    body
}

/// A TCP proxy in front of the test server that tests can open and cut, to make the database
/// unreachable without stopping the shared server.
pub struct TcpProxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    task: Option<JoinHandle<()>>,
    /// While set, bytes are held instead of forwarded and nothing is closed: a black hole, as
    /// when the peer vanished without a FIN (half-open TCP).
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl TcpProxy {
    /// A port with nothing listening yet (the proxy is not started).
    pub async fn reserve() -> TcpProxy {
        TcpProxy::reserve_for(server_addr()).await
    }

    /// The same, in front of another server.
    pub async fn reserve_for(upstream: SocketAddr) -> TcpProxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        TcpProxy {
            addr,
            upstream,
            task: None,
            frozen: Arc::default(),
        }
    }

    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Starts forwarding `self.addr` to the test server.
    pub async fn start(&mut self) {
        let listener = bind_retrying(self.addr).await;
        let upstream = self.upstream;
        let frozen = Arc::clone(&self.frozen);
        self.task = Some(tokio::spawn(async move {
            // A JoinSet aborts every forwarded connection when the proxy task is dropped, which
            // is what cutting the path means.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let frozen = Arc::clone(&frozen);
                conns.spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let (in_r, in_w) = inbound.into_split();
                        let (out_r, out_w) = outbound.into_split();
                        tokio::join!(
                            pump(in_r, out_w, Arc::clone(&frozen)),
                            pump(out_r, in_w, frozen)
                        );
                    }
                });
            }
        }));
    }
}

impl TcpProxy {
    /// Cuts the path: the listener closes (new connects are refused) and every forwarded
    /// connection is dropped, as when Postgres dies or the network between goes away.
    pub fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// One request's outcome in a [`Load`] run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When the request was sent, relative to the load's start.
    pub at: Duration,
    pub latency: Duration,
    /// `None`: no HTTP response at all (refused, reset, timed out).
    pub status: Option<u16>,
    pub retry_after: Option<String>,
    pub code: Option<String>,
}

/// Concurrent clients sending `GET path` in a loop until stopped, recording every outcome.
pub struct Load {
    pub start: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<JoinHandle<Vec<Outcome>>>,
}

impl Load {
    /// `url` is absolute, so the load can target a separately started process too.
    pub fn start(url: String, clients: usize) -> Load {
        let start = Instant::now();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                // Each client has its own connection pool, like separate users.
                let client = http_client()
                    .no_proxy()
                    .timeout(Duration::from_secs(15))
                    .build()
                    .unwrap();
                let url = url.clone();
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        let r = client.get(&url).send().await;
                        let latency = sent.elapsed();
                        let at = sent - start;
                        out.push(match r {
                            Ok(r) => {
                                let status = r.status().as_u16();
                                let retry_after = r
                                    .headers()
                                    .get("retry-after")
                                    .map(|v| v.to_str().unwrap_or("").to_owned());
                                let body: serde_json::Value = r.json().await.unwrap_or_default();
                                Outcome {
                                    at,
                                    latency,
                                    status: Some(status),
                                    retry_after,
                                    code: body["code"].as_str().map(str::to_owned),
                                }
                            }
                            Err(_) => Outcome {
                                at,
                                latency,
                                status: None,
                                retry_after: None,
                                code: None,
                            },
                        });
                        // A short pause keeps debug builds on two cores responsive.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    out
                })
            })
            .collect();
        Load { start, stop, tasks }
    }

    /// Runs for `duration`, then stops; every outcome.
    pub async fn run_for(self, duration: Duration) -> Vec<Outcome> {
        tokio::time::sleep(duration).await;
        self.finish().await.into_iter().flatten().collect()
    }

    /// Stops the clients and returns every outcome, sorted by send time, per client.
    pub async fn finish(self) -> Vec<Vec<Outcome>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.push(t.await.expect("load client"));
        }
        all
    }
}

/// Forwards one direction, holding data while `frozen`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn bind_retrying(addr: SocketAddr) -> TcpListener {
    let start = Instant::now();
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if start.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot bind proxy on {addr}: {e}"),
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A child process (the service binary) that is killed when dropped, so a test that fails before
/// shutting it down cannot leak a running service.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Already exited after a clean shutdown: kill fails harmlessly; wait reaps it either way.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `postgres://…@HOST:PORT/…` with host and port replaced.
fn with_host(url: &Url, host: &str, port: u16) -> String {
    let mut u = url.clone();
    u.set_host(Some(host)).unwrap();
    u.set_port(Some(port)).unwrap();
    u.to_string()
}

/// Parses the `rel="next"` URL out of a Link header.
pub fn next_link(r: &reqwest::Response) -> Option<String> {
    let link = r.headers().get("link")?.to_str().ok()?;
    let (url, rel) = link.split_once(';')?;
    (rel.trim() == r#"rel="next""#).then(|| url.trim().trim_matches(['<', '>']).to_owned())
}

/// A `RateLimit` or `RateLimit-Policy` field of `r`, decoded by an independent parser of
/// structured fields (RFC 9651, the `sfv` crate): each member's policy name and its integer
/// parameters. Panics when the field is missing or is not a list of such members.
pub fn ratelimit_field(
    r: &reqwest::Response,
    name: &str,
) -> Vec<(String, std::collections::BTreeMap<String, i64>)> {
    let text = r
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} field"));
    let list: sfv::List = sfv::Parser::new(text.as_bytes())
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {text:?} is not a structured list: {e}"));
    list.into_iter()
        .map(|member| {
            let sfv::ListEntry::Item(item) = member else {
                panic!("{name}: an inner list in {text:?}")
            };
            let policy = item.bare_item.as_string().expect("a quoted policy name");
            let params = item
                .params
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .as_integer()
                        .unwrap_or_else(|| panic!("{name}: {k} not an integer"));
                    (k.as_str().to_owned(), i64::from(v))
                })
                .collect();
            (policy.as_str().to_owned(), params)
        })
        .collect()
}
