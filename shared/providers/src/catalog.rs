//! The providers and actions a namespace may call. Both the queue manager (validating at
//! apply time) and the engine (running) derive it from the same configuration and from
//! [`crate::BUILTINS`], the table the engine's registry is built from, so a namespace that
//! validates is one the engines can run.

use std::collections::BTreeMap;

use provisio_shared::config::Config;
use provisio_shared::procedure::Catalog;

use crate::{BUILTINS, Builtin, Enabled};

#[derive(Clone, Debug)]
pub struct StandardCatalog {
    /// The built-in providers this configuration enables.
    builtins: Vec<&'static Builtin>,
    /// Remote providers and their actions.
    remote: BTreeMap<String, Vec<String>>,
}

impl StandardCatalog {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            builtins: BUILTINS.iter().filter(|b| b.enabled_in(cfg)).collect(),
            remote: cfg
                .providers
                .remote
                .iter()
                .map(|(k, v)| (k.clone(), v.actions.clone()))
                .collect(),
        }
    }

    /// Every provider a namespace may call, with its actions.
    pub fn offered(&self) -> BTreeMap<String, Vec<String>> {
        let mut all = self.remote.clone();
        // A built-in provider's name wins over a remote one's (as in `check_action`).
        for b in &self.builtins {
            all.insert(
                b.name.to_owned(),
                b.actions.iter().map(|&a| a.to_owned()).collect(),
            );
        }
        all
    }
}

impl Catalog for StandardCatalog {
    fn check_action(&self, provider: &str, action: &str) -> Result<(), String> {
        if let Some(b) = self.builtins.iter().find(|b| b.name == provider) {
            return b.check_action(action);
        }
        if let Some(Builtin {
            enabled: Enabled::When { setting, .. },
            ..
        }) = crate::builtin(provider)
        {
            return Err(format!(
                "provider `{provider}` is disabled ({setting} = false)"
            ));
        }
        let Some(actions) = self.remote.get(provider) else {
            return Err(format!("unknown provider `{provider}`"));
        };
        if actions.iter().any(|a| a == action) {
            return Ok(());
        }
        Err(format!(
            "remote provider `{provider}` has no action `{action}` (it has: {})",
            actions.join(", ")
        ))
    }
}

/// What provisioctl can check without the server: the built-in providers' actions. Any other
/// provider may be configured on the server as a remote one, and whether a provider that
/// configuration enables is on is the server's setting, so those pass here.
#[derive(Clone, Copy, Debug, Default)]
pub struct OfflineCatalog;

impl Catalog for OfflineCatalog {
    fn check_action(&self, provider: &str, action: &str) -> Result<(), String> {
        crate::builtin(provider).map_or(Ok(()), |b| b.check_action(action))
    }
}

#[cfg(test)]
#[path = "catalog_tests.rs"]
mod tests;
