//! `docker-compose.yml`, the `Dockerfile` and the SigNoz collector config, checked statically: no
//! Docker engine runs on these machines. CI also runs `docker-compose config -q` on the compose
//! file; this test checks what that cannot: that the stack is the one docs/observability.md describes and is
//! wired to this service's real settings.

use std::{collections::HashSet, path::PathBuf};

use serde_yaml_ng::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn s<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

/// The variables the service reads, from `.env.example` (itself checked against the config table).
fn known_variables() -> HashSet<String> {
    std::fs::read_to_string(root().join(".env.example"))
        .unwrap()
        .lines()
        .map(|l| l.trim_start_matches('#').trim())
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
        .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect()
}

fn healthcheck(service: &Value, name: &str) -> String {
    let test = &service["healthcheck"]["test"];
    let parts: Vec<&str> = test
        .as_sequence()
        .unwrap_or_else(|| panic!("{name}: healthcheck test"))
        .iter()
        .map(|p| s(p, "healthcheck part"))
        .collect();
    parts.join(" ")
}

#[test]
fn compose_brings_up_postgres_the_service_and_signoz_wired_together() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_mapping().expect("services");
    let names: HashSet<&str> = services.keys().map(|k| s(k, "service name")).collect();
    for required in [
        "postgres",
        "todo-service",
        "clickhouse",
        "signoz-migrator",
        "otel-collector",
        "signoz",
        "signoz-provision",
    ] {
        assert!(names.contains(required), "service {required} missing");
    }
    // Every image pinned to a version (no implicit or explicit `latest`).
    for (name, svc) in services {
        if let Some(image) = svc["image"].as_str() {
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
            assert!(
                !tag.is_empty() && tag != "latest",
                "{name:?}: image {image} is not pinned"
            );
        }
    }

    let pg = &compose["services"]["postgres"];
    assert!(healthcheck(pg, "postgres").contains("pg_isready"));
    assert!(
        pg["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| s(v, "volume").ends_with(":/var/lib/postgresql/data")),
        "postgres data on a volume"
    );
    assert!(pg["deploy"]["resources"]["limits"]["memory"].is_string());

    let app = &compose["services"]["todo-service"];
    assert_eq!(
        app["build"].as_str(),
        Some("."),
        "built from the Dockerfile"
    );
    assert!(healthcheck(app, "todo-service").contains("/health"));
    assert_eq!(
        app["depends_on"]["postgres"]["condition"].as_str(),
        Some("service_healthy")
    );
    assert!(app["deploy"]["resources"]["limits"]["memory"].is_string());
    assert!(app["deploy"]["resources"]["limits"]["cpus"].is_string());
    let env = app["environment"].as_mapping().expect("environment map");
    let known = known_variables();
    for key in env.keys() {
        let key = s(key, "variable");
        assert!(
            known.contains(key),
            "todo-service: {key} is not a setting of the service"
        );
    }
    let var = |k: &str| s(&app["environment"][k], k).to_owned();
    // Published beyond loopback, so callers authenticate, with a secret from the operator's
    // shell (compose refuses to start without one) rather than one written here.
    assert_eq!(var("AUTH_MODE"), "jwt");
    assert!(
        var("AUTH_JWT_SECRET").starts_with("${AUTH_JWT_SECRET:?"),
        "{}",
        var("AUTH_JWT_SECRET")
    );
    // The post-mortem's setup: the database by its compose name (resolved once at startup).
    let db = url::Url::parse(&var("DATABASE_URL").replace("${POSTGRES_PASSWORD:-todo}", "x"))
        .expect("DATABASE_URL");
    assert_eq!(db.host_str(), Some("postgres"));
    assert_eq!(
        var("OTEL_EXPORTER_OTLP_ENDPOINT"),
        "http://otel-collector:4317"
    );
    assert_eq!(var("OTEL_EXPORTER_OTLP_PROTOCOL"), "grpc");
    assert_eq!(var("OTEL_SERVICE_NAME"), "todo-service");
    assert!(var("LISTEN_ADDR").starts_with("0.0.0.0:"));
    // The stop grace period must outlast the service's own drain deadline.
    let grace =
        humantime::parse_duration(s(&app["stop_grace_period"], "stop_grace_period")).unwrap();
    let drain = humantime::parse_duration(&var("SHUTDOWN_TIMEOUT")).unwrap();
    assert!(
        grace > drain,
        "stop_grace_period {grace:?} <= SHUTDOWN_TIMEOUT {drain:?}"
    );

    let published: Vec<String> = services
        .values()
        .filter_map(|svc| svc["ports"].as_sequence())
        .flatten()
        .map(|p| s(p, "port").to_owned())
        .collect();
    for port in ["8080:8080", "4317:4317", "4318:4318", "3301:8080"] {
        assert!(
            published.iter().any(|p| p == port),
            "{port} not published: {published:?}"
        );
    }
    for name in ["clickhouse", "otel-collector", "signoz"] {
        assert!(
            !healthcheck(&compose["services"][name], name).is_empty(),
            "{name}: healthcheck"
        );
    }
    assert_eq!(
        compose["services"]["signoz-provision"]["depends_on"]["signoz"]["condition"].as_str(),
        Some("service_healthy"),
        "provisioning waits for a healthy SigNoz"
    );
    // Every file the stack mounts from the repository exists.
    for (name, svc) in services {
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let v = s(v, "volume");
            if let Some(path) = v.strip_prefix("./") {
                let host = path.split(':').next().unwrap();
                assert!(
                    root().join(host).exists(),
                    "{name:?}: mounts missing {host}"
                );
            }
        }
    }
}

