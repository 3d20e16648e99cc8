//! Admission control for the data routes: at most `MAX_IN_FLIGHT` requests are worked on at once,
//! and a request that finds them all busy waits its turn (first come, first served) for at most
//! `MAX_QUEUE_WAIT`. A request that cannot start within that is refused with `503 overloaded` and a
//! jittered `Retry-After`.
//!
//! Why a wait and not tower's `LoadShed` + `ConcurrencyLimit`: refusing whatever exceeds a fixed
//! count threw away work the service could have finished in well under a second: under a
//! 2000-connection flood a lean twin with no limit served several times the successes
//! (loadtest/archive.md#overload). A refusal costs CPU too, and a closed-loop client comes
//! straight back. Limiting on *time spent waiting* keeps a burst's
//! requests and serves them within the bound. Under sustained overload latency stays at most
//! `MAX_QUEUE_WAIT` plus the service time, and the excess is refused.
//!
//! Refusals are cheap and mostly immediate. From the measured mean time a request holds its slot
//! (an exponentially weighted average) and the number already waiting, Little's law gives the wait
//! a newcomer would face. When that is well beyond `MAX_QUEUE_WAIT` (twice it: the estimate is
//! noisy), it is refused at once, with no timer and no wait. Any other request waits, with
//! `MAX_QUEUE_WAIT` as its deadline. The immediate refusal is also checked early, in front of the router's costlier
//! layers ([`EarlyRefusal`]), and every refusal answers with a problem body rendered once, so
//! what a refusal costs is mostly the kernel's socket work (loadtest/RESULTS.md#refusal-cost).
//! Dropping the future (client gone, shutdown) leaves the queue on the spot (tokio's semaphore is
//! fair and cancel-safe) and frees the slot if it had one.
//!
//! Written here rather than with `little-loadshedder` (0.2.0, last released February 2024). That
//! crate holds an *average* latency target by resizing a queue through a `std::sync::Mutex` taken
//! twice per request. It answers with its own response enum, and it has no bound on how long any
//! one request waits. What we need is a bound per request: a tokio semaphore with a deadline, an
//! atomic average, and this module.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    http::{Request, Response},
};
use pin_project_lite::pin_project;
use rand::Rng as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service, ServiceExt as _};

use super::BoxedResponse;
use crate::http::problem::{ApiError, Prerendered};

/// The weight of a new sample in the average time a slot is held: 1/8, as TCP's smoothed RTT.
const EWMA_SHIFT: u32 = 3;

/// What admission needs to know; see the module doc.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionLimits {
    /// Requests worked on at once (`MAX_IN_FLIGHT`).
    pub max_in_flight: usize,
    /// Longest a request waits for a slot (`MAX_QUEUE_WAIT`); zero refuses at once.
    pub max_queue_wait: Duration,
}

/// The admission layer; its clones (one per route) share one gate.
#[derive(Clone, Debug)]
pub struct AdmissionLayer {
    gate: Arc<Gate>,
}

impl AdmissionLayer {
    pub fn new(limits: AdmissionLimits) -> Self {
        AdmissionLayer {
            gate: Arc::new(Gate::new(limits)),
        }
    }

    /// The same gate's early refusal (see [`EarlyRefusal`]).
    pub fn early(&self) -> EarlyRefusal {
        EarlyRefusal {
            gate: Arc::clone(&self.gate),
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            gate: Arc::clone(&self.gate),
        }
    }
}

#[derive(Debug)]
struct Gate {
    slots: Arc<Semaphore>,
    max_in_flight: usize,
    max_wait: Duration,
    /// Requests waiting for a slot now.
    waiting: AtomicUsize,
    /// The average time a request holds its slot, in nanoseconds (0 until the first one ends).
    mean_hold_ns: AtomicU64,
    /// The refusal's body, rendered once.
    refusal: Prerendered,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The expected wait was beyond the bound already on arrival.
    QueueTooLong,
    /// It waited the whole bound.
    WaitedTooLong,
}

impl Gate {
    fn new(limits: AdmissionLimits) -> Self {
        Gate {
            slots: Arc::new(Semaphore::new(limits.max_in_flight)),
            max_in_flight: limits.max_in_flight,
            max_wait: limits.max_queue_wait,
            waiting: AtomicUsize::new(0),
            mean_hold_ns: AtomicU64::new(0),
            refusal: ApiError::overloaded(limits.max_queue_wait).prerender(),
        }
    }

