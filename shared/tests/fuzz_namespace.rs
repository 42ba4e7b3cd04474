//! Property tests: malformed namespace documents and jq expressions thrown at
//! `parse_document`, `compile` and `Expr::compile`, which `PUT /v1/namespaces/{name}` and the
//! trusted route's inline steps run on whatever a client sends. Nothing may panic (or overflow
//! the stack), and every refusal must list at least one problem with a message: the client
//! sees them as the `details` of a `422`.
//!
//! Case counts are fixed (docs/operations.md, "Property tests"): 1,000 + 1,000 + 250 + 200 +
//! 1,500 = 3,950 here (compiling the demo costs ~40 ms in a debug build, hence the small
//! counts of the two properties that do).
#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation is the test failing"
)]

use proptest::prelude::*;
use provisio_shared::jq::Expr;
use provisio_shared::procedure::{Catalog, NoExternal, Problem, compile, parse_document};
use serde_json::{Map, Value, json};

/// Every provider and action exists, so that what fails is the document, not the catalog.
struct AnyAction;
impl Catalog for AnyAction {
    fn check_action(&self, _: &str, _: &str) -> Result<(), String> {
        Ok(())
    }
}

const DEMO: &str = include_str!("../../schemas/examples/demo.yaml");
const HOSTING: &str = include_str!("../../schemas/examples/hosting.yaml");

fn demo() -> Value {
    parse_document(DEMO).expect("the demo namespace parses")
}

/// Text, parsed then compiled; the property all inputs share. `Ok(true)` when it compiled.
fn check_text(text: &str) -> Result<bool, Problem> {
    let doc = parse_document(text).inspect_err(|p| {
        assert!(!p.message.is_empty(), "an empty parse problem for {text:?}");
    })?;
    Ok(check_doc(&doc))
}

/// A document compiled: `true` when valid, else at least one problem, each with a message.
fn check_doc(doc: &Value) -> bool {
    match compile(doc, 1, &AnyAction, &NoExternal) {
        Ok(_) => true,
        Err(problems) => {
            assert!(!problems.is_empty(), "refused without a problem: {doc}");
            for p in &problems {
                assert!(!p.message.is_empty(), "a problem without a message: {p:?}");
            }
            false
        }
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
        jq_soup().prop_map(Value::String),
        "[a-z]{1,6}\\.[a-z]{1,6}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 40, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Keys of the language mixed with noise, so that arbitrary documents get past the first check.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "namespace",
            "description",
            "procedures",
            "access",
            "transaction",
            "input_schema",
            "output_schema",
            "steps",
            "output",
            "id",
            "call",
            "input",
            "set",
            "procedure",
            "for_each",
            "as",
            "switch",
            "cases",
            "default",
            "try",
            "catch",
            "fail",
            "code",
            "message",
            "retry",
            "when",
            "compensate",
            "timeout",
        ])
        .prop_map(str::to_owned),
        "[a-z_]{1,10}",
    ]
}

/// jq-looking text: tokens of the language in random order.
fn jq_soup() -> impl Strategy<Value = String> {
    let token = prop::sample::select(vec![
        ".", ".a", ".input", ".steps.x", "|", ",", "(", ")", "[", "]", "{", "}", ":", "+", "-",
        "*", "/", "%", "==", "!=", "<", ">=", "and", "or", "not", "if", "then", "elif", "else",
        "end", "reduce", "foreach", "as", "$x", "$__loc__", "def", "f", ";", "1", "1.5e308",
        "\"s\"", "\"\\(", "@base64", "?", "//", "..", "try", "catch", "label", "$out", "break",
        "length", "map", "select", "error", "empty", "range", "recurse", "limit", "input", "env",
        "$ENV", "getpath", "paths", "splits", "test", "ltrimstr", "tojson", "fromjson", " ", "\n",
        "#", "\\", "'", "`", "é", "\u{0}",
    ]);
    prop::collection::vec(token, 0..30).prop_map(|ts| ts.concat())
}

/// One random change somewhere in a document.
#[derive(Clone, Debug)]
enum Edit {
    /// Replace the node at this (relative) position with a value.
    Replace(prop::sample::Index, Value),
    /// Remove a key of the object at this position.
    Remove(prop::sample::Index, prop::sample::Index),
    /// Add a key to the object at this position.
    Insert(prop::sample::Index, String, Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<prop::sample::Index>(), any_json()).prop_map(|(i, v)| Edit::Replace(i, v)),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(i, k)| Edit::Remove(i, k)),
        (any::<prop::sample::Index>(), key(), any_json())
            .prop_map(|(i, k, v)| Edit::Insert(i, k, v)),
    ]
}

fn count_nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count_nodes).sum(),
        Value::Object(m) => m.values().map(count_nodes).sum(),
        _ => 0,
    }
}

