//! `provisioctl`: the command-line client of the queue manager's API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(version, about = "Provisio command-line client")]
struct Cli {
    /// Queue manager base URL.
    #[arg(long, env = "PROVISIO_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API key (admin for `apply`).
    #[arg(long, env = "PROVISIO_API_KEY", hide_env_values = true)]
    api_key: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Upload namespace documents (a file, or every .yaml/.yml/.json file of a folder).
    Apply {
        #[arg(short = 'f', long = "file")]
        path: PathBuf,
    },
    /// Submit a request and print the answer.
    Submit {
        namespace: String,
        procedure: String,
        /// JSON input.
        #[arg(long, default_value = "{}")]
        input: String,
        #[arg(long)]
        id: Option<String>,
    },
    /// Show a request's record.
    Get { id: String },
}

fn namespace_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
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
    Ok(files)
}

async fn apply(cli: &Cli, client: &reqwest::Client, path: &Path) -> anyhow::Result<bool> {
    let mut ok = true;
    let files = namespace_files(path)?;
    if files.is_empty() {
        bail!("no namespace files in {}", path.display());
    }
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let doc = provisio_shared::procedure::parse_document(&text)
            .map_err(|p| anyhow::anyhow!("{}: {}", file.display(), p.message))?;
        let Some(name) = doc.get("namespace").and_then(Value::as_str) else {
            println!("{}: no `namespace` key", file.display());
            ok = false;
            continue;
        };
        let resp = client
            .put(format!(
                "{}/v1/namespaces/{name}",
                cli.url.trim_end_matches('/')
            ))
            .bearer_auth(&cli.api_key)
            .header("content-type", "application/yaml")
            .body(text.clone())
            .send()
            .await
            .with_context(|| format!("uploading {}", file.display()))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            let version = body.get("version").and_then(Value::as_i64).unwrap_or(0);
            if body.get("changed").and_then(Value::as_bool) == Some(true) {
                println!("{name}: applied version {version} ({})", file.display());
            } else {
                println!("{name}: unchanged, version {version} ({})", file.display());
            }
        } else {
            ok = false;
            let msg = body
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("");
            println!("{name}: rejected ({status}): {msg} ({})", file.display());
            for d in body
                .pointer("/error/details")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let p = d.get("path").and_then(Value::as_str).unwrap_or("");
                let m = d.get("message").and_then(Value::as_str).unwrap_or("");
                println!("  {p}: {m}");
            }
        }
    }
    Ok(ok)
}

async fn print_response(resp: reqwest::Response) -> anyhow::Result<bool> {
    let ok = resp.status().is_success();
    let body: Value = resp.json().await.context("reading the answer")?;
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(ok)
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let client = reqwest::Client::new();
    let base = cli.url.trim_end_matches('/').to_owned();
    let ok = match &cli.cmd {
        Cmd::Apply { path } => apply(&cli, &client, path).await?,
        Cmd::Submit {
            namespace,
            procedure,
            input,
            id,
        } => {
            let input: Value = serde_json::from_str(input).context("--input is not JSON")?;
            let mut body =
                serde_json::json!({"namespace": namespace, "procedure": procedure, "input": input});
            if let Some(id) = id {
                body["id"] = Value::String(id.clone());
            }
            let resp = client
                .post(format!("{base}/v1/requests"))
                .bearer_auth(&cli.api_key)
                .json(&body)
                .send()
                .await?;
            print_response(resp).await?
        }
        Cmd::Get { id } => {
            let resp = client
                .get(format!("{base}/v1/requests/{id}"))
                .bearer_auth(&cli.api_key)
                .send()
                .await?;
            print_response(resp).await?
        }
    };
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
