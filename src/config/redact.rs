//! How a URL from the settings is printed: with its secrets hidden.

use url::Url;

/// Replaces every secret in a URL with `***`: the password in its user info and the libpq
/// parameters that carry one (`password`, `sslpassword`, in any case). Unparsable input is hidden
/// entirely.
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
