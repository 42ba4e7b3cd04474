use super::*;
use serde_json::json;

#[test]
fn parses_a_minimal_envelope_with_defaults() {
    let e =
        Envelope::parse(br#"{"id":"r1","namespace":"demo","procedure":"hello"}"#).expect("parses");
    assert_eq!(e.priority, Priority::Normal);
    assert_eq!(e.kind, RequestKind::Queued);
    assert_eq!(e.input, Value::Null);
}

#[test]
fn round_trips() {
    let e = Envelope::parse(
        json!({"id":"r1","namespace":"demo","procedure":"hello","input":{"a":1},"priority":"high"})
            .to_string()
            .as_bytes(),
    )
    .expect("parses");
    assert_eq!(Envelope::parse(&e.to_bytes()).expect("parses again"), e);
}

#[test]
fn rejects_garbage_bad_names_and_unknown_fields() {
    for bad in [
        &b"not json"[..],
        br#"{"id":"r1","namespace":"Demo!","procedure":"hello"}"#,
        br#"{"id":"","namespace":"demo","procedure":"hello"}"#,
        br#"{"id":"r1","namespace":"demo","procedure":"hello","bogus":1}"#,
        br#"{"namespace":"demo","procedure":"hello"}"#,
    ] {
        assert!(
            Envelope::parse(bad).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}
