//! API keys: shown once, stored as argon2 hashes, and cached after a successful check so that
//! argon2's deliberate slowness is paid once per key per cache period, not per request. The
//! cache is emptied whenever access changes anywhere (PostgreSQL notifications), so caching
//! costs no revocation delay.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use provisio_shared::config::Secret;
use provisio_shared::domain::PrincipalRef;
use provisio_shared::notify::Follower;
use provisio_shared::security::AUTH_CHANNEL;
use rand::Rng;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid API key")]
    Invalid,
    /// A genuine key past its `expires_at`: refused, but the principal is known (for audit).
    #[error("API key expired")]
    Expired(PrincipalRef),
    #[error("database: {0}")]
    Db(String),
    #[error("the hashing thread stopped")]
    Hashing,
}

/// How long a verified key is trusted while the `provisio_auth` listener is down, whatever
/// `key_cache_seconds` says: revocations must take effect within seconds even then.
const UNFOLLOWED_TTL: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Cached {
    principal: PrincipalRef,
    expires_at: Option<DateTime<Utc>>,
    at: Instant,
}

/// Verified keys with their principals' permissions. Emptied on every `provisio_auth`
/// notification (a key revoked, a grant or membership changed, a principal disabled: see
/// [`KeyStore::listen`]); the TTL is the backstop for a missed one.
pub struct KeyStore {
    pool: Pool,
    ttl: Duration,
    cache: RwLock<HashMap<String, Cached>>,
    /// Verifications in progress, by key (see [`KeyStore::authenticate`]).
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    listening: AtomicBool,
    /// Bumped by every invalidation: a key read before a bump is not cached after it.
    epoch: AtomicU64,
}

/// The lookup column: a short prefix of the key's SHA-256, enough to find the row.
pub fn lookup_of(key: &str) -> String {
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    digest[..16].to_owned()
}

/// argon2id with the OWASP cheat sheet's lowest-memory parameter set (m = 7 MiB, t = 5, p = 1),
/// which it rates as strong as the crate's default (m = 19 MiB, t = 2): memory is what the
/// queue manager is short of (every hash or verification holds `m` at once; the 100 MB RSS
/// budget of `ops/bench`), not CPU. Verification takes the parameters from the stored hash,
/// so keys hashed with the default before still verify.
fn argon2() -> Argon2<'static> {
    argon2::Params::new(7 * 1024, 5, 1, None).map_or_else(
        |_| Argon2::default(),
        |params| Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params),
    )
}

/// Runs `f` (argon2) on the one thread that does all of this process's hashing. argon2 takes
/// its `m` of memory per hash or verification by design, and the allocator keeps freed memory
/// in the heap of the thread that used it: on tokio's blocking pool every thread that ever
/// hashed held its own copy, and the queue manager grew past 100 MB RSS under `ops/bench`.
/// On one thread the memory is held once. Hashing is rare (a new
/// key, a key's first use per cache period) and slow on purpose either way. `None`: the
/// thread could not be started or `f` panicked.
pub async fn on_hashing_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    type Job = Box<dyn FnOnce() + Send>;
    static JOBS: std::sync::OnceLock<Option<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let jobs = JOBS.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("argon2".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    // A panicking job loses its own answer only.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .ok()
            .map(|_| tx)
    });
    let (done, wait) = tokio::sync::oneshot::channel();
    jobs.as_ref()?
        .send(Box::new(move || {
            let _ = done.send(f());
        }))
        .ok()?;
    wait.await.ok()
}

/// `hash_key` on the hashing thread: what every caller outside tests wants.
pub async fn hash_new_key(key: &str) -> Result<String, AuthError> {
    let key = key.to_owned();
    on_hashing_thread(move || hash_key(&key))
        .await
        .unwrap_or(Err(AuthError::Hashing))
}

pub fn hash_key(key: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    argon2()
        .hash_password(key.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|_| AuthError::Invalid)
}

