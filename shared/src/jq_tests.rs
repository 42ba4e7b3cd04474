use super::*;
use serde_json::json;

#[test]
fn evaluates_object_construction() {
    let e = Expr::compile("{name: .input.org, n: (.input.q // 1024)}").expect("compiles");
    let out = e
        .eval_one(&json!({"input": {"org": "acme"}}))
        .expect("runs");
    assert_eq!(out, json!({"name": "acme", "n": 1024}));
}

#[test]
fn reports_syntax_errors() {
    let err = Expr::compile("{name: ").expect_err("must not compile");
    assert!(err.to_string().contains("does not compile"), "{err}");
}

#[test]
fn reports_undefined_functions() {
    let err = Expr::compile("nosuchfn(1)").expect_err("must not compile");
    assert!(err.reason.contains("nosuchfn"), "{err}");
}

#[test]
fn runtime_errors_are_values_not_panics() {
    let e = Expr::compile(".a + 1").expect("compiles");
    let err = e
        .eval_one(&json!({"a": "x"}))
        .expect_err("string + number fails");
    assert!(matches!(err, EvalError::Failed { .. }));
    let e = Expr::compile("empty").expect("compiles");
    assert!(matches!(
        e.eval_one(&json!(1)),
        Err(EvalError::Empty { .. })
    ));
}

#[test]
fn round_trips_json() {
    let v =
        json!({"a": [1, 2.5, "x", null, true, {"b": -3}], "big": 18_446_744_073_709_551_615_u64});
    assert_eq!(from_val(&to_val(&v)), v);
}

#[test]
fn fields_evaluate_like_the_object_they_describe() {
    let e = Expr::compile("{a: .x.k, b: .s, c: .m.one, n: (.m | length)}").expect("compiles");
    let x = json!({"k": [1, 2.5, null]});
    let m: serde_json::Map<String, Value> =
        serde_json::from_value(json!({"one": {"deep": true}, "two": "t"})).expect("a map");
    let mut f = Fields::default();
    f.value("x", &x).string("s", "str").object("m", &m);
    let whole = json!({"x": x, "s": "str", "m": m});
    assert_eq!(
        e.eval_fields(f).expect("runs"),
        e.eval_one(&whole).expect("runs")
    );
    let keys = Expr::compile("[.[]]").expect("compiles");
    let mut unordered = Fields::default();
    unordered.string("b", "2").string("a", "1");
    assert_eq!(
        keys.eval_fields(unordered).expect("runs"),
        json!(["1", "2"])
    );
    let mut later = Fields::default();
    later.value("x", &json!(1)).value("x", &json!(2));
    let last = Expr::compile(".x").expect("compiles");
    assert_eq!(last.eval_fields(later).expect("runs"), json!(2));
}

#[test]
fn converted_parts_are_read_as_given_and_missing_ones_converted_on_the_spot() {
    let e = Expr::compile("{i: .input.n, a: .steps.a, b: .steps.b, k: (.steps | keys_unsorted)}")
        .expect("compiles");
    let input = Converted::new(&json!({"n": 7}));
    let steps: serde_json::Map<String, Value> =
        serde_json::from_value(json!({"b": 1, "a": 1})).expect("a map");
    // The cached form of `a` differs from its JSON on purpose: it shows which one is read.
    let a_cached = Converted::new(&json!("from the cache"));
    let mut f = Fields::default();
    f.converted("input", &input)
        .object_cached("steps", &steps, |k| (k == "a").then_some(&a_cached));
    assert_eq!(
        e.eval_fields(f).expect("runs"),
        json!({"i": 7, "a": "from the cache", "b": 1, "k": ["a", "b"]})
    );
}

#[test]
fn truthiness_follows_jq() {
    let e = Expr::compile(".x").expect("compiles");
    assert!(!e.eval_bool(&json!({"x": null})).expect("runs"));
    assert!(!e.eval_bool(&json!({"x": false})).expect("runs"));
    assert!(e.eval_bool(&json!({"x": 0})).expect("runs"));
}
