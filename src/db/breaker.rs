//! A circuit breaker in front of the database.
//!
//! When the database is down, every request would otherwise wait for a connection attempt to fail
//! (or for the pool's wait timeout) — slow answers, a pile of waiters, and a reconnect storm when
//! it returns. After `failure_threshold` consecutive outage-class failures the breaker **opens**:
//! requests that need the database get 503 at once, without touching the pool. After `open_for`
//! it goes **half-open** and lets `half_open_probes` requests through; one success **closes** it,
//! a failure reopens it for another `open_for`.
//!
//! Only outage-class failures count (connect refused or timed out, a fresh connection breaking;
//! see `db::DbError::Unavailable`). A 404, a validation error, a statement timeout, a wait for a
//! busy pool or a request the client abandoned (its [`Permit`] is dropped unrecorded) never trips
//! it.
//!
//! Written here rather than taken from a crate: the one maintained tower breaker counts every call
//! since its last state change (its window never forgets), is a router-level layer (it would also
//! reject `/health`), and runs on `std::time::Instant`, which paused-clock tests cannot drive.
//! This one is about 150 lines, on tokio's clock, and lock-free while closed.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::config::BreakerConfig;

/// The externally visible state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

pub struct Breaker {
    config: BreakerConfig,
    /// Mirrors `inner`'s state so the closed path needs no lock.
    state: AtomicU8,
    consecutive_failures: AtomicU32,
    opened_total: AtomicU64,
    inner: Mutex<Inner>,
    /// Signalled each time the breaker opens, for background reactions (re-resolving DNS).
    opened: tokio::sync::Notify,
}

struct Inner {
    /// When the open state ends (meaningful while open).
    open_until: Instant,
    /// Probes admitted and not yet finished (meaningful while half-open).
    probes_in_flight: u32,
}

/// Rejection while open: how long until a probe may be admitted.
#[derive(Debug, Clone, Copy)]
pub struct Rejected {
    pub retry_after: Duration,
}

/// Admission to use the database. Record the outcome with [`Permit::success`] or
/// [`Permit::failure`]; dropping it unrecorded (the request was cancelled) counts as neither.
pub struct Permit {
    breaker: Arc<Breaker>,
    probe: bool,
    recorded: bool,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Arc<Breaker> {
        Arc::new(Breaker {
            config,
            state: AtomicU8::new(CLOSED),
            consecutive_failures: AtomicU32::new(0),
            opened_total: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                open_until: Instant::now(),
                probes_in_flight: 0,
            }),
            opened: tokio::sync::Notify::new(),
        })
    }

    pub fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    /// How many times the breaker has opened since startup.
    pub fn opened_total(&self) -> u64 {
        self.opened_total.load(Ordering::Relaxed)
    }

    /// Completes the next time the breaker opens (or at once if it opened since the last call).
    pub async fn opened(&self) {
        self.opened.notified().await;
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Admits a call, or rejects it while open (or while half-open with all probes taken).
    pub fn try_acquire(self: &Arc<Self>) -> Result<Permit, Rejected> {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Ok(self.permit(false));
        }
        let mut inner = self.lock();
        let now = Instant::now();
        match self.state.load(Ordering::Acquire) {
            CLOSED => Ok(self.permit(false)),
            OPEN if now < inner.open_until => Err(Rejected {
                retry_after: inner.open_until - now,
            }),
            OPEN => {
                self.state.store(HALF_OPEN, Ordering::Release);
                tracing::info!(
                    breaker.state = "half_open",
                    "database circuit half-open: letting a probe through"
                );
                inner.probes_in_flight = 1;
                Ok(self.permit(true))
            }
            _ if inner.probes_in_flight < self.config.half_open_probes => {
                inner.probes_in_flight += 1;
                Ok(self.permit(true))
            }
            // Half-open with every probe slot taken: come back shortly.
            _ => Err(Rejected {
                retry_after: Duration::from_millis(100),
            }),
        }
    }

    fn permit(self: &Arc<Self>, probe: bool) -> Permit {
        Permit {
            breaker: Arc::clone(self),
            probe,
            recorded: false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn on_success(&self, probe: bool) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if probe || self.state.load(Ordering::Acquire) != CLOSED {
            let mut inner = self.lock();
            if self.state.load(Ordering::Acquire) == HALF_OPEN {
                inner.probes_in_flight = 0;
                self.state.store(CLOSED, Ordering::Release);
                tracing::info!(
                    breaker.state = "closed",
                    "database circuit closed: the database answers again"
                );
            }
        }
    }

    fn on_failure(&self, probe: bool) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let state = self.state.load(Ordering::Acquire);
        let trip = (state == CLOSED && failures >= self.config.failure_threshold)
            || (state == HALF_OPEN && probe);
        if !trip {
            return;
        }
        let mut inner = self.lock();
        // Re-check under the lock: another failure may have opened it already.
        let state = self.state.load(Ordering::Acquire);
        if state == OPEN {
            return;
        }
        inner.open_until = Instant::now() + self.config.open_for;
        inner.probes_in_flight = 0;
        self.state.store(OPEN, Ordering::Release);
        self.opened_total.fetch_add(1, Ordering::Relaxed);
        self.opened.notify_one();
        tracing::warn!(
            breaker.state = "open",
            consecutive_failures = failures,
            open_for = ?self.config.open_for,
            "database circuit open: answering 503 without touching the database"
        );
    }

    fn on_abandoned(&self, probe: bool) {
        if probe {
            let mut inner = self.lock();
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
        }
    }
}

