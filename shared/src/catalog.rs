//! The providers and actions a namespace may call. Both the queue manager (validating at
//! apply time) and the engine (running) derive it from the same configuration, so a namespace
//! that validates is one the engines can run.

use crate::config::Config;
use crate::procedure::Catalog;

/// Actions of the built-in `test` provider (fault injection; docs/providers.md).
pub const TEST_ACTIONS: &[&str] = &["echo", "sleep", "fail", "fail_n_times", "panic"];
/// Actions of the `directory` provider.
pub const DIRECTORY_ACTIONS: &[&str] = &[
    "ensure_org",
    "create_user",
    "add_to_group",
    "add_alias",
    "delete_user",
];
/// Actions of the `resource` provider (the resource manager).
pub const RESOURCE_ACTIONS: &[&str] = &["allocate", "release", "query"];
/// Actions of the `sql` provider.
pub const SQL_ACTIONS: &[&str] = &["execute", "query"];
/// Actions of the `http` provider.
pub const HTTP_ACTIONS: &[&str] = &["request"];

#[derive(Clone, Debug)]
pub struct StandardCatalog {
    test_enabled: bool,
    remote: std::collections::BTreeMap<String, Vec<String>>,
}

impl StandardCatalog {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            test_enabled: cfg.providers.test.enabled,
            remote: cfg
                .providers
                .remote
                .iter()
                .map(|(k, v)| (k.clone(), v.actions.clone()))
                .collect(),
        }
    }
}

impl Catalog for StandardCatalog {
    fn check_action(&self, provider: &str, action: &str) -> Result<(), String> {
        let actions: &[&str] = match provider {
            "directory" => DIRECTORY_ACTIONS,
            "resource" => RESOURCE_ACTIONS,
            "sql" => SQL_ACTIONS,
            "http" => HTTP_ACTIONS,
            "test" if self.test_enabled => TEST_ACTIONS,
            "test" => {
                return Err(
                    "provider `test` is disabled (providers.test.enabled = false)".to_owned(),
                );
            }
            other => {
                let Some(actions) = self.remote.get(other) else {
                    return Err(format!("unknown provider `{other}`"));
                };
                if actions.iter().any(|a| a == action) {
                    return Ok(());
                }
                return Err(format!(
                    "remote provider `{other}` has no action `{action}` (it has: {})",
                    actions.join(", ")
                ));
            }
        };
        if actions.contains(&action) {
            Ok(())
        } else {
            Err(format!(
                "provider `{provider}` has no action `{action}` (it has: {})",
                actions.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
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
            crate::config::RemoteProviderConfig {
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
}