fn apply(doc: &mut Value, edit: &Edit) {
    let (Edit::Replace(at, _) | Edit::Remove(at, _) | Edit::Insert(at, _, _)) = edit;
    let mut nth = at.index(count_nodes(doc));
    let node = walk(doc, &mut nth);
    match edit {
        Edit::Replace(_, value) => *node = value.clone(),
        Edit::Remove(_, which) => {
            if let Value::Object(m) = node
                && !m.is_empty()
            {
                let key = m
                    .keys()
                    .nth(which.index(m.len()))
                    .cloned()
                    .unwrap_or_default();
                m.remove(&key);
            }
        }
        Edit::Insert(_, key, value) => {
            if let Value::Object(m) = node {
                m.insert(key.clone(), value.clone());
            }
        }
    }
}

/// The `n`th node in pre-order (the root when `n` is past the end).
fn walk<'v>(v: &'v mut Value, n: &mut usize) -> &'v mut Value {
    fn find<'v>(v: &'v mut Value, n: &mut usize) -> Option<&'v mut Value> {
        if *n == 0 {
            return Some(v);
        }
        *n -= 1;
        match v {
            Value::Array(a) => a.iter_mut().find_map(|x| find(x, n)),
            Value::Object(m) => m.values_mut().find_map(|x| find(x, n)),
            _ => None,
        }
    }
    let mut k = *n;
    if find(v, &mut k).is_some() {
        let mut k = *n;
        return find(v, &mut k).expect("found before");
    }
    v
}

/// Defects that always make the demo invalid, each at its own path.
#[derive(Clone, Debug)]
enum Defect {
    NoNamespace,
    BadNamespace(String),
    BadJq(String),
    BadCall(String),
    DuplicateStepId,
    UnknownProcedureKey(String),
    BadAccess(String),
    NoSteps,
    UndefinedProcedure(String),
}

fn defect() -> impl Strategy<Value = Defect> {
    prop_oneof![
        Just(Defect::NoNamespace),
        prop_oneof![
            "[A-Z0-9][a-z]{0,5}",
            "[a-z]{1,4}[. !/][a-z]{0,4}",
            Just(String::new())
        ]
        .prop_map(Defect::BadNamespace),
        prop::sample::select(vec![
            "(",
            "{a:",
            ".a |",
            "if . then 1",
            "[1,",
            "1 +",
            "$undefined_var",
            "nosuchfunction(1)",
            ")",
            "\"\\("
        ])
        .prop_flat_map(|bad| "[a-z. ]{0,6}".prop_map(move |pre| format!("{pre} {bad}")))
        .prop_map(Defect::BadJq),
        "[a-z]{1,8}|[A-Z]{1,3}\\.x|\\.[a-z]{1,4}|[a-z]{1,3}\\.".prop_map(Defect::BadCall),
        Just(Defect::DuplicateStepId),
        "x[a-z]{3,10}".prop_map(Defect::UnknownProcedureKey),
        "[a-z]{0,10}"
            .prop_filter("a valid access", |a| a != "public" && a != "private")
            .prop_map(Defect::BadAccess),
        Just(Defect::NoSteps),
        "zz[a-z]{1,8}".prop_map(Defect::UndefinedProcedure),
    ]
}

fn break_demo(d: &Defect) -> Value {
    let mut doc = demo();
    let hello = &mut doc["procedures"]["hello"];
    match d {
        Defect::NoNamespace => {
            doc.as_object_mut().expect("object").remove("namespace");
        }
        Defect::BadNamespace(n) => doc["namespace"] = json!(n),
        Defect::BadJq(q) => hello["steps"][1]["input"] = json!(q),
        Defect::BadCall(c) => hello["steps"][0]["call"] = json!(c),
        Defect::DuplicateStepId => hello["steps"][2]["id"] = json!("greet"),
        Defect::UnknownProcedureKey(k) => hello[k.as_str()] = json!(1),
        Defect::BadAccess(a) => hello["access"] = json!(a),
        Defect::NoSteps => {
            hello.as_object_mut().expect("object").remove("steps");
        }
        Defect::UndefinedProcedure(p) => hello["steps"][0] = json!({"procedure": p}),
    }
    doc
}

#[test]
fn the_examples_compile() {
    assert!(check_text(DEMO).expect("parses"));
    assert!(check_text(HOSTING).expect("parses"));
}

