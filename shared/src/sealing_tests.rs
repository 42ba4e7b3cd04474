use super::*;

const K1: &str = "0101010101010101010101010101010101010101010101010101010101010101";
const K2: &str = "0202020202020202020202020202020202020202020202020202020202020202";

#[test]
fn seals_and_opens_for_the_same_request_only() {
    let ring = Keyring::new(&format!("k1:{K1}"), "sig").expect("keys");
    let clear = json!({"password": "S3cret-pass"});
    let sealed = ring.seal(&clear, "req-1");
    assert!(is_sealed(&sealed));
    assert!(!sealed.to_string().contains("S3cret-pass"));
    assert_eq!(sealed["kid"], "k1");
    assert_eq!(ring.open(&sealed, "req-1"), Ok(clear.clone()));
    assert_eq!(ring.open(&sealed, "req-2"), Err(SealError::DoesNotOpen));
    // Sealing twice does not nest; clear values pass through `open`.
    assert_eq!(ring.seal(&sealed, "req-1"), sealed);
    assert_eq!(ring.open(&clear, "req-1"), Ok(clear));
}

#[test]
fn paths_messages_and_redaction() {
    let ring = Keyring::new(&format!("k1:{K1}"), "sig").expect("keys");
    let input = json!({"user": "ann", "auth": {"password": "pw-1"}, "pin": 1234});
    let paths = vec![
        vec!["auth".to_owned(), "password".to_owned()],
        vec!["pin".to_owned()],
        vec!["absent".to_owned()],
    ];
    let sealed = ring.seal_paths(&input, &paths, "r");
    let text = sealed.to_string();
    assert!(!text.contains("pw-1") && !text.contains("1234"), "{text}");
    assert_eq!(sealed["user"], "ann");
    assert!(sealed.get("absent").is_none());
    assert!(contains_sealed(&sealed));
    // Sealing again changes nothing; opening restores the input.
    assert_eq!(ring.seal_paths(&sealed, &paths, "r"), sealed);
    assert_eq!(ring.open_paths(&sealed, &paths, "r"), Ok(input.clone()));
    assert_eq!(ring.open_all(&sealed, "r"), Ok(input.clone()));
    assert_eq!(
        redacted(&sealed),
        json!({"user": "ann", "auth": {"password": REDACTED}, "pin": REDACTED})
    );
    // The whole input.
    let whole = ring.seal_paths(&input, &[vec![]], "r");
    assert!(is_sealed(&whole));

    let error = json!({"code": "x", "message": "pw-1 refused", "not_undone": [
        {"path": "0", "error": {"code": "y", "message": "pw-1 again"}}]});
    let sealed_error = ring.seal_messages(&error, "r");
    assert!(!sealed_error.to_string().contains("pw-1"));
    assert_eq!(sealed_error["code"], "x");
    assert_eq!(sealed_error["not_undone"][0]["error"]["code"], "y");
    assert_eq!(ring.open_all(&sealed_error, "r"), Ok(error));
    assert_eq!(ring.seal_some(&Value::Null, "r"), Value::Null);
}

#[test]
fn rotation_old_keys_open_the_new_one_seals() {
    let old = Keyring::new(&format!("k1:{K1}"), "sig").expect("keys");
    let sealed_old = old.seal(&json!("x"), "r");
    let rotated = Keyring::new(&format!("k2:{K2}, k1:{K1}"), "sig").expect("keys");
    assert_eq!(rotated.current_id(), "k2");
    assert_eq!(rotated.open(&sealed_old, "r"), Ok(json!("x")));
    assert_eq!(rotated.seal(&json!("y"), "r")["kid"], "k2");
    let retired = Keyring::new(&format!("k2:{K2}"), "sig").expect("keys");
    assert_eq!(
        retired.open(&sealed_old, "r"),
        Err(SealError::UnknownKey("k1".into()))
    );
}

#[test]
fn a_tampered_value_does_not_open_and_bad_keys_are_refused() {
    let ring = Keyring::new("", "the signing key").expect("derived");
    assert_eq!(ring.current_id(), DERIVED_KEY_ID);
    let mut sealed = ring.seal(&json!({"a": 1}), "r");
    let ct = sealed["ct"].as_str().expect("ct").to_owned();
    let flipped = format!(
        "{}{}",
        if ct.starts_with('0') { "1" } else { "0" },
        &ct[1..]
    );
    sealed["ct"] = json!(flipped);
    assert_eq!(ring.open(&sealed, "r"), Err(SealError::DoesNotOpen));
    sealed["nonce"] = json!("zz");
    assert_eq!(ring.open(&sealed, "r"), Err(SealError::Malformed("nonce")));
    assert!(Keyring::new("k1:abcd", "s").is_err());
    assert!(Keyring::new("nocolon", "s").is_err());
    assert!(Keyring::new(&format!("k1:{K1},k1:{K2}"), "s").is_err());
    // Debug output names key ids, never keys.
    let shown = format!(
        "{:?}",
        Keyring::new(&format!("k1:{K1}"), "s").expect("keys")
    );
    assert!(!shown.contains(K1) && shown.contains("k1"), "{shown}");
}
