//! Who is calling: the [`Caller`] the authentication layer leaves in the request's extensions,
//! the [`Owner`] a handler reads from it, and the [`Key`] the rate limiter counts it under (the
//! token's `sub`, else the client's address as [`ClientAddr`] finds it).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::{Request, request::Parts},
};
use tower_governor::{GovernorError, key_extractor::KeyExtractor};

use super::client_ip::ClientAddr;
use crate::{auth::Principal, http::problem::ApiError};

/// Who is calling, as the authentication layer found out.
#[derive(Debug, Clone)]
pub enum Caller {
    /// `AUTH_MODE=none`: everyone is the one anonymous owner.
    Anonymous,
    Principal(Principal),
}

impl Caller {
    /// The owner of the todos this caller sees: the token's `sub`, or `""` for the anonymous one.
    pub fn owner(&self) -> &str {
        match self {
            Caller::Anonymous => "",
            Caller::Principal(p) => &p.sub,
        }
    }
}

/// The caller whose todos a handler works on.
#[derive(Debug)]
pub struct Owner(pub Caller);

impl Owner {
    pub fn as_str(&self) -> &str {
        self.0.owner()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Owner {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        // Taken, not cloned: nothing after the handler's extractors reads it. Missing only if a
        // route were served without the authentication layer, which must fail closed.
        match parts.extensions.remove::<Caller>() {
            Some(caller) => Ok(Owner(caller)),
            None => {
                tracing::error!("a data route was reached without the authentication layer");
                Err(ApiError::unexpected())
            }
        }
    }
}

/// Whom a request counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// An unauthenticated caller, by address (IPv6 by prefix).
    Addr(IpAddr),
    /// An authenticated caller, by the token's `sub`.
    Sub(Arc<str>),
}

/// Extracts the [`Key`]: the authenticated caller's `sub`, else the client's address.
#[derive(Debug, Clone)]
pub struct CallerKey(pub ClientAddr);

impl CallerKey {
    /// The client's address as a key, from the TCP peer and (behind trusted proxies)
    /// `X-Forwarded-For`.
    pub fn addr<T>(&self, req: &Request<T>) -> Option<IpAddr> {
        let peer = req.extensions().get::<ConnectInfo<SocketAddr>>()?.0.ip();
        Some(self.0.key(self.0.client(peer, req.headers())))
    }
}

impl KeyExtractor for CallerKey {
    type Key = Key;

    fn extract<T>(&self, req: &Request<T>) -> Result<Key, GovernorError> {
        if let Some(Caller::Principal(p)) = req.extensions().get::<Caller>() {
            return Ok(Key::Sub(p.sub.clone()));
        }
        self.addr(req)
            .map(Key::Addr)
            .ok_or(GovernorError::UnableToExtractKey)
    }
}
