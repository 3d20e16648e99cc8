//! Who is calling: bearer tokens (JWT) verified into a [`Principal`], the owner of todos and the
//! key of rate limits (issue 17).
//!
//! Verification is `jsonwebtoken`'s, not hand-written crypto. What this module adds is policy: the
//! algorithm is pinned per key (a token cannot choose `none` or switch HS/RS families), `exp` and
//! `sub` are required, `nbf` is honoured, `aud` and `iss` are checked when configured, and every
//! rejection has a reason that metrics can count and `WWW-Authenticate` can describe (RFC 6750).
//!
//! Not wired into the HTTP routes yet: the settings (`AUTH_MODE`, `AUTH_JWT_SECRET`, …), the
//! per-owner queries and the layer come in the next steps of issue 17.

pub mod jwt;

pub use jwt::{Principal, Rejection, Verifier, mint_hs256};
