use super::*;

#[test]
fn hash_ignores_key_order_but_not_values() {
    let a = serde_json::from_str::<Value>(r#"{"a":1,"b":{"x":1,"y":[1,2]}}"#).expect("json");
    let b = serde_json::from_str::<Value>(r#"{"b":{"y":[1,2],"x":1},"a":1}"#).expect("json");
    let c = serde_json::from_str::<Value>(r#"{"b":{"y":[2,1],"x":1},"a":1}"#).expect("json");
    assert_eq!(hash_of(None, &a), hash_of(None, &b));
    assert_ne!(hash_of(None, &a), hash_of(None, &c));
    // Keyed for bodies with secrets: the same body, the same fingerprint; not a plain hash.
    assert_eq!(hash_of(Some(b"k"), &a), hash_of(Some(b"k"), &b));
    assert_ne!(hash_of(Some(b"k"), &a), hash_of(None, &a));
    assert_ne!(hash_of(Some(b"k"), &a), hash_of(Some(b"j"), &a));
}
