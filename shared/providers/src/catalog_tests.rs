use super::*;

#[test]
fn the_test_provider_exists_only_when_enabled() {
    let mut cfg = Config::default();
    let off = StandardCatalog::from_config(&cfg);
    assert!(off.check_action("test", "echo").is_err());
    cfg.providers.test.enabled = true;
    let on = StandardCatalog::from_config(&cfg);
    assert!(on.check_action("test", "echo").is_ok());
    assert!(on.check_action("test", "nope").is_err());
}

#[test]
fn remote_providers_offer_their_configured_actions() {
    let mut cfg = Config::default();
    cfg.providers.remote.insert(
        "billing".into(),
        provisio_shared::config::RemoteProviderConfig {
            actions: vec!["charge".into()],
            ..Default::default()
        },
    );
    let c = StandardCatalog::from_config(&cfg);
    assert!(c.check_action("billing", "charge").is_ok());
    assert!(c.check_action("billing", "refund").is_err());
    assert!(c.check_action("directory", "create_user").is_ok());
    assert!(c.check_action("nosuch", "x").is_err());
}
