//! The todos' wire format: what the API returns and accepts, and the validation that turns a
//! request body or query into what the database layer takes (or a 422 naming each bad field).

use axum::{
    body::Body,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::{
    db::todos::{Cursor, NewTodo, TodoChanges, TodoRow},
    http::{
        problem::{ApiError, FieldError},
        routes::base_url::BaseUrl,
    },
};

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;
pub const MAX_TITLE_CHARS: usize = 1000;

/// Headers a JSON answer carries at most on its way out: the handler's (content type, `ETag`,
/// `Location` or `Link`, `Idempotent-Replayed`), the rate limiter's four, compression's `Vary`
/// and `Content-Encoding`, the content length, and the front layer's request id, CORS pair and
/// trace id.
const ANSWER_HEADERS: usize = 16;

/// A JSON answer, its header map allocated once with room for every header the layers add on
/// its way out, where `axum::Json`'s grows on the way (~500 instructions of a single-todo GET,
/// loadtest/RESULTS.md#layer-costs).
pub(super) fn json_answer(status: StatusCode, body: &impl Serialize) -> Result<Response, ApiError> {
    let mut bytes = Vec::with_capacity(256);
    serde_json::to_writer(&mut bytes, body).map_err(|e| ApiError::internal(&e))?;
    let mut res = Response::new(Body::from(bytes));
    *res.status_mut() = status;
    let mut headers = HeaderMap::with_capacity(ANSWER_HEADERS);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    *res.headers_mut() = headers;
    Ok(res)
}

/// A todo as the API returns it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Todo {
    pub id: i64,
    /// Absolute URL of this todo.
    pub url: String,
    pub title: String,
    pub completed: bool,
    /// Optional position; lists sort by it (todos without one come last), then by id.
    pub order: Option<i64>,
    #[serde(serialize_with = "rfc3339_micros")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339_micros")]
    pub updated_at: DateTime<Utc>,
}

/// RFC 3339 in UTC with exactly six fractional digits (`2026-11-23T10:00:00.123456Z`): one fixed
/// form, which every ISO 8601 parser takes (Python's `fromisoformat` before 3.11 refuses other
/// fraction lengths). Written digit by digit: chrono's `Display` goes through the `fmt`
/// machinery and was most of a 20-row page's serialisation cost in the profile.
fn rfc3339_micros<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    use chrono::{Datelike, Timelike};
    // The naive value, read once: each field read through `DateTime` would convert it to local
    // time first (an offset addition, even for UTC).
    let t = t.naive_utc();
    let year = t.year();
    if !(0..=9999).contains(&year) {
        return s.collect_str(
            &t.and_utc()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        );
    }
    fn put(b: &mut [u8], at: usize, width: usize, mut v: u32) {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    put(&mut b, 0, 4, year as u32);
    put(&mut b, 5, 2, t.month());
    put(&mut b, 8, 2, t.day());
    put(&mut b, 11, 2, t.hour());
    put(&mut b, 14, 2, t.minute());
    put(&mut b, 17, 2, t.second());
    // A leap second shows as nanoseconds past 1e9 on second 59.
    put(&mut b, 20, 6, (t.nanosecond() / 1000).min(999_999));
    s.serialize_str(std::str::from_utf8(&b).expect("ASCII digits"))
}