#[test]
fn deep_documents_are_refused_not_a_stack_overflow() {
    // 200_000 deep took the YAML parser minutes (its time grows with the square of the
    // depth) before parse_document refused such documents up front.
    for depth in [200, 1_000, 1_025, 200_000] {
        let flow = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let r = check_text(&format!("namespace: demo\nprocedures: {flow}\n"));
        assert!(matches!(r, Err(_) | Ok(false)), "depth {depth}");
        let json = format!(
            "{}{}",
            "{\"a\":".repeat(depth),
            "1".to_owned() + &"}".repeat(depth)
        );
        assert!(
            matches!(check_text(&json), Err(_) | Ok(false)),
            "depth {depth}"
        );
    }
    // Nested steps: `try` inside `try` as deep as the parser lets through.
    let mut steps = json!([{"call": "test.echo"}]);
    for _ in 0..120 {
        steps = json!([{"try": steps, "catch": [{"call": "test.echo"}]}]);
    }
    let doc = json!({"namespace": "demo", "procedures": {"p": {"steps": steps}}});
    let text = serde_json::to_string(&doc).expect("json");
    let _ = check_text(&text);
}

#[test]
fn alias_bombs_are_refused() {
    // Eleven levels of ten aliases each: 10^12 nodes if expanded.
    let mut lines = vec!["a0: &a0 [x, x, x, x, x, x, x, x, x, x]".to_owned()];
    for i in 1..12 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        lines.push(format!("a{i}: &a{i} [{refs}]"));
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text.push_str("namespace: demo\nprocedures: {}\n");
    assert!(!matches!(check_text(&text), Ok(true)));
}

#[test]
fn deep_jq_is_refused_not_a_stack_overflow() {
    // Regression: each of these a few hundred levels deep overflowed the stack inside jaq
    // (aborting the process) before `Expr::compile` measured nesting first.
    let shapes = [
        ("(", ")"),
        ("[", "]"),
        ("{a:", "}"),
        ("-", ""),
        ("try ", ""),
        ("if . then ", " else 0 end"),
        ("def f: ", "; f"),
        ("reduce . as $x (0; ", ")"),
        ("\"\\(", ")\""),
        ("not | ", ""),
        ("1, ", ""),
        (".a | ", ""),
    ];
    for depth in [10, 300, 3_000, 100_000] {
        for (open, close) in shapes {
            let q = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            match Expr::compile(&q) {
                Ok(_) => assert!(depth < 300, "{open}… {depth}"),
                Err(e) => assert!(!e.reason.is_empty()),
            }
        }
    }
    // And inside a namespace document, as a step's input.
    let q = format!("{}1{}", "(".repeat(1_000), ")".repeat(1_000));
    let doc = json!({"namespace": "demo", "procedures": {"p": {"steps": [{"call": "test.echo", "input": q}]}}});
    assert!(!check_doc(&doc));
}

proptest! {
    // 1,000 cases: arbitrary text, and YAML-flavoured text.
    #![proptest_config(ProptestConfig { cases: 1_000, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn arbitrary_text_never_panics(text in prop_oneof![".{0,300}", "[\\[\\]{}:,&*!|>'\"#%@` \n\ta-z0-9.-]{0,300}"]) {
        let _ = check_text(&text);
    }
}

proptest! {
    // 1,000 cases: any JSON or YAML document (the same value written both ways).
    #![proptest_config(ProptestConfig { cases: 1_000, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn arbitrary_documents_never_panic(v in any_json(), ns in "[a-z]{1,8}") {
        let mut v = v;
        if let Value::Object(m) = &mut v {
            m.insert("namespace".into(), json!(ns));
        }
        let _ = check_doc(&v);
        let yaml = serde_norway::to_string(&v).expect("yaml");
        let _ = check_text(&yaml);
    }
}

proptest! {
    // 250 cases: the demo with one to three random edits anywhere; valid or not, never a panic.
    #![proptest_config(ProptestConfig { cases: 250, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn edited_demo_never_panics(edits in prop::collection::vec(edit(), 1..4)) {
        let mut doc = demo();
        for e in &edits {
            apply(&mut doc, e);
        }
        let _ = check_doc(&doc);
    }
}

proptest! {
    // 200 cases: the demo with one known defect is always refused; the same cases cut or
    // splice the demo's text, which must parse or be refused cleanly.
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn broken_demo_is_refused(d in defect(), cut in any::<prop::sample::Index>(), noise in ".{0,10}") {
        prop_assert!(!check_doc(&break_demo(&d)), "accepted: {:?}", d);
        let at = cut.index(DEMO.len());
        let at = (0..=at).rev().find(|i| DEMO.is_char_boundary(*i)).unwrap_or(0);
        let spliced = format!("{}{noise}{}", &DEMO[..at], &DEMO[at..]);
        let _ = check_text(&spliced);
        let _ = check_text(&DEMO[..at]);
    }
}

proptest! {
    // 1,500 cases: jq on arbitrary strings and on token soup. Only compiled: running
    // arbitrary jq may loop for ever (`def f: f; f`), which is what step timeouts are for.
    #![proptest_config(ProptestConfig { cases: 1_500, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn jq_never_panics(q in prop_oneof![".{0,80}", jq_soup()]) {
        if let Err(e) = Expr::compile(&q) {
            prop_assert!(!e.reason.is_empty());
        }
    }
}
