use super::*;
use crate::procedure::{Catalog, NoExternal, compile, parse_document, with_inline};

/// Every provider and action exists: labels do not depend on which ones do (the real
/// catalog is in `provisio-providers`, which depends on this crate).
struct AnyAction;

impl Catalog for AnyAction {
    fn check_action(&self, _: &str, _: &str) -> Result<(), String> {
        Ok(())
    }
}

#[test]
fn every_metric_name_is_described_once() {
    let source = include_str!("metrics.rs");
    let declared: Vec<&str> = source
        .lines()
        .filter_map(|l| l.strip_prefix("pub const "))
        .filter_map(|l| l.split_once(": &str = \"provisio_"))
        .map(|(name, _)| name)
        .collect();
    assert_eq!(declared.len(), DESCRIPTIONS.len(), "{declared:?}");
    let mut described: Vec<&str> = DESCRIPTIONS.iter().map(|d| d.1).collect();
    described.sort_unstable();
    described.dedup();
    assert_eq!(
        described.len(),
        DESCRIPTIONS.len(),
        "a metric described twice"
    );
}

#[test]
fn only_applied_names_become_labels() {
    let catalog = AnyAction;
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/examples/demo.yaml");
    let doc = parse_document(&std::fs::read_to_string(path).expect("demo.yaml")).expect("parses");
    let ns = compile(&doc, 1, &catalog, &NoExternal).expect("compiles");
    assert_eq!(
        request_labels(Some(&ns), "hello", false),
        ("demo".into(), "hello".into())
    );
    assert_eq!(
        request_labels(Some(&ns), "no-such", false),
        ("demo".into(), "unknown".into())
    );
    assert_eq!(
        request_labels(None, "hello", false),
        ("unknown".into(), "unknown".into())
    );
    // As the engine sees a trusted request: the inline procedure compiled into the
    // namespace under the caller's name, which must still not become a label.
    let inline = serde_json::json!({"steps": [{"call": "test.echo", "input": "{}"}]});
    let with = with_inline(&doc, "adhoc-7f3a", &inline, &catalog).expect("compiles");
    assert!(with.procedures.contains_key("adhoc-7f3a"));
    assert_eq!(
        request_labels(Some(&with), "adhoc-7f3a", true),
        ("demo".into(), "inline".into())
    );
    assert_eq!(accepted_procedure_label("adhoc-7f3a", true), "inline");
    assert_eq!(accepted_procedure_label("hello", false), "hello");
}
