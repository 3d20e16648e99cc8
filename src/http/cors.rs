//! CORS (`CORS_ALLOWED_ORIGINS`): which browser origins may read the answers, and the answer to
//! a preflight. Applied by the front layer, outside everything that can answer, so problems and
//! refusals carry the headers too and browsers can read them.
//!
//! Written here rather than with tower-http's `CorsLayer`, which does the same for any policy:
//! ours is fixed at startup, so every header value is rendered once, and asking it costs two
//! comparisons and the inserts. tower-http's layer builds a header map for each request, and its
//! configuration (a dozen values) is cloned each time axum clones a route's service for a call:
//! 1.5k instructions of a 55k GET (loadtest/RESULTS.md#layer-costs). The behaviour is tower-http's
//! for this configuration: any `OPTIONS` request is a preflight answered here (200, no body);
//! `Access-Control-Allow-Origin` is `*`, or the request's `Origin` when it is in the list (and
//! absent otherwise); `Vary: origin` only when the answer depends on it (a list).

use axum::{
    body::Body,
    http::{HeaderMap, HeaderValue, Method, header},
    response::Response,
};

use crate::config::CorsOrigins;

/// Request headers a browser may send beyond the safelisted ones.
const ALLOWED_HEADERS: &[&str] = &[
    "content-type",
    "accept",
    "authorization",
    super::trace::REQUEST_ID,
    super::routes::extract::IDEMPOTENCY_KEY,
    "if-match",
    "if-none-match",
];

/// Response headers a browser's script may read beyond the safelisted ones.
const EXPOSED_HEADERS: &[&str] = &[
    "idempotent-replayed",
    "location",
    "link",
    "etag",
    "retry-after",
    "ratelimit",
    "ratelimit-policy",
    super::trace::REQUEST_ID,
];

/// How long a browser may cache a preflight's answer.
const MAX_AGE_SECONDS: u32 = 3600;

/// The policy, each header value rendered once.
#[derive(Debug)]
pub(super) struct CorsPolicy {
    origins: CorsOrigins,
    allow_methods: HeaderValue,
    allow_headers: HeaderValue,
    expose_headers: HeaderValue,
    max_age: HeaderValue,
}

impl CorsPolicy {
    pub(super) fn new(origins: &CorsOrigins) -> Self {
        let methods = [
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ];
        CorsPolicy {
            origins: origins.clone(),
            allow_methods: listed(methods.iter().map(Method::as_str)),
            allow_headers: listed(ALLOWED_HEADERS.iter().copied()),
            expose_headers: listed(EXPOSED_HEADERS.iter().copied()),
            max_age: HeaderValue::from(MAX_AGE_SECONDS),
        }
    }

    /// The `Access-Control-Allow-Origin` a request with these headers gets: `*`, its own origin
    /// when listed, or none.
    pub(super) fn allowed_origin(&self, request: &HeaderMap) -> Option<HeaderValue> {
        match &self.origins {
            CorsOrigins::Any => Some(HeaderValue::from_static("*")),
            CorsOrigins::List(list) => request
                .get(header::ORIGIN)
                .filter(|origin| list.contains(origin))
                .cloned(),
        }
    }

    /// The answer to a preflight (an `OPTIONS` request).
    pub(super) fn preflight(&self, origin: Option<HeaderValue>) -> Response {
        let mut res = Response::new(Body::empty());
        let headers = res.headers_mut();
        headers.reserve(5);
        self.vary(headers);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.allow_methods.clone(),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            self.allow_headers.clone(),
        );
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        if let Some(origin) = origin {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        }
        res
    }

    /// The headers on any other answer (the handler's, a problem, a refusal).
    pub(super) fn apply(&self, origin: Option<HeaderValue>, headers: &mut HeaderMap) {
        self.vary(headers);
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            self.expose_headers.clone(),
        );
        if let Some(origin) = origin {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        }
    }

    /// Appended, not set: the answer may already vary on something else.
    fn vary(&self, headers: &mut HeaderMap) {
        if matches!(self.origins, CorsOrigins::List(_)) {
            headers.append(header::VARY, HeaderValue::from_static("origin"));
        }
    }
}

fn listed<'a>(items: impl Iterator<Item = &'a str>) -> HeaderValue {
    let text = items.collect::<Vec<_>>().join(",");
    HeaderValue::from_str(&text).expect("header names and methods are valid header text")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(origin: Option<&'static str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_static(o));
        }
        h
    }

    #[test]
    fn any_origin_is_a_star_without_vary() {
        let policy = CorsPolicy::new(&CorsOrigins::Any);
        let origin = policy.allowed_origin(&request(Some("https://a.example")));
        assert_eq!(origin.as_ref().unwrap(), "*");
        assert_eq!(policy.allowed_origin(&request(None)).unwrap(), "*");
        let mut headers = HeaderMap::new();
        policy.apply(origin, &mut headers);
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert!(
            headers[header::ACCESS_CONTROL_EXPOSE_HEADERS]
                .to_str()
                .unwrap()
                .contains("etag")
        );
        assert!(headers.get(header::VARY).is_none());
    }

    #[test]
    fn a_listed_origin_is_echoed_an_unlisted_one_gets_nothing_and_both_vary() {
        let policy = CorsPolicy::new(&CorsOrigins::List(vec![HeaderValue::from_static(
            "https://app.example",
        )]));
        let mut headers = HeaderMap::new();
        headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        policy.apply(
            policy.allowed_origin(&request(Some("https://app.example"))),
            &mut headers,
        );
        assert_eq!(
            headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example"
        );
        let vary: Vec<_> = headers.get_all(header::VARY).iter().collect();
        assert_eq!(
            vary,
            ["accept-encoding", "origin"],
            "appended, not replaced"
        );

        for other in [Some("https://evil.example"), None] {
            let origin = policy.allowed_origin(&request(other));
            assert!(origin.is_none(), "{other:?}");
            let res = policy.preflight(origin);
            assert!(
                res.headers()
                    .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
                    .is_none()
            );
            assert_eq!(res.headers()[header::VARY], "origin");
        }
    }

    #[test]
    fn a_preflight_allows_the_methods_and_headers_the_api_takes_for_an_hour() {
        let policy = CorsPolicy::new(&CorsOrigins::Any);
        let res = policy.preflight(policy.allowed_origin(&request(Some("https://a.example"))));
        assert_eq!(res.status(), 200);
        let h = res.headers();
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(h[header::ACCESS_CONTROL_MAX_AGE], "3600");
        let methods = h[header::ACCESS_CONTROL_ALLOW_METHODS].to_str().unwrap();
        for m in ["GET", "POST", "PATCH", "DELETE"] {
            assert!(methods.split(',').any(|x| x == m), "{m} in {methods}");
        }
        let allowed = h[header::ACCESS_CONTROL_ALLOW_HEADERS].to_str().unwrap();
        for name in ALLOWED_HEADERS {
            assert!(allowed.split(',').any(|x| x == *name), "{name}");
        }
        assert!(h.get(header::ACCESS_CONTROL_EXPOSE_HEADERS).is_none());
    }
}
