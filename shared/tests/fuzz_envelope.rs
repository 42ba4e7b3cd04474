//! Property tests: malformed envelopes thrown at `Envelope::parse`, the engine's first look at a
//! delivery. Whatever arrives on a queue, parsing must not panic, and every refusal must carry a
//! message: the engine dead-letters the delivery with reason `malformed` and that message as
//! its `x-provisio-error` (worker/src/engine/mod.rs, `handle`).
//!
//! Case counts are fixed so that the suite's total stays known (see docs/operations.md,
//! "Property tests"): 3,000 + 1,000 + 2,000 + 2,500 + 1,000 = 9,500 envelopes here.
#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation is the test failing"
)]

use proptest::prelude::*;
use provisio_shared::domain::Envelope;
use serde_json::{Map, Value, json};

/// Any JSON value, nested a few levels: objects, arrays, every scalar kind.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
        "[a-z_]{1,10}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}|.{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A valid envelope with every optional field, so that mutations have something to break.
fn valid() -> Value {
    json!({
        "id": "req-1",
        "namespace": "demo",
        "procedure": "hello",
        "input": {"name": "Ada"},
        "priority": "high",
        "kind": "queued",
        "namespace_version": 3,
        "principal": {
            "id": "0190a0a0-0000-7000-8000-000000000001",
            "name": "alice",
            "permissions": ["execute"],
        },
        "run_as": "bob",
        "steps": [],
        "credentials": {"token": "t"},
        "retry": {"count": 2, "interval_ms": 1000, "on_exhausted": "park"},
        "submitted_at": "2026-01-01T00:00:00Z",
        "not_before": "2026-01-01T00:00:00Z",
    })
}

/// `[[[…0…]]]`, `depth` arrays deep, built as text (a `Value` that deep would overflow the
/// stack of its own `Drop`).
fn nested_text(depth: usize) -> String {
    format!("{}0{}", "[".repeat(depth), "]".repeat(depth))
}

/// Every way the mutations below break an envelope: each makes it invalid.
#[derive(Clone, Debug)]
enum Mutation {
    Remove(&'static str),
    WrongType(&'static str, Value),
    BadId(String),
    BadName(&'static str, String),
    BadPriority(String),
    BadKind(String),
    Unknown(String, Value),
    BadRetry(Value),
    BadPrincipal(Value),
    BadTime(&'static str, String),
    /// A field nested past serde_json's recursion limit (128).
    Deep(&'static str, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let required = prop::sample::select(vec!["id", "namespace", "procedure"]);
    let named = prop::sample::select(vec!["namespace", "procedure"]);
    let typed = prop::sample::select(vec![
        "id",
        "namespace",
        "procedure",
        "priority",
        "kind",
        "namespace_version",
        "principal",
        "run_as",
        "retry",
        "submitted_at",
        "not_before",
    ]);
    let field_known = [
        "id",
        "namespace",
        "procedure",
        "input",
        "priority",
        "kind",
        "namespace_version",
        "principal",
        "run_as",
        "steps",
        "credentials",
        "retry",
        "submitted_at",
        "not_before",
    ];
    let deep_field = prop::sample::select(vec!["input", "steps", "credentials", "namespace"]);
    prop_oneof![
        required.prop_map(Mutation::Remove),
        (typed, wrong_scalar_or_container()).prop_map(|(f, v)| Mutation::WrongType(f, v)),
        bad_id().prop_map(Mutation::BadId),
        (named, bad_name()).prop_map(|(f, v)| Mutation::BadName(f, v)),
        "[a-z]{0,12}|.{0,20}"
            .prop_filter("a valid priority", |p| !["high", "normal", "low"]
                .contains(&p.as_str()))
            .prop_map(Mutation::BadPriority),
        ".{0,20}"
            .prop_filter("a valid kind", |k| !["queued", "trusted"]
                .contains(&k.as_str()))
            .prop_map(Mutation::BadKind),
        ("[a-zA-Z_]{1,20}", any_json())
            .prop_filter("a known field", move |(k, _)| !field_known
                .contains(&k.as_str()))
            .prop_map(|(k, v)| Mutation::Unknown(k, v)),
        bad_retry().prop_map(Mutation::BadRetry),
        bad_principal().prop_map(Mutation::BadPrincipal),
        (
            prop::sample::select(vec!["submitted_at", "not_before"]),
            "[0-9:TZ-]{0,30}|.{0,20}"
        )
            .prop_map(|(f, t)| Mutation::BadTime(f, t)),
        (deep_field, 129usize..4096).prop_map(|(f, d)| Mutation::Deep(f, d)),
    ]
}

/// A value of the wrong kind for every field in `typed` above.
fn wrong_scalar_or_container() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        any::<f64>()
            .prop_filter("finite non-integer", |f| f.is_finite() && f.fract() != 0.0)
            .prop_map(Value::from),
        // Strings, not numbers: serde reads a struct from an array of its fields in order, so
        // `"retry": [1, 2]` is a valid retry policy.
        prop::collection::vec("[a-z]{0,5}".prop_map(Value::String), 0..4).prop_map(Value::Array),
    ]
}

fn bad_id() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        (129usize..20_000).prop_map(|n| "x".repeat(n)),
        (
            "[a-z]{0,10}",
            prop::char::range('\u{0}', '\u{1f}'),
            "[a-z]{0,10}"
        )
            .prop_map(|(a, c, b)| format!("{a}{c}{b}")),
    ]
}

fn bad_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[A-Z][a-z]{0,10}",
        "[0-9_-][a-z]{0,10}",
        "[a-z]{1,5}[.:/ !é][a-z]{0,5}",
        (65usize..50_000).prop_map(|n| "a".repeat(n)),
    ]
}

