//! Who the rate limiter takes for the client: behind a trusted proxy, forged `X-Forwarded-For`
//! entries and IPv6 address rotation do not buy a fresh quota, and an untrusted peer cannot name
//! another client.

use crate::helpers::{AppOptions, TestApp, ratelimit_field, spawn_app_with};

/// A burst of 3 and then one request a minute: the fourth request from one client is a 429.
async fn app_behind_proxy() -> TestApp {
    let mut opts = AppOptions::default();
    for (k, v) in [
        ("RATE_LIMIT_PER_SECOND", "1"),
        ("RATE_LIMIT_BURST", "3"),
        // The test's own client (127.0.0.1) plays the proxy; 127.0.0.2 is a client that is not.
        ("TRUSTED_PROXIES", "127.0.0.1/32, 10.0.0.0/8"),
    ] {
        opts.env.insert(k.into(), v.into());
    }
    spawn_app_with(opts).await
}

fn client_from(local: &str) -> reqwest::Client {
    crate::helpers::http_client()
        .no_proxy()
        .local_address(Some(local.parse().unwrap()))
        .build()
        .unwrap()
}

/// The status of `GET /todos` sent with each `X-Forwarded-For` value in turn.
async fn statuses(app: &TestApp, client: &reqwest::Client, forwarded: &[String]) -> Vec<u16> {
    let mut out = Vec::new();
    for xff in forwarded {
        let r = client
            .get(app.url("/todos?limit=1"))
            .header("x-forwarded-for", xff)
            .send()
            .await
            .unwrap();
        out.push(r.status().as_u16());
    }
    out
}

#[tokio::test]
async fn rotating_a_forged_entry_through_a_trusted_proxy_does_not_reset_the_quota() {
    let app = app_behind_proxy().await;
    let proxy = client_from("127.0.0.1");
    // What the client wrote (rotating), then what the edge proxy saw, then an inner proxy hop.
    let forged: Vec<String> = (1..=6)
        .map(|i| format!("6.6.6.{i}, 203.0.113.7, 10.1.2.3"))
        .collect();
    assert_eq!(
        statuses(&app, &proxy, &forged).await,
        [200, 200, 200, 429, 429, 429]
    );
    // Another client behind the same proxy has its own quota.
    let other = ["203.0.113.8".to_string()];
    assert_eq!(statuses(&app, &proxy, &other).await, [200]);
}

#[tokio::test]
async fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
    let app = app_behind_proxy().await;
    let direct = client_from("127.0.0.2");
    let forged: Vec<String> = (1..=5).map(|i| format!("198.51.100.{i}")).collect();
    assert_eq!(
        statuses(&app, &direct, &forged).await,
        [200, 200, 200, 429, 429]
    );
}

#[tokio::test]
async fn ipv6_addresses_from_one_64_share_a_quota() {
    let app = app_behind_proxy().await;
    let proxy = client_from("127.0.0.1");
    let rotating: Vec<String> = (1..=5).map(|i| format!("2001:db8:1:2::{i:x}")).collect();
    assert_eq!(
        statuses(&app, &proxy, &rotating).await,
        [200, 200, 200, 429, 429]
    );
    let next_network = ["2001:db8:1:3::1".to_string()];
    assert_eq!(statuses(&app, &proxy, &next_network).await, [200]);
}

/// hyper arms its header-read timer again as soon as a response is written, so a keep-alive
/// connection that stays idle is closed after `HTTP_HEADER_READ_TIMEOUT` too: that one setting is
/// the idle keep-alive timeout (docs/resilience.md says so; this holds it to it).
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_read_timeout() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut opts = AppOptions::default();
    opts.env
        .insert("HTTP_HEADER_READ_TIMEOUT".into(), "1s".into());
    let app = spawn_app_with(opts).await;
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: idle\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    // Now idle: nothing more is sent.
    let idle = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    let after = idle.elapsed();
    assert!(
        closed.is_ok(),
        "an idle connection is still open after 10 s"
    );
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(3),
        "closed {after:?} after going idle (timeout 1 s)"
    );
}

/// One byte that is not ASCII on the client's side of the header once made the whole header
/// unreadable, and the request was keyed to the proxy: a fresh quota, then the proxy's own.
#[tokio::test]
async fn a_byte_that_is_not_ascii_on_the_clients_side_does_not_hide_the_proxys_entry() {
    let app = app_behind_proxy().await;
    let client = client_from("127.0.0.1");
    let send = |xff: &'static [u8]| {
        client
            .get(app.url("/todos"))
            .header(
                "x-forwarded-for",
                reqwest::header::HeaderValue::from_bytes(xff).unwrap(),
            )
            .send()
    };
    for _ in 0..3 {
        assert_eq!(send(b"198.51.100.77").await.unwrap().status(), 200);
    }
    assert_eq!(send(b"198.51.100.77").await.unwrap().status(), 429);
    assert_eq!(send(b"\xff, 198.51.100.77").await.unwrap().status(), 429);
    assert_eq!(
        send(b"\xff\xfe, 198.51.100.77").await.unwrap().status(),
        429
    );
    // The proxy's own quota was not spent.
    let r = client.get(app.url("/todos")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// The IETF fields, decoded by an independent parser: the policy (a burst of 3, one request back a
/// second: 3 over 3 s), what is left after each request, and on the 429 the same wait as
/// `Retry-After`. Another client's count is its own.
#[tokio::test]
async fn every_answer_the_limiter_saw_states_the_limit_in_the_standard_fields() {
    let app = app_behind_proxy().await;
    let proxy = client_from("127.0.0.1");
    let get = |client: &'static str| {
        proxy
            .get(app.url("/todos?limit=1"))
            .header("x-forwarded-for", client)
            .send()
    };
    for left in [2, 1, 0] {
        let r = get("203.0.113.9").await.unwrap();
        assert_eq!(r.status(), 200);
        let policy = ratelimit_field(&r, "ratelimit-policy");
        assert_eq!(policy.len(), 1);
        assert_eq!(policy[0].0, "caller");
        assert_eq!((policy[0].1["q"], policy[0].1["w"]), (3, 3));
        let limit = ratelimit_field(&r, "ratelimit");
        assert_eq!(limit[0].0, "caller");
        assert_eq!(limit[0].1["r"], left, "requests left");
        assert_eq!(limit[0].1["t"], 1, "one comes back within a second");
        // The legacy pair says the same.
        assert_eq!(
            r.headers()["x-ratelimit-remaining"],
            left.to_string().as_str()
        );
    }
    let r = get("203.0.113.9").await.unwrap();
    assert_eq!(r.status(), 429);
    let limit = ratelimit_field(&r, "ratelimit");
    assert_eq!(limit[0].1["r"], 0);
    assert_eq!(
        limit[0].1["t"].to_string(),
        r.headers()["retry-after"].to_str().unwrap(),
        "t is the wait Retry-After gives"
    );
    assert_eq!(ratelimit_field(&r, "ratelimit-policy")[0].1["q"], 3);
    let other = get("203.0.113.10").await.unwrap();
    assert_eq!(ratelimit_field(&other, "ratelimit")[0].1["r"], 2);
    // Probes are not limited, so they carry no fields.
    let health = proxy.get(app.url("/health")).send().await.unwrap();
    assert!(health.headers().get("ratelimit").is_none());
}
