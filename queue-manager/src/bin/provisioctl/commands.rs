//! The commands other than `apply` and `describe`: each one API call, its answer printed.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::Format;
use crate::args::{Get, Submit};
use crate::bulk;
use crate::client::{Api, Body, Exit, Failure, filters, seg};
use crate::table::{self, Col};

/// Prints an answer: its JSON, or the rows at `key` (or the answer itself when `key` is
/// empty) in columns.
pub(crate) fn print(answer: &Value, format: Format, key: &str, cols: &[Col]) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(answer)?),
        Format::Table => {
            let rows = if key.is_empty() {
                std::slice::from_ref(answer)
            } else {
                table::list_of(answer, key)
            };
            print!("{}", table::render(rows, cols));
            if let Some(next) = answer.get("next").filter(|n| !n.is_null()) {
                eprintln!("more: --after {}", table::cell(Some(next)));
            }
        }
    }
    Ok(())
}

fn wait_query(wait: Option<u64>) -> Vec<(&'static str, String)> {
    wait.map(|w| vec![("wait", w.to_string())])
        .unwrap_or_default()
}

fn opt<T: ToString>(v: Option<&T>) -> Option<String> {
    v.map(ToString::to_string)
}

pub(crate) async fn get(api: &Api, what: &Get, format: Format) -> anyhow::Result<Exit> {
    match what {
        Get::Namespaces => {
            let v = api.get("/v1/namespaces", &[]).await?;
            print(&v, format, "namespaces", table::NAMESPACES)?;
        }
        Get::Namespace { name } => {
            let v = api
                .get(&format!("/v1/namespaces/{}", seg(name)), &[])
                .await?;
            print(&v, format, "history", table::HISTORY)?;
        }
        Get::Requests {
            status,
            namespace,
            limit,
            after,
        } => {
            let q = filters(&[
                ("status", status.clone()),
                ("namespace", namespace.clone()),
                ("limit", opt(limit.as_ref())),
                ("after", after.clone()),
            ]);
            let v = api.get("/v1/requests", &q).await?;
            print(&v, format, "requests", table::REQUEST)?;
        }
        Get::Request { id } => {
            let v = api.get(&format!("/v1/requests/{}", seg(id)), &[]).await?;
            print(&v, format, "", table::REQUEST)?;
        }
        Get::Transactions { limit } => {
            let q = filters(&[
                ("status", Some("in_doubt".to_owned())),
                ("limit", opt(limit.as_ref())),
            ]);
            let v = api.get("/v1/transactions", &q).await?;
            print(&v, format, "transactions", table::IN_DOUBT)?;
        }
        Get::Audit {
            from,
            to,
            namespace,
            procedure,
            outcome,
            request_id,
            limit,
            after,
        } => {
            let q = filters(&[
                ("from", from.clone()),
                ("to", to.clone()),
                ("namespace", namespace.clone()),
                ("procedure", procedure.clone()),
                ("outcome", outcome.clone()),
                ("request_id", request_id.clone()),
                ("limit", opt(limit.as_ref())),
                ("after", after.clone()),
            ]);
            let v = api.get("/v1/audit/transactions", &q).await?;
            print(&v, format, "transactions", table::AUDIT)?;
        }
        Get::DeadLetters {
            status,
            reason,
            namespace,
            request_id,
            limit,
            after,
        } => {
            let q = filters(&[
                ("status", status.clone()),
                ("reason", reason.clone()),
                ("namespace", namespace.clone()),
                ("request_id", request_id.clone()),
                ("limit", opt(limit.as_ref())),
                ("after", after.clone()),
            ]);
            let v = api.get("/v1/dead-letters", &q).await?;
            print(&v, format, "dead_letters", table::DEAD_LETTERS)?;
        }
        Get::Pools => {
            let v = api.get("/v1/resources/pools", &[]).await?;
            print(&v, format, "pools", table::POOLS)?;
        }
    }
    Ok(Exit::Ok)
}

