//! Credentials sealed at rest: a request's `credentials` are encrypted (ChaCha20-Poly1305, an
//! AEAD) by the queue manager before they reach RabbitMQ or PostgreSQL, and opened by the
//! engine only to hand them to the provider call that needs them.
//!
//! Why an AEAD with a key id: an operator must be able to rotate the key without losing the
//! requests already queued or scheduled under the old one. The keyring's first key seals;
//! every key opens what carries its id. The request id is the associated data, so a sealed
//! value cannot be moved into another request's envelope.
//!
//! Without configured keys, the key is derived from the signing key (which every queue
//! manager and engine already share), under the id `signing`: sealing is never off.

use std::collections::HashMap;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

/// The marker of a sealed value; its presence is what tells sealed from clear.
pub const SEALED: &str = "chacha20poly1305";

/// The key id of a key derived from the signing key.
pub const DERIVED_KEY_ID: &str = "signing";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("credential keys: {0}")]
    BadKeys(String),
    #[error("sealed credentials name key `{0}`, which this process does not have")]
    UnknownKey(String),
    #[error("sealed credentials are malformed: {0}")]
    Malformed(&'static str),
    #[error("sealed credentials do not open (wrong key, or not for this request)")]
    DoesNotOpen,
}

/// The keys a process seals and opens with.
#[derive(Clone)]
pub struct Keyring {
    current: String,
    keys: HashMap<String, Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key ids only: the keys themselves never reach a log.
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("Keyring")
            .field("current", &self.current)
            .field("ids", &ids)
            .finish()
    }
}

impl Keyring {
    /// `spec`: `id:hex32bytes[,id:hex32bytes…]`, the first one current; empty → one key derived
    /// from `signing_key`.
    pub fn new(spec: &str, signing_key: &str) -> Result<Self, SealError> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Ok(Self::derived(signing_key));
        }
        let mut keys = HashMap::new();
        let mut current = None;
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (id, hex_key) = item
                .split_once(':')
                .ok_or_else(|| SealError::BadKeys("each key is `id:hex`".into()))?;
            let id = id.trim();
            if id.is_empty()
                || id.len() > 32
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(SealError::BadKeys(format!(
                    "`{id}` is not a key id (letters, digits, - and _, at most 32)"
                )));
            }
            let bytes = hex::decode(hex_key.trim())
                .map_err(|_| SealError::BadKeys(format!("key `{id}` is not hex")))?;
            if bytes.len() != 32 {
                return Err(SealError::BadKeys(format!(
                    "key `{id}` has {} bytes; it needs 32 (64 hex digits)",
                    bytes.len()
                )));
            }
            if keys
                .insert(id.to_owned(), *Key::from_slice(&bytes))
                .is_some()
            {
                return Err(SealError::BadKeys(format!("key id `{id}` appears twice")));
            }
            current.get_or_insert_with(|| id.to_owned());
        }
        let current = current.ok_or_else(|| SealError::BadKeys("no key".into()))?;
        Ok(Self { current, keys })
    }

    /// The keyring `security.credential_keys` describes (checked when configuration loads).
    pub fn from_config(sec: &crate::config::SecurityConfig) -> Result<Self, SealError> {
        Self::new(sec.credential_keys.expose(), sec.signing_key.expose())
    }

    /// One key derived from the signing key, under the id `signing`.
    pub fn derived(signing_key: &str) -> Self {
        let mut keys = HashMap::new();
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        let key = match <Hmac<Sha256> as Mac>::new_from_slice(signing_key.as_bytes()) {
            Ok(mut mac) => {
                mac.update(b"provisio credentials sealing v1");
                *Key::from_slice(&mac.finalize().into_bytes())
            }
            Err(_) => Key::default(),
        };
        keys.insert(DERIVED_KEY_ID.to_owned(), key);
        Self {
            current: DERIVED_KEY_ID.to_owned(),
            keys,
        }
    }

    /// The id of the key that seals.
    pub fn current_id(&self) -> &str {
        &self.current
    }

    /// Seals `clear` for the request `request_id`. Already sealed values are returned as they
    /// are (a retried request keeps what it had).
    pub fn seal(&self, clear: &Value, request_id: &str) -> Value {
        if is_sealed(clear) {
            return clear.clone();
        }
        let Some(key) = self.keys.get(&self.current) else {
            return Value::Null;
        };
        let nonce_bytes: [u8; 12] = rand::random();
        let plaintext = clear.to_string();
        let cipher = ChaCha20Poly1305::new(key);
        let Ok(ct) = cipher.encrypt(
            Nonce::from_slice(&nonce_bytes),
            Payload {
                msg: plaintext.as_bytes(),
                aad: request_id.as_bytes(),
            },
        ) else {
            // Encryption cannot fail for in-memory buffers of this size; never leak clear text.
            return Value::Null;
        };
        json!({
            "sealed": SEALED,
            "kid": self.current,
            "nonce": hex::encode(nonce_bytes),
            "ct": hex::encode(ct),
        })
    }

    /// Opens a sealed value of the request `request_id`; a clear value (from a direct AMQP
    /// producer) is returned as it is.
    pub fn open(&self, value: &Value, request_id: &str) -> Result<Value, SealError> {
        if !is_sealed(value) {
            return Ok(value.clone());
        }
        let field = |name: &'static str| {
            value
                .get(name)
                .and_then(Value::as_str)
                .ok_or(SealError::Malformed(name))
        };
        let kid = field("kid")?;
        let key = self
            .keys
            .get(kid)
            .ok_or_else(|| SealError::UnknownKey(kid.to_owned()))?;
        let nonce = hex::decode(field("nonce")?).map_err(|_| SealError::Malformed("nonce"))?;
        if nonce.len() != 12 {
            return Err(SealError::Malformed("nonce"));
        }
        let ct = hex::decode(field("ct")?).map_err(|_| SealError::Malformed("ct"))?;
        let clear = ChaCha20Poly1305::new(key)
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ct,
                    aad: request_id.as_bytes(),
                },
            )
            .map_err(|_| SealError::DoesNotOpen)?;
        serde_json::from_slice(&clear).map_err(|_| SealError::DoesNotOpen)
    }
}

