//! Compiled namespaces, cached by (name, version). Versions are immutable, so a cached entry
//! never goes stale; "which version is current" is one indexed query, so a version applied on
//! one replica is seen by the next request on every other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Held while a version is being loaded and compiled.
type Gate = Arc<tokio::sync::Mutex<()>>;

pub struct NamespaceCache {
    pool: Pool,
    catalog: Box<dyn Catalog + Send + Sync>,
    compiled: RwLock<HashMap<(String, i32), Arc<Namespace>>>,
    /// Current version by name, trusted only while `listening` (see [`NamespaceCache::listen`]).
    current: RwLock<HashMap<String, i32>>,
    listening: AtomicBool,
    /// Bumped by every invalidation: a version read before a bump is not cached after it.
    epoch: AtomicU64,
    /// One compilation per version at a time: the others wait for its result (see
    /// [`NamespaceCache::get`]).
    loading: std::sync::Mutex<HashMap<(String, i32), Gate>>,
}

/// The channel a new namespace version is announced on (`pg_notify`, payload: the name).
pub const CHANNEL: &str = "provisio_namespaces";

impl NamespaceCache {
    pub fn new(pool: Pool, catalog: Box<dyn Catalog + Send + Sync>) -> Self {
        Self {
            pool,
            catalog,
            compiled: RwLock::new(HashMap::new()),
            current: RwLock::new(HashMap::new()),
            listening: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            loading: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Follows new versions through PostgreSQL notifications, so that `current` needs no query
    /// per request. Until the listener is up (and whenever it is down) every `current` asks
    /// the database, so a missed notification can never serve a stale version for long: the
    /// cache is emptied on every reconnect.
    pub fn listen(self: &Arc<Self>, url: &crate::config::Secret) {
        crate::notify::follow(Arc::downgrade(self), url, CHANNEL);
    }

    /// Forgets the cached current version of `name` (after applying one here).
    pub fn invalidate(&self, name: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut c) = self.current.write() {
            c.remove(name);
        }
    }

    pub fn catalog(&self) -> &(dyn Catalog + Send + Sync) {
        self.catalog.as_ref()
    }

    /// The current version, or `None` when the namespace does not exist.
    pub async fn current(&self, name: &str) -> Result<Option<Arc<Namespace>>, NamespaceError> {
        if self.listening.load(Ordering::SeqCst) {
            let cached = self.current.read().ok().and_then(|c| c.get(name).copied());
            if let Some(version) = cached {
                return self.get(name, version).await;
            }
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
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
        if self.listening.load(Ordering::SeqCst)
            && self.epoch.load(Ordering::SeqCst) == epoch
            && let Ok(mut c) = self.current.write()
            // Re-checked under the lock: an invalidation may have come in between.
            && self.epoch.load(Ordering::SeqCst) == epoch
        {
            c.insert(name.to_owned(), version);
        }
        self.get(name, version).await
    }

    /// The stored document of a version (for inline procedures compiled in its context).
    pub async fn document(
        &self,
        name: &str,
        version: i32,
    ) -> Result<Option<serde_json::Value>, NamespaceError> {
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
        Ok(row.map(|r| r.get(0)))
    }

    /// A given version (engines run the version the request was accepted under).
    ///
    /// A version missing from the cache is loaded and compiled once, however many requests ask
    /// for it at the same moment: the first compiles, the others wait and take its result.
    /// Without that, the first burst after a start or a new version compiled it once per
    /// request in flight (a compiled namespace with its jq filters is hundreds of KB), and
    /// the queue manager's RSS peaked 30-40 MB higher under `ops/bench`.
    pub async fn get(
        &self,
        name: &str,
        version: i32,
    ) -> Result<Option<Arc<Namespace>>, NamespaceError> {
        let key = (name.to_owned(), version);
        if let Some(ns) = self.read_cache(&key) {
            return Ok(Some(ns));
        }
        let gate = self
            .loading
            .lock()
            .map(|mut l| l.entry(key.clone()).or_default().clone())
            .unwrap_or_default();
        let _turn = gate.lock().await;
        if let Some(ns) = self.read_cache(&key) {
            return Ok(Some(ns));
        }
        let loaded = self.load(&key).await;
        if let Ok(mut l) = self.loading.lock() {
            l.remove(&key);
        }
        loaded
    }

    async fn load(&self, key: &(String, i32)) -> Result<Option<Arc<Namespace>>, NamespaceError> {
        let (name, version) = (key.0.as_str(), key.1);
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
            w.insert(key.clone(), ns.clone());
        }
        Ok(Some(ns))
    }

    fn read_cache(&self, key: &(String, i32)) -> Option<Arc<Namespace>> {
        self.compiled.read().ok()?.get(key).cloned()
    }
}

impl crate::notify::Follower for NamespaceCache {
    fn connected(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut c) = self.current.write() {
            c.clear();
        }
        self.listening.store(true, Ordering::SeqCst);
    }

    fn notified(&self, name: &str) {
        self.invalidate(name);
    }

    fn disconnected(&self) {
        self.listening.store(false, Ordering::SeqCst);
    }
}
