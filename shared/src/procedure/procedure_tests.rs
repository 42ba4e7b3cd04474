use serde_json::json;

use super::*;

struct TestCatalog;
impl Catalog for TestCatalog {
    fn check_action(&self, provider: &str, action: &str) -> Result<(), String> {
        match (provider, action) {
            ("test", "echo" | "fail" | "sleep") => Ok(()),
            ("test", a) => Err(format!("provider `test` has no action `{a}`")),
            (p, _) => Err(format!("unknown provider `{p}`")),
        }
    }
}

fn compile_doc(v: &serde_json::Value) -> Result<Namespace, Vec<Problem>> {
    compile(v, 1, &TestCatalog, &NoExternal)
}

#[test]
fn compiles_a_namespace_with_every_step_kind() {
    let doc = json!({
        "namespace": "demo",
        "procedures": {
            "main": {
                "access": "public",
                "steps": [
                    {"id": "a", "call": "test.echo", "input": "{x: .input.x}"},
                    {"set": {"n": ".steps.a.x"}},
                    {"procedure": "helper"},
                    {"for_each": "[1,2]", "as": "item", "steps": [{"call": "test.echo"}]},
                    {"switch": ".vars.n", "cases": {"1": [{"call": "test.echo"}]}, "default": [{"fail": {"code": "nope"}}]},
                    {"try": [{"call": "test.fail"}], "catch": [{"call": "test.echo", "input": ".error"}]}
                ],
                "output": ".steps.a"
            },
            "helper": {"steps": [{"call": "test.echo"}]}
        }
    });
    let ns = compile_doc(&doc).expect("compiles");
    let main = &ns.procedures["main"];
    assert_eq!(main.access, Access::Public);
    assert_eq!(ns.procedures["helper"].access, Access::Private);
    assert_eq!(main.model, TxModel::Compensating);
    assert_eq!(main.steps.len(), 6);
    let StepKind::ForEach { steps, .. } = &main.steps[3].kind else {
        panic!("for_each expected")
    };
    assert_eq!(steps[0].path, "3.each.0");
}

#[test]
fn reports_every_problem_with_its_path() {
    let doc = json!({
        "namespace": "demo",
        "procedures": {
            "p": {
                "input_schema": {"type": "nonsense"},
                "steps": [
                    {"call": "nosuch.thing"},
                    {"call": "test.echo", "input": "{broken"},
                    {"procedure": "missing"},
                    {"call": "test.echo", "fail": {"code": "x"}},
                    {}
                ]
            }
        }
    });
    let problems = compile_doc(&doc).expect_err("invalid");
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "procedures.p.input_schema",
        "procedures.p.steps[0].call",
        "procedures.p.steps[1].input",
        "procedures.p.steps[2].procedure",
        "procedures.p.steps[3]",
        "procedures.p.steps[4]",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {problems:?}"
        );
    }
}

#[test]
fn detects_call_cycles() {
    let doc = json!({
        "namespace": "demo",
        "procedures": {
            "a": {"steps": [{"procedure": "b"}]},
            "b": {"steps": [{"procedure": "c"}]},
            "c": {"steps": [{"procedure": "a"}]}
        }
    });
    let problems = compile_doc(&doc).expect_err("cycle");
    assert!(
        problems.iter().any(|p| p.message.contains("cycle")),
        "{problems:?}"
    );
}

#[test]
fn rejects_unknown_keys_and_duplicate_ids() {
    let doc = json!({"namespace": "demo", "procedures": {"p": {"steps": [{"call": "test.echo", "bogus": 1}]}}});
    assert!(compile_doc(&doc).is_err());
    let doc = json!({"namespace": "demo", "procedures": {"p": {"steps": [
        {"id": "a", "call": "test.echo"}, {"id": "a", "call": "test.echo"}]}}});
    let problems = compile_doc(&doc).expect_err("dup");
    assert!(problems[0].message.contains("used twice"), "{problems:?}");
}

#[test]
fn parses_yaml() {
    let v =
        parse_document("namespace: demo\nprocedures:\n  p:\n    steps:\n      - call: test.echo\n")
            .expect("yaml");
    assert!(compile_doc(&v).is_ok());
}

#[test]
fn schema_violations_are_all_reported_with_paths() {
    let doc = json!({
        "namespace": "Bad Name",
        "procedures": {"p": {"transaction": "sometimes", "steps": [{"call": "test.echo", "retry": {"max_attempts": 0}}]}},
        "extra": true
    });
    let problems = compile_doc(&doc).expect_err("invalid");
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "namespace",
        "procedures.p.transaction",
        "procedures.p.steps[0].retry.max_attempts",
        "",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {problems:?}"
        );
    }
}

