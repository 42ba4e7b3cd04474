//! HMAC signatures on envelopes published by the queue manager, so that an engine can tell
//! them from envelopes forged by anyone who can publish to the broker.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The AMQP header that carries the signature.
pub const SIGNATURE_HEADER: &str = "x-provisio-signature";

pub fn sign(key: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
        return String::new();
    };
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// SHA-256 of `parts` one after the other, in hex: a fingerprint, not a signature (no key).
pub fn digest(parts: &[&[u8]]) -> String {
    use sha2::Digest;
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

/// Constant-time check of a hex signature.
pub fn verify(key: &[u8], body: &[u8], signature: &str) -> bool {
    let Ok(sig) = hex::decode(signature) else {
        return false;
    };
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// An envelope as the queue manager publishes it: its bytes, and properties carrying the
/// message id and the signature of exactly those bytes.
pub fn signed_envelope(
    envelope: &crate::domain::Envelope,
    key: &[u8],
) -> (Vec<u8>, lapin::BasicProperties) {
    let bytes = envelope.to_bytes();
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        SIGNATURE_HEADER.into(),
        crate::amqp::long_str(&sign(key, &bytes)),
    );
    let props = lapin::BasicProperties::default()
        .with_message_id(envelope.id.as_str().into())
        .with_content_type("application/json".into())
        .with_headers(headers);
    (bytes, props)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_own_signature_and_rejects_tampering() {
        let sig = sign(b"k", b"body");
        assert!(verify(b"k", b"body", &sig));
        assert!(!verify(b"k", b"body2", &sig));
        assert!(!verify(b"other", b"body", &sig));
        assert!(!verify(b"k", b"body", "zz"));
    }
}
