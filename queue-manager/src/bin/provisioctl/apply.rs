//! `apply -f FILE|DIR|-`: uploads namespace documents, or with `--dry-run` checks them here
//! without sending anything (the API has no dry run).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use provisio_providers::catalog::OfflineCatalog;
use provisio_shared::procedure::{self, ExternalProcedures, Problem};
use reqwest::Method;
use serde_json::{Value, json};

use crate::Format;
use crate::client::{Api, Body, Exit, Failure, seg};

/// Other namespaces live on the server; calls into them are checked when applied.
struct AnyExternal;

impl ExternalProcedures for AnyExternal {
    fn exists(&self, _: &str, _: &str) -> bool {
        true
    }
}

/// One document to apply: where it came from and its text.
struct Doc {
    origin: String,
    text: String,
}

fn documents(path: &Path) -> anyhow::Result<Vec<Doc>> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
        return Ok(vec![Doc {
            origin: "stdin".into(),
            text,
        }]);
    }
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f)
                .map_err(|e| Failure::Usage(format!("reading {}: {e}", f.display())))?;
            Ok(Doc {
                origin: f.display().to_string(),
                text,
            })
        })
        .collect()
}

fn print_problems(problems: &[Value]) {
    for d in problems {
        let p = d.get("path").and_then(Value::as_str).unwrap_or("");
        let m = d.get("message").and_then(Value::as_str).unwrap_or("");
        println!("  {p}: {m}");
    }
}

/// Each document's outcome goes to stdout (one line per document, problems indented under
/// it); each refusal also to stderr with the API's code. Exit: 3 when any was refused.
pub async fn run(api: &Api, path: &Path, dry_run: bool, format: Format) -> anyhow::Result<Exit> {
    let docs = documents(path)?;
    if docs.is_empty() {
        return Err(Failure::Usage(format!("no namespace files in {}", path.display())).into());
    }
    let mut exit = Exit::Ok;
    let mut results = Vec::new();
    for doc in docs {
        let origin = &doc.origin;
        let parsed = procedure::parse_document(&doc.text);
        let name = parsed
            .as_ref()
            .ok()
            .and_then(|d| d.get("namespace"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let outcome = match (parsed, name) {
            (Err(p), _) => Err((origin.clone(), p.message, Vec::new(), Exit::Refused)),
            (Ok(_), None) => Err((
                origin.clone(),
                "the document has no `namespace` key".to_owned(),
                Vec::new(),
                Exit::Refused,
            )),
            (Ok(value), Some(name)) if dry_run => {
                match procedure::compile(&value, 0, &OfflineCatalog, &AnyExternal) {
                    Ok(_) => Ok((name.clone(), json!({"namespace": name, "dry_run": true}))),
                    Err(problems) => Err((
                        name,
                        format!("namespace is invalid ({} problems)", problems.len()),
                        problems.iter().map(problem_json).collect(),
                        Exit::Refused,
                    )),
                }
            }
            (Ok(_), Some(name)) => {
                let sent = api
                    .call(
                        Method::PUT,
                        &format!("/v1/namespaces/{}", seg(&name)),
                        &[],
                        Body::Yaml(doc.text.clone()),
                    )
                    .await;
                match sent {
                    Ok((_, body)) => Ok((name, body)),
                    Err(f @ Failure::Api { .. }) => {
                        let exit = f.exit();
                        let problems = match &f {
                            Failure::Api { details, .. } => {
                                details.as_array().cloned().unwrap_or_default()
                            }
                            _ => Vec::new(),
                        };
                        Err((name, f.to_string(), problems, exit))
                    }
                    Err(other) => return Err(other.into()),
                }
            }
        };
        match outcome {
            Ok((name, body)) => {
                if format == Format::Table {
                    let version = body.get("version").and_then(Value::as_i64).unwrap_or(0);
                    if dry_run {
                        println!("{name}: would apply ({origin}; checked here, not sent)");
                    } else if body.get("changed").and_then(Value::as_bool) == Some(true) {
                        println!("{name}: applied version {version} ({origin})");
                    } else {
                        println!("{name}: unchanged, version {version} ({origin})");
                    }
                }
                results.push(json!({"file": origin, "ok": true, "answer": body}));
            }
            Err((name, message, problems, code)) => {
                exit = worse(exit, code);
                if format == Format::Table {
                    println!("{name}: rejected: {message} ({origin})");
                    print_problems(&problems);
                }
                eprintln!("error: {origin}: {message}");
                results.push(
                    json!({"file": origin, "ok": false, "error": message, "details": problems}),
                );
            }
        }
    }
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(exit)
}

fn problem_json(p: &Problem) -> Value {
    json!({"path": p.path, "message": p.message})
}

/// The exit code of several outcomes: the highest.
fn worse(a: Exit, b: Exit) -> Exit {
    if b as u8 > a as u8 { b } else { a }
}
