//! The client-side deadline of one database call: `statement_timeout` plus a margin, which ends
//! the wait when the server cannot (a half-open connection answers nothing). A future of its own
//! rather than an `async fn`, for the reason on [`within`].

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;

/// Runs one call under the client-side deadline; running out counts as a broken connection (it is
/// discarded and its siblings checked), not as a slow query.
///
/// A future of its own rather than an `async fn`: an `async fn` keeps its argument's slot after
/// moving the call into tokio's `Timeout`, so the call's future (most of a request's state) was
/// stored twice and copied once more (loadtest/RESULTS.md#layer-costs).
pub(super) fn within<F: Future>(deadline: Option<Duration>, call: F) -> Within<F> {
    match deadline {
        None => Within::Unbounded { call },
        Some(limit) => Within::Bounded {
            call: tokio::time::timeout(limit, call),
            limit,
        },
    }
}

pin_project! {
    /// The future of [`within`].
    #[project = WithinProj]
    pub(super) enum Within<F> {
        Unbounded { #[pin] call: F },
        Bounded { #[pin] call: tokio::time::Timeout<F>, limit: Duration },
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Result<F::Output, sqlx::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            WithinProj::Unbounded { call } => call.poll(cx).map(Ok),
            WithinProj::Bounded { call, limit } => call.poll(cx).map(|done| {
                done.map_err(|_| {
                    sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer from the database connection within {limit:?}"),
                    ))
                })
            }),
        }
    }
}
