//! What remembering clients costs the rate limiter: the memory for 1,000,000 distinct client keys in
//! the store tower_governor uses (governor's keyed `DashMap` state, keyed by `IpAddr` as the
//! service keys it), how long a prune of them takes, and how many a prune leaves. Evidence for
//! `RATE_LIMIT_MAX_CLIENTS` in loadtest/archive.md#rate-limit-state and docs/resilience.md, not a test.
//!
//! Run: `cargo bench --bench rate_limit_memory` (no database needed). `BENCH_KEYS` (default
//! 1000000) sets the number of keys. The service's allocator (mimalloc) is used, and memory is the
//! process's resident set (`VmRSS`) before and after. After the prune the allocator keeps the
//! freed memory for reuse, so the resident set does not fall back at once.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    num::NonZeroU32,
    time::{Duration, Instant},
};

use governor::{Quota, RateLimiter};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn run(label: &str, keys: u32, key: impl Fn(u32) -> IpAddr) {
    // The service's default quota: 200 a second, bursts of 600.
    let quota = Quota::per_second(NonZeroU32::new(200).expect("non-zero"))
        .allow_burst(NonZeroU32::new(600).expect("non-zero"));
    let limiter = RateLimiter::keyed(quota);
    let before = rss_kib();
    let started = Instant::now();
    for i in 0..keys {
        let _ = limiter.check_key(&key(i));
    }
    let filled = started.elapsed();
    let after = rss_kib();
    let per_key = (after.saturating_sub(before) * 1024) as f64 / f64::from(keys);
    // One request each: every key's quota is whole again 5 ms later.
    std::thread::sleep(Duration::from_millis(20));
    let started = Instant::now();
    limiter.retain_recent();
    limiter.shrink_to_fit();
    let pruned = started.elapsed();
    println!(
        "{label}: {keys} keys -> +{:.1} MiB resident ({per_key:.0} bytes a key), inserted in \
         {filled:.2?}; prune took {pruned:.2?} and left {} keys, {:.1} MiB resident",
        after.saturating_sub(before) as f64 / 1024.0,
        limiter.len(),
        rss_kib() as f64 / 1024.0,
    );
}

fn main() {
    let keys: u32 = std::env::var("BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    match std::env::var("BENCH_FAMILY").as_deref() {
        Ok("v4") => run("IPv4", keys, |i| {
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
        }),
        // IPv6 keys as the service makes them: one per /64.
        Ok("v6") => run("IPv6 /64", keys, |i| {
            IpAddr::V6(Ipv6Addr::from(
                (0x2001_0db8_u128 << 96) | (u128::from(i) << 64),
            ))
        }),
        // Each family in a process of its own: memory the allocator keeps after the first run
        // would hide the second one's cost.
        _ => {
            for family in ["v4", "v6"] {
                let status = std::process::Command::new(std::env::current_exe().expect("own path"))
                    .env("BENCH_FAMILY", family)
                    .status()
                    .expect("run the bench for one family");
                assert!(status.success());
            }
        }
    }
}