/// What API answers and outcome messages show in place of a sealed value.
pub const REDACTED: &str = "[redacted]";

/// Replaces every sealed value inside `v` by [`REDACTED`]: what an API answer or an outcome
/// message shows (ciphertext is no business of a reader, and never clear text).
pub fn redact(v: &mut Value) {
    if is_sealed(v) {
        *v = Value::String(REDACTED.to_owned());
        return;
    }
    match v {
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::Object(m) => m.values_mut().for_each(redact),
        _ => {}
    }
}

/// A copy of `v` with every sealed value redacted.
pub fn redacted(v: &Value) -> Value {
    let mut v = v.clone();
    redact(&mut v);
    v
}

/// Whether `v` holds a sealed value anywhere.
pub fn contains_sealed(v: &Value) -> bool {
    is_sealed(v)
        || match v {
            Value::Array(items) => items.iter().any(contains_sealed),
            Value::Object(m) => m.values().any(contains_sealed),
            _ => false,
        }
}

impl Keyring {
    /// `input` with the value at each of `paths` (property names from the top; `[]` is the whole
    /// input) sealed for `request_id`; absent properties stay absent, sealed ones stay as they
    /// are. Used for a procedure's `sensitive` input properties.
    pub fn seal_paths(&self, input: &Value, paths: &[Vec<String>], request_id: &str) -> Value {
        let mut out = input.clone();
        for path in paths {
            if let Some(slot) = slot_at(&mut out, path) {
                *slot = self.seal(slot, request_id);
            }
        }
        out
    }

    /// `input` with the sealed values at `paths` opened (the reverse of
    /// [`Keyring::seal_paths`]); clear values pass as they are.
    pub fn open_paths(
        &self,
        input: &Value,
        paths: &[Vec<String>],
        request_id: &str,
    ) -> Result<Value, SealError> {
        let mut out = input.clone();
        for path in paths {
            if let Some(slot) = slot_at(&mut out, path) {
                *slot = self.open(slot, request_id)?;
            }
        }
        Ok(out)
    }

    /// `v` sealed whole, unless it is `null` (nothing to hide; a `null` stays a `null` so that
    /// "no value" still reads as such).
    pub fn seal_some(&self, v: &Value, request_id: &str) -> Value {
        if v.is_null() {
            Value::Null
        } else {
            self.seal(v, request_id)
        }
    }

    /// An error object (`{code, message, …}`, possibly with nested errors such as
    /// `not_undone`) with every `message` sealed: codes and paths stay readable for operators,
    /// messages (which may quote values) do not.
    pub fn seal_messages(&self, error: &Value, request_id: &str) -> Value {
        match error {
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| {
                        let v = if k == "message" && !v.is_null() {
                            self.seal(v, request_id)
                        } else {
                            self.seal_messages(v, request_id)
                        };
                        (k.clone(), v)
                    })
                    .collect(),
            ),
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|v| self.seal_messages(v, request_id))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// Opens every sealed value inside `v` (the reverse of sealing whole values or messages).
    pub fn open_all(&self, v: &Value, request_id: &str) -> Result<Value, SealError> {
        if is_sealed(v) {
            return self.open(v, request_id);
        }
        Ok(match v {
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| self.open_all(i, request_id))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, i)| Ok((k.clone(), self.open_all(i, request_id)?)))
                    .collect::<Result<_, SealError>>()?,
            ),
            other => other.clone(),
        })
    }
}

/// The value at `path` (object keys from the top), if every step of it exists.
fn slot_at<'v>(v: &'v mut Value, path: &[String]) -> Option<&'v mut Value> {
    path.iter()
        .try_fold(v, |v, key| v.as_object_mut().and_then(|m| m.get_mut(key)))
}

/// Whether `v` is a sealed value (rather than clear credentials).
pub fn is_sealed(v: &Value) -> bool {
    v.get("sealed").and_then(Value::as_str) == Some(SEALED)
}

#[cfg(test)]
#[path = "sealing_tests.rs"]
mod tests;
