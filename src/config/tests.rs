//! Settings as a whole: defaults, errors naming variables, secrets, and the documents that list
//! every variable (`.env.example`, docs/configuration.md, `--help`).

use std::collections::HashMap;

use super::*;

fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_lookup(|k| map.get(k).cloned())
}

const URL: (&str, &str) = ("DATABASE_URL", "postgres://app:s3cret@postgres:5432/todos");

#[test]
fn defaults_apply_when_only_the_database_url_is_set() {
    let c = config(&[URL]).unwrap();
    assert_eq!(c.listen_addr, "127.0.0.1:8080".parse().unwrap());
    assert!(
        matches!(c.auth.mode, AuthMode::None { explicit: false }),
        "on loopback, no authentication unless asked for"
    );
    assert_eq!(c.database.host, "postgres");
    assert_eq!(c.database.port, 5432);
    assert_eq!(c.database.pool_max_size, 16);
    assert_eq!(c.database.pool_wait_timeout, Duration::from_secs(2));
    assert_eq!(c.log_format, LogFormat::Text);
    assert!(matches!(c.cors_allowed_origins, CorsOrigins::Any));
    let rl = c.rate_limit.expect("rate limit on by default");
    assert!(
        rl.burst >= 5 * 120,
        "five of the post-mortem's spikes must fit the burst"
    );
    assert!(
        c.clients.trusted_proxies.is_empty(),
        "no proxy is trusted unless named"
    );
    assert_eq!(c.clients.ipv6_prefix, 64);
    assert_eq!(c.clients.max_clients, 100_000);
    assert_eq!(c.max_in_flight, 4 * 16, "derived from the pool size");
    assert_eq!(c.max_queue_wait, Duration::from_millis(500));
    assert_eq!(c.breaker.failure_threshold, 5);
}

#[test]
fn a_zero_rate_disables_the_limit_and_max_in_flight_follows_the_pool() {
    let c = config(&[
        URL,
        ("RATE_LIMIT_PER_SECOND", "0"),
        ("DB_POOL_MAX_SIZE", "4"),
    ])
    .unwrap();
    assert!(c.rate_limit.is_none());
    assert_eq!(c.max_in_flight, 16);
    let c = config(&[URL, ("MAX_IN_FLIGHT", "7")]).unwrap();
    assert_eq!(c.max_in_flight, 7);
}

#[test]
fn a_missing_database_url_is_an_error_naming_it() {
    let err = config(&[]).unwrap_err();
    assert_eq!(err.var, "DATABASE_URL");
    assert!(err.to_string().contains("DATABASE_URL"), "{err}");
}

#[test]
fn bad_values_name_the_variable_and_the_expected_form() {
    let cases = [
        ("LISTEN_ADDR", "localhost", "IP:PORT"),
        ("DB_POOL_MAX_SIZE", "0", "from 1 to 1000"),
        ("DB_POOL_MAX_SIZE", "many", "from 1 to 1000"),
        ("DB_POOL_WAIT_TIMEOUT", "2 parsecs", "duration"),
        ("DB_STATEMENT_TIMEOUT", "-1s", "duration"),
        ("DB_IDLE_IN_TRANSACTION_TIMEOUT", "soon", "duration"),
        ("DB_MAX_LIFETIME", "5s", "from 10s to 7d"),
        ("DB_MAX_LIFETIME", "30d", "from 10s to 7d"),
        ("IDEMPOTENCY_KEY_TTL", "1s", "from 1m to 30d"),
        ("IDEMPOTENCY_KEY_TTL", "365d", "from 1m to 30d"),
        ("IDEMPOTENCY_KEY_TTL", "forever", "duration"),
        ("MAX_BODY_BYTES", "10", "from 1024"),
        ("HTTP_HEADER_READ_TIMEOUT", "0s", "from 1s to 5m"),
        ("MAX_CONNECTIONS", "5", "from 100"),
        ("PUBLIC_BASE_URL", "ftp://x", "http(s)"),
        ("PUBLIC_BASE_URL", "not a url", "http(s)"),
        ("CORS_ALLOWED_ORIGINS", "https://a.example/path", "origins"),
        ("LOG_FORMAT", "xml", "text or json"),
        ("RATE_LIMIT_BURST", "0", "from 1"),
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "collector:4317",
            "http(s) URL",
        ),
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "http/json",
            "grpc or http/protobuf",
        ),
        ("OTEL_RESOURCE_ATTRIBUTES", "novalue", "key=value"),
        ("OTEL_SDK_DISABLED", "perhaps", "true or false"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "1m", "from 100"),
        (
            "OTEL_TRACES_SAMPLER",
            "sometimes",
            "parentbased_traceidratio",
        ),
        (
            "RATE_LIMIT_TRUST_FORWARDED_FOR",
            "true",
            "replaced by TRUSTED_PROXIES",
        ),
        ("TRUSTED_PROXIES", "10.0.0.0/8, proxy.local", "CIDR"),
        ("TRUSTED_PROXIES", "10.0.0.0/33", "CIDR"),
        ("RATE_LIMIT_IPV6_PREFIX", "16", "from 32 to 128"),
        ("RATE_LIMIT_MAX_CLIENTS", "10", "from 1000"),
        ("MAX_IN_FLIGHT", "0", "from 1"),
        ("MAX_QUEUE_WAIT", "61s", "from 0 to 60s"),
        ("MAX_QUEUE_WAIT", "soon", "duration"),
        ("REQUEST_TIMEOUT", "0s", "positive duration"),
        ("BREAKER_FAILURE_THRESHOLD", "0", "from 1"),
        ("BREAKER_OPEN_DURATION", "soon", "duration"),
        ("LOG_LEVEL", "info,[", "EnvFilter"),
        ("DATABASE_URL", "mysql://x@y/z", "postgres://"),
        (
            "DATABASE_URL",
            "postgres://app@db:notaport/todos",
            "postgres://",
        ),
        ("DATABASE_URL", "not a url", "postgres://"),
    ];
    for (var, value, form) in cases {
        let err = if var == "DATABASE_URL" {
            config(&[(var, value)])
        } else {
            config(&[URL, (var, value)])
        }
        .expect_err(var);
        let msg = err.to_string();
        assert_eq!(err.var, var, "{var}={value}: {msg}");
        assert!(
            msg.contains(var) && msg.contains(form),
            "{var}={value}: {msg}"
        );
    }
}

