//! The Provisio run: a queue manager and engines, requests submitted over HTTP.

use std::sync::Arc;

use anyhow::{Context, bail};
use provisio_tests::measure::Who;
use provisio_tests::{TestEnv, demo_namespace};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::drive::{RunFigures, SubmitFn, database_name, measure, shared_groups};
use crate::{Args, Plan};

pub(crate) fn request_input(template: Option<&Value>, i: usize) -> Value {
    template
        .cloned()
        .unwrap_or_else(|| json!({"name": format!("User{i}")}))
}

pub(crate) async fn run(args: &Args, plan: Plan) -> anyhow::Result<RunFigures> {
    let (namespace, procedure) = args
        .procedure
        .split_once('.')
        .context("--procedure is NAMESPACE.PROCEDURE")?;
    let document = match &args.namespace_file {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None if namespace == "demo" => demo_namespace(),
        None => bail!("--procedure {namespace}.*: give its namespace with --namespace-file"),
    };
    let input: Option<Value> = args
        .input
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .context("--input is not JSON")?;

    let mut env = TestEnv::new("bench").await?;
    for (k, v) in [
        ("PROVISIO_LOG__FORMAT", "json".to_owned()),
        ("PROVISIO_LOG__LEVEL", "warn".to_owned()),
        ("PROVISIO_ENGINE__PREFETCH", args.prefetch.to_string()),
        ("PROVISIO_DATABASE__POOL_SIZE", "16".to_owned()),
        ("PROVISIO_TXLOG__POOL_SIZE", "8".to_owned()),
        ("PROVISIO_RUNTIME__THREADS", args.threads.to_string()),
    ] {
        env.extra_env.push((k.into(), v));
    }
    env.extra_env.extend(args.set.iter().cloned());
    if args.schema_validation {
        env.extra_env.push((
            "PROVISIO_VALIDATION__ENABLE_SCHEMA_VALIDATION".into(),
            "true".into(),
        ));
    }
    let qm = env.queue_manager().await?;
    let mut engines = Vec::new();
    for _ in 0..args.engines {
        engines.push(env.engine().await?);
    }
    let (status, body) = env.apply(&qm, namespace, &document).await?;
    if status >= 300 {
        bail!("applying namespace {namespace} failed: {body}");
    }

    let mut who = vec![(
        "queue-manager".to_owned(),
        Who::Pid(qm.child.id().context("queue manager pid")?),
    )];
    for (k, e) in engines.iter().enumerate() {
        who.push((
            format!("engine-{}", k + 1),
            Who::Pid(e.child.id().context("engine pid")?),
        ));
    }
    who.extend(shared_groups(database_name(&env.db_url)));

    let outcomes = env.outcomes().await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(forward_outcomes(outcomes, tx));
    let submit = submitter(
        args.concurrency,
        format!("{}/v1/requests", qm.url),
        env.admin_key.clone(),
        (namespace.to_owned(), procedure.to_owned()),
        input,
    )?;

    let mut figures = measure(plan, submit, rx, who).await;
    reader.abort();
    // Scraped before the fleet stops. A process that does not answer is left out, and the
    // sums then cover the others only; the bench's own figures above do not depend on it.
    if let Ok(f) = figures.as_mut() {
        let mut texts = Vec::new();
        for p in std::iter::once(&qm).chain(&engines) {
            if let Ok(r) = env.http.get(format!("{}/metrics", p.url)).send().await
                && let Ok(t) = r.text().await
            {
                texts.push(t);
            }
        }
        f.stages = crate::stages::summarise(&texts);
    }
    for e in engines {
        let _ = e.terminate().await;
    }
    let _ = qm.terminate().await;
    env.cleanup().await;
    figures
}

/// Forwards the bench's outcomes to the measurement as (request index, outcome status).
async fn forward_outcomes(
    mut outcomes: provisio_tests::Outcomes,
    tx: mpsc::UnboundedSender<(usize, String)>,
) {
    while let Ok(v) = outcomes.next_any().await {
        let Some(i) = v["id"]
            .as_str()
            .and_then(|id| id.strip_prefix("bench-"))
            .and_then(|i| i.parse().ok())
        else {
            continue;
        };
        let status = v["status"].as_str().unwrap_or("?").to_owned();
        if tx.send((i, status)).is_err() {
            return;
        }
    }
}

/// Submits request `i` as `bench-{i}` over HTTP; accepted means `202`.
fn submitter(
    concurrency: usize,
    url: String,
    key: String,
    (namespace, procedure): (String, String),
    input: Option<Value>,
) -> anyhow::Result<SubmitFn> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    Ok(Arc::new(move |i| {
        let body = json!({
            "id": format!("bench-{i}"),
            "namespace": namespace,
            "procedure": procedure,
            "input": request_input(input.as_ref(), i),
        });
        let req = client.post(&url).bearer_auth(&key).json(&body);
        Box::pin(async move {
            match req.send().await {
                Ok(r) if r.status().as_u16() == 202 => Ok(()),
                Ok(r) => Err(r.status().as_u16().to_string()),
                Err(_) => Err("transport".to_owned()),
            }
        })
    }))
}
