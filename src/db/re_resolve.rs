//! Following a database that moved: while the breaker is open, the host is looked up again in
//! the background, and the pinned address switches only to one that accepts a connection.

use std::{sync::Arc, time::Duration};

use super::{
    Db, WeakDb,
    backoff::{Attempt, Backoff},
    breaker::BreakerState,
    resolve,
};

/// While the breaker is open (the pinned address keeps failing), looks the host up again in the
/// background: at once when it opens, then with doubling delays up to a minute, until it closes.
/// One lookup per outage in the common case; never a lookup storm, never on a request.
pub(super) fn spawn(db: WeakDb) {
    tokio::spawn(async move {
        loop {
            let Some(breaker) = db.upgrade().map(|d| Arc::clone(&d.inner.breaker)) else {
                return;
            };
            breaker.opened().await;
            let backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(60));
            db.retry(backoff, |d| async move { re_resolve_once(&d).await })
                .await;
        }
    });
}

/// One lookup during an outage: done when the breaker closed or the address switched.
async fn re_resolve_once(db: &Db) -> Attempt {
    if db.breaker().state() == BreakerState::Closed {
        return Attempt::Done;
    }
    let address = db.address();
    match address.re_resolve().await {
        resolve::ReResolved::Switched { from, to } => {
            tracing::warn!(
                db.host = address.host(), ?from, %to,
                "database address changed: switched to an address that answers"
            );
            // The breaker's next probe tries the new address; if that fails too, the breaker
            // reopens and this starts over.
            Attempt::Done
        }
        outcome => {
            tracing::info!(
                db.host = address.host(),
                ?outcome,
                "re-resolved the database host during an outage; keeping the address"
            );
            Attempt::Again
        }
    }
}
