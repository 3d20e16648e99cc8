//! Following a database that moved: while the breaker is open, the host is looked up again in
//! the background, and the pinned address switches only to one that accepts a connection.

use std::{sync::Arc, time::Duration};

use super::{WeakDb, breaker::BreakerState, resolve};

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
            let mut delay = Duration::from_secs(2);
            loop {
                let Some(d) = db.upgrade() else { return };
                if d.breaker().state() == BreakerState::Closed {
                    break;
                }
                let address = d.address();
                match address.re_resolve().await {
                    resolve::ReResolved::Switched { from, to } => {
                        tracing::warn!(
                            db.host = address.host(), ?from, %to,
                            "database address changed: switched to an address that answers"
                        );
                        // The breaker's next probe tries the new address; if that fails too, the
                        // breaker reopens and this starts over.
                        break;
                    }
                    outcome => tracing::info!(
                        db.host = address.host(), ?outcome, retry_in = ?delay,
                        "re-resolved the database host during an outage; keeping the address"
                    ),
                }
                drop(d);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    });
}
