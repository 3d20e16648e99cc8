//! The accept loop: hyper with a timer, so that clients who are slow to send their headers are cut,
//! and a cap on open connections, so that file descriptors never run out.
//!
//! `axum::serve` runs hyper without a timer, which leaves hyper's header-read timeout off: 2000
//! connections trickling a header line every few seconds stayed open indefinitely, and near
//! `ulimit -n` the accept itself failed, so even `/health` went unanswered. Here each connection
//! is served by hyper's HTTP/1 builder with `HTTP_HEADER_READ_TIMEOUT` (a connection that has not
//! sent a whole request head in that time is closed), at most `MAX_CONNECTIONS` are open at once
//! (beyond that, new ones wait in the kernel's listen backlog), and shutdown uses hyper-util's
//! graceful watcher: stop accepting, let requests in flight finish. Connections close lingering
//! ([`linger`]).

pub mod linger;

use std::{sync::Arc, time::Duration};

use axum::{Router, body::Body, extract::connect_info::ConnectInfo};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tower::ServiceExt;

/// How the server treats connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A connection must send a whole request head within this (`HTTP_HEADER_READ_TIMEOUT`).
    pub header_read_timeout: Duration,
    /// Open connections at most (`MAX_CONNECTIONS`).
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting and waits for
/// the open connections' requests to finish (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut listener = linger::Listener(listener);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
            () = &mut shutdown => break,
        };
        // The peer address, as `into_make_service_with_connect_info` would give it: the rate
        // limiter keys on it and the request span records it.
        let service = router
            .clone()
            .map_request(move |req: hyper::Request<Incoming>| {
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            });
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A client that resets or times out is its own business, not the service's error.
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!("shutdown requested; draining in-flight requests");
    graceful.shutdown().await;
}