impl Permit {
    /// The database answered (whatever the query's result).
    pub fn success(mut self) {
        self.recorded = true;
        self.breaker.on_success(self.probe);
    }

    /// The database was unavailable.
    pub fn failure(mut self) {
        self.recorded = true;
        self.breaker.on_failure(self.probe);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker.on_abandoned(self.probe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Arc<Breaker> {
        Breaker::new(BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(2),
            half_open_probes: 1,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_a_success_resets_the_count() {
        let b = breaker();
        b.try_acquire().unwrap().failure();
        b.try_acquire().unwrap().failure();
        b.try_acquire().unwrap().success();
        b.try_acquire().unwrap().failure();
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Closed, "not three in a row yet");
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.opened_total(), 1);
        let rejected = b.try_acquire().err().expect("open rejects");
        assert_eq!(rejected.retry_after, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_one_probe_whose_success_closes_it() {
        let b = breaker();
        for _ in 0..3 {
            b.try_acquire().unwrap().failure();
        }
        tokio::time::advance(Duration::from_millis(1500)).await;
        let r = b.try_acquire().err().expect("still open");
        assert_eq!(r.retry_after, Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(500)).await;
        let probe = b.try_acquire().expect("probe admitted");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire().is_err(), "only one probe at a time");
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        b.try_acquire().expect("closed admits").success();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_another_full_period() {
        let b = breaker();
        for _ in 0..3 {
            b.try_acquire().unwrap().failure();
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.opened_total(), 2);
        let r = b.try_acquire().err().unwrap();
        assert_eq!(r.retry_after, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_frees_its_slot_and_counts_as_nothing() {
        let b = breaker();
        for _ in 0..3 {
            b.try_acquire().unwrap().failure();
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(b.try_acquire().unwrap());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let probe = b.try_acquire().expect("slot freed");
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_of_calls_admitted_before_opening_do_not_extend_the_open_period() {
        let b = breaker();
        let late: Vec<Permit> = (0..5).map(|_| b.try_acquire().unwrap()).collect();
        for p in late {
            p.failure();
        }
        assert_eq!(b.opened_total(), 1, "opened once, not once per failure");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(b.try_acquire().is_ok());
    }
}