    /// Whether a request arriving now would be refused without waiting: every slot is busy and
    /// the queue already cannot start it in time. A hint, read without taking a place; admission
    /// proper decides again.
    fn full_now(&self) -> Option<Duration> {
        if self.slots.available_permits() > 0 {
            return None;
        }
        let expected = self.expected_wait(self.waiting.load(Ordering::Relaxed) + 1);
        self.hopeless(expected).then_some(expected)
    }

    fn refuse(&self, why: Refusal, expected: Duration) -> Response<Body> {
        tracing::debug!(
            ?why,
            expected_wait_ms = expected.as_millis() as u64,
            "refused a request: at capacity"
        );
        self.refusal.response(Some(retry_after(expected)))
    }

    async fn admit(self: &Arc<Self>) -> Result<OwnedSemaphorePermit, (Refusal, Duration)> {
        if let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(slot);
        }
        let queued = Queued::join(&self.waiting);
        let expected = self.expected_wait(queued.position);
        if self.hopeless(expected) {
            return Err((Refusal::QueueTooLong, expected));
        }
        match tokio::time::timeout(self.max_wait, Arc::clone(&self.slots).acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            // The semaphore is never closed; a timeout is the other way out.
            Ok(Err(_)) | Err(_) => Err((Refusal::WaitedTooLong, self.max_wait)),
        }
    }

    /// Whether a request expected to wait `expected` is refused without waiting. The estimate is
    /// noisy (one slow request moves the average), so only beyond twice the bound: between the
    /// bound and twice it, the request waits and its deadline decides. Refusing on a noisy
    /// estimate turned away requests that would have been served well within the bound
    /// (loadtest/archive.md#overload).
    fn hopeless(&self, expected: Duration) -> bool {
        self.max_wait.is_zero() || expected > self.max_wait * 2
    }

    /// Little's law: slots free up at `max_in_flight / mean_hold` a second, so the request in
    /// queue `position` (1 is next) starts after `position × mean_hold / max_in_flight`.
    fn expected_wait(&self, position: usize) -> Duration {
        let hold = u128::from(self.mean_hold_ns.load(Ordering::Relaxed));
        let ns = hold * position as u128 / self.max_in_flight.max(1) as u128;
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Folds one request's time in its slot into the average. Concurrent updates may lose one
    /// another's sample; an estimate does not need every one.
    fn held(&self, took: Duration) {
        let sample = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let old = self.mean_hold_ns.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            // old + (sample - old) / 8, in signed arithmetic.
            let delta = (i128::from(sample) - i128::from(old)) >> EWMA_SHIFT;
            u64::try_from(i128::from(old) + delta).unwrap_or(old)
        };
        self.mean_hold_ns.store(new, Ordering::Relaxed);
    }
}

/// A place in the queue, given up when dropped (admitted, refused, or the request abandoned).
struct Queued<'a> {
    waiting: &'a AtomicUsize,
    /// 1 for the first in line.
    position: usize,
}

impl<'a> Queued<'a> {
    fn join(waiting: &'a AtomicUsize) -> Self {
        let position = waiting.fetch_add(1, Ordering::Relaxed) + 1;
        Queued { waiting, position }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The admission service: see the module doc.
#[derive(Clone, Debug)]
pub struct Admission<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S> Service<Request<Body>> for Admission<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = AdmissionFuture<S::Future, S::Error>;

    /// The inner service's readiness (the route's: always ready). Whether there is room is
    /// decided per request, in `call`, where waiting is bounded (the router drives readiness
    /// before it has a request to refuse).
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // A free slot, the usual case: straight on, with no allocation.
        if let Ok(slot) = Arc::clone(&self.gate.slots).try_acquire_owned() {
            return AdmissionFuture::Admitted {
                inner: self.inner.call(req),
                held: Some(Held::new(&self.gate, slot)),
            };
        }
        // The ready service goes with the wait; its clone stays, to be driven ready next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let gate = Arc::clone(&self.gate);
        AdmissionFuture::Waiting {
            wait: Box::pin(async move {
                let slot = match gate.admit().await {
                    Ok(slot) => slot,
                    Err((why, expected)) => return Ok(gate.refuse(why, expected)),
                };
                let held = Held::new(&gate, slot);
                let res = inner.oneshot(req).await;
                held.finish();
                res
            }),
        }
    }
}

