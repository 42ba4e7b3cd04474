//! Property tests: malformed HTTP bodies thrown at the queue manager's body checks
//! (`api::checks`, the same functions its submission and namespace routes run). No body may
//! panic or earn a `5xx`: each is a `4xx` whose JSON is the documented error shape
//! (`{"error": {"code", "message", "details"?}}`, schemas/openapi.yaml `Error`).
//!
//! Case counts are fixed (docs/operations.md, "Property tests"): 1,000 + 1,000 + 1,200 + 500
//! + 150 (four bodies each) + 500 = 4,350 cases here.
#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation is the test failing"
)]

use axum::response::IntoResponse;
use futures_util::FutureExt;
use proptest::prelude::*;
use provisio_queue_manager::api::ApiError;
use provisio_queue_manager::api::checks::{
    check_batch_body, check_namespace_body, check_submit_body,
};
use provisio_shared::procedure::Catalog;
use serde_json::{Map, Value, json};

/// The namespace body limit used here: small, so that oversized bodies are cheap to make.
const LIMIT: usize = 64 * 1024;

struct AnyAction;
impl Catalog for AnyAction {
    fn check_action(&self, _: &str, _: &str) -> Result<(), String> {
        Ok(())
    }
}

const DEMO: &str = include_str!("../../schemas/examples/demo.yaml");

/// The property every refusal shares: a 4xx, with the documented JSON body.
fn assert_client_error(e: ApiError, what: &[u8]) {
    let status = e.status();
    let code = e.code();
    assert!(
        status.is_client_error(),
        "{status} ({e}) for {:?}",
        String::from_utf8_lossy(&what[..what.len().min(300)])
    );
    let resp = e.into_response();
    assert_eq!(resp.status(), status);
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .now_or_never()
        .expect("a ready body")
        .expect("a body");
    let body: Value = serde_json::from_slice(&bytes).expect("a JSON error body");
    let err = body["error"].as_object().expect("an `error` object");
    assert_eq!(err["code"], json!(code));
    assert!(ApiError::CODES.contains(&code));
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    if code == "invalid" {
        let details = err["details"].as_array().expect("details");
        assert!(!details.is_empty(), "{body}");
        for d in details {
            assert!(d["path"].is_string(), "{body}");
        }
    } else {
        assert!(!err.contains_key("details"), "{body}");
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
        "[a-z]{1,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 40, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    prop::sample::select(vec![
                        "namespace",
                        "procedure",
                        "input",
                        "id",
                        "priority",
                        "not_before",
                        "credentials",
                        "retry",
                        "run_as",
                        "steps",
                        "output",
                        "transaction",
                        "count",
                        "interval_ms",
                    ])
                    .prop_map(str::to_owned),
                    "[a-z_]{1,8}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn valid_body() -> Value {
    json!({
        "namespace": "demo",
        "procedure": "hello",
        "input": {"name": "Ada"},
        "id": "r-1",
        "priority": "low",
        "retry": {"count": 1, "interval_ms": 10},
    })
}

