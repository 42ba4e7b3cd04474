//! API keys: shown once, stored as argon2 hashes, and cached after a successful check so that
//! argon2's deliberate slowness is paid once per key per cache period, not per request.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use deadpool_postgres::Pool;
use provisio_shared::domain::PrincipalRef;
use rand::Rng;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid API key")]
    Invalid,
    #[error("database: {0}")]
    Db(String),
}

pub struct KeyStore {
    pool: Pool,
    ttl: Duration,
    cache: RwLock<HashMap<String, (PrincipalRef, Instant)>>,
}

/// The lookup column: a short prefix of the key's SHA-256, enough to find the row.
pub fn lookup_of(key: &str) -> String {
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    digest[..16].to_owned()
}

pub fn hash_key(key: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
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
        }
    }

    pub async fn authenticate(&self, key: &str) -> Result<PrincipalRef, AuthError> {
        let cache_key = hex::encode(Sha256::digest(key.as_bytes()));
        if let Ok(cache) = self.cache.read()
            && let Some((p, at)) = cache.get(&cache_key)
            && at.elapsed() < self.ttl
        {
            return Ok(p.clone());
        }
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| AuthError::Db(e.to_string()))?;
        let rows = client
            .query(
                "SELECT k.hash, p.id, p.name FROM api_keys k JOIN principals p ON p.id = k.principal_id \
                 WHERE k.lookup = $1 AND k.revoked_at IS NULL AND NOT p.disabled",
                &[&lookup_of(key)],
            )
            .await
            .map_err(|e| AuthError::Db(e.to_string()))?;
        let mut found = None;
        for row in rows {
            let hash: String = row.get(0);
            let key = key.to_owned();
            // argon2 is CPU-heavy by design; keep it off the async workers.
            let ok = tokio::task::spawn_blocking(move || {
                PasswordHash::new(&hash).is_ok_and(|h| {
                    Argon2::default()
                        .verify_password(key.as_bytes(), &h)
                        .is_ok()
                })
            })
            .await
            .unwrap_or(false);
            if ok {
                found = Some((row.get::<_, uuid::Uuid>(1), row.get::<_, String>(2)));
                break;
            }
        }
        let (id, name) = found.ok_or(AuthError::Invalid)?;
        let permissions = permissions_of(&client, id).await?;
        let principal = PrincipalRef {
            id,
            name,
            permissions,
        };
        if let Ok(mut cache) = self.cache.write() {
            cache.retain(|_, (_, at)| at.elapsed() < self.ttl);
            cache.insert(cache_key, (principal.clone(), Instant::now()));
        }
        Ok(principal)
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
    let hash = hash_key(key)?;
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
mod tests {
    use super::*;

    #[test]
    fn generated_keys_hash_and_verify() {
        let key = generate_key();
        assert!(key.starts_with("pv_") && key.len() == 43);
        let hash = hash_key(&key).expect("hashes");
        let parsed = PasswordHash::new(&hash).expect("parses");
        assert!(
            Argon2::default()
                .verify_password(key.as_bytes(), &parsed)
                .is_ok()
        );
        assert!(
            Argon2::default()
                .verify_password(b"other", &parsed)
                .is_err()
        );
    }

    #[test]
    fn lookup_is_a_stable_prefix() {
        assert_eq!(lookup_of("abc"), lookup_of("abc"));
        assert_ne!(lookup_of("abc"), lookup_of("abd"));
        assert_eq!(lookup_of("abc").len(), 16);
    }
}