pub(crate) async fn submit(api: &Api, s: &Submit, format: Format) -> anyhow::Result<Exit> {
    if let Some(file) = &s.bulk {
        let opts = bulk::Options {
            file,
            chunk: usize::from(s.chunk),
            in_flight: usize::from(s.in_flight),
            progress: s.progress,
        };
        return bulk::run(api, &opts, format).await;
    }
    if s.run_as.is_some() && !s.trusted {
        return Err(Failure::Usage("--run-as goes with --trusted".into()).into());
    }
    let input: Value = serde_json::from_str(&s.input)
        .map_err(|e| Failure::Usage(format!("--input is not JSON: {e}")))?;
    let mut body = json!({
        "namespace": s.namespace, "procedure": s.procedure, "input": input,
    });
    for (k, v) in [
        ("id", &s.id),
        ("priority", &s.priority),
        ("not_before", &s.not_before),
        ("run_as", &s.run_as),
    ] {
        if let Some(v) = v {
            body[k] = Value::String(v.clone());
        }
    }
    let path = if s.trusted {
        "/v1/requests/trusted"
    } else {
        "/v1/requests"
    };
    let (status, v) = api
        .call(Method::POST, path, &wait_query(s.wait), Body::Json(&body))
        .await?;
    // 200: finished within --wait, the record; 202: accepted (queued or scheduled).
    let cols = if status == StatusCode::OK {
        table::REQUEST
    } else {
        table::ACCEPTED
    };
    print(&v, format, "", cols)?;
    Ok(Exit::Ok)
}

async fn post(
    api: &Api,
    path: &str,
    query: &[(&str, String)],
    body: Option<Value>,
) -> Result<Value, Failure> {
    let body = body.as_ref().map_or(Body::Empty, Body::Json);
    api.call(Method::POST, path, query, body)
        .await
        .map(|(_, v)| v)
}

async fn delete(api: &Api, path: &str) -> Result<Value, Failure> {
    api.call(Method::DELETE, path, &[], Body::Empty)
        .await
        .map(|(_, v)| v)
}

pub(crate) async fn cancel(api: &Api, id: &str, format: Format) -> anyhow::Result<Exit> {
    let v = delete(api, &format!("/v1/requests/{}", seg(id))).await?;
    print(&v, format, "", table::REQUEST)?;
    Ok(Exit::Ok)
}

pub(crate) async fn resume(api: &Api, id: &str, format: Format) -> anyhow::Result<Exit> {
    let v = post(api, &format!("/v1/requests/{}:resume", seg(id)), &[], None).await?;
    print(&v, format, "", table::REQUEST)?;
    Ok(Exit::Ok)
}

pub(crate) async fn requeue_one(api: &Api, id: &str, format: Format) -> anyhow::Result<Exit> {
    let v = post(
        api,
        &format!("/v1/dead-letters/{}:requeue", seg(id)),
        &[],
        None,
    )
    .await?;
    print(&v, format, "", table::REQUEUED_ONE)?;
    Ok(Exit::Ok)
}

/// `requeue --all`: every dead letter matching the filter, reporting the skipped ones.
pub(crate) async fn requeue_all(
    api: &Api,
    reason: Option<&String>,
    namespace: Option<&String>,
    format: Format,
) -> anyhow::Result<Exit> {
    let mut filter = serde_json::Map::new();
    for (k, v) in [("reason", reason), ("namespace", namespace)] {
        if let Some(v) = v {
            filter.insert(k.into(), Value::String(v.clone()));
        }
    }
    let v = post(
        api,
        "/v1/dead-letters:requeue",
        &[],
        Some(Value::Object(filter)),
    )
    .await?;
    print(&v, format, "requeued", table::REQUEUED)?;
    if format == Format::Table {
        for s in v
            .get("skipped")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            eprintln!(
                "skipped: dead letter {}: {}",
                table::cell(s.get("id")),
                table::cell(s.get("reason"))
            );
        }
        if v.get("more").and_then(Value::as_bool) == Some(true) {
            eprintln!("more dead letters match: run it again");
        }
    }
    Ok(Exit::Ok)
}