/// One defect that always makes a submission body a client error.
#[derive(Clone, Debug)]
enum Defect {
    Truncate(prop::sample::Index),
    /// A byte that is not UTF-8 inside the `input` string.
    NotUtf8(u8),
    WrongType(&'static str, Value),
    Unknown(String),
    HugeId(usize),
    ControlInId(char),
    BadName(&'static str, String),
    BadPriority(String),
    TooManyRetries(u32),
    /// `retry.on_exhausted` other than `fail`/`park` (credentials with a retry are fine: sealed).
    UnknownOnExhausted,
    /// `input` nested past serde_json's recursion limit.
    Deep(usize),
    /// A trusted-only field on the queued route.
    TrustedField(&'static str),
    Missing(&'static str),
}

fn defect() -> impl Strategy<Value = Defect> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Defect::Truncate),
        (0x80u8..=0xff).prop_map(Defect::NotUtf8),
        (
            prop::sample::select(vec![
                "namespace",
                "procedure",
                "id",
                "priority",
                "retry",
                "not_before"
            ]),
            prop_oneof![
                any::<bool>().prop_map(Value::Bool),
                any::<i32>().prop_map(Value::from),
                Just(json!(["x"])),
            ]
        )
            .prop_map(|(f, v)| Defect::WrongType(f, v)),
        "[a-z]{1,12}"
            .prop_filter("a known field", |k| !valid_body()
                .as_object()
                .is_some_and(|m| m.contains_key(k.as_str()))
                && ![
                    "not_before",
                    "credentials",
                    "run_as",
                    "steps",
                    "output",
                    "transaction"
                ]
                .contains(&k.as_str()))
            .prop_map(Defect::Unknown),
        (129usize..100_000).prop_map(Defect::HugeId),
        prop::char::range('\u{0}', '\u{1f}').prop_map(Defect::ControlInId),
        (
            prop::sample::select(vec!["namespace", "procedure"]),
            prop_oneof![
                Just(String::new()),
                "[A-Z0-9][a-z]{0,8}",
                "[a-z]{1,4}[. /!][a-z]{0,4}",
                (65usize..10_000).prop_map(|n| "a".repeat(n)),
            ]
        )
            .prop_map(|(f, n)| Defect::BadName(f, n)),
        "[a-z]{0,8}"
            .prop_filter("a priority", |p| !["high", "normal", "low"]
                .contains(&p.as_str()))
            .prop_map(Defect::BadPriority),
        (101u32..).prop_map(Defect::TooManyRetries),
        Just(Defect::UnknownOnExhausted),
        (128usize..50_000).prop_map(Defect::Deep),
        prop::sample::select(vec!["run_as", "steps", "output", "transaction"])
            .prop_map(Defect::TrustedField),
        prop::sample::select(vec!["namespace", "procedure"]).prop_map(Defect::Missing),
    ]
}

/// The broken body, and whether it is still refused on the trusted route (trusted-only
/// fields are fine there).
fn broken(d: &Defect) -> (Vec<u8>, bool) {
    let mut v = valid_body();
    let mut trusted_too = true;
    match d {
        Defect::Truncate(i) => {
            let mut b = v.to_string().into_bytes();
            b.truncate(i.index(b.len()));
            return (b, true);
        }
        Defect::NotUtf8(byte) => {
            let mut b = json!({"namespace": "demo", "procedure": "hello", "input": "ab@cd"})
                .to_string()
                .into_bytes();
            let at = b.iter().position(|c| *c == b'@').expect("marker");
            b[at] = *byte;
            return (b, true);
        }
        Defect::WrongType(f, val) => v[*f] = val.clone(),
        Defect::Unknown(k) => v[k.as_str()] = json!(1),
        Defect::HugeId(n) => v["id"] = json!("i".repeat(*n)),
        Defect::ControlInId(c) => v["id"] = json!(format!("a{c}b")),
        Defect::BadName(f, n) => v[*f] = json!(n),
        Defect::BadPriority(p) => v["priority"] = json!(p),
        Defect::TooManyRetries(n) => v["retry"]["count"] = json!(n),
        Defect::UnknownOnExhausted => v["retry"]["on_exhausted"] = json!("never"),
        Defect::Deep(depth) => {
            let text = v.to_string().replace(
                r#"{"name":"Ada"}"#,
                &format!("{}0{}", "[".repeat(*depth), "]".repeat(*depth)),
            );
            return (text.into_bytes(), true);
        }
        Defect::TrustedField(f) => {
            v[*f] = match *f {
                "run_as" => json!("bob"),
                "steps" => json!([]),
                "output" => json!("."),
                _ => json!("compensating"),
            };
            trusted_too = false;
        }
        Defect::Missing(f) => {
            v.as_object_mut().expect("object").remove(*f);
        }
    }
    (v.to_string().into_bytes(), trusted_too)
}

#[test]
fn the_valid_bodies_pass() {
    let body = valid_body().to_string();
    check_submit_body(body.as_bytes(), false).expect("queued");
    check_submit_body(body.as_bytes(), true).expect("trusted");
    let batch = json!([valid_body(), valid_body()]).to_string();
    let answers = check_batch_body(batch.as_bytes()).expect("batch");
    assert!(answers.iter().all(Result::is_ok));
    check_namespace_body("demo", DEMO.as_bytes(), LIMIT, &AnyAction).expect("demo");
}

#[test]
fn deep_bodies_are_refused_not_a_stack_overflow() {
    for depth in [128, 1_000, 200_000] {
        let deep = format!("{}0{}", "[".repeat(depth), "]".repeat(depth));
        let body = format!(r#"{{"namespace":"demo","procedure":"hello","input":{deep}}}"#);
        let e = check_submit_body(body.as_bytes(), false).expect_err("too deep");
        assert_client_error(e, body.as_bytes());
        let e = check_batch_body(deep.as_bytes()).expect_err("too deep");
        assert_client_error(e, deep.as_bytes());
        let ns = format!("namespace: demo\nprocedures: {deep}\n");
        let e = check_namespace_body("demo", ns.as_bytes(), usize::MAX, &AnyAction)
            .expect_err("too deep");
        assert_client_error(e, ns.as_bytes());
    }
}

#[test]
fn oversized_and_oversized_batches_are_refused() {
    let big = format!("namespace: demo\ndescription: {}\n", "x".repeat(LIMIT));
    let e = check_namespace_body("demo", big.as_bytes(), LIMIT, &AnyAction).expect_err("big");
    assert_eq!(e.code(), "too_large");
    assert_client_error(e, big.as_bytes());
    let batch = Value::Array(vec![json!({}); 1001]).to_string();
    let e = check_batch_body(batch.as_bytes()).expect_err("too many");
    assert_client_error(e, batch.as_bytes());
}

proptest! {
    // 1,000 cases: raw bytes on either submission route.
    #![proptest_config(ProptestConfig { cases: 1_000, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn arbitrary_bytes_are_client_errors(bytes in prop::collection::vec(any::<u8>(), 0..512), trusted in any::<bool>()) {
        if let Err(e) = check_submit_body(&bytes, trusted) {
            assert_client_error(e, &bytes);
        }
    }
}

proptest! {
    // 1,000 cases: any JSON value on either submission route: passes the checks or is a 4xx.
    #![proptest_config(ProptestConfig { cases: 1_000, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn arbitrary_json_is_a_client_error_or_passes(v in any_json(), trusted in any::<bool>()) {
        let bytes = v.to_string().into_bytes();
        if let Err(e) = check_submit_body(&bytes, trusted) {
            assert_client_error(e, &bytes);
        }
    }
}