#[test]
fn trace_samplers_follow_the_otel_names() {
    let sampler = |pairs: &[(&str, &str)]| {
        let mut all = vec![URL];
        all.extend_from_slice(pairs);
        config(&all).map(|c| c.otel.sampler)
    };
    let s = |parent_based, ratio| TraceSampler {
        parent_based,
        ratio,
        forced_per_second: 10,
    };
    assert_eq!(sampler(&[]).unwrap(), s(true, 1.0));
    assert_eq!(
        sampler(&[("OTEL_TRACES_SAMPLER", "always_off")]).unwrap(),
        s(false, 0.0)
    );
    assert_eq!(
        sampler(&[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ])
        .unwrap(),
        s(true, 0.25)
    );
    // A ratio sampler without its argument keeps everything, as the OTel spec says.
    assert_eq!(
        sampler(&[("OTEL_TRACES_SAMPLER", "traceidratio")]).unwrap(),
        s(false, 1.0)
    );
    assert_eq!(
        sampler(&[("TRACES_FORCED_PER_SECOND", "0")])
            .unwrap()
            .forced_per_second,
        0
    );
    let err = sampler(&[("TRACES_FORCED_PER_SECOND", "-1")]).unwrap_err();
    assert_eq!(err.var, "TRACES_FORCED_PER_SECOND", "{err}");
    for bad in ["1.5", "-0.1", "half", "NaN"] {
        let err = sampler(&[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", bad),
        ])
        .unwrap_err();
        assert_eq!(err.var, "OTEL_TRACES_SAMPLER_ARG", "{bad}: {err}");
        assert!(err.to_string().contains("from 0 to 1"), "{err}");
    }
}

