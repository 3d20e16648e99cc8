//! What compressing an answer costs and saves, per coding and level, through tower-http's layer
//! as the service uses it: a page of 100 todos (titles drawn from a word list, so the text is not
//! more repetitive than people's), and small bodies of 200 B to 4 KB, where the compressor's set-up
//! is most of the work. Evidence for the level and the threshold in src/http/compress.rs and
//! loadtest/RESULTS.md, not a test.
//!
//! Run: `cargo bench --bench compression` (no database needed). `BENCH_ITERATIONS` (default
//! 2000) sets the compressions per row.

use std::{convert::Infallible, time::Instant};

use axum::{body::Body, extract::Request, http::Response};
use http_body_util::BodyExt as _;
use rand::{Rng as _, SeedableRng as _, seq::IndexedRandom as _};
use serde_json::json;
use tower::{Service as _, ServiceExt as _};
use tower_http::compression::{Compression, CompressionLevel};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WORDS: &[&str] = &[
    "call",
    "plumber",
    "buy",
    "milk",
    "book",
    "flights",
    "to",
    "Lisbon",
    "renew",
    "passport",
    "water",
    "plants",
    "pay",
    "rent",
    "review",
    "Anna's",
    "pull",
    "request",
    "fix",
    "bike",
    "tyre",
    "dentist",
    "on",
    "Tuesday",
    "send",
    "invoice",
    "#4471",
    "for",
    "March",
    "clean",
    "garage",
    "email",
    "school",
    "about",
    "trip",
    "order",
    "printer",
    "ink",
    "cancel",
    "gym",
    "prepare",
    "slides",
    "quarterly",
    "meeting",
    "backup",
    "laptop",
    "and",
    "the",
    "a",
    "new",
];

/// A page of `n` todos as the service writes it.
fn page(n: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(33);
    let todos: Vec<_> = (0..n)
        .map(|i| {
            let id = 1000 + i as i64;
            let words = rng.random_range(2..9);
            let title: Vec<&str> = (0..words).map(|_| *WORDS.choose(&mut rng).expect("words")).collect();
            json!({
                "id": id,
                "url": format!("https://todos.example.com/todos/{id}"),
                "title": title.join(" "),
                "completed": rng.random_bool(0.3),
                "order": if rng.random_bool(0.5) { Some(i as i64) } else { None },
                "created_at": format!("2026-12-0{}T{:02}:{:02}:{:02}.{:06}Z", 1 + i % 6, i % 24, i % 60, (i * 7) % 60, rng.random_range(0..999_999)),
                "updated_at": format!("2026-12-06T{:02}:{:02}:{:02}.{:06}Z", i % 24, (i * 3) % 60, (i * 11) % 60, rng.random_range(0..999_999)),
            })
        })
        .collect();
    serde_json::to_vec(&todos).expect("JSON")
}

/// One answer through tower-http's compression for `accept`, read whole: (µs, bytes on the wire).
async fn compress_once(body: &[u8], accept: &str, level: CompressionLevel) -> usize {
    let body = body.to_vec();
    let inner = tower::service_fn(move |_: Request| {
        let body = body.clone();
        async move { Ok::<_, Infallible>(Response::new(Body::from(body))) }
    });
    let mut svc = Compression::new(inner).quality(level);
    let req = Request::builder()
        .header("accept-encoding", accept)
        .body(Body::empty())
        .expect("a request");
    let res = svc
        .ready()
        .await
        .expect("ready")
        .call(req)
        .await
        .expect("answer");
    res.into_body()
        .collect()
        .await
        .expect("the body")
        .to_bytes()
        .len()
}

fn main() {
    let n: u32 = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let hundred = page(100);
    let mut bodies: Vec<(String, Vec<u8>)> =
        vec![(format!("page of 100 ({} B)", hundred.len()), hundred)];
    for size in [200usize, 600, 1024, 2048, 4096] {
        // Small bodies: the first `size` bytes of a page, as the service would answer a short one.
        let mut b = page(40);
        b.truncate(size);
        bodies.push((format!("{size} B"), b));
    }
    let levels = [
        ("1", CompressionLevel::Precise(1)),
        ("2", CompressionLevel::Precise(2)),
        ("3", CompressionLevel::Precise(3)),
        ("4", CompressionLevel::Precise(4)),
        ("6", CompressionLevel::Precise(6)),
        ("default", CompressionLevel::Default),
    ];
    println!(
        "{:24} {:6} {:>8} {:>10} {:>8} {:>10}",
        "body", "coding", "level", "µs each", "bytes", "ratio"
    );
    for (label, body) in &bodies {
        rt.block_on(async {
            let identity = compress_once(body, "identity", CompressionLevel::Default).await;
            let started = Instant::now();
            for _ in 0..n {
                compress_once(body, "identity", CompressionLevel::Default).await;
            }
            let each = started.elapsed().as_secs_f64() * 1e6 / f64::from(n);
            println!(
                "{label:24} {:6} {:>8} {each:>10.2} {identity:>8} {:>10.2}",
                "none", "-", 1.0
            );
            for coding in ["gzip", "br", "zstd"] {
                for (name, level) in levels {
                    // brotli's default (11) takes milliseconds a page: fewer rounds.
                    let rounds = if coding == "br" && name == "default" {
                        (n / 20).max(5)
                    } else {
                        n
                    };
                    let bytes = compress_once(body, coding, level).await;
                    let started = Instant::now();
                    for _ in 0..rounds {
                        compress_once(body, coding, level).await;
                    }
                    let each = started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
                    let ratio = body.len() as f64 / bytes as f64;
                    println!(
                        "{label:24} {coding:6} {name:>8} {each:>10.2} {bytes:>8} {ratio:>10.2}"
                    );
                }
            }
        });
    }
}
