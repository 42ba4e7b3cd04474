use std::collections::BTreeMap;

use provisio_shared::config::{Config, RemoteProviderConfig, Secret, SqlTarget};

use super::*;
use crate::catalog::StandardCatalog;

/// Every built-in provider enabled, a sql target and a remote provider: the most the
/// configuration can offer. (Building connects to nothing.)
fn everything() -> Config {
    let mut cfg = Config::default();
    cfg.database.url = Secret::new("postgres://postgres@127.0.0.1:5432/provisio_unused");
    cfg.providers.test.enabled = true;
    cfg.providers.sql.targets.insert(
        "app".into(),
        SqlTarget {
            url: Secret::new("postgres://postgres@127.0.0.1:5432/provisio_unused"),
            ..Default::default()
        },
    );
    cfg.providers.remote.insert(
        "billing".into(),
        RemoteProviderConfig {
            base_url: "http://127.0.0.1:9/".into(),
            actions: vec!["charge".into(), "refund".into()],
            ..Default::default()
        },
    );
    cfg
}

#[tokio::test]
async fn the_catalog_and_the_registry_offer_the_same_providers_and_actions() {
    let cfg = everything();
    assert!(
        BUILTINS.iter().all(|b| b.enabled_in(&cfg)),
        "the configuration should enable every built-in provider"
    );
    let pool = provisio_shared::db::pool(&cfg.database.url, 1).expect("pool");
    let built = build(&cfg, &pool).expect("builds");
    let registry: BTreeMap<String, Vec<String>> = built
        .registry
        .names()
        .map(|n| {
            let actions = built
                .registry
                .actions(n)
                .expect("registered with its actions");
            (n.to_owned(), actions.to_vec())
        })
        .collect();
    let catalog = StandardCatalog::from_config(&cfg);
    assert_eq!(registry, catalog.offered());
    for b in BUILTINS {
        let p = built
            .registry
            .get(b.name)
            .expect("every built-in is registered");
        assert_eq!(p.name(), b.name, "a provider answers to its table name");
    }
    assert!(built.sql.is_some(), "recovery gets the sql provider");
}

#[tokio::test]
async fn a_disabled_builtin_is_in_neither() {
    let mut cfg = everything();
    cfg.providers.test.enabled = false;
    let pool = provisio_shared::db::pool(&cfg.database.url, 1).expect("pool");
    let built = build(&cfg, &pool).expect("builds");
    assert!(built.registry.get("test").is_none());
    assert!(
        !StandardCatalog::from_config(&cfg)
            .offered()
            .contains_key("test")
    );
}