/// A slot while its request is worked on. Finishing records how long it was held; dropped
/// unfinished (the request abandoned), it frees the slot without a sample.
pub struct Held {
    gate: Arc<Gate>,
    _slot: OwnedSemaphorePermit,
    started: Instant,
}

impl Held {
    fn new(gate: &Arc<Gate>, slot: OwnedSemaphorePermit) -> Self {
        Held {
            gate: Arc::clone(gate),
            _slot: slot,
            started: Instant::now(),
        }
    }

    fn finish(self) {
        self.gate.held(self.started.elapsed());
    }
}

pin_project! {
    /// Admitted at once, or waiting for a slot.
    #[project = AdmissionProj]
    pub enum AdmissionFuture<F, E> {
        Admitted { #[pin] inner: F, held: Option<Held> },
        Waiting { wait: BoxedResponse<E> },
    }
}

impl<F, E> Future for AdmissionFuture<F, E>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AdmissionProj::Admitted { inner, held } => {
                let res = ready!(inner.poll(cx));
                if let Some(held) = held.take() {
                    held.finish();
                }
                Poll::Ready(res)
            }
            AdmissionProj::Waiting { wait } => wait.as_mut().poll(cx),
        }
    }
}

/// The early refusal: the front layer (`http::front`) asks it first, in front of the layers that
/// cost the most per request (the problem check, panic guard, authentication, rate limit, body
/// read), and a request that admission would refuse at once is refused there instead, with the
/// same prerendered problem. Under sustained overload nearly every refusal is of that kind, and
/// refusals then come by the thousand a second: what each costs is what is left for the requests
/// being served (loadtest/RESULTS.md#refusal-cost). The front layer still counts and traces them.
#[derive(Clone, Debug)]
pub struct EarlyRefusal {
    gate: Arc<Gate>,
}

impl EarlyRefusal {
    /// The refusal, when admission would refuse a request arriving now without waiting.
    pub fn refuse_now(&self) -> Option<Response<Body>> {
        let expected = self.gate.full_now()?;
        Some(self.gate.refuse(Refusal::QueueTooLong, expected))
    }
}

