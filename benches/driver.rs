//! The single-todo GET's query through two drivers, side by side: sqlx (what the service uses)
//! and tokio-postgres (what the calibration service used), to measure what the driver's
//! query path costs per query on this machine — evidence for the get-one gap in
//! loadtest/archive.md#driver-and-layers, not a test.
//!
//! Both run the very statement the service runs (read from loadtest/pgbench/get-one.sql, which a
//! unit test keeps identical to the service's), prepared once per connection, on 16 connections
//! shared exclusively by 64 tasks (as the service's pool of 16 serves oha's 64 clients), on a
//! two-worker Tokio runtime, rows decoded into the same Rust types. Printed per driver: queries
//! per second, this process's CPU per query and PostgreSQL's (all `postgres` processes).
//!
//! Run: `DATABASE_URL=postgres://…/todos cargo bench --bench driver` against a database the
//! service has migrated and `loadtest/run.sh` has seeded (ids 1..1000 at least).
//! `BENCH_SECONDS` (default 5) per run; drivers alternate for `BENCH_ROUNDS` (default 3) rounds.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use sqlx::{Connection as _, Row as _};
use tokio::sync::Mutex;

const CONNECTIONS: usize = 16;
const TASKS: usize = 64;
const IDS: i64 = 1000;

type Todo = (
    i64,
    String,
    bool,
    Option<i64>,
    i64,
    DateTime<Utc>,
    DateTime<Utc>,
);

/// A row into a [`Todo`]; a macro because the two drivers' row types share no trait.
macro_rules! decode {
    ($row:expr) => {{
        let todo: Todo = (
            $row.get(0),
            $row.get(1),
            $row.get(2),
            $row.get(3),
            $row.get(4),
            $row.get(5),
            $row.get(6),
        );
        todo
    }};
}

/// The service's statement, from the pgbench script that mirrors it.
/// The owner of the rows loadtest/run.sh seeds.
const OWNER: &str = "loadtest";

fn statement() -> String {
    let script = include_str!("../loadtest/pgbench/get-one.sql");
    let line = script
        .lines()
        .find(|l| l.starts_with("SELECT"))
        .expect("a SELECT line");
    line.trim_end_matches(';')
        .replace(":id", "$1")
        .replace(":owner", "$2")
}

/// CPU time (user + system) of a process, from /proc/<pid>/stat.
fn cpu_of(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which may hold spaces: utime and stime are fields 12 and 13.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports in USER_HZ, 100 per second on every mainstream configuration.
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time of every `postgres` process now alive (the backends serving this benchmark included).
fn postgres_cpu() -> Duration {
    let mut total = Duration::ZERO;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name();
        let Some(pid) = pid
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if comm.trim() == "postgres" {
            total += cpu_of(pid).unwrap_or_default();
        }
    }
    total
}

struct Figures {
    queries: u64,
    elapsed: Duration,
    own_cpu: Duration,
    postgres_cpu: Duration,
}

impl Figures {
    fn print(&self, driver: &str) {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / self.queries as f64;
        println!(
            "{driver:15} {:>8.0} queries/s   this process {:>5.1} µs/query   postgres {:>5.1} µs/query",
            self.queries as f64 / self.elapsed.as_secs_f64(),
            per(self.own_cpu),
            per(self.postgres_cpu),
        );
    }
}

/// Runs `TASKS` copies of `one` (each given its task number and a query counter) for `seconds`.
async fn measure<F, Fut>(seconds: u64, one: F) -> Figures
where
    F: Fn(usize, i64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let one = Arc::new(one);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let (own0, pg0, t0) = (
        cpu_of("self").unwrap_or_default(),
        postgres_cpu(),
        Instant::now(),
    );
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (one, stop, count) = (one.clone(), stop.clone(), count.clone());
            tokio::spawn(async move {
                // A cheap spread over the seeded ids, different per task.
                let mut id = task as i64 * 7919 % IDS;
                while !stop.load(Ordering::Relaxed) {
                    id = (id * 31 + 17) % IDS;
                    one(task, id + 1).await;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("a benchmark task panicked");
    }
    Figures {
        queries: count.load(Ordering::Relaxed),
        elapsed: t0.elapsed(),
        own_cpu: cpu_of("self").unwrap_or_default().saturating_sub(own0),
        postgres_cpu: postgres_cpu().saturating_sub(pg0),
    }
}

async fn run_sqlx(url: &str, sql: &'static str, seconds: u64) -> Figures {
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        conns.push(Arc::new(Mutex::new(
            sqlx::PgConnection::connect(url)
                .await
                .expect("sqlx connects"),
        )));
    }
    let conns = Arc::new(conns);
    measure(seconds, move |task, id| {
        let conns = conns.clone();
        async move {
            let mut conn = conns[task % CONNECTIONS].lock().await;
            let row = sqlx::query(sql)
                .bind(id)
                .bind(OWNER)
                .fetch_optional(&mut *conn)
                .await
                .expect("sqlx query");
            let row = row.expect("a seeded id");
            std::hint::black_box(decode!(row));
        }
    })
    .await
}

async fn run_tokio_postgres(url: &str, sql: &'static str, seconds: u64) -> Figures {
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("tokio-postgres connects");
        tokio::spawn(connection);
        let statement = client.prepare(sql).await.expect("prepare");
        clients.push(Arc::new(Mutex::new((client, statement))));
    }
    let clients = Arc::new(clients);
    measure(seconds, move |task, id| {
        let clients = clients.clone();
        async move {
            // Held exclusively for the query, like a pooled connection: no pipelining.
            let guard = clients[task % CONNECTIONS].lock().await;
            let (client, statement) = &*guard;
            let row = client
                .query_opt(statement, &[&id, &OWNER])
                .await
                .expect("tokio-postgres query")
                .expect("a seeded id");
            std::hint::black_box(decode!(row));
        }
    })
    .await
}

fn main() {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        eprintln!(
            "DATABASE_URL is not set: point it at a migrated, seeded todos database (see this \
             file's doc); nothing measured"
        );
        return;
    };
    let env_u64 = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name} must be a whole number"))
            })
            .unwrap_or(default)
    };
    let seconds = env_u64("BENCH_SECONDS", 5);
    let rounds = env_u64("BENCH_ROUNDS", 3);
    let sql: &'static str = Box::leak(statement().into_boxed_str());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    println!(
        "{sql}\n{CONNECTIONS} connections, {TASKS} tasks, {seconds} s per run, {rounds} rounds"
    );
    runtime.block_on(async {
        for _ in 0..rounds {
            run_sqlx(&url, sql, seconds).await.print("sqlx");
            run_tokio_postgres(&url, sql, seconds)
                .await
                .print("tokio-postgres");
        }
    });
}
