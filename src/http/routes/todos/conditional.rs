//! Conditional requests (RFC 9110 §13): a todo's `ETag` is its version; `If-None-Match` on `GET`
//! answers `304`, `If-Match` on `PATCH` and `DELETE` makes the write happen only while the todo is
//! still at a version the client names (`412` otherwise, and nothing changes). A page of the
//! collection has a weak `ETag` of its own ([`page_etag`]), so a polling client gets `304` too.
//!
//! The entity-tag lists are parsed here rather than with the `headers` crate: its `IfMatch`
//! answers only "does this one tag pass", and the check has to travel to the database as the list
//! of acceptable versions, so that the comparison and the write are one statement and a
//! concurrent write cannot slip in between.

use axum::{
    extract::FromRequestParts,
    http::{HeaderMap, HeaderValue, header, request::Parts},
};

use crate::http::problem::{ApiError, code::Code};

/// What `If-Match` and `If-None-Match` accept, as the OpenAPI document states it: `*`, or a list of
/// `[W/]"…"` entity tags (RFC 9110 §8.8.3) separated by commas, with empty elements and optional
/// whitespace, and at least one tag.
/// (HTTP removes whitespace at either end of a value, so the pattern need not allow it there.)
pub const ENTITY_TAGS_PATTERN: &str =
    r#"^(\*|[ \t,]*(W/)?"[!#-~]*"([ \t]*,[ \t,]*(W/)?"[!#-~]*")*[ \t,]*)$"#;

/// The `ETag` of a todo at `version`: a strong tag, `"<version>"`.
pub fn etag(version: i64) -> HeaderValue {
    tag("", version)
}

/// `<prefix>"<number>"`: `""` for a strong tag, `"W/"` for a weak one.
fn tag(prefix: &str, number: i64) -> HeaderValue {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(number);
    let mut tag = String::with_capacity(prefix.len() + digits.len() + 2);
    tag.push_str(prefix);
    tag.push('"');
    tag.push_str(digits);
    tag.push('"');
    HeaderValue::from_str(&tag).expect("digits and quotes are a valid header value")
}

/// The weak `ETag` of a page of the collection, and the number `If-None-Match` is compared with
/// ([`IfNoneMatch::is_current`]): a hash of what can change on the page — each todo's id and
/// version (every write to a todo bumps its version, migration 20261206000002; a create or a
/// delete changes the ids), whether a next page follows (the `Link` header) — and the release,
/// since a new one may render the same rows differently. The links in the page are built from the
/// request's URL, which a cache keys on anyway. The hash is fixed (no random seed) so that every
/// replica of a release gives a page the same tag; 63 bits, so the tag reads as a version does.
pub fn page_etag(rows: impl Iterator<Item = (i64, i64)>, more: bool) -> (i64, HeaderValue) {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = foldhash::quality::FixedState::with_seed(0).build_hasher();
    hasher.write(crate::release::RELEASE.as_bytes());
    for (id, version) in rows {
        hasher.write_i64(id);
        hasher.write_i64(version);
    }
    hasher.write_u8(u8::from(more));
    let number = (hasher.finish() >> 1) as i64;
    (number, tag("W/", number))
}

/// A parsed `If-Match` or `If-None-Match`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Condition {
    /// `*`: any current version.
    Any,
    /// The listed tags; `weak` ones never satisfy `If-Match` (strong comparison). Tags that are
    /// not one of our versions are kept as `None`: they match nothing.
    Tags(Vec<(bool, Option<i64>)>),
}

/// The `If-Match` of a write: `None` (no header, or `*`) means unconditional, otherwise the
/// versions the write may change. `*` is unconditional because a missing todo is a 404 either
/// way: RFC 9110 §13.2.1 has preconditions ignored when the answer would not be 2xx or 412.
///
/// An extractor that reads the one header, rather than taking a copy of the whole `HeaderMap`
/// (axum's `HeaderMap` extractor clones every header: loadtest/archive.md#issue-14 has its price).
pub struct IfMatch(pub Option<Vec<i64>>);

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(IfMatch(match parse(&parts.headers, header::IF_MATCH)? {
            None | Some(Condition::Any) => None,
            Some(Condition::Tags(tags)) => Some(
                tags.into_iter()
                    .filter(|(weak, _)| !weak)
                    .filter_map(|(_, v)| v)
                    .collect(),
            ),
        }))
    }
}