impl Todo {
    pub(super) fn from_row(row: TodoRow, base: &BaseUrl) -> Todo {
        Todo {
            url: base.todo_url(row.id),
            id: row.id,
            title: row.title,
            completed: row.completed,
            order: row.position,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// What `validate_title` accepts, as the OpenAPI document states it (ECMA-262 regex): at least
/// one character that is neither NUL nor Unicode White_Space (what `str::trim` removes), and no
/// NUL anywhere. The length (1 to 1000 characters) is stated beside it.
pub const TITLE_PATTERN: &str = r"^[^\u0000]*[^\u0000\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$";

/// What `decode_cursor` accepts: two 16-digit lowercase hex numbers.
pub const CURSOR_PATTERN: &str = "^[0-9a-f]{16}_[0-9a-f]{16}$";

/// Body of `POST /todos`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTodo {
    /// Required; 1 to 1000 characters, not blank.
    #[schema(required = true, value_type = String, min_length = 1, max_length = 1000)]
    #[serde(default)]
    pub title: Option<String>,
    /// Defaults to `false`.
    #[serde(default)]
    pub completed: Option<bool>,
    #[serde(default, deserialize_with = "integer")]
    pub order: Option<i64>,
}

/// Body of `PATCH /todos/{id}`: any subset of the fields; `"order": null` clears the order.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTodo {
    /// 1 to 1000 characters, not blank; not null.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String, required = false, min_length = 1, max_length = 1000)]
    pub title: Option<Option<String>>,
    /// Not null.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = bool, required = false)]
    pub completed: Option<Option<bool>>,
    #[serde(default, deserialize_with = "present_integer")]
    #[schema(value_type = Option<i64>)]
    pub order: Option<Option<i64>>,
}

/// An `order`: JSON Schema's (and so the document's) `integer` is any number without a fraction,
/// so `2.0` and `1e3` are integers too; serde's `i64` takes only `2`. A number that is not exactly
/// an integer in the 64-bit range is refused with a message naming the range.
///
/// Read from the number's own text, exactly: serde_json without `arbitrary_precision` turns a
/// number into the nearest float, which rounds `9007199254740993.0` to …992, `1.0000000000000000001`
/// to 1 and `1e-400` to 0, and would store them silently.
fn integer<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let Some(raw) = Option::<Box<serde_json::value::RawValue>>::deserialize(d)? else {
        return Ok(None);
    };
    let text = raw.get();
    if text == "null" {
        return Ok(None);
    }
    if !text.starts_with(['-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9']) {
        return Err(serde::de::Error::custom(format!(
            "invalid type: {text}, expected an integer"
        )));
    }
    exact_integer(text).map(Some).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "must be an integer from {} to {}, not {text}",
            i64::MIN,
            i64::MAX
        ))
    })
}

/// The value of a JSON number's text when it is exactly an integer that fits an `i64`: its
/// digits shifted by the exponent, every digit after the point zero.
fn exact_integer(text: &str) -> Option<i64> {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.strip_prefix('+').unwrap_or(e)),
        None => (unsigned, "0"),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: String = [whole, fraction].concat();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let significant = digits.trim_start_matches('0');
    if significant.is_empty() {
        return Some(0);
    }
    // Where the point falls among the significant digits.
    let leading_zeros = (digits.len() - significant.len()) as i64;
    let point = (whole.len() as i64 - leading_zeros).checked_add(exponent.parse::<i64>().ok()?)?;
    // An i64 has at most 19 digits: beyond, or below 1, it is no integer in range.
    if !(1..=19).contains(&point) {
        return None;
    }
    let point = point as usize;
    let (int_digits, rest) = significant.split_at(point.min(significant.len()));
    if !rest.bytes().all(|b| b == b'0') {
        return None;
    }
    let zeros = "0".repeat(point.saturating_sub(significant.len()));
    let sign = if negative { "-" } else { "" };
    format!("{sign}{int_digits}{zeros}").parse().ok()
}

/// [`integer`] for `PATCH`, where null (clear the order) differs from absent.
fn present_integer<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    integer(d).map(Some)
}

/// Tells "absent" (outer `None`, via `default`) from "null" (`Some(None)`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Query of `GET /todos`. Values are parsed by hand so a bad one gets a 422 naming it.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only todos with this `completed` value.
    #[param(value_type = Option<bool>)]
    pub completed: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// Opaque position to continue from, taken from the previous page's `Link: rel="next"` URL.
    pub cursor: Option<String>,
    /// Any other parameter, to be refused by name: a misspelt one (`?Limit=5`) silently ignored
    /// would give the client a page it did not ask for.
    #[serde(flatten)]
    #[param(ignore)]
    pub unknown: std::collections::BTreeMap<String, String>,
}

pub(super) struct ListParams {
    pub(super) completed: Option<bool>,
    pub(super) limit: i64,
    pub(super) after: Cursor,
}

