//! The absolute base of the links a response carries (each todo's `url`, `Location`, `Link`):
//! `PUBLIC_BASE_URL`, else the request's `Host` header when it is a plain `host[:port]` that
//! `ALLOWED_HOSTS` names, else the listen address. A client must not be able to make the service
//! hand out links to a host of its choosing (a `Host: evil.example` once came back as
//! `Location: http://evil.example/todos/6`).

use std::sync::Arc;

use axum::{
    extract::FromRequestParts,
    http::{HeaderValue, header, request::Parts},
};

use crate::{config::is_plain_authority, http::state::AppState};

/// The absolute base URL for links in a response: `PUBLIC_BASE_URL`, else `http://<Host>`.
///
/// Links are written straight into the string they end up in: every todo in a response carries
/// one, and formatting a base string first, then each link from it, costs a measurable share of a
/// single-todo GET (loadtest/archive.md#clones-boxes-moves, counted with `loadtest/compare.py --instructions`).
pub struct BaseUrl(Base);

enum Base {
    /// `PUBLIC_BASE_URL`, or the fallback: a whole base URL.
    Url(Arc<str>),
    /// The request's validated Host header (a cheap reference-counted clone).
    Host(HeaderValue),
}

impl BaseUrl {
    /// `<base><path>`, with room for `extra` more bytes.
    pub fn join(&self, path: &str, extra: usize) -> String {
        let (scheme, base) = match &self.0 {
            Base::Url(url) => ("", url.as_ref()),
            // Validated as ASCII when extracted.
            Base::Host(host) => ("http://", host.to_str().unwrap_or_default()),
        };
        let mut url = String::with_capacity(scheme.len() + base.len() + path.len() + extra);
        url.push_str(scheme);
        url.push_str(base);
        url.push_str(path);
        url
    }

    pub fn todo_url(&self, id: i64) -> String {
        let mut digits = itoa::Buffer::new();
        let id = digits.format(id);
        let mut url = self.join("/todos/", id.len());
        url.push_str(id);
        url
    }
}

impl FromRequestParts<AppState> for BaseUrl {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(base) = &state.public_base_url {
            return Ok(BaseUrl(Base::Url(Arc::clone(base))));
        }
        let host = match parts.headers.get(header::HOST) {
            Some(host) => Some(host.clone()),
            None => parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        Ok(BaseUrl(
            match host.filter(|h| {
                is_plain_authority(h.as_bytes())
                    && h.to_str().is_ok_and(|h| state.allowed_hosts.allows(h))
            }) {
                Some(host) => Base::Host(host),
                None => Base::Url(Arc::clone(&state.fallback_base_url)),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_host_and_port_is_echoed_into_links() {
        for ok in [
            "todo.test",
            "todo.test:9000",
            "127.0.0.1:8080",
            "[::1]:80",
            "todo_service",
        ] {
            assert!(is_plain_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "evil.test/<script>",
            "user@evil.test",
            "evil.test?x",
            "evil.test#x",
            "a b",
            "evil.test\"",
        ] {
            assert!(!is_plain_authority(bad.as_bytes()), "{bad}");
        }
        let base = BaseUrl(Base::Host(HeaderValue::from_static("todo.test:9000")));
        assert_eq!(base.todo_url(42), "http://todo.test:9000/todos/42");
        let base = BaseUrl(Base::Url(Arc::from("https://api.example/v1")));
        assert_eq!(base.todo_url(-1), "https://api.example/v1/todos/-1");
        assert_eq!(base.join("/todos", 0), "https://api.example/v1/todos");
    }
}
