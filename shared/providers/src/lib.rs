//! Provisio's built-in providers, and the one table that registers them.
//!
//! A built-in provider is registered in one place: a row of [`BUILTINS`]. The engine's
//! registry ([`build`]), the namespace catalog that validates namespaces at apply time
//! ([`catalog::StandardCatalog`]) and provisioctl's offline check all derive from that table,
//! so they cannot disagree about which providers and actions exist.

pub mod catalog;
pub mod directory;
pub mod http;
mod input;
mod ledger;
pub mod limits;
mod registry;
pub mod resource;
pub mod sql;
pub mod test;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::sync::Arc;

use provisio_provider::Provider;
use provisio_shared::config::Config;

pub use registry::{BuildContext, BuildError, Built, Registry, build};
pub use resource::define_pools;

/// One built-in provider: its name and actions (for validating namespaces), whether the
/// configuration enables it, and how an engine constructs it.
pub struct Builtin {
    /// The name namespaces call it by; its [`Provider::name`] must be the same.
    pub name: &'static str,
    pub actions: &'static [&'static str],
    pub enabled: Enabled,
    pub build: fn(&mut BuildContext<'_>) -> Result<Arc<dyn Provider>, BuildError>,
}

impl std::fmt::Debug for Builtin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builtin")
            .field("name", &self.name)
            .field("actions", &self.actions)
            .finish_non_exhaustive()
    }
}

/// Whether a built-in provider exists in a given configuration.
#[derive(Clone, Copy, Debug)]
pub enum Enabled {
    Always,
    /// Only when `on` says so; `setting` names the configuration key, for the message that
    /// refuses a namespace calling the provider while it is off.
    When {
        setting: &'static str,
        on: fn(&Config) -> bool,
    },
}

impl Builtin {
    pub fn enabled_in(&self, cfg: &Config) -> bool {
        match self.enabled {
            Enabled::Always => true,
            Enabled::When { on, .. } => on(cfg),
        }
    }

    /// `Err(message)` when this provider has no action `action`.
    pub fn check_action(&self, action: &str) -> Result<(), String> {
        if self.actions.contains(&action) {
            Ok(())
        } else {
            Err(format!(
                "provider `{}` has no action `{action}` (it has: {})",
                self.name,
                self.actions.join(", ")
            ))
        }
    }
}

/// Every built-in provider: the one place one is registered. Remote providers come from
/// configuration instead (`providers.remote`). Registered in this order, before remote ones.
pub static BUILTINS: &[Builtin] = &[
    Builtin {
        name: "directory",
        actions: directory::ACTIONS,
        enabled: Enabled::Always,
        build: directory::build,
    },
    Builtin {
        name: "resource",
        actions: resource::ACTIONS,
        enabled: Enabled::Always,
        build: resource::build,
    },
    Builtin {
        name: "test",
        actions: test::ACTIONS,
        enabled: Enabled::When {
            setting: "providers.test.enabled",
            on: |cfg| cfg.providers.test.enabled,
        },
        build: test::build,
    },
    Builtin {
        name: "sql",
        actions: sql::ACTIONS,
        enabled: Enabled::Always,
        build: sql::build,
    },
    Builtin {
        name: "http",
        actions: http::ACTIONS,
        enabled: Enabled::Always,
        build: http::build,
    },
];

/// The built-in provider called `name`, enabled or not.
pub fn builtin(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}
