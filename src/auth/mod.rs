//! Who is calling: bearer tokens (JWT) verified into a [`Principal`], the owner of todos and the
//! key of rate limits (issue 17).
//!
//! Verification is `jsonwebtoken`'s, not hand-written crypto. What this module adds is policy: the
//! algorithm is pinned per key (a token cannot choose `none` or switch HS/RS families), `exp` and
//! `sub` are required, `nbf` is honoured, `aud` and `iss` are checked when configured, and every
//! rejection has a reason that metrics can count and `WWW-Authenticate` can describe (RFC 6750).
//!
//! The HTTP side (the bearer header, 401/403 answers, the rate-limit key) is `http::guard::authenticate`.

pub mod jwks;
pub mod jwt;
pub mod keys;

pub use jwt::{
    MAX_SUB_BYTES, Mint, Principal, READ_SCOPE, Rejection, Scopes, Verifier, WRITE_SCOPE,
    mint_hs256, usable_sub,
};