proptest! {
    // 1,200 cases: one known defect in a valid body is always a 4xx.
    #![proptest_config(ProptestConfig { cases: 1_200, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn broken_bodies_are_client_errors(d in defect()) {
        let (bytes, trusted_too) = broken(&d);
        let e = check_submit_body(&bytes, false);
        prop_assert!(e.is_err(), "accepted on the queued route: {:?}", d);
        if let Err(e) = e {
            assert_client_error(e, &bytes);
        }
        if trusted_too {
            let e = check_submit_body(&bytes, true);
            prop_assert!(e.is_err(), "accepted on the trusted route: {:?}", d);
            if let Err(e) = e {
                assert_client_error(e, &bytes);
            }
        }
    }
}

proptest! {
    // 500 cases: batches of valid, broken and arbitrary elements: each element answered on
    // its own, every refusal a 4xx.
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn batches_answer_each_element(items in prop::collection::vec(prop_oneof![
        Just(valid_body()),
        defect().prop_filter_map("a JSON element", |d| serde_json::from_slice::<Value>(&broken(&d).0).ok()),
        any_json(),
    ], 0..8)) {
        let bytes = Value::Array(items.clone()).to_string().into_bytes();
        let answers = check_batch_body(&bytes).map_err(|e| e.to_string());
        prop_assert!(answers.is_ok(), "{:?}", answers.err());
        let answers = answers.unwrap_or_default();
        prop_assert_eq!(answers.len(), items.len());
        for a in answers {
            if let Err(e) = a {
                assert_client_error(e, &bytes);
            }
        }
    }
}

proptest! {
    // 150 cases (four bodies each, compiling the demo is slow in debug): namespace bodies: raw bytes, the demo's text cut, spliced or with a byte
    // flipped, and the demo under another name.
    #![proptest_config(ProptestConfig { cases: 150, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn namespace_bodies_are_client_errors_or_apply(
        raw in prop::collection::vec(any::<u8>(), 0..256),
        cut in any::<prop::sample::Index>(),
        flip in (any::<prop::sample::Index>(), any::<u8>()),
        name in "[a-z]{1,6}|.{0,6}",
    ) {
        let demo = DEMO.as_bytes();
        let at = cut.index(demo.len());
        let mut flipped = demo.to_vec();
        let i = flip.0.index(flipped.len());
        flipped[i] = flip.1;
        let mut spliced = demo[..at].to_vec();
        spliced.extend_from_slice(&raw);
        spliced.extend_from_slice(&demo[at..]);
        for body in [&raw[..], &demo[..at], &flipped, &spliced] {
            if let Err(e) = check_namespace_body("demo", body, LIMIT, &AnyAction) {
                assert_client_error(e, body);
            }
        }
        if name != "demo" {
            let e = check_namespace_body(&name, demo, LIMIT, &AnyAction);
            prop_assert!(e.is_err());
            if let Err(e) = e {
                assert_client_error(e, demo);
            }
        }
    }
}

proptest! {
    // 500 cases: namespace documents as JSON values of any shape.
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn namespace_documents_of_any_shape(v in any_json()) {
        let mut v = v;
        if let Value::Object(m) = &mut v {
            m.insert("namespace".into(), json!("demo"));
        }
        let bytes = v.to_string().into_bytes();
        if let Err(e) = check_namespace_body("demo", &bytes, LIMIT, &AnyAction) {
            assert_client_error(e, &bytes);
        }
    }
}
