//! The Kubernetes manifests in `ops/k8s/` hold together (kubeconform is not at hand, so this is
//! a small schema check of our own): every document names its apiVersion, kind and name;
//! containers keep the image's entrypoint (tini) by giving `args`, never `command`; probes
//! ask `/readyz` (readiness) and `/healthz` (liveness) on a port the container declares; the
//! KEDA triggers watch queues the broker topology declares, one for every lane engines
//! consume.
#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation is the test failing"
)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use provisio_shared::amqp::Topology;
use provisio_shared::config::AmqpConfig;
use provisio_shared::domain::Priority;
use serde::Deserialize;
use serde_json::Value;

fn k8s_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ops/k8s")
}

/// Every document of every manifest the kustomization lists, with its file name.
fn documents() -> Vec<(String, Value)> {
    let dir = k8s_dir();
    let kustomization = read_yaml(&dir.join("kustomization.yaml"));
    assert_eq!(kustomization.len(), 1);
    let resources = kustomization[0]["resources"]
        .as_array()
        .expect("kustomization.yaml lists resources");
    let mut docs = Vec::new();
    for r in resources {
        let file = r.as_str().expect("a resource is a file name");
        for doc in read_yaml(&dir.join(file)) {
            docs.push((file.to_owned(), doc));
        }
    }
    // Not in the kustomization (it holds placeholders), but applied by hand.
    for doc in read_yaml(&dir.join("secret.example.yaml")) {
        docs.push(("secret.example.yaml".to_owned(), doc));
    }
    docs
}

fn read_yaml(path: &std::path::Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| {
            Value::deserialize(d).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The `amqp.prefix` of the ConfigMap's TOML.
fn configured_prefix(docs: &[(String, Value)]) -> String {
    let toml = docs
        .iter()
        .find(|(_, d)| d["kind"] == "ConfigMap")
        .and_then(|(_, d)| d["data"]["provisio.toml"].as_str())
        .expect("a ConfigMap with provisio.toml");
    let mut section = "";
    for line in toml.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[amqp]"
            && let Some((key, value)) = line.split_once('=')
            && key.trim() == "prefix"
        {
            return value.trim().trim_matches('"').to_owned();
        }
    }
    AmqpConfig::default().prefix
}

#[test]
fn every_document_names_its_api_version_kind_and_name() {
    let docs = documents();
    assert!(docs.len() >= 8, "{} documents", docs.len());
    for (file, d) in &docs {
        for field in ["apiVersion", "kind"] {
            assert!(
                d[field].as_str().is_some_and(|s| !s.is_empty()),
                "{file}: a document without {field}"
            );
        }
        assert!(
            d["metadata"]["name"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{file}: a {} without metadata.name",
            d["kind"]
        );
    }
}

#[test]
fn containers_keep_the_entrypoint_and_probe_declared_ports() {
    let dockerfile = std::fs::read_to_string(k8s_dir().join("../Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains("ENTRYPOINT [\"/usr/bin/tini\", \"--\"]"),
        "the image's entrypoint is tini; the manifests rely on it"
    );
    let mut deployments = 0;
    for (file, d) in documents() {
        if d["kind"] != "Deployment" {
            continue;
        }
        deployments += 1;
        let containers = d["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap_or_else(|| panic!("{file}: no containers"));
        for c in containers {
            let name = c["name"].as_str().unwrap_or_default();
            let at = format!("{file}, container {name}");
            assert!(
                c["image"].as_str().is_some_and(|s| !s.is_empty()),
                "{at}: no image"
            );
            assert!(
                c.get("command").is_none(),
                "{at}: `command` replaces the image's entrypoint (tini); use `args`"
            );
            let args = c["args"]
                .as_array()
                .unwrap_or_else(|| panic!("{at}: no args"));
            let program = args.first().and_then(Value::as_str).unwrap_or_default();
            assert!(
                ["queue-manager", "worker"].contains(&program),
                "{at}: runs `{program}`"
            );
            let ports: Vec<(Option<&str>, Option<u64>)> = c["ports"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .map(|p| (p["name"].as_str(), p["containerPort"].as_u64()))
                        .collect()
                })
                .unwrap_or_default();
            for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
                let get = &c[probe]["httpGet"];
                assert_eq!(get["path"], path, "{at}: {probe} path");
                let declared = match &get["port"] {
                    Value::String(n) => ports.iter().any(|(name, _)| *name == Some(n.as_str())),
                    Value::Number(n) => ports.iter().any(|(_, port)| *port == n.as_u64()),
                    _ => false,
                };
                assert!(
                    declared,
                    "{at}: {probe} port {} is not a declared port",
                    get["port"]
                );
            }
            let scrape_port =
                d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
                    .as_str()
                    .and_then(|p| p.parse::<u64>().ok());
            assert!(
                ports.iter().any(|(_, p)| *p == scrape_port),
                "{at}: the scrape port annotation names no container port"
            );
        }
    }
    assert_eq!(deployments, 3, "queue manager, engine, auditor");
}

#[test]
fn keda_watches_every_lane_engines_consume() {
    let docs = documents();
    let topology = Topology::new(&AmqpConfig {
        prefix: configured_prefix(&docs),
        ..AmqpConfig::default()
    });
    let consumed: BTreeSet<String> = Priority::ALL
        .iter()
        .map(|p| topology.lane_queue(*p))
        .chain([topology.trusted_queue()])
        .collect();
    let deployments: BTreeSet<&str> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "Deployment")
        .filter_map(|(_, d)| d["metadata"]["name"].as_str())
        .collect();
    let auths: BTreeSet<&str> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "TriggerAuthentication")
        .filter_map(|(_, d)| d["metadata"]["name"].as_str())
        .collect();
    let mut watched = BTreeSet::new();
    for (file, d) in docs.iter().filter(|(_, d)| d["kind"] == "ScaledObject") {
        let target = d["spec"]["scaleTargetRef"]["name"]
            .as_str()
            .unwrap_or_default();
        assert!(
            deployments.contains(target),
            "{file}: scales `{target}`, which is no Deployment here"
        );
        for t in d["spec"]["triggers"].as_array().into_iter().flatten() {
            assert_eq!(t["type"], "rabbitmq", "{file}: {t}");
            let queue = t["metadata"]["queueName"].as_str().unwrap_or_default();
            assert!(
                consumed.contains(queue),
                "{file}: trigger on `{queue}`, not a queue engines consume ({consumed:?})"
            );
            let auth = t["authenticationRef"]["name"].as_str().unwrap_or_default();
            assert!(
                auths.contains(auth),
                "{file}: no TriggerAuthentication `{auth}`"
            );
            watched.insert(queue.to_owned());
        }
    }
    assert_eq!(watched, consumed, "a KEDA trigger for every lane");
}
