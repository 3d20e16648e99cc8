//! The keys tokens are verified with: one key and the one algorithm it accepts, and the set a
//! JWK Set's refresher replaces while the verifier reads it. Apart from both, so that the
//! verifier (`jwt`) and the loader (`jwks`) each depend on it and not on each other.

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicU64, Ordering},
};

use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::Notify;

/// One verification key, with the one algorithm it accepts.
pub struct Key {
    /// `None`: the key for tokens without a `kid`.
    pub(super) kid: Option<String>,
    pub(super) alg: Algorithm,
    pub(super) key: DecodingKey,
}

impl Key {
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// The keys currently loaded, shared by the verifier and the refresher.
pub struct KeySet {
    keys: RwLock<Arc<[Key]>>,
    /// Bumped whenever the keys are replaced, so tokens verified with the old ones are verified
    /// again (see the verifier's cache).
    generation: AtomicU64,
    pub(super) wanted: Notify,
}

impl KeySet {
    pub fn new(keys: Vec<Key>) -> Arc<Self> {
        Arc::new(KeySet {
            keys: RwLock::new(keys.into()),
            generation: AtomicU64::new(0),
            wanted: Notify::new(),
        })
    }

    /// The keys as of now (a cheap shared copy; verification runs without a lock).
    pub fn current(&self) -> Arc<[Key]> {
        match self.keys.read() {
            Ok(keys) => keys.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(super) fn replace(&self, keys: Vec<Key>) {
        match self.keys.write() {
            Ok(mut k) => *k = keys.into(),
            Err(poisoned) => *poisoned.into_inner() = keys.into(),
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Which load of the keys is current.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Asks the refresher for a refresh (it decides whether one is due).
    pub fn want_refresh(&self) {
        self.wanted.notify_one();
    }
}