/// The `If-None-Match` of a read.
pub struct IfNoneMatch(Option<Condition>);

impl IfNoneMatch {
    /// Whether the client's copy at `version` (a todo's, or a page's [`page_etag`] number) is
    /// current (weak comparison), so the answer is `304 Not Modified`.
    pub fn is_current(&self, version: i64) -> bool {
        match &self.0 {
            None => false,
            Some(Condition::Any) => true,
            Some(Condition::Tags(tags)) => tags.iter().any(|(_, v)| *v == Some(version)),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IfNoneMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse(&parts.headers, header::IF_NONE_MATCH).map(IfNoneMatch)
    }
}

/// Every field line of `name`, combined as one list.
fn parse(headers: &HeaderMap, name: header::HeaderName) -> Result<Option<Condition>, ApiError> {
    let mut tags = Vec::new();
    let mut any = false;
    let mut present = false;
    for value in headers.get_all(&name) {
        present = true;
        let text = value.to_str().map_err(|_| invalid(&name))?;
        if text.trim() == "*" {
            any = true;
            continue;
        }
        parse_list(text, &mut tags).ok_or_else(|| invalid(&name))?;
    }
    Ok(match (present, any) {
        (false, _) => None,
        // A list of no tags (only commas and spaces) names nothing: malformed, not "match none".
        (true, false) if tags.is_empty() => return Err(invalid(&name)),
        (true, true) if tags.is_empty() => Some(Condition::Any),
        // `*` mixed with tags is malformed.
        (true, true) => return Err(invalid(&name)),
        (true, false) => Some(Condition::Tags(tags)),
    })
}

/// `#entity-tag`: comma-separated `[W/]"<etagc>*"`, empty elements allowed (RFC 9110 §5.6.1).
fn parse_list(text: &str, out: &mut Vec<(bool, Option<i64>)>) -> Option<()> {
    let mut rest = text.trim_start_matches([' ', '\t']);
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            return Some(());
        }
        let weak = rest.starts_with("W/");
        if weak {
            rest = &rest[2..];
        }
        rest = rest.strip_prefix('"')?;
        let end = rest.find('"')?;
        let opaque = &rest[..end];
        // etagc: %x21 / %x23-7E / obs-text; the header value is already visible ASCII.
        if opaque.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return None;
        }
        out.push((weak, version_of(opaque)));
        rest = rest[end + 1..].trim_start_matches([' ', '\t']);
        if !(rest.is_empty() || rest.starts_with(',')) {
            return None;
        }
    }
}

/// Our tags are plain decimal versions; anything else names no version of ours.
fn version_of(opaque: &str) -> Option<i64> {
    if opaque.is_empty() || !opaque.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    opaque.parse().ok()
}