/// A new random key: `pv_` and 40 hex characters (160 bits).
pub fn generate_key() -> String {
    let bytes: [u8; 20] = rand::rng().random();
    format!("pv_{}", hex::encode(bytes))
}

impl KeyStore {
    pub fn new(pool: Pool, ttl: Duration) -> Self {
        Self {
            pool,
            ttl,
            cache: RwLock::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            listening: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
        }
    }

    /// Empties the cache on every change announced on [`AUTH_CHANNEL`], so that a revocation
    /// or a permission change is seen at the next request on every queue manager.
    pub fn listen(self: &Arc<Self>, url: &Secret) {
        provisio_shared::notify::follow(Arc::downgrade(self), url, AUTH_CHANNEL);
    }

    /// Waits (at most `limit`) for the listener's first session, so that the first keys
    /// verified are not thrown away by the emptying that starts it.
    pub async fn wait_listening(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.listening.load(Ordering::SeqCst) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn ttl(&self) -> Duration {
        if self.listening.load(Ordering::SeqCst) {
            self.ttl
        } else {
            self.ttl.min(UNFOLLOWED_TTL)
        }
    }

    fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut cache) = self.cache.write() {
            cache.clear();
        }
    }

    pub async fn authenticate(&self, key: &str) -> Result<PrincipalRef, AuthError> {
        let cache_key = hex::encode(Sha256::digest(key.as_bytes()));
        if let Some(c) = self.cached(&cache_key) {
            return still_valid(c.principal, c.expires_at);
        }
        if self.ttl().is_zero() {
            // No cache to fill: nothing to wait for.
            return self.load(key, cache_key).await;
        }
        // One verification per key at a time: after the cache is emptied (any change of
        // access), every client's next requests arrive at once, and argon2 for each of them
        // would hold a connection and a core. The others wait, then find the cache filled.
        let gate = self.gate(&cache_key);
        let turn = gate.lock().await;
        let result = match self.cached(&cache_key) {
            Some(c) => still_valid(c.principal, c.expires_at),
            None => self.load(key, cache_key.clone()).await,
        };
        drop(turn);
        drop(gate);
        if let Ok(mut gates) = self.gates.lock() {
            gates.retain(|_, g| Arc::strong_count(g) > 1);
        }
        result
    }

    fn cached(&self, cache_key: &str) -> Option<Cached> {
        let ttl = self.ttl();
        self.cache
            .read()
            .ok()
            .and_then(|c| c.get(cache_key).cloned())
            .filter(|c| c.at.elapsed() < ttl)
    }

    fn gate(&self, cache_key: &str) -> Arc<tokio::sync::Mutex<()>> {
        match self.gates.lock() {
            Ok(mut gates) => gates.entry(cache_key.to_owned()).or_default().clone(),
            // A poisoned map only costs the deduplication.
            Err(_) => Arc::default(),
        }
    }

    /// Verifies `key` against the database and caches the principal (unless access changed
    /// meanwhile).
    async fn load(&self, key: &str, cache_key: String) -> Result<PrincipalRef, AuthError> {
        let epoch = self.epoch.load(Ordering::SeqCst);
        let (id, name, expires_at) = self.verify(key).await?;
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| AuthError::Db(e.to_string()))?;
        let permissions = permissions_of(&client, id).await?;
        drop(client);
        let principal = PrincipalRef {
            id,
            name,
            permissions,
        };
        let ttl = self.ttl();
        if self.epoch.load(Ordering::SeqCst) == epoch
            && let Ok(mut cache) = self.cache.write()
            // Re-checked under the lock: an invalidation may have come in between.
            && self.epoch.load(Ordering::SeqCst) == epoch
        {
            cache.retain(|_, c| c.at.elapsed() < ttl);
            cache.insert(
                cache_key,
                Cached {
                    principal: principal.clone(),
                    expires_at,
                    at: Instant::now(),
                },
            );
        }
        still_valid(principal, expires_at)
    }

    /// The principal whose active key `key` is: (id, name, the key's expiry).
    async fn verify(
        &self,
        key: &str,
    ) -> Result<(uuid::Uuid, String, Option<DateTime<Utc>>), AuthError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| AuthError::Db(e.to_string()))?;
        let rows = client
            .query(
                "SELECT k.hash, p.id, p.name, k.expires_at FROM api_keys k \
                 JOIN principals p ON p.id = k.principal_id \
                 WHERE k.lookup = $1 AND k.revoked_at IS NULL AND NOT p.disabled",
                &[&lookup_of(key)],
            )
            .await
            .map_err(|e| AuthError::Db(e.to_string()))?;
        // No connection held through argon2.
        drop(client);
        for row in rows {
            let hash: String = row.get(0);
            let key = key.to_owned();
            // argon2 is CPU-heavy by design; keep it off the async workers.
            let ok = on_hashing_thread(move || {
                PasswordHash::new(&hash)
                    .is_ok_and(|h| argon2().verify_password(key.as_bytes(), &h).is_ok())
            })
            .await
            .unwrap_or(false);
            if ok {
                return Ok((row.get(1), row.get(2), row.get(3)));
            }
        }
        Err(AuthError::Invalid)
    }
}

