//! Compiled namespaces, cached by (name, version). Versions are immutable, so a cached entry
//! never goes stale; "which version is current" is one indexed query, so a version applied on
//! one replica is seen by the next request on every other.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use deadpool_postgres::Pool;

use crate::procedure::{self, Catalog, Namespace, NoExternal, Problem};

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("database: {0}")]
    Db(String),
    #[error("stored namespace {name} v{version} no longer compiles: {problems:?}")]
    Stale {
        name: String,
        version: i32,
        problems: Vec<Problem>,
    },
}

pub struct NamespaceCache {
    pool: Pool,
    catalog: Box<dyn Catalog + Send + Sync>,
    compiled: RwLock<HashMap<(String, i32), Arc<Namespace>>>,
}

impl NamespaceCache {
    pub fn new(pool: Pool, catalog: Box<dyn Catalog + Send + Sync>) -> Self {
        Self {
            pool,
            catalog,
            compiled: RwLock::new(HashMap::new()),
        }
    }

    pub fn catalog(&self) -> &(dyn Catalog + Send + Sync) {
        self.catalog.as_ref()
    }

    /// The current version, or `None` when the namespace does not exist.
    pub async fn current(&self, name: &str) -> Result<Option<Arc<Namespace>>, NamespaceError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| NamespaceError::Db(e.to_string()))?;
        let stmt = client
            .prepare_cached("SELECT max(version) FROM namespaces WHERE name = $1")
            .await
            .map_err(|e| NamespaceError::Db(e.to_string()))?;
        let row = client
            .query_one(&stmt, &[&name])
            .await
            .map_err(|e| NamespaceError::Db(e.to_string()))?;
        let Some(version) = row.get::<_, Option<i32>>(0) else {
            return Ok(None);
        };
        drop(client);
        self.get(name, version).await
    }

    /// A given version (engines run the version the request was accepted under).
    pub async fn get(
        &self,
        name: &str,
        version: i32,
    ) -> Result<Option<Arc<Namespace>>, NamespaceError> {
        let key = (name.to_owned(), version);
        if let Some(ns) = self.read_cache(&key) {
            return Ok(Some(ns));
        }
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| NamespaceError::Db(e.to_string()))?;
        let row = client
            .query_opt(
                "SELECT document FROM namespaces WHERE name = $1 AND version = $2",
                &[&name, &version],
            )
            .await
            .map_err(|e| NamespaceError::Db(e.to_string()))?;
        let Some(row) = row else { return Ok(None) };
        let doc: serde_json::Value = row.get(0);
        let ns = procedure::compile(&doc, version, self.catalog.as_ref(), &NoExternal).map_err(
            |problems| NamespaceError::Stale {
                name: name.to_owned(),
                version,
                problems,
            },
        )?;
        let ns = Arc::new(ns);
        if let Ok(mut w) = self.compiled.write() {
            w.insert(key, ns.clone());
        }
        Ok(Some(ns))
    }

    fn read_cache(&self, key: &(String, i32)) -> Option<Arc<Namespace>> {
        self.compiled.read().ok()?.get(key).cloned()
    }
}
