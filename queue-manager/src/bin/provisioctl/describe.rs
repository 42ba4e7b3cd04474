//! `describe request ID`: a request's record, its steps and rollbacks, and its audit rows.

use serde_json::{Value, json};

use crate::Format;
use crate::client::{Api, Exit, Failure, seg};
use crate::table;

/// The record, then its audit rows when the caller may read them (an admin) and the
/// transaction was audited.
pub(crate) async fn request(api: &Api, id: &str, format: Format) -> anyhow::Result<Exit> {
    let rec = api.get(&format!("/v1/requests/{}", seg(id)), &[]).await?;
    let (audit, audit_note) = audit_of(api, id).await?;
    if format == Format::Json {
        let out = json!({"request": rec, "audit": audit});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(Exit::Ok);
    }
    print_fields(&rec);
    if let Some(e) = rec.get("error").filter(|e| !e.is_null()) {
        print_error(e);
    }
    if let Some(o) = rec.get("output").filter(|o| !o.is_null()) {
        println!("{:<11}{o}", "Output:");
    }
    print_steps(&rec);
    print_audit(&audit, audit_note);
    Ok(Exit::Ok)
}

/// The full audit rows of the request's transactions, or why they are not shown.
async fn audit_of(api: &Api, id: &str) -> anyhow::Result<(Vec<Value>, Option<&'static str>)> {
    let mut audit = Vec::new();
    match api
        .get(
            "/v1/audit/transactions",
            &[("request_id", id.to_owned()), ("limit", "1000".to_owned())],
        )
        .await
    {
        Ok(list) => {
            for t in table::list_of(&list, "transactions") {
                let Some(tx) = t.get("id").and_then(Value::as_str) else {
                    continue;
                };
                let full = api
                    .get(&format!("/v1/audit/transactions/{}", seg(tx)), &[])
                    .await?;
                audit.push(full);
            }
            Ok((audit, None))
        }
        Err(Failure::Api { status: 403, .. }) => Ok((
            audit,
            Some("not shown: reading the audit needs the admin permission"),
        )),
        Err(e) => Err(e.into()),
    }
}

fn print_fields(rec: &Value) {
    let field = |label: &str, p: &str| {
        if let Some(v) = rec.pointer(p).filter(|v| !v.is_null()) {
            println!("{:<11}{}", format!("{label}:"), table::cell(Some(v)));
        }
    };
    field("Request", "/id");
    field("Namespace", "/namespace");
    field("Procedure", "/procedure");
    field("Status", "/status");
    field("Attempts", "/attempts");
    field("Submitted", "/submitted_at");
    field("Started", "/started_at");
    field("Finished", "/finished_at");
}

fn print_error(e: &Value) {
    let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("");
    let step = e
        .get("step")
        .and_then(Value::as_str)
        .map(|s| format!(" (step {s})"))
        .unwrap_or_default();
    println!(
        "{:<11}{}: {}{step}",
        "Error:",
        text("code"),
        text("message")
    );
    if let Some(r) = e.get("resolution") {
        println!("{:<11}{r}", "Resolution:");
    }
    if let Some(n) = e
        .get("not_undone")
        .and_then(Value::as_array)
        .filter(|n| !n.is_empty())
    {
        println!("Not undone:");
        print!(
            "{}",
            indent(&table::render(
                n,
                &[
                    ("PATH", "/path"),
                    ("PROVIDER", "/provider"),
                    ("ACTION", "/action"),
                    ("ERROR", "/error")
                ]
            ))
        );
    }
}

fn print_steps(rec: &Value) {
    let steps = rec
        .get("steps")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (rollbacks, forward): (Vec<Value>, Vec<Value>) = steps.into_iter().partition(|s| {
        matches!(
            s.get("status").and_then(Value::as_str),
            Some("rolled_back" | "rollback_failed")
        )
    });
    println!("Steps:");
    if forward.is_empty() {
        println!("  (none recorded)");
    } else {
        print!("{}", indent(&table::render(&forward, table::STEPS)));
    }
    if !rollbacks.is_empty() {
        println!("Rollbacks:");
        print!(
            "{}",
            indent(&table::render(
                &rollbacks,
                &[("PATH", "/path"), ("STATUS", "/status")]
            ))
        );
    }
}

fn print_audit(audit: &[Value], note: Option<&str>) {
    println!("Audit:");
    if let Some(note) = note {
        println!("  ({note})");
    } else if audit.is_empty() {
        println!("  (not audited, or not swept yet)");
    }
    for t in audit {
        print!(
            "{}",
            indent(&table::render(std::slice::from_ref(t), table::AUDIT))
        );
        if let Some(p) = t
            .get("procedures")
            .and_then(Value::as_array)
            .filter(|p| !p.is_empty())
        {
            println!("  Procedures:");
            print!(
                "{}",
                indent(&indent(&table::render(
                    p,
                    &[
                        ("STEP", "/step"),
                        ("NAMESPACE", "/namespace"),
                        ("PROCEDURE", "/procedure")
                    ]
                )))
            );
        }
        if let Some(e) = t
            .get("errors")
            .and_then(Value::as_array)
            .filter(|e| !e.is_empty())
        {
            println!("  Errors:");
            print!(
                "{}",
                indent(&indent(&table::render(
                    e,
                    &[
                        ("SEQ", "/seq"),
                        ("SOURCE", "/source"),
                        ("CODE", "/code"),
                        ("DESCRIPTION", "/description")
                    ]
                )))
            );
        }
    }
}

fn indent(text: &str) -> String {
    let mut out = String::new();
    for l in text.lines() {
        out.push_str("  ");
        out.push_str(l);
        out.push('\n');
    }
    out
}