impl ListQuery {
    pub(super) fn validate(self) -> Result<ListParams, ApiError> {
        let mut errors = Vec::new();
        let completed = match self.completed.as_deref() {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(other) => {
                errors.push(field(
                    "completed",
                    format!("{other:?} is not true or false"),
                ));
                None
            }
        };
        let limit = match self.limit.as_deref().map(str::parse::<i64>) {
            None => DEFAULT_LIMIT,
            Some(Ok(n)) if (1..=MAX_LIMIT).contains(&n) => n,
            Some(_) => {
                errors.push(field(
                    "limit",
                    format!("must be an integer from 1 to {MAX_LIMIT}"),
                ));
                DEFAULT_LIMIT
            }
        };
        for name in self.unknown.keys() {
            errors.push(field(
                name,
                "is not a parameter of this list; it takes completed, limit and cursor".into(),
            ));
        }
        let after = match self.cursor.as_deref() {
            None => Cursor::START,
            Some(raw) => decode_cursor(raw).unwrap_or_else(|| {
                errors.push(field(
                    "cursor",
                    "is not a cursor from this service; take it from a Link header".into(),
                ));
                Cursor::START
            }),
        };
        if errors.is_empty() {
            Ok(ListParams {
                completed,
                limit,
                after,
            })
        } else {
            Err(ApiError::validation_many(errors))
        }
    }
}

fn field(name: &str, message: String) -> FieldError {
    FieldError {
        field: name.to_owned(),
        message,
    }
}

/// The cursor is `<sort_key>_<id>` of the last row of the previous page, each the 16 hex digits
/// of its 64 bits. Clients treat it as opaque. Fixed-width hex rather than decimal so that
/// [`CURSOR_PATTERN`] states exactly what is accepted (a decimal `i64` has a range no short
/// pattern can state, and `str::parse` takes a `+` and leading zeros too).
pub(super) fn encode_cursor(c: Cursor) -> String {
    format!("{:016x}_{:016x}", c.sort_key as u64, c.id as u64)
}