/// The principal, unless its key has expired by now (a cached key expires in the cache too).
fn still_valid(
    principal: PrincipalRef,
    expires_at: Option<DateTime<Utc>>,
) -> Result<PrincipalRef, AuthError> {
    match expires_at {
        Some(at) if at <= Utc::now() => Err(AuthError::Expired(principal)),
        _ => Ok(principal),
    }
}

impl Follower for KeyStore {
    fn connected(&self) {
        self.clear();
        self.listening.store(true, Ordering::SeqCst);
    }

    fn notified(&self, _table: &str) {
        self.clear();
    }

    fn disconnected(&self) {
        self.listening.store(false, Ordering::SeqCst);
    }
}

pub async fn permissions_of(
    client: &tokio_postgres::Client,
    principal: uuid::Uuid,
) -> Result<Vec<String>, AuthError> {
    provisio_shared::security::permissions_of(client, principal)
        .await
        .map_err(|e| AuthError::Db(e.to_string()))
}

/// Makes `key` the first admin's key when no admin has a key yet. Idempotent and safe when
/// several queue managers start together (advisory lock).
pub async fn bootstrap_admin(pool: &Pool, key: &str) -> Result<bool, AuthError> {
    let mut client = pool.get().await.map_err(|e| AuthError::Db(e.to_string()))?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| AuthError::Db(e.to_string()))?;
    tx.execute("SELECT pg_advisory_xact_lock(7262002)", &[])
        .await
        .map_err(|e| AuthError::Db(e.to_string()))?;
    let has_admin = tx
        .query_opt(
            "SELECT 1 FROM group_members m JOIN api_keys k ON k.principal_id = m.principal_id \
             WHERE m.group_name = 'admins' AND k.revoked_at IS NULL LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| AuthError::Db(e.to_string()))?
        .is_some();
    if has_admin {
        return Ok(false);
    }
    let id = uuid::Uuid::now_v7();
    let hash = hash_new_key(key).await?;
    let db = |e: tokio_postgres::Error| AuthError::Db(e.to_string());
    tx.execute(
        "INSERT INTO principals (id, name, kind) VALUES ($1, 'admin', 'person') \
         ON CONFLICT (name) DO NOTHING",
        &[&id],
    )
    .await
    .map_err(db)?;
    let row = tx
        .query_one("SELECT id FROM principals WHERE name = 'admin'", &[])
        .await
        .map_err(db)?;
    let admin: uuid::Uuid = row.get(0);
    tx.execute(
        "INSERT INTO group_members (group_name, principal_id) VALUES ('admins', $1) ON CONFLICT DO NOTHING",
        &[&admin],
    )
    .await
    .map_err(db)?;
    tx.execute(
        "INSERT INTO api_keys (id, principal_id, lookup, hash) VALUES ($1, $2, $3, $4)",
        &[&uuid::Uuid::now_v7(), &admin, &lookup_of(key), &hash],
    )
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(true)
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;