/// The `scale` profile: replicas behind HAProxy through PgBouncer, wired so each piece reaches the
/// next where it listens, with settings the service accepts.
#[test]
fn the_scale_profile_puts_replicas_behind_haproxy_and_pgbouncer_wired_together() {
    let compose = yaml("docker-compose.yml");
    let services = &compose["services"];
    for name in ["pgbouncer", "todo-replica", "haproxy"] {
        assert_eq!(
            services[name]["profiles"],
            serde_yaml_ng::from_str::<Value>("[scale]").unwrap(),
            "{name} is in the scale profile only"
        );
    }
    assert!(
        services["todo-service"]["profiles"].is_null(),
        "the default stack is unchanged"
    );

    // The replicas' settings are the service's and parse, once compose fills in the variables.
    let replica = &services["todo-replica"];
    let known = known_variables();
    let mut env = std::collections::HashMap::new();
    for (k, v) in replica["environment"].as_mapping().unwrap() {
        let k = s(k, "variable");
        assert!(known.contains(k), "todo-replica: {k} is not a setting");
        let v = s(v, k).replace("${POSTGRES_PASSWORD:-todo}", "pw");
        let v = if v.starts_with("${AUTH_JWT_SECRET") {
            "x".repeat(48)
        } else {
            v
        };
        env.insert(k.to_owned(), v);
    }
    let config = todo_service::config::Config::from_lookup(|k| env.get(k).cloned()).unwrap();
    assert_eq!(
        config.database.pooler_mode,
        todo_service::config::PoolerMode::TransactionPrepared
    );
    assert_eq!(config.database.host, "pgbouncer");
    assert_eq!(
        config.database.migration.as_ref().map(|m| m.host.as_str()),
        Some("postgres"),
        "migrations go straight to Postgres"
    );
    assert!(replica["deploy"]["replicas"].as_u64().unwrap() >= 2);
    let grace = humantime::parse_duration(s(&replica["stop_grace_period"], "grace")).unwrap();
    assert!(grace > config.shutdown_readiness_delay + config.shutdown_timeout);

    // PgBouncer pools in transaction mode, lets the service's login through, and its server
    // connections fit in Postgres' default max_connections (100, 3 reserved) with the single
    // service's pool beside them.
    let bouncer = &services["pgbouncer"]["environment"];
    assert_eq!(s(&bouncer["POOL_MODE"], "POOL_MODE"), "transaction");
    for param in ["extra_float_digits", "options"] {
        assert!(s(&bouncer["IGNORE_STARTUP_PARAMETERS"], "ignore").contains(param));
    }
    // It carries prepared statements (the image is 1.21 or later), and the server's sessions for
    // the replicas' role and database start with the replicas' timeouts.
    let image = s(&services["pgbouncer"]["image"], "image");
    let version = image.rsplit_once(":v").unwrap().1;
    let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
    assert!(version.starts_with("1.") && minor >= 21, "{image}");
    let prepared: u32 = s(
        &bouncer["MAX_PREPARED_STATEMENTS"],
        "max_prepared_statements",
    )
    .parse()
    .unwrap();
    assert!(prepared > 0);
    let init = "./deploy/compose/postgres-pooler-timeouts.sql";
    assert!(
        services["postgres"]["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| s(v, "volume").starts_with(&format!("{init}:/docker-entrypoint-initdb.d/"))),
        "{init} is mounted where the image runs it"
    );
    let sql = std::fs::read_to_string(root().join(init)).unwrap();
    let user = config.database.connect_options.get_username();
    let database = config.database.connect_options.get_database().unwrap();
    for (setting, value) in [
        ("statement_timeout", config.database.statement_timeout),
        (
            "idle_in_transaction_session_timeout",
            config.database.idle_in_transaction_timeout,
        ),
    ] {
        let line = format!(
            "ALTER ROLE {user} IN DATABASE {database} SET {setting} = '{}';",
            humantime::format_duration(value)
        );
        assert!(sql.lines().any(|l| l == line), "{init} lacks {line}");
    }
    let server_side: usize = s(&bouncer["DEFAULT_POOL_SIZE"], "size").parse().unwrap();
    let single: usize = s(
        &services["todo-service"]["environment"]["DB_POOL_MAX_SIZE"],
        "pool",
    )
    .parse()
    .unwrap();
    assert!(server_side + single <= 97, "{server_side} + {single}");
    assert_eq!(
        config.database.port, 5432,
        "PgBouncer's LISTEN_PORT default"
    );

    // HAProxy: its configuration is the shipped one, its backend is the replicas' service name and
    // port, its frontend the published container port, and it checks /ready.
    let haproxy = &services["haproxy"];
    assert!(
        haproxy["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| s(v, "volume")
                == "./deploy/compose/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro")
    );
    let cfg = std::fs::read_to_string(root().join("deploy/compose/haproxy.cfg")).unwrap();
    let line = |start: &str| -> String {
        cfg.lines()
            .map(str::trim)
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("haproxy.cfg: no {start}"))
            .to_owned()
    };
    assert!(
        line("server-template").ends_with(&format!(
            " todo-replica:{} check",
            config.listen_addr.port()
        )),
        "{}",
        line("server-template")
    );
    let published = s(&haproxy["ports"][0], "port");
    assert!(
        line("bind").ends_with(&format!(":{}", published.rsplit(':').next().unwrap())),
        "{published} vs {}",
        line("bind")
    );
    assert_eq!(line("option httpchk"), "option httpchk GET /ready");
    // What HAProxy answers itself is a problem the client can act on: JSON with Retry-After.
    let errors: Vec<String> = cfg
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("http-error"))
        .map(str::to_owned)
        .collect();
    assert_eq!(errors.len(), 3, "502, 503 and 504");
    for e in &errors {
        assert!(e.contains("hdr Retry-After 1"), "{e}");
        let body = e.split_once(" string '").unwrap().1.trim_end_matches('\'');
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        let status = e.split_whitespace().nth(2).unwrap();
        assert_eq!(problem["status"].to_string(), status, "{e}");
        for key in ["type", "title", "detail", "code", "hint"] {
            assert!(problem[key].is_string(), "{key} in {e}");
        }
    }
    // The edge's rate limit: its 429 is the service's problem, with Retry-After and the policy,
    // and its rate is the compose setting (scripts/cluster.sh drills it on loopback).
    let limit = line("http-request return status 429");
    assert!(limit.contains("hdr Retry-After 1"), "{limit}");
    assert!(
        limit.contains("${EDGE_RATE_LIMIT_PER_SECOND-200}"),
        "{limit}"
    );
    let body = limit.split_once(" string '").unwrap().1;
    let body = body.split_once("' if ").unwrap().0;
    let problem: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(problem["status"], 429);
    assert_eq!(problem["code"], "rate_limited");
    assert_eq!(
        s(
            &haproxy["environment"]["EDGE_RATE_LIMIT_PER_SECOND"],
            "edge rate"
        ),
        "${EDGE_RATE_LIMIT_PER_SECOND:-200}"
    );
}

