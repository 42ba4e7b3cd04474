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
fn new_hashes_use_seven_mib_and_default_ones_still_verify() {
    let key = generate_key();
    let hash = hash_key(&key).expect("hashes");
    assert!(hash.contains("m=7168,t=5,p=1"), "{hash}");
    // A key hashed before, with the crate's default parameters.
    let salt = SaltString::generate(&mut OsRng);
    let old = Argon2::default()
        .hash_password(key.as_bytes(), &salt)
        .expect("hashes")
        .to_string();
    assert!(old.contains("m=19456"), "{old}");
    let parsed = PasswordHash::new(&old).expect("parses");
    assert!(argon2().verify_password(key.as_bytes(), &parsed).is_ok());
    assert!(argon2().verify_password(b"other", &parsed).is_err());
}

#[test]
fn lookup_is_a_stable_prefix() {
    assert_eq!(lookup_of("abc"), lookup_of("abc"));
    assert_ne!(lookup_of("abc"), lookup_of("abd"));
    assert_eq!(lookup_of("abc").len(), 16);
}