#[test]
fn the_shipped_examples_compile() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/examples");
    for entry in std::fs::read_dir(dir).expect("examples") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        let v = parse_document(&text).expect("parses");
        assert_eq!(check_schema(&v), vec![], "{}", path.display());
    }
}

#[test]
fn sensitive_is_accepted_on_input_properties_and_steps() {
    let doc = json!({
        "namespace": "demo",
        "procedures": {
            "login": {
                "input_schema": {"type": "object", "required": ["user"], "properties": {
                    "user": {"type": "string"},
                    "password": {"type": "string", "minLength": 3, "sensitive": true},
                    "auth": {"type": "object", "properties": {"pin": {"type": "integer", "sensitive": true}}},
                    "plain": {"type": "string", "sensitive": false},
                    "sensitive": {"type": "string", "default": "a property named `sensitive` is fine"}
                }},
                "steps": [{"call": "test.echo"}]
            },
            "mint": {"steps": [
                {"id": "token", "call": "test.echo", "sensitive": true},
                {"call": "test.echo", "sensitive": false}
            ]},
            "nested": {"steps": [{"try": [{"call": "test.echo", "sensitive": true}], "catch": [{"call": "test.echo"}]}]},
            "plain": {"input_schema": {"type": "object", "properties": {"x": {"type": "string"}}}, "steps": [{"call": "test.echo"}]}
        }
    });
    let ns = compile_doc(&doc).expect("compiles");
    let login = &ns.procedures["login"];
    assert!(login.sensitive);
    let mut paths = login.sensitive_inputs.clone();
    paths.sort();
    assert_eq!(
        paths,
        vec![
            vec!["auth".to_owned(), "pin".to_owned()],
            vec!["password".to_owned()]
        ]
    );
    // The validator ignores the keyword: it validates as if it were not there.
    let schema = login.input_schema.as_ref().expect("schema");
    assert!(schema.is_valid(&json!({"user": "u", "password": "secret"})));
    assert!(!schema.is_valid(&json!({"user": "u", "password": "no"})));
    let mint = &ns.procedures["mint"];
    assert!(mint.sensitive && mint.sensitive_inputs.is_empty());
    assert!(mint.steps[0].sensitive && !mint.steps[1].sensitive);
    assert!(ns.procedures["nested"].sensitive, "a step nested in `try`");
    assert!(!ns.procedures["plain"].sensitive);
}

#[test]
fn sensitive_of_the_wrong_type_or_in_the_wrong_place_is_a_problem() {
    let doc = json!({
        "namespace": "demo",
        "procedures": {
            "p": {
                "input_schema": {"type": "object", "properties": {
                    "password": {"type": "string", "sensitive": "yes"},
                    "list": {"type": "array", "items": {"type": "string", "sensitive": true}}
                }},
                "output_schema": {"type": "object", "properties": {"x": {"sensitive": true}}},
                "steps": [{"call": "test.echo", "sensitive": "very"}]
            }
        }
    });
    let problems = compile_doc(&doc).expect_err("invalid");
    let find = |path: &str| {
        problems
            .iter()
            .find(|p| p.path == path)
            .unwrap_or_else(|| panic!("{path} missing from {problems:?}"))
    };
    assert!(
        find("procedures.p.steps[0].sensitive")
            .message
            .contains("boolean")
    );
    assert!(
        find("procedures.p.input_schema.properties.password.sensitive")
            .message
            .contains("true or false")
    );
    assert!(
        find("procedures.p.input_schema.properties.list.items.sensitive")
            .message
            .contains("nothing else")
    );
    find("procedures.p.output_schema.properties.x.sensitive");
}

#[test]
fn messages_at_above_or_inside_a_sensitive_property_are_withheld() {
    let sensitive = vec![vec!["auth".to_owned(), "password".to_owned()]];
    for (path, withheld) in [
        ("/auth/password", true),
        ("/auth/password/0", true),
        ("/auth", true),
        ("", true),
        ("/auth/user", false),
        ("/name", false),
    ] {
        assert_eq!(
            super::touches_sensitive(path, &sensitive),
            withheld,
            "{path}"
        );
    }
    assert!(!super::touches_sensitive("", &[]));
}
