//! `deploy/kubernetes/` and its PgBouncer overlay, checked statically: no cluster runs here. CI also
//! validates each manifest against the Kubernetes schemas (`scripts/validate-manifests.sh`); this
//! checks what a schema cannot: that the settings are the service's own and valid, that the drain
//! fits in the grace period, that the probes and ports are the service's, that the pieces select
//! each other, and that the overlay's service reaches PgBouncer the way PgBouncer listens.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use serde_yaml_ng::Value;
use todo_service::config::Config;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

fn yaml(file: &str) -> Value {
    let text = std::fs::read_to_string(dir().join(file)).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn string_map(v: &Value, what: &str) -> HashMap<String, String> {
    v.as_mapping()
        .unwrap_or_else(|| panic!("{what}: a mapping"))
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str()
                    .unwrap_or_else(|| panic!("{what}: quote {k:?}'s value"))
                    .to_owned(),
            )
        })
        .collect()
}

/// The `.yaml` files in `sub` (of deploy/kubernetes) other than the kustomization, sorted.
fn manifests_in(sub: &str) -> Vec<String> {
    let mut present: Vec<String> = std::fs::read_dir(dir().join(sub))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    present.sort();
    present
}

#[test]
fn kustomization_lists_every_manifest_and_only_existing_ones() {
    let k = yaml("kustomization.yaml");
    let mut listed: Vec<String> = k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, manifests_in(""));

    // The overlay: the base, its own resources, and its patches.
    let k = yaml("pgbouncer/kustomization.yaml");
    let mut listed: Vec<String> = k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .chain(
            k["patches"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|p| &p["path"]),
        )
        .map(|r| r.as_str().unwrap().to_owned())
        .filter(|r| r != "../")
        .collect();
    listed.sort();
    assert_eq!(listed, manifests_in("pgbouncer"));
    assert!(
        k["resources"]
            .as_sequence()
            .unwrap()
            .contains(&"../".into())
    );
}

/// `key = value` lines of one `[section]` of an ini file.
fn ini_section(text: &str, section: &str) -> HashMap<String, String> {
    let mut current = String::new();
    let mut out = HashMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            current = line.trim_matches(['[', ']']).to_owned();
        } else if current == section
            && !line.starts_with(';')
            && let Some((k, v)) = line.split_once('=')
        {
            out.insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    out
}

#[test]
fn the_pgbouncer_overlay_routes_the_service_through_a_transaction_pooler_it_can_use() {
    // The service's settings as the overlay merges them over the base.
    let mut env = string_map(&yaml("configmap.yaml")["data"], "ConfigMap data");
    env.extend(string_map(
        &yaml("pgbouncer/todo-service-configmap-patch.yaml")["data"],
        "ConfigMap patch",
    ));
    env.extend(string_map(&yaml("secret.yaml")["stringData"], "Secret"));
    env.extend(string_map(
        &yaml("pgbouncer/todo-service-secret-patch.yaml")["stringData"],
        "Secret patch",
    ));
    let known: Vec<&str> = todo_service::config::VARS.iter().map(|v| v.name).collect();
    for key in env.keys() {
        assert!(known.contains(&key.as_str()), "{key} is not a setting");
    }
    env.insert("AUTH_JWT_SECRET".into(), "x".repeat(48));
    let parsed = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
    let db = &parsed.database;
    assert_eq!(
        db.pooler_mode,
        todo_service::config::PoolerMode::TransactionPrepared
    );

    // DATABASE_URL names PgBouncer's Service and port; PgBouncer listens where that port leads.
    let service = yaml("pgbouncer/pgbouncer-service.yaml");
    assert_eq!(db.host, service["metadata"]["name"].as_str().unwrap());
    let port = &service["spec"]["ports"][0];
    assert_eq!(u64::from(db.port), port["port"].as_u64().unwrap());
    let deployment = yaml("pgbouncer/pgbouncer-deployment.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["ports"][0]["name"], port["targetPort"]);
    let ini_text = yaml("pgbouncer/pgbouncer-configmap.yaml")["data"]["pgbouncer.ini"]
        .as_str()
        .unwrap()
        .to_owned();
    let ini = ini_section(&ini_text, "pgbouncer");
    assert_eq!(
        ini["listen_port"],
        container["ports"][0]["containerPort"]
            .as_u64()
            .unwrap()
            .to_string()
    );
    assert_eq!(
        ini["pool_mode"], "transaction",
        "DB_POOLER_MODE=transaction-prepared is for it"
    );
    // It carries prepared statements: an image of 1.21 or later, with them on.
    let image = container["image"].as_str().unwrap();
    let minor: u32 = image
        .rsplit_once(":v1.")
        .unwrap()
        .1
        .split('.')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(minor >= 21, "{image}");
    assert!(ini["max_prepared_statements"].parse::<u32>().unwrap() > 0);
    // The pooler must not refuse the parameters the service and sqlx send at login.
    for param in ["extra_float_digits", "options"] {
        assert!(
            ini["ignore_startup_parameters"].contains(param),
            "{ini_text}"
        );
    }

    // Migrations go to the server PgBouncer pools, not through it.
    let migration = db
        .migration
        .as_ref()
        .expect("DATABASE_MIGRATION_URL is set");
    let databases = ini_section(&ini_text, "databases");
    let target = &databases[db.connect_options.get_database().unwrap()];
    assert!(
        target.contains(&format!("host={} ", migration.host))
            && target.contains(&format!("port={}", migration.port)),
        "{target} vs the migration URL's {}:{}",
        migration.host,
        migration.port
    );
    // Every server session starts with the service's timeouts (checked before it serves).
    for (setting, value) in [
        ("statement_timeout", db.statement_timeout),
        (
            "idle_in_transaction_session_timeout",
            db.idle_in_transaction_timeout,
        ),
    ] {
        let set = format!("SET {setting} = {}", value.as_millis());
        assert!(target.contains(&set), "{target} lacks {set}");
    }

    // The userlist is mounted where auth_file points, under the key the Secret has.
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "userlist")
        .unwrap();
    let userlist = yaml("pgbouncer/pgbouncer-secret.yaml");
    let key = userlist["stringData"]
        .as_mapping()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        ini["auth_file"],
        format!("{}/{key}", mount["mountPath"].as_str().unwrap())
    );
    assert!(
        userlist["stringData"][key.as_str()]
            .as_str()
            .unwrap()
            .contains(&format!("\"{}\"", db.connect_options.get_username())),
        "the service's user is in the userlist"
    );

    // The server's budget is PgBouncer's now: its pods × default_pool_size, within the default
    // max_connections (100) less superuser_reserved_connections (3).
    let pods = deployment["spec"]["replicas"].as_u64().unwrap();
    let per_pod: u64 = ini["default_pool_size"].parse().unwrap();
    assert!(pods * per_pod <= 97, "{pods} × {per_pod}");

    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    for (k, v) in selector.as_mapping().unwrap() {
        assert_eq!(&labels[k.as_str().unwrap()], v);
    }
    assert_eq!(service["spec"]["selector"], *selector);
    assert_eq!(
        yaml("pgbouncer/pgbouncer-poddisruptionbudget.yaml")["spec"]["selector"]["matchLabels"],
        *selector
    );
}

