//! The registry the interpreter looks providers up in, built from [`crate::BUILTINS`] and the
//! configured remote providers.

use std::collections::HashMap;
use std::sync::Arc;

use provisio_provider::Provider;
use provisio_shared::config::Config;

use crate::{BUILTINS, http, limits, sql};

/// What a built-in provider's constructor gets.
pub struct BuildContext<'a> {
    pub config: &'a Config,
    /// The configuration database (migrated), which holds the providers' own schemas.
    pub pool: &'a deadpool_postgres::Pool,
    /// Set by the `sql` provider's constructor: recovery needs the provider itself, not
    /// only the registry's (possibly limit-wrapped) trait object.
    pub sql: Option<Arc<sql::SqlProvider>>,
}

/// Every provider this engine offers, built from configuration, with limits applied.
pub struct Built {
    pub registry: Registry,
    /// The `sql` provider also serves recovery (prepared transactions).
    pub sql: Option<Arc<sql::SqlProvider>>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("sql target `{0}`: {1}")]
    SqlTarget(String, String),
    #[error("database pool: {0}")]
    Pool(String),
    #[error("http provider: {0}")]
    Http(String),
}

/// Builds the registry: each built-in provider of [`BUILTINS`] that the configuration
/// enables, then the remote providers by configuration, each wrapped in its limits.
pub fn build(cfg: &Config, pool: &deadpool_postgres::Pool) -> Result<Built, BuildError> {
    let mut ctx = BuildContext {
        config: cfg,
        pool,
        sql: None,
    };
    let mut offered: Vec<(Arc<dyn Provider>, Vec<String>)> = Vec::new();
    for b in BUILTINS.iter().filter(|b| b.enabled_in(cfg)) {
        let p = (b.build)(&mut ctx)?;
        offered.push((p, b.actions.iter().map(|&a| a.to_owned()).collect()));
    }
    for (name, remote) in &cfg.providers.remote {
        let p: Arc<dyn Provider> =
            Arc::new(http::RemoteProvider::new(name.clone(), remote.clone()));
        offered.push((p, remote.actions.clone()));
    }
    let mut registry = Registry::default();
    for (p, actions) in offered {
        let limited = match cfg.providers.limits.get(p.name()) {
            Some(l) => limits::Limited::wrap(p, l),
            None => p,
        };
        registry.offer(limited, actions);
    }
    Ok(Built {
        registry,
        sql: ctx.sql,
    })
}

#[derive(Default, Clone)]
pub struct Registry {
    providers: HashMap<String, Arc<dyn Provider>>,
    /// The actions of each provider, where known (those [`build`] registered).
    actions: HashMap<String, Vec<String>>,
}

impl Registry {
    pub fn register(&mut self, p: Arc<dyn Provider>) {
        self.actions.remove(p.name());
        self.providers.insert(p.name().to_owned(), p);
    }
    /// Registers `p` with the actions it offers.
    pub fn offer(&mut self, p: Arc<dyn Provider>, actions: Vec<String>) {
        let name = p.name().to_owned();
        self.register(p);
        self.actions.insert(name, actions);
    }
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.providers.get(name)
    }
    /// The provider names (the `provider` label values an engine can report).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.providers.keys().map(String::as_str)
    }
    /// The actions provider `name` was registered with, when it was registered with them.
    pub fn actions(&self, name: &str) -> Option<&[String]> {
        self.actions.get(name).map(Vec::as_slice)
    }
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
