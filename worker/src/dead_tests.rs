use super::*;
use lapin::types::{FieldArray, LongString};

fn headers(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

#[test]
fn an_engine_dead_letter_gives_the_engine_reason() {
    let props = BasicProperties::default()
        .with_message_id("r-1".into())
        .with_headers(headers(&[
            ("x-provisio-reason", text("unauthenticated")),
            (
                "x-provisio-error",
                text("envelope signature does not verify"),
            ),
        ]));
    let l = Letter::read(br#"{"id": "r-1"}"#, &props);
    assert_eq!(l.request_id.as_deref(), Some("r-1"));
    assert_eq!(l.reason, "unauthenticated");
    assert_eq!(l.error()["code"], "dead_lettered");
    assert_eq!(l.error()["reason"], "unauthenticated");
    assert!(
        l.message.contains("signature does not verify"),
        "{}",
        l.message
    );
}

#[test]
fn a_broker_dead_letter_gives_the_death_reason_and_queue() {
    let props = BasicProperties::default()
        .with_message_id("r-2".into())
        .with_headers(headers(&[
            ("x-first-death-reason", text("delivery_limit")),
            ("x-first-death-queue", text("p.requests.normal")),
        ]));
    let l = Letter::read(b"{}", &props);
    assert_eq!(l.reason, "delivery_limit");
    assert!(l.message.contains("p.requests.normal"), "{}", l.message);
}

#[test]
fn without_first_death_headers_the_oldest_x_death_entry_counts() {
    let death = |reason: &str, queue: &str| {
        AMQPValue::FieldTable(headers(&[("reason", text(reason)), ("queue", text(queue))]))
    };
    let deaths = FieldArray::from(vec![death("rejected", "q2"), death("delivery_limit", "q1")]);
    let props = BasicProperties::default()
        .with_headers(headers(&[("x-death", AMQPValue::FieldArray(deaths))]));
    let l = Letter::read(br#"{"id": "from-body"}"#, &props);
    assert_eq!(l.reason, "delivery_limit");
    assert_eq!(
        l.request_id.as_deref(),
        Some("from-body"),
        "no message_id: the envelope's id"
    );
}

#[test]
fn credentials_are_never_kept_and_the_route_comes_from_the_envelope() {
    let body = br#"{"id": "r-3", "priority": "high", "credentials": {"password": "p"}}"#;
    let l = Letter::read(body, &BasicProperties::default());
    let (stored, redacted) = l.redacted();
    assert!(redacted);
    assert!(!stored.unwrap_or_default().to_string().contains("password"));
    assert_eq!(l.route(), (Some("high".to_owned()), false));
    let trusted = Letter::read(
        br#"{"id": "r-4", "kind": "trusted", "credentials": null}"#,
        &BasicProperties::default(),
    );
    assert_eq!(trusted.route(), (None, true));
    assert!(!trusted.redacted().1, "a null is no credentials");
    assert_eq!(
        Letter::read(b"{}", &BasicProperties::default()).route(),
        (Some("normal".to_owned()), false)
    );
}

#[test]
fn the_same_message_has_the_same_fingerprint_and_another_death_another() {
    let props = |reason: &str| {
        BasicProperties::default()
            .with_message_id("r-5".into())
            .with_headers(headers(&[("x-first-death-reason", text(reason))]))
    };
    let a = Letter::read(b"{}", &props("delivery_limit"));
    let again = BasicProperties::default()
        .with_message_id("r-5".into())
        .with_headers(headers(&[
            ("x-first-death-reason", text("delivery_limit")),
            ("x-delivery-count", AMQPValue::LongLongInt(1)),
        ]));
    assert_eq!(
        a.fingerprint,
        Letter::read(b"{}", &again).fingerprint,
        "delivered again"
    );
    assert_ne!(
        a.fingerprint,
        Letter::read(b"{}", &props("expired")).fingerprint
    );
    assert_ne!(
        a.fingerprint,
        Letter::read(b"{ }", &props("delivery_limit")).fingerprint
    );
}

#[test]
fn a_letter_with_neither_id_nor_reason_is_still_read() {
    let l = Letter::read(b"not json", &BasicProperties::default());
    assert_eq!(l.request_id, None);
    assert_eq!(l.reason, "unknown");
    assert_eq!(l.body, None);
}
