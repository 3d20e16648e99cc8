//! How a URL from the settings is printed: with its secrets hidden. Every URL the service prints
//! (logs, `doctor`, configuration errors) goes through [`redact_url`]; the ones it keeps to use
//! later are held as [`RedactedUrl`], which cannot be printed any other way.

use std::fmt;

use url::Url;

/// A URL from the settings that may carry credentials (`https://user:pass@host/…`): used whole,
/// printed (`Display`, `Debug`) only redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct RedactedUrl(Url);

impl RedactedUrl {
    pub fn new(url: Url) -> Self {
        RedactedUrl(url)
    }

    /// The URL itself, credentials included, to connect with.
    pub fn url(&self) -> &Url {
        &self.0
    }
}

impl fmt::Display for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(self.0.as_str()))
    }
}

impl fmt::Debug for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// Replaces every secret in a URL with `***`: the password in its user info and the libpq
/// parameters that carry one (`password`, `sslpassword`, in any case). Unparsable input is hidden
/// entirely, since what was meant as its password cannot be told from the rest.
pub fn redact_url(raw: &str) -> String {
    const SECRET_PARAMS: [&str; 2] = ["password", "sslpassword"];
    let Ok(mut url) = Url::parse(raw) else {
        return "<unparsable URL hidden>".to_owned();
    };
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    let secret = |key: &str| SECRET_PARAMS.iter().any(|s| s.eq_ignore_ascii_case(key));
    if url.query_pairs().any(|(k, _)| secret(&k)) {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret(&k) {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_show_whichever_way_the_url_is_printed() {
        let url = RedactedUrl::new(
            Url::parse("https://keys:hunter2@id.example/jwks?password=x2").unwrap(),
        );
        for shown in [
            url.to_string(),
            format!("{url:?}"),
            redact_url("ftp://u:hunter2@h/"),
        ] {
            assert!(
                !shown.contains("hunter2") && !shown.contains("x2"),
                "{shown}"
            );
        }
        assert_eq!(
            url.to_string(),
            "https://keys:***@id.example/jwks?password=***"
        );
        assert_eq!(url.url().password(), Some("hunter2"));
        assert_eq!(redact_url("not a url: hunter2"), "<unparsable URL hidden>");
    }
}