fn invalid(name: &header::HeaderName) -> ApiError {
    ApiError::bad_request(
        Code::InvalidPrecondition,
        format!("{name} must be * or a comma-separated list of entity tags such as \"3\""),
    )
    .with_hint("Send back the ETag value of the todo exactly as you received it.")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: header::HeaderName, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn etags_are_quoted_versions() {
        assert_eq!(etag(7), "\"7\"");
        assert_eq!(etag(i64::MAX), format!("\"{}\"", i64::MAX));
    }

    fn if_match(values: &[&str]) -> Result<Option<Vec<i64>>, ApiError> {
        let (mut parts, ()) = axum::http::Request::new(()).into_parts();
        parts.headers = headers(header::IF_MATCH, values);
        ready_now(IfMatch::from_request_parts(&mut parts, &())).map(|m| m.0)
    }

    fn if_none_match(values: &[&str]) -> IfNoneMatch {
        IfNoneMatch(
            parse(
                &headers(header::IF_NONE_MATCH, values),
                header::IF_NONE_MATCH,
            )
            .unwrap(),
        )
    }

    /// The extractors never wait: poll once.
    fn ready_now<T>(f: impl Future<Output = T>) -> T {
        let mut f = std::pin::pin!(f);
        match f
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
        {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => unreachable!("extractors of headers do not wait"),
        }
    }

    #[test]
    fn a_page_tag_is_weak_stable_and_names_its_rows_and_whether_more_follow() {
        let page = |rows: &[(i64, i64)], more| page_etag(rows.iter().copied(), more);
        let (n, tag) = page(&[(1, 1), (2, 3)], false);
        assert_eq!(
            page(&[(1, 1), (2, 3)], false),
            (n, tag.clone()),
            "same rows, same tag"
        );
        assert_eq!(tag, format!("W/\"{n}\""));
        assert!(n >= 0);
        assert!(if_none_match(&[tag.to_str().unwrap()]).is_current(n));
        for (rows, more) in [
            (&[(1, 1), (2, 4)][..], false),         // a todo changed
            (&[(1, 1)][..], false),                 // deleted
            (&[(1, 1), (2, 3), (3, 1)][..], false), // created
            (&[(2, 3), (1, 1)][..], false),         // reordered
            (&[(1, 1), (2, 3)][..], true),          // a next page now follows
            (&[][..], false),
        ] {
            assert_ne!(page(rows, more).0, n, "{rows:?} {more}");
        }
    }

    #[test]
    fn if_match_lists_only_strong_tags_of_our_versions() {
        let m = |v: &[&str]| if_match(v).unwrap();
        assert_eq!(m(&[]), None);
        assert_eq!(m(&["*"]), None);
        assert_eq!(m(&["\"3\""]), Some(vec![3]));
        assert_eq!(m(&["\"3\", W/\"4\" ,\"x\",,\"5\""]), Some(vec![3, 5]));
        assert_eq!(m(&["\"3\"", "\"9\""]), Some(vec![3, 9]));
        // A tag that is not ours names no version: the write can only be refused.
        assert_eq!(m(&["\"abc\""]), Some(vec![]));
        assert_eq!(m(&["\"99999999999999999999\""]), Some(vec![]));
    }

    #[test]
    fn if_none_match_compares_weakly() {
        assert!(!if_none_match(&[]).is_current(1));
        assert!(if_none_match(&["*"]).is_current(1));
        assert!(if_none_match(&["W/\"2\""]).is_current(2));
        assert!(if_none_match(&["\"1\", \"2\""]).is_current(2));
        assert!(!if_none_match(&["\"1\""]).is_current(2));
    }

    #[test]
    fn malformed_lists_are_a_400_problem() {
        for bad in [
            "3",
            "\"3",
            "\"3\" \"4\"",
            "W/3",
            "*, \"3\"",
            "\"a b\"",
            "",
            " , ,",
        ] {
            let err = if_match(&[bad]).expect_err(bad);
            assert_eq!(err.status(), 400, "{bad}");
            assert_eq!(err.problem().code, Code::InvalidPrecondition, "{bad}");
        }
    }

    /// The parser accepts exactly what the documented pattern says, on strings built from the
    /// pieces of the grammar (scripts/contract.sh tests the same from the document over HTTP).
    #[test]
    fn lists_are_accepted_exactly_when_the_documented_pattern_matches() {
        use rand::{Rng, SeedableRng, seq::IndexedRandom};
        let pattern = regex::Regex::new(ENTITY_TAGS_PATTERN).unwrap();
        let pieces = ["\"", "W/", "*", ",", " ", "\t", "3", "a", "!", "#", "~"];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let n = rng.random_range(0..=8);
            let s: String = (0..n).map(|_| *pieces.choose(&mut rng).unwrap()).collect();
            // What HTTP delivers: no whitespace at either end.
            let s = s.trim_matches([' ', '\t']);
            let parsed = if_match(&[s]).is_ok();
            assert_eq!(parsed, pattern.is_match(s), "{s:?}");
            accepted += usize::from(parsed);
        }
        assert!(
            accepted > 200,
            "the generator reaches valid lists too: {accepted}"
        );
    }
}
