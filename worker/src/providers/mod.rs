//! Provider implementations and the registry the interpreter looks them up in.

pub mod directory;
pub mod http;
pub(crate) mod input;
pub mod limits;
pub mod resource;
pub mod sql;
pub mod test;

use std::collections::HashMap;
use std::sync::Arc;

use provisio_shared::provider::{Provider, ProviderError};

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

/// Builds the registry: `test` only when enabled, `sql` when targets are configured, `http`
/// always (it refuses services that are not configured), remote providers by configuration.
pub fn build(
    cfg: &provisio_shared::config::Config,
    pool: &deadpool_postgres::Pool,
) -> Result<Built, BuildError> {
    use std::str::FromStr;
    let mut providers: Vec<Arc<dyn Provider>> = Vec::new();
    extra_providers(pool, &mut providers);
    if cfg.providers.test.enabled {
        let mut pg = tokio_postgres::Config::from_str(cfg.database.url.expose())
            .map_err(|e| BuildError::Pool(e.to_string()))?;
        pg.options("-c synchronous_commit=off");
        let mgr = deadpool_postgres::Manager::new(pg, tokio_postgres::NoTls);
        let test_pool = deadpool_postgres::Pool::builder(mgr)
            .max_size(cfg.database.pool_size.min(8))
            .build()
            .map_err(|e| BuildError::Pool(e.to_string()))?;
        providers.push(Arc::new(test::TestProvider::new(test_pool)));
    }
    let mut targets = HashMap::new();
    for (name, t) in &cfg.providers.sql.targets {
        let p = provisio_shared::db::pool(&t.url, t.pool_size.unwrap_or(8))
            .map_err(|e| BuildError::SqlTarget(name.clone(), e.to_string()))?;
        targets.insert(name.clone(), p);
    }
    let sql = Arc::new(sql::SqlProvider::new(targets));
    providers.push(sql.clone());
    providers.push(Arc::new(
        http::HttpProvider::new(&cfg.providers.http)
            .map_err(|e| BuildError::Http(e.to_string()))?,
    ));
    for (name, remote) in &cfg.providers.remote {
        providers.push(Arc::new(http::RemoteProvider::new(
            name.clone(),
            remote.clone(),
        )));
    }
    let mut registry = Registry::default();
    for p in providers {
        let limited = match cfg.providers.limits.get(p.name()) {
            Some(l) => limits::Limited::wrap(p, l),
            None => p,
        };
        registry.register(limited);
    }
    Ok(Built {
        registry,
        sql: Some(sql),
    })
}

/// Providers backed by the configuration database's own schemas.
fn extra_providers(pool: &deadpool_postgres::Pool, out: &mut Vec<Arc<dyn Provider>>) {
    out.push(Arc::new(directory::DirectoryProvider::new(pool.clone())));
    out.push(Arc::new(resource::ResourceProvider::new(pool.clone())));
}

/// Upserts the resource pools named in configuration (engines do this at start-up).
pub async fn define_pools(
    cfg: &provisio_shared::config::Config,
    pool: &deadpool_postgres::Pool,
) -> Result<(), ProviderError> {
    for p in &cfg.providers.resource.pools {
        let resources: Vec<(String, i32, i32)> = p
            .resources
            .iter()
            .map(|r| (r.name.clone(), r.capacity, r.rank))
            .collect();
        resource::define_pool(pool, &p.name, &p.strategy, &resources).await?;
    }
    Ok(())
}

#[derive(Default, Clone)]
pub struct Registry {
    providers: HashMap<String, Arc<dyn Provider>>,
}

impl Registry {
    pub fn register(&mut self, p: Arc<dyn Provider>) {
        self.providers.insert(p.name().to_owned(), p);
    }
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.providers.get(name)
    }
    /// The provider names (the `provider` label values an engine can report).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.providers.keys().map(String::as_str)
    }
}