#[test]
fn secrets_never_appear_in_debug_output_or_errors() {
    let c = config(&[URL]).unwrap();
    let debug = format!("{c:?}");
    assert!(!debug.contains("s3cret"), "{debug}");
    assert!(debug.contains("app:***@postgres"), "{debug}");
    let err = config(&[("DATABASE_URL", "mysql://app:s3cret@x/db")]).unwrap_err();
    assert!(!err.to_string().contains("s3cret"), "{err}");
    // libpq also takes the password as a query parameter.
    for url in [
        "postgres://app@postgres:5432/todos?password=s3cret",
        "postgres://app@postgres/todos?sslmode=prefer&PASSWORD=s3cret&application_name=x",
    ] {
        let c = config(&[("DATABASE_URL", url)]).unwrap();
        let shown = format!("{} {:?}", c.database.redacted_url(), c.database);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }
    // An encrypted client key's passphrase is refused (rustls cannot use one), unshown.
    let err = config(&[(
        "DATABASE_URL",
        "postgres://app@postgres/todos?sslpassword=s3cret",
    )])
    .unwrap_err();
    assert!(err.to_string().contains("sslpassword"), "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
}

#[test]
fn empty_values_fall_back_to_defaults() {
    let c = config(&[URL, ("LISTEN_ADDR", ""), ("LOG_FORMAT", " ")]).unwrap();
    assert_eq!(c.listen_addr.port(), 8080);
    assert_eq!(c.log_format, LogFormat::Text);
}

#[test]
fn cors_origin_lists_are_parsed() {
    let c = config(&[
        URL,
        (
            "CORS_ALLOWED_ORIGINS",
            "https://a.example, http://b.example:3000",
        ),
    ])
    .unwrap();
    match c.cors_allowed_origins {
        CorsOrigins::List(v) => assert_eq!(v.len(), 2),
        CorsOrigins::Any => panic!("expected a list"),
    }
}

#[test]
fn env_example_documents_exactly_the_variables_read() {
    let example = include_str!("../../.env.example");
    let listed: Vec<&str> = example
        .lines()
        .map(|l| l.trim_start_matches('#').trim())
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
        .filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .collect();
    for var in VARS {
        assert!(
            listed.contains(&var.name),
            ".env.example lacks {}",
            var.name
        );
    }
    for name in listed {
        assert!(
            VARS.iter().any(|v| v.name == name),
            ".env.example lists {name}, which the service does not read"
        );
    }
}

#[test]
fn the_documented_configuration_table_lists_every_variable() {
    let page = include_str!("../../docs/configuration.md");
    for var in VARS {
        assert!(
            page.contains(&format!("| `{}` |", var.name)),
            "docs/configuration.md's table lacks {}",
            var.name
        );
    }
}

#[test]
fn help_lists_every_variable() {
    let help = help_text();
    for var in VARS {
        assert!(help.contains(var.name), "--help lacks {}", var.name);
    }
}

#[test]
fn trusted_proxies_take_addresses_and_cidr_blocks() {
    let c = config(&[
        URL,
        ("TRUSTED_PROXIES", " 10.0.0.0/8, 127.0.0.1 ,::1,fd00::/8"),
    ])
    .unwrap();
    let nets: Vec<String> = c
        .clients
        .trusted_proxies
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "127.0.0.1/32", "::1/128", "fd00::/8"]);
}

#[test]
fn serving_other_machines_without_authentication_must_be_chosen() {
    let public = ("LISTEN_ADDR", "0.0.0.0:8080");
    let err = config(&[URL, public]).unwrap_err();
    assert_eq!(err.var, "AUTH_MODE");
    assert!(err.to_string().contains("0.0.0.0:8080"), "{err}");
    let c = config(&[URL, public, ("AUTH_MODE", "none")]).unwrap();
    assert!(matches!(c.auth.mode, AuthMode::None { explicit: true }));
    assert!(c.auth.is_open_to_the_network(c.listen_addr));
    let c = config(&[URL, ("LISTEN_ADDR", "[::1]:8080")]).unwrap();
    assert!(!c.auth.is_open_to_the_network(c.listen_addr));
    assert!(
        c.auth.unauthenticated_limit.is_none(),
        "nothing to fail without jwt"
    );
    let err = config(&[URL, ("AUTH_MODE", "oauth")]).unwrap_err();
    assert_eq!(err.var, "AUTH_MODE");
}

#[test]
fn jwt_needs_a_long_enough_secret_and_no_error_shows_it() {
    let err = config(&[URL, ("AUTH_MODE", "jwt")]).unwrap_err();
    assert_eq!(err.var, "AUTH_JWT_SECRET");
    let short = "hunter2-is-not-enough";
    let err = config(&[URL, ("AUTH_MODE", "jwt"), ("AUTH_JWT_SECRET", short)]).unwrap_err();
    assert_eq!(err.var, "AUTH_JWT_SECRET");
    assert!(!err.to_string().contains(short), "{err}");
    assert!(err.to_string().contains("21 bytes"), "{err}");
    let secret = "s".repeat(32);
    let c = config(&[
        URL,
        ("LISTEN_ADDR", "0.0.0.0:8080"),
        ("AUTH_MODE", "jwt"),
        ("AUTH_JWT_SECRET", &secret),
        ("AUTH_JWT_AUDIENCE", "todos"),
    ])
    .unwrap();
    let AuthMode::Jwt(jwt) = &c.auth.mode else {
        panic!("jwt mode")
    };
    assert_eq!(jwt.audience.as_deref(), Some("todos"));
    assert!(!format!("{c:?}").contains(&secret), "Debug shows no secret");
    assert!(!c.auth.is_open_to_the_network(c.listen_addr));
    assert_eq!(c.auth.unauthenticated_limit, Some((10, 20)));
}