fn decode_cursor(raw: &str) -> Option<Cursor> {
    fn hex16(s: &str) -> Option<i64> {
        (s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
            .map(|v| v as i64)
    }
    let (sort_key, id) = raw.split_once('_')?;
    Some(Cursor {
        sort_key: hex16(sort_key)?,
        id: hex16(id)?,
    })
}

fn validate_title(title: &str, errors: &mut Vec<FieldError>) {
    if title.trim().is_empty() {
        errors.push(field("title", "must not be empty or blank".into()));
    } else if title.chars().count() > MAX_TITLE_CHARS {
        errors.push(field(
            "title",
            format!("must be at most {MAX_TITLE_CHARS} characters"),
        ));
    } else if title.contains('\0') {
        // PostgreSQL text cannot hold NUL; without this check it would be a 500.
        errors.push(field("title", "must not contain NUL characters".into()));
    }
}

impl CreateTodo {
    /// The new todo, or a 422 naming every invalid field.
    pub fn validate(self) -> Result<NewTodo, ApiError> {
        let mut errors = Vec::new();
        match &self.title {
            Some(t) => validate_title(t, &mut errors),
            None => errors.push(field("title", "is required".into())),
        }
        if !errors.is_empty() {
            return Err(ApiError::validation_many(errors));
        }
        Ok(NewTodo {
            title: self.title.unwrap_or_default(),
            completed: self.completed.unwrap_or(false),
            position: self.order,
        })
    }
}

impl UpdateTodo {
    /// The changes, or a 422 naming every invalid field.
    pub fn validate(self) -> Result<TodoChanges, ApiError> {
        let mut errors = Vec::new();
        let title = match self.title {
            None => None,
            Some(None) => {
                errors.push(field("title", "must be a string, not null".into()));
                None
            }
            Some(Some(t)) => {
                validate_title(&t, &mut errors);
                Some(t)
            }
        };
        let completed = match self.completed {
            None => None,
            Some(None) => {
                errors.push(field("completed", "must be true or false, not null".into()));
                None
            }
            Some(c) => c,
        };
        if !errors.is_empty() {
            return Err(ApiError::validation_many(errors));
        }
        Ok(TodoChanges {
            title,
            completed,
            position: self.order,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_is_taken_only_when_its_text_is_exactly_an_integer_in_range() {
        for (text, value) in [
            ("0", Some(0)),
            ("-0.0", Some(0)),
            ("0e999999999999999999999", Some(0)),
            ("2.0", Some(2)),
            ("1e3", Some(1000)),
            ("12.50e1", Some(125)),
            ("1500E-3", None),
            ("15000e-3", Some(15)),
            ("9007199254740993.0", Some(9_007_199_254_740_993)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("-9223372036854775808.0", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("-9223372036854775809", None),
            ("-9223372036854775808.5", None),
            ("1.0000000000000000001", None),
            ("1e-400", None),
            ("1e400", None),
            ("1e99999999999999999999", None),
            ("0.5", None),
        ] {
            assert_eq!(exact_integer(text), value, "{text}");
        }
    }

    #[test]
    fn cursors_round_trip_including_negative_and_max_sort_keys() {
        for c in [
            Cursor {
                sort_key: -5,
                id: 10,
            },
            Cursor {
                sort_key: i64::MAX,
                id: 1,
            },
            Cursor::START,
        ] {
            assert_eq!(decode_cursor(&encode_cursor(c)), Some(c));
        }
        for bad in ["", "5", "a_b", "1_", "_1", "1_2_x", "5_10"] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }

    /// The validators accept exactly what the OpenAPI document's patterns say, on strings built
    /// to sit near each rule's edges (a property test from the document is the other half:
    /// scripts/contract.sh).
    #[test]
    fn cursors_and_titles_are_accepted_exactly_when_the_documented_pattern_matches() {
        use rand::{Rng, SeedableRng, seq::IndexedRandom};
        let cursor = regex::Regex::new(CURSOR_PATTERN).unwrap();
        let title = regex::Regex::new(TITLE_PATTERN).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let cursor_chars: Vec<char> = "0123456789abcdefABCDEF_+- x".chars().collect();
        let title_chars: Vec<char> = "a \t\n\u{b}\u{c}\r\u{85}\u{a0}\u{1680}\u{2000}\u{200a}\u{200b}\u{2028}\u{202f}\u{205f}\u{3000}\u{feff}\u{0}\u{1c}é"
            .chars()
            .collect();
        let mut agreed = 0;
        for _ in 0..20_000 {
            let len = rng.random_range(0..=34);
            let s: String = (0..len)
                .map(|_| *cursor_chars.choose(&mut rng).unwrap())
                .collect();
            assert_eq!(
                decode_cursor(&s).is_some(),
                cursor.is_match(&s),
                "cursor {s:?}"
            );
            let len = rng.random_range(0..=4);
            let s: String = (0..len)
                .map(|_| *title_chars.choose(&mut rng).unwrap())
                .collect();
            let mut errors = Vec::new();
            validate_title(&s, &mut errors);
            let documented =
                title.is_match(&s) && (1..=MAX_TITLE_CHARS).contains(&s.chars().count());
            assert_eq!(errors.is_empty(), documented, "title {s:?}");
            agreed += usize::from(documented);
        }
        assert!(agreed > 100, "the generator reaches valid titles too");
        for c in [
            Cursor::START,
            Cursor {
                sort_key: i64::MAX,
                id: 7,
            },
        ] {
            assert!(cursor.is_match(&encode_cursor(c)));
        }
    }

    #[test]
    fn timestamps_have_one_fixed_form_that_matches_chrono() {
        use chrono::{SecondsFormat, TimeZone};
        let cases = [
            Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0).unwrap(),
            Utc.timestamp_opt(1_795_000_000, 123_456_000).unwrap(),
            Utc.timestamp_opt(1_795_000_000, 7_000).unwrap(),
            Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
        ];
        for t in cases {
            let mut out = Vec::new();
            rfc3339_micros(&t, &mut serde_json::Serializer::new(&mut out)).unwrap();
            let expected = format!("\"{}\"", t.to_rfc3339_opts(SecondsFormat::Micros, true));
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }

    #[test]
    fn titles_are_checked_in_characters_not_bytes() {
        let mut errors = Vec::new();
        validate_title(&"é".repeat(MAX_TITLE_CHARS), &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        validate_title(&"é".repeat(MAX_TITLE_CHARS + 1), &mut errors);
        validate_title("  \t", &mut errors);
        validate_title("a\0b", &mut errors);
        assert_eq!(errors.len(), 3, "{errors:?}");
    }
}