fn bad_retry() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        Just(json!({"count": 1})),
        Just(json!({"interval_ms": 1})),
        any::<i64>()
            .prop_filter("negative", |n| *n < 0)
            .prop_map(|n| json!({"count": n, "interval_ms": 1})),
        Just(json!({"count": 1, "interval_ms": 1, "on_exhausted": "explode"})),
        Just(json!({"count": 1, "interval_ms": 1, "extra": true})),
        Just(json!({"count": 4_294_967_296_u64, "interval_ms": 1})),
    ]
}

fn bad_principal() -> impl Strategy<Value = Value> {
    prop_oneof![
        ".{0,40}".prop_map(|id| json!({"id": id, "name": "a"})),
        Just(json!({"name": "a"})),
        Just(json!({"id": "0190a0a0-0000-7000-8000-000000000001"})),
        Just(
            json!({"id": "0190a0a0-0000-7000-8000-000000000001", "name": "a", "permissions": "admin"})
        ),
        Just(json!({"id": "0190a0a0-0000-7000-8000-000000000001", "name": "a", "extra": 1})),
    ]
}

/// The mutated envelope as bytes (text, because `Deep` cannot be a `Value`).
fn apply(m: &Mutation) -> Vec<u8> {
    let mut v = valid();
    let obj = v.as_object_mut().expect("an object");
    let placeholder = "\"__DEEP__\"";
    match m {
        Mutation::Remove(f) => {
            obj.remove(*f);
        }
        Mutation::WrongType(f, val) => {
            obj.insert((*f).into(), val.clone());
        }
        Mutation::BadId(id) => {
            obj.insert("id".into(), id.clone().into());
        }
        Mutation::BadName(f, n) => {
            obj.insert((*f).into(), n.clone().into());
        }
        Mutation::BadPriority(p) => {
            obj.insert("priority".into(), p.clone().into());
        }
        Mutation::BadKind(k) => {
            obj.insert("kind".into(), k.clone().into());
        }
        Mutation::Unknown(k, val) => {
            obj.insert(k.clone(), val.clone());
        }
        Mutation::BadRetry(r) => {
            obj.insert("retry".into(), r.clone());
        }
        Mutation::BadPrincipal(p) => {
            obj.insert("principal".into(), p.clone());
        }
        Mutation::BadTime(f, t) => {
            obj.insert((*f).into(), t.clone().into());
        }
        Mutation::Deep(f, _) => {
            obj.insert((*f).into(), "__DEEP__".into());
        }
    }
    let text = v.to_string();
    match m {
        Mutation::Deep(_, depth) => text.replace(placeholder, &nested_text(*depth)).into_bytes(),
        _ => text.into_bytes(),
    }
}