/// Whole seconds, at least the expected wait and at least 1, plus 0–2 s at random, so that a
/// burst refused together does not come back together.
fn retry_after(expected: Duration) -> u64 {
    let base = expected.as_secs_f64().ceil().max(1.0) as u64;
    base + rand::rng().random_range(0..=2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::problem::{ProblemCode, code::Code};
    use axum::http::{StatusCode, header};
    use std::convert::Infallible;
    use tokio::sync::Notify;

    /// A service whose requests all wait for `release`.
    fn held(
        release: Arc<Notify>,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Future + Send,
    > + Clone {
        tower::service_fn(move |_: Request<Body>| {
            let release = Arc::clone(&release);
            async move {
                release.notified().await;
                Ok::<_, Infallible>(Response::new(Body::empty()))
            }
        })
    }

    fn retry_after_of(res: &Response<Body>) -> u64 {
        res.headers()[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_a_slot_up_to_the_bound_then_is_refused_with_retry_after() {
        let release = Arc::new(Notify::new());
        let svc = AdmissionLayer::new(AdmissionLimits {
            max_in_flight: 1,
            max_queue_wait: Duration::from_millis(300),
        })
        .layer(held(Arc::clone(&release)));

        let first = tokio::spawn(svc.clone().oneshot(Request::new(Body::empty())));
        tokio::task::yield_now().await;
        // The slot is taken; the second waits, and is served when the first ends in time.
        let second = tokio::spawn(svc.clone().oneshot(Request::new(Body::empty())));
        tokio::time::sleep(Duration::from_millis(200)).await;
        release.notify_one();
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
        tokio::task::yield_now().await;
        release.notify_one();
        assert_eq!(second.await.unwrap().unwrap().status(), StatusCode::OK);

        // Now the slot stays taken: a waiter gets its refusal at the bound, not before.
        let _stuck = tokio::spawn(svc.clone().oneshot(Request::new(Body::empty())));
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        let refused = svc
            .clone()
            .oneshot(Request::new(Body::empty()))
            .await
            .unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            refused.extensions().get::<ProblemCode>().unwrap().0,
            Code::Overloaded
        );
        assert!((1..=3).contains(&retry_after_of(&refused)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_that_cannot_start_within_the_bound_is_refused_at_once() {
        let gate = Arc::new(Gate::new(AdmissionLimits {
            max_in_flight: 2,
            max_queue_wait: Duration::from_millis(500),
        }));
        gate.held(Duration::from_millis(100));
        let _taken = Arc::clone(&gate.slots).acquire_many_owned(2).await.unwrap();
        // Two slots each freed every 100 ms: the 10th in line starts after 500 ms, the 21st
        // after 1050 ms, beyond twice the bound.
        assert_eq!(gate.expected_wait(10), Duration::from_millis(500));
        gate.waiting.store(20, Ordering::Relaxed);
        let started = tokio::time::Instant::now();
        let refused = gate.admit().await.unwrap_err();
        assert_eq!(refused.0, Refusal::QueueTooLong);
        assert_eq!(refused.1, Duration::from_millis(1050));
        assert_eq!(started.elapsed(), Duration::ZERO, "refused without waiting");
        assert_eq!(gate.waiting.load(Ordering::Relaxed), 20, "left the queue");
        // The 11th, expected at 550 ms, is within twice the bound: it waits, and its deadline
        // refuses it at 500 ms.
        gate.waiting.store(10, Ordering::Relaxed);
        let refused = gate.admit().await.unwrap_err();
        assert_eq!(refused.0, Refusal::WaitedTooLong);
        assert_eq!(started.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn the_early_refusal_answers_what_admission_would_refuse_at_once_and_only_that() {
        let release = Arc::new(Notify::new());
        let admission = AdmissionLayer::new(AdmissionLimits {
            max_in_flight: 1,
            max_queue_wait: Duration::from_millis(500),
        });
        let gate = Arc::clone(&admission.gate);
        let early = admission.early();
        let svc = admission.layer(held(Arc::clone(&release)));
        let first = tokio::spawn(svc.clone().oneshot(Request::new(Body::empty())));
        tokio::task::yield_now().await;
        // The slot is busy, but nothing is known yet of how long it is held: pass on and wait.
        assert!(early.refuse_now().is_none());
        gate.held(Duration::from_secs(1));
        gate.waiting.store(1, Ordering::Relaxed);
        // One already waiting a second: the next would start after 2 s, beyond twice 500 ms.
        let refused = early.refuse_now().expect("refused at once");
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            refused.extensions().get::<ProblemCode>().unwrap().0,
            Code::Overloaded
        );
        assert!((2..=4).contains(&retry_after_of(&refused)));
        gate.waiting.store(0, Ordering::Relaxed);
        release.notify_one();
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
        assert!(
            early.refuse_now().is_none(),
            "a free slot: nothing is refused early"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_wait_leaves_the_queue_and_a_finished_request_frees_its_slot() {
        let release = Arc::new(Notify::new());
        let layer = AdmissionLayer::new(AdmissionLimits {
            max_in_flight: 1,
            max_queue_wait: Duration::from_secs(5),
        });
        let gate = Arc::clone(&layer.gate);
        let svc = layer.layer(held(Arc::clone(&release)));
        let first = tokio::spawn(svc.clone().oneshot(Request::new(Body::empty())));
        tokio::task::yield_now().await;
        let waiter = tokio::spawn(svc.clone().oneshot(Request::new(Body::empty())));
        tokio::task::yield_now().await;
        assert_eq!(gate.waiting.load(Ordering::Relaxed), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(gate.waiting.load(Ordering::Relaxed), 0);
        release.notify_one();
        first.await.unwrap().unwrap();
        assert_eq!(gate.slots.available_permits(), 1);
    }

    #[test]
    fn the_average_hold_moves_an_eighth_of_the_way_to_each_sample() {
        let gate = Gate::new(AdmissionLimits {
            max_in_flight: 1,
            max_queue_wait: Duration::ZERO,
        });
        gate.held(Duration::from_millis(80));
        assert_eq!(gate.mean_hold_ns.load(Ordering::Relaxed), 80_000_000);
        gate.held(Duration::from_millis(0));
        assert_eq!(gate.mean_hold_ns.load(Ordering::Relaxed), 70_000_000);
        gate.held(Duration::from_millis(150));
        assert_eq!(gate.mean_hold_ns.load(Ordering::Relaxed), 80_000_000);
    }

    #[test]
    fn retry_after_covers_the_expected_wait_and_spreads_a_burst() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let secs = retry_after(Duration::from_millis(2500));
            assert!((3..=5).contains(&secs), "{secs}");
            seen.insert(secs);
        }
        assert_eq!(seen.len(), 3, "every value in the range occurs");
        assert!((1..=3).contains(&retry_after(Duration::ZERO)));
    }
}