#[test]
fn the_settings_are_the_services_own_and_valid_once_the_secrets_are_filled_in() {
    let config = string_map(&yaml("configmap.yaml")["data"], "ConfigMap data");
    let secret = string_map(&yaml("secret.yaml")["stringData"], "Secret stringData");
    let known: Vec<&str> = todo_service::config::VARS.iter().map(|v| v.name).collect();
    for key in config.keys().chain(secret.keys()) {
        assert!(known.contains(&key.as_str()), "{key} is not a setting");
    }
    assert!(
        !config.contains_key("DATABASE_URL") && !config.contains_key("AUTH_JWT_SECRET"),
        "secrets belong in the Secret"
    );

    // As shipped, the placeholders stop the service, naming the variable.
    let mut env: HashMap<String, String> = config.clone();
    env.extend(secret.clone());
    let err = Config::from_lookup(|k| env.get(k).cloned()).unwrap_err();
    assert_eq!(err.var, "AUTH_JWT_SECRET", "{err}");

    // Filled in, every setting parses.
    env.insert("AUTH_JWT_SECRET".into(), "x".repeat(48));
    let parsed = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
    assert_eq!(parsed.listen_addr.port(), 8080);
    assert!(parsed.shutdown_readiness_delay >= Duration::from_secs(2));

    // The drain fits in the kubelet's grace period, with room for the last export.
    let deployment = yaml("deployment.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
    let drain = parsed.shutdown_readiness_delay + parsed.shutdown_timeout;
    assert!(
        grace >= drain + Duration::from_secs(3),
        "grace {grace:?} vs drain {drain:?}"
    );
    // The budget the comments promise: the autoscaler's ceiling × the pool stays within the
    // default max_connections (100).
    let max_replicas = yaml("horizontalpodautoscaler.yaml")["spec"]["maxReplicas"]
        .as_u64()
        .unwrap() as usize;
    assert!(
        max_replicas * parsed.database.pool_max_size <= 100,
        "{max_replicas} × {}",
        parsed.database.pool_max_size
    );
}

#[test]
fn probes_ports_and_selectors_match_the_service() {
    let deployment = yaml("deployment.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(deployment["spec"]["selector"]["matchLabels"], *labels);
    let container = &pod["containers"][0];
    assert_eq!(container["ports"][0]["containerPort"].as_u64(), Some(8080));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(container["startupProbe"]["httpGet"]["path"], "/health");
    // The image runs as uid 10001 (Dockerfile); a read-only root needs /tmp for the TLS relay.
    assert_eq!(pod["securityContext"]["runAsUser"].as_u64(), Some(10001));
    assert_eq!(container["volumeMounts"][0]["mountPath"], "/tmp");
    assert_eq!(
        deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"].as_u64(),
        Some(0)
    );

    let service = yaml("service.yaml");
    assert_eq!(service["spec"]["selector"], *labels);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    let pdb = yaml("poddisruptionbudget.yaml");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], *labels);
    let hpa = yaml("horizontalpodautoscaler.yaml");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    assert!(
        hpa["spec"]["minReplicas"].as_u64().unwrap() > 1,
        "the PodDisruptionBudget needs a second replica"
    );
}
