//! Background work on the database that retries until it succeeds (applying migrations, looking a
//! host up again): doubling delays up to a ceiling, and a hold on the database that is weak, so
//! the work ends with the application instead of keeping its pool alive.

use std::time::Duration;

use super::{Db, WeakDb};

/// Doubling delays from `first` up to `max`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Backoff {
    delay: Duration,
    max: Duration,
}

impl Backoff {
    pub(super) fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { delay: first, max }
    }

    /// The delay the next wait will take.
    pub(super) fn next_delay(&self) -> Duration {
        self.delay
    }

    /// Waits the current delay, then doubles it (up to the ceiling).
    pub(super) async fn wait(&mut self) {
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(self.max);
    }
}

/// What one attempt of retried work concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Attempt {
    Done,
    Again,
}

impl WeakDb {
    /// Runs `attempt` until it is [`Attempt::Done`], waiting `backoff` between tries. Returns at
    /// once when the database handle is gone; the handle is not held while waiting.
    pub(super) async fn retry<Fut>(&self, mut backoff: Backoff, mut attempt: impl FnMut(Db) -> Fut)
    where
        Fut: Future<Output = Attempt>,
    {
        loop {
            let Some(db) = self.upgrade() else { return };
            if attempt(db).await == Attempt::Done {
                return;
            }
            backoff.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn delays_double_up_to_the_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(b.next_delay());
            let started = tokio::time::Instant::now();
            b.wait().await;
            assert_eq!(started.elapsed(), *seen.last().unwrap());
        }
        assert_eq!(
            seen,
            [100, 200, 350, 350].map(Duration::from_millis).to_vec()
        );
    }
}
