//! A TCP proxy between the service and Postgres that can hold one connection's traffic at a
//! chosen protocol message, so a drill can cancel a request at a precise await point.
//!
//! Patterns are matched against whole reads (Postgres' messages for one round trip arrive
//! together on loopback), for example a reply's `CommandComplete` tag `"INSERT 0 1\0"` (the
//! statement ran; its answer is held) or a client's `"COMMIT\0"` (the commit never reaches the
//! server).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, tcp::OwnedReadHalf, tcp::OwnedWriteHalf},
    sync::Notify,
    task::JoinHandle,
};

/// Which way the bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Service to Postgres: statements.
    ToServer,
    /// Postgres to service: replies.
    ToClient,
}

#[derive(Default)]
struct State {
    /// The armed trigger: the next read in that direction containing the pattern is held, with
    /// everything after it in that direction, until [`FaultProxy::release`].
    armed: Mutex<Option<(Direction, Vec<u8>)>>,
    holding: AtomicBool,
    released: Notify,
    /// Set when the held connection's service side closed.
    held_conn_closed: AtomicBool,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts forwarding a fresh local port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let state = Arc::clone(&shared);
                conns.spawn(async move {
                    let Ok(outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let held_here = Arc::new(AtomicBool::new(false));
                    let (in_r, in_w) = inbound.into_split();
                    let (out_r, out_w) = outbound.into_split();
                    tokio::join!(
                        pump(
                            in_r,
                            out_w,
                            Direction::ToServer,
                            Arc::clone(&state),
                            Arc::clone(&held_here)
                        ),
                        pump(out_r, in_w, Direction::ToClient, state, held_here),
                    );
                });
            }
        });
        FaultProxy { addr, state, task }
    }

    /// Holds the next read in `direction` that contains `pattern` (one connection only).
    pub fn hold_at(&self, direction: Direction, pattern: &[u8]) {
        self.state.held_conn_closed.store(false, Ordering::SeqCst);
        *self.state.armed.lock().unwrap() = Some((direction, pattern.to_vec()));
    }

    /// Waits until the armed pattern is being held; `false` if it did not occur within `limit`.
    pub async fn wait_holding(&self, limit: Duration) -> bool {
        poll_until(limit, || self.state.holding.load(Ordering::SeqCst)).await
    }

    /// Waits until the service closed the connection whose traffic is held: the service gave
    /// the connection up instead of returning it to its pool.
    pub async fn wait_held_connection_closed(&self, limit: Duration) -> bool {
        poll_until(limit, || self.state.held_conn_closed.load(Ordering::SeqCst)).await
    }

    /// Forwards what was held and lets traffic flow again.
    pub fn release(&self) {
        *self.state.armed.lock().unwrap() = None;
        self.state.holding.store(false, Ordering::SeqCst);
        self.state.released.notify_waiters();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.release();
        self.task.abort();
    }
}

async fn poll_until(limit: Duration, cond: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cond()
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    direction: Direction,
    state: Arc<State>,
    held_here: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                if direction == Direction::ToServer && held_here.load(Ordering::SeqCst) {
                    state.held_conn_closed.store(true, Ordering::SeqCst);
                }
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        let triggered = {
            let mut armed = state.armed.lock().unwrap();
            let hit = armed.as_ref().is_some_and(|(d, p)| {
                *d == direction && buf[..n].windows(p.len()).any(|w| w == p.as_slice())
            });
            if hit {
                *armed = None;
                held_here.store(true, Ordering::SeqCst);
                state.holding.store(true, Ordering::SeqCst);
            }
            hit
        };
        let mut more = Vec::new();
        let mut ended = false;
        if triggered || (held_here.load(Ordering::SeqCst) && state.holding.load(Ordering::SeqCst)) {
            while state.holding.load(Ordering::SeqCst) {
                let released = state.released.notified();
                if !state.holding.load(Ordering::SeqCst) {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(20), released).await;
                // A held statement blocks this pump, so keep reading what follows it, to notice
                // the service hanging up (the reply direction's pump notices that by itself).
                if direction == Direction::ToServer && !ended {
                    let mut chunk = [0u8; 4096];
                    match tokio::time::timeout(Duration::from_millis(1), from.read(&mut chunk))
                        .await
                    {
                        Ok(Ok(0) | Err(_)) => {
                            ended = true;
                            state.held_conn_closed.store(true, Ordering::SeqCst);
                        }
                        Ok(Ok(m)) => more.extend_from_slice(&chunk[..m]),
                        Err(_) => {}
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() || to.write_all(&more).await.is_err() {
            return;
        }
        if ended {
            let _ = to.shutdown().await;
            return;
        }
    }
}