/// The property every input shares: parsing returns, and a refusal says why.
fn parse_checked(bytes: &[u8]) -> Result<Envelope, String> {
    match Envelope::parse(bytes) {
        Ok(e) => Ok(e),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.len() > "envelope is not valid JSON for a request: ".len(),
                "an empty reason for {:?}",
                String::from_utf8_lossy(bytes)
            );
            Err(msg)
        }
    }
}

#[test]
fn the_valid_envelope_parses_and_round_trips() {
    let e = Envelope::parse(valid().to_string().as_bytes()).expect("valid");
    assert_eq!(Envelope::parse(&e.to_bytes()).expect("again"), e);
}

#[test]
fn nesting_past_the_recursion_limit_is_refused_not_a_stack_overflow() {
    for depth in [100, 128, 129, 1_000, 100_000] {
        let text = format!(
            r#"{{"id":"r","namespace":"demo","procedure":"p","input":{}}}"#,
            nested_text(depth)
        );
        let r = parse_checked(text.as_bytes());
        // serde_json stops at 128 levels, the envelope's own object and the `input` value
        // included.
        assert_eq!(r.is_ok(), depth == 100, "depth {depth}: {r:?}");
    }
}

proptest! {
    // 3,000 cases: raw bytes off the wire, mostly not even UTF-8.
    #![proptest_config(ProptestConfig { cases: 3_000, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_checked(&bytes);
    }
}

proptest! {
    // 1,000 cases: a valid envelope cut short anywhere is refused.
    #![proptest_config(ProptestConfig { cases: 1_000, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn truncated_envelopes_are_refused(cut in any::<prop::sample::Index>(), flip in any::<Option<(prop::sample::Index, u8)>>()) {
        let mut bytes = valid().to_string().into_bytes();
        let at = cut.index(bytes.len());
        bytes.truncate(at);
        if let Some((i, b)) = flip && !bytes.is_empty() {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        prop_assert!(parse_checked(&bytes).is_err());
    }
}

proptest! {
    // 2,000 cases: any JSON value. Most are refused; the rare one that parses is a real envelope.
    #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn arbitrary_json_never_panics(v in any_json()) {
        if let Ok(e) = parse_checked(v.to_string().as_bytes()) {
            prop_assert_eq!(Envelope::parse(&e.to_bytes()).ok(), Some(e));
        }
    }
}

proptest! {
    // 2,500 cases: one targeted defect in an otherwise valid envelope, always refused.
    #![proptest_config(ProptestConfig { cases: 2_500, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn mutated_envelopes_are_refused(m in mutation()) {
        let bytes = apply(&m);
        prop_assert!(parse_checked(&bytes).is_err(), "accepted: {:?}", m);
    }
}

proptest! {
    // 1,000 cases: arbitrary JSON in the free-form fields of a valid envelope still parses, and
    // an arbitrary value in the typed fields never panics.
    #![proptest_config(ProptestConfig { cases: 1_000, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn arbitrary_field_values(field in prop::sample::select(vec!["input", "steps", "credentials", "priority", "retry", "principal", "kind"]), v in any_json()) {
        let mut env = valid();
        env[field] = v;
        let r = parse_checked(env.to_string().as_bytes());
        if ["input", "steps", "credentials"].contains(&field) {
            prop_assert!(r.is_ok(), "{:?}", r);
        }
    }
}
