//! `deploy/kubernetes/`, checked statically: no cluster runs here. CI also validates each manifest
//! against the Kubernetes schemas (`scripts/validate-manifests.sh`); this checks what a schema
//! cannot: that the settings are the service's own and valid, that the drain fits in the grace
//! period, that the probes and ports are the service's, and that the pieces select each other.

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
    let mut present: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    present.sort();
    assert_eq!(listed, present);
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