#[test]
fn a_jwk_set_is_a_file_or_a_url_and_can_stand_in_for_the_secret() {
    let jwt = ("AUTH_MODE", "jwt");
    let c = config(&[
        URL,
        jwt,
        ("AUTH_JWKS_URL", "https://id.example.com/jwks.json"),
    ])
    .unwrap();
    let AuthMode::Jwt(j) = &c.auth.mode else {
        panic!("jwt")
    };
    assert!(j.secret.is_none());
    assert!(
        matches!(&j.jwks, Some(JwksSource::Url(u)) if u.url().host_str() == Some("id.example.com"))
    );
    assert_eq!(j.jwks_refresh, Duration::from_secs(300));
    let c = config(&[URL, jwt, ("AUTH_JWKS_FILE", "/etc/jwks.json")]).unwrap();
    let AuthMode::Jwt(j) = &c.auth.mode else {
        panic!("jwt")
    };
    assert!(matches!(&j.jwks, Some(JwksSource::File(p)) if p.ends_with("jwks.json")));
    for (pairs, var) in [
        (
            vec![("AUTH_JWKS_FILE", "/a"), ("AUTH_JWKS_URL", "https://b/")],
            "AUTH_JWKS_URL",
        ),
        (
            vec![("AUTH_JWKS_URL", "ftp://id.example.com/jwks")],
            "AUTH_JWKS_URL",
        ),
        (vec![("AUTH_JWKS_URL", "/jwks.json")], "AUTH_JWKS_URL"),
        (
            vec![("AUTH_JWKS_FILE", "/a"), ("AUTH_JWKS_REFRESH", "1s")],
            "AUTH_JWKS_REFRESH",
        ),
    ] {
        let mut all = vec![URL, jwt];
        all.extend(pairs);
        assert_eq!(config(&all).unwrap_err().var, var);
    }
}

#[test]
fn otlp_headers_are_checked_decoded_and_kept_out_of_sight() {
    let c = config(&[
        URL,
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "signoz-ingestion-key=s3cr%3Dt-value, X-Tenant = blue",
        ),
    ])
    .unwrap();
    assert_eq!(c.otel.headers.names(), ["signoz-ingestion-key", "x-tenant"]);
    assert_eq!(c.otel.headers.0[0].1, "s3cr=t-value", "percent-decoded");
    assert!(c.otel.headers.0.iter().all(|(_, v)| v.is_sensitive()));
    assert!(!format!("{c:?}").contains("s3cr"), "no value in Debug");
    for bad in [
        "signoz-ingestion-key",
        "bad key=1",
        "k=",
        "k=%FF%FE",
        "k=line%0Abreak",
    ] {
        let err = config(&[URL, ("OTEL_EXPORTER_OTLP_HEADERS", bad)]).unwrap_err();
        assert_eq!(err.var, "OTEL_EXPORTER_OTLP_HEADERS", "{bad}");
        assert!(
            !err.to_string().contains("%FF") && !err.to_string().contains("break"),
            "{err}"
        );
    }
}

#[test]
fn allowed_hosts_name_hosts_with_or_without_a_port_and_star_is_any() {
    let c = config(&[URL]).unwrap();
    for ok in [
        "localhost",
        "localhost:8080",
        "LOCALHOST:1",
        "127.0.0.1:9",
        "[::1]:80",
        "[::1]",
    ] {
        assert!(c.allowed_hosts.allows(ok), "{ok}");
    }
    for no in [
        "evil.example",
        "evil.example:8080",
        "localhost.evil.example",
        "127.0.0.2",
    ] {
        assert!(!c.allowed_hosts.allows(no), "{no}");
    }
    let c = config(&[
        URL,
        ("ALLOWED_HOSTS", "todos.example.com, api.example:8443"),
    ])
    .unwrap();
    assert!(c.allowed_hosts.allows("todos.example.com:80"));
    assert!(c.allowed_hosts.allows("api.example:8443"));
    assert!(!c.allowed_hosts.allows("api.example:80"));
    assert!(!c.allowed_hosts.allows("localhost"));
    assert_eq!(
        config(&[URL, ("ALLOWED_HOSTS", "*")])
            .unwrap()
            .allowed_hosts,
        AllowedHosts::Any
    );
    for bad in ["evil.example/x", "user@host", "host:port", "::1"] {
        let err = config(&[URL, ("ALLOWED_HOSTS", bad)]).unwrap_err();
        assert_eq!(err.var, "ALLOWED_HOSTS", "{bad}");
    }
}