#[test]
fn the_image_is_multi_stage_non_root_and_healthchecked() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let from_lines = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert!(from_lines >= 2, "multi-stage: {from_lines} FROM lines");
    let user = dockerfile
        .lines()
        .rfind(|l| l.starts_with("USER "))
        .expect("a USER line");
    let uid = user.trim_start_matches("USER ").split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "runs as {uid}");
    assert!(dockerfile.contains("HEALTHCHECK") && dockerfile.contains("/health"));
    assert!(dockerfile.contains("--locked"), "builds from Cargo.lock");
    // The build script names the release (env! in src/release.rs): the image must have it.
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("COPY ") && l.contains("build.rs")),
        "build.rs is copied into the build stage"
    );
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "target/ kept out of the context"
    );
}

#[test]
fn the_collector_receives_otlp_and_every_pipeline_part_is_defined() {
    let c = yaml("signoz/collector/otel-collector-config.yaml");
    let grpc = s(
        &c["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"],
        "grpc",
    );
    let http = s(
        &c["receivers"]["otlp"]["protocols"]["http"]["endpoint"],
        "http",
    );
    assert!(grpc.ends_with(":4317") && http.ends_with(":4318"));
    let pipelines = c["service"]["pipelines"].as_mapping().expect("pipelines");
    for signal in ["traces", "metrics", "logs"] {
        let p = &c["service"]["pipelines"][signal];
        assert!(
            p["receivers"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|r| r.as_str() == Some("otlp")),
            "{signal} pipeline receives OTLP"
        );
    }
    for (name, p) in pipelines {
        for (kind, section) in [
            ("receivers", "receivers"),
            ("processors", "processors"),
            ("exporters", "exporters"),
        ] {
            for part in p[kind].as_sequence().into_iter().flatten() {
                let part = s(part, kind);
                assert!(
                    !c[section][part].is_null() || c[section].get(part).is_some(),
                    "pipeline {name:?} uses undefined {kind} {part}"
                );
            }
        }
    }
    // SigNoz's APM pages are built from the span metrics processor on the traces pipeline.
    assert!(
        c["service"]["pipelines"]["traces"]["processors"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p.as_str() == Some("signozspanmetrics/delta"))
    );
}