pub(crate) async fn delete_dead_letter(
    api: &Api,
    id: &str,
    format: Format,
) -> anyhow::Result<Exit> {
    let v = delete(api, &format!("/v1/dead-letters/{}", seg(id))).await?;
    print(&v, format, "", table::DELETED)?;
    Ok(Exit::Ok)
}

pub(crate) async fn resolve(
    api: &Api,
    tx_id: &str,
    note: &str,
    wait: Option<u64>,
    format: Format,
) -> anyhow::Result<Exit> {
    let v = post(
        api,
        &format!("/v1/transactions/{}:resolve", seg(tx_id)),
        &wait_query(wait),
        Some(json!({"note": note})),
    )
    .await?;
    print(&v, format, "", table::COMMAND)?;
    Ok(Exit::Ok)
}

pub(crate) async fn retry_rollback(
    api: &Api,
    tx_id: &str,
    note: Option<&String>,
    wait: Option<u64>,
    format: Format,
) -> anyhow::Result<Exit> {
    let body = note.map(|n| json!({"note": n}));
    let v = post(
        api,
        &format!("/v1/transactions/{}:retry-rollback", seg(tx_id)),
        &wait_query(wait),
        body,
    )
    .await?;
    print(&v, format, "", table::COMMAND)?;
    Ok(Exit::Ok)
}

pub(crate) async fn create_principal(
    api: &Api,
    name: &str,
    groups: &[String],
    kind: Option<&String>,
    amqp_user: Option<&String>,
    format: Format,
) -> anyhow::Result<Exit> {
    let mut body = json!({"name": name, "groups": groups});
    if let Some(k) = kind {
        body["kind"] = json!(k);
    }
    if let Some(u) = amqp_user {
        body["amqp_user"] = json!(u);
    }
    let v = post(api, "/v1/principals", &[], Some(body)).await?;
    print(&v, format, "", table::PRINCIPAL)?;
    Ok(Exit::Ok)
}

pub(crate) async fn set_groups(
    api: &Api,
    name: &str,
    groups: &[String],
    format: Format,
) -> anyhow::Result<Exit> {
    let body = json!({"groups": groups});
    let (_, v) = api
        .call(
            Method::PUT,
            &format!("/v1/principals/{}/groups", seg(name)),
            &[],
            Body::Json(&body),
        )
        .await?;
    print(&v, format, "", table::GROUPS)?;
    Ok(Exit::Ok)
}

/// `principals grants NAME [--set PERM...]`: shows, or replaces, the principal's own grants.
pub(crate) async fn grants(
    api: &Api,
    name: &str,
    set: Option<&[String]>,
    format: Format,
) -> anyhow::Result<Exit> {
    let path = format!("/v1/principals/{}/grants", seg(name));
    let (_, v) = match set {
        Some(perms) => {
            let body = json!(perms);
            api.call(Method::PUT, &path, &[], Body::Json(&body)).await?
        }
        None => api.call(Method::GET, &path, &[], Body::Empty).await?,
    };
    print(&v, format, "", table::GRANTS)?;
    Ok(Exit::Ok)
}

pub(crate) async fn create_key(
    api: &Api,
    principal: &str,
    ttl_seconds: Option<u64>,
    format: Format,
) -> anyhow::Result<Exit> {
    let v = post(
        api,
        &format!("/v1/principals/{}/keys", seg(principal)),
        &[],
        ttl_seconds.map(|t| json!({"ttl_seconds": t})),
    )
    .await?;
    print(&v, format, "", table::KEY)?;
    Ok(Exit::Ok)
}

pub(crate) async fn revoke_key(
    api: &Api,
    principal: &str,
    key_id: &str,
    format: Format,
) -> anyhow::Result<Exit> {
    let v = delete(
        api,
        &format!("/v1/principals/{}/keys/{}", seg(principal), seg(key_id)),
    )
    .await?;
    print(&v, format, "", table::REVOKED)?;
    Ok(Exit::Ok)
}
