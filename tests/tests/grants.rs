//! End-to-end: grants to single principals, expiring keys, and access taken away on every
//! queue manager within 10 s (the queue managers' key caches are emptied by PostgreSQL
//! notifications, their TTL left at its default of 60 s); refusals counted and audited; a
//! scheduled request whose principal lost `execute` is not run.

use std::time::Duration;

use provisio_tests::{Proc, TestEnv, demo_namespace, eventually, request};
use serde_json::{Value, json};

type R = anyhow::Result<()>;

/// The bound the security issue sets on revocation.
const REVOCATION: Duration = Duration::from_secs(10);

async fn submit_as(env: &TestEnv, qm: &Proc, key: &str) -> anyhow::Result<u16> {
    Ok(env
        .http
        .post(format!("{}/v1/requests", qm.url))
        .bearer_auth(key)
        .json(&request("demo", "hello", json!({"name": "g"})))
        .send()
        .await?
        .status()
        .as_u16())
}

/// Waits until a submission with `key` is answered `status` by every queue manager.
async fn everywhere(env: &TestEnv, qms: &[&Proc], key: &str, status: u16, what: &str) -> R {
    eventually(REVOCATION, what, || async {
        for qm in qms {
            if submit_as(env, qm, key).await? != status {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
}

async fn put_grants(env: &TestEnv, qm: &Proc, name: &str, grants: Value) -> anyhow::Result<Value> {
    let path = format!("/v1/principals/{name}/grants");
    let (status, body) = env
        .admin(qm, reqwest::Method::PUT, &path, Some(grants))
        .await?;
    anyhow::ensure!(status == 200, "PUT grants: {status} {body}");
    Ok(body)
}

#[tokio::test]
async fn grants_revocations_and_expiry_reach_every_queue_manager_within_10_s() -> R {
    let env = TestEnv::new("grants").await?;
    let (qm1, qm2) = tokio::try_join!(env.queue_manager(), env.queue_manager())?;
    let qms = [&qm1, &qm2];
    assert_eq!(env.apply(&qm1, "demo", &demo_namespace()).await?.0, 201);
    let (_, key) = env.principal(&qm1, "solo", &[]).await?;
    // No groups, no grants: refused on both (and both now cache that).
    everywhere(&env, &qms, &key, 403, "solo refused before any grant").await?;

    let granted = put_grants(&env, &qm1, "solo", json!(["execute"])).await?;
    assert_eq!(granted["grants"], json!(["execute"]), "{granted}");
    assert_eq!(granted["permissions"], json!(["execute"]), "{granted}");
    everywhere(&env, &qms, &key, 202, "solo's own grant seen everywhere").await?;
    let (status, shown) = env
        .admin(
            &qm2,
            reqwest::Method::GET,
            "/v1/principals/solo/grants",
            None,
        )
        .await?;
    assert_eq!((status, &shown["permissions"]), (200, &json!(["execute"])));

    // Taken away: refused by every queue manager within the bound.
    put_grants(&env, &qm2, "solo", json!({"grants": []})).await?;
    everywhere(&env, &qms, &key, 403, "the grant withdrawn everywhere").await?;

    // An unknown permission: a JSON error naming it, nothing changed.
    let (status, body) = env
        .admin(
            &qm1,
            reqwest::Method::PUT,
            "/v1/principals/solo/grants",
            Some(json!(["execute", "root"])),
        )
        .await?;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid", "{body}");
    assert_eq!(body["error"]["details"][0]["path"], "/1", "{body}");

    // A key revoked: 401 from every queue manager within the bound.
    put_grants(&env, &qm1, "solo", json!(["execute"])).await?;
    everywhere(&env, &qms, &key, 202, "the grant back").await?;
    let (status, created) = env
        .admin(
            &qm1,
            reqwest::Method::POST,
            "/v1/principals/solo/keys",
            None,
        )
        .await?;
    assert_eq!(status, 201, "{created}");
    let second = created["key"].as_str().unwrap_or_default().to_owned();
    everywhere(&env, &qms, &second, 202, "the second key works").await?;
    let key_id = created["id"].as_str().unwrap_or_default();
    let (status, _) = env
        .admin(
            &qm2,
            reqwest::Method::DELETE,
            &format!("/v1/principals/solo/keys/{key_id}"),
            None,
        )
        .await?;
    assert_eq!(status, 200);
    everywhere(
        &env,
        &qms,
        &second,
        401,
        "the revoked key refused everywhere",
    )
    .await?;
    assert_eq!(
        submit_as(&env, &qm1, &key).await?,
        202,
        "the other key still works"
    );

    disabling(&env, &qms, &key).await?;
    expiring_keys(&env, &qms).await?;
    denials_are_audited_and_counted(&env, &qm1).await?;
    env.cleanup().await;
    Ok(())
}

/// Keys with an expiry stop working when it passes, wherever they were cached.
/// Disabled over the API: every key of the principal refused (401) by every queue manager
/// within the bound; enabled again, accepted again. An admin cannot disable itself.
async fn disabling(env: &TestEnv, qms: &[&Proc], key: &str) -> R {
    let path = "/v1/principals/solo/disabled";
    let (status, body) = env
        .admin(qms[0], reqwest::Method::PUT, path, Some(json!(true)))
        .await?;
    assert_eq!((status, &body["disabled"]), (200, &json!(true)), "{body}");
    assert_eq!(body["permissions"], json!([]), "{body}");
    everywhere(
        env,
        qms,
        key,
        401,
        "the disabled principal refused everywhere",
    )
    .await?;
    let (status, body) = env
        .admin(
            qms[1],
            reqwest::Method::PUT,
            path,
            Some(json!({"disabled": false})),
        )
        .await?;
    assert_eq!((status, &body["disabled"]), (200, &json!(false)), "{body}");
    everywhere(env, qms, key, 202, "enabled again everywhere").await?;
    let (status, body) = env
        .admin(qms[0], reqwest::Method::PUT, path, Some(json!("yes")))
        .await?;
    assert_eq!(status, 400, "{body}");
    let (status, body) = env
        .admin(
            qms[0],
            reqwest::Method::PUT,
            "/v1/principals/admin/disabled",
            Some(json!(true)),
        )
        .await?;
    assert_eq!(status, 409, "an admin disabling itself: {body}");
    Ok(())
}

async fn expiring_keys(env: &TestEnv, qms: &[&Proc]) -> R {
    let qm = qms[0];
    let path = "/v1/principals/solo/keys";
    let both = json!({"ttl_seconds": 60, "expires_at": "2999-01-01T00:00:00Z"});
    let (status, body) = env
        .admin(qm, reqwest::Method::POST, path, Some(both))
        .await?;
    assert_eq!((status, &body["error"]["code"]), (400, &json!("malformed")));
    let past = json!({"expires_at": "2001-01-01T00:00:00Z"});
    let (status, body) = env
        .admin(qm, reqwest::Method::POST, path, Some(past))
        .await?;
    assert_eq!((status, &body["error"]["code"]), (422, &json!("invalid")));

    let (status, created) = env
        .admin(
            qm,
            reqwest::Method::POST,
            path,
            Some(json!({"ttl_seconds": 1})),
        )
        .await?;
    assert_eq!(status, 201, "{created}");
    assert!(created["expires_at"].is_string(), "{created}");
    let short = created["key"].as_str().unwrap_or_default().to_owned();
    everywhere(env, qms, &short, 401, "the 1-second key expired").await?;

    // Expiry changed under a cached key: refused from then on, everywhere.
    let (status, created) = env
        .admin(
            qm,
            reqwest::Method::POST,
            path,
            Some(json!({"expires_at": "2999-01-01T00:00:00Z"})),
        )
        .await?;
    assert_eq!(status, 201, "{created}");
    let long = created["key"].as_str().unwrap_or_default().to_owned();
    everywhere(env, qms, &long, 202, "the long-lived key works").await?;
    let id = uuid::Uuid::parse_str(created["id"].as_str().unwrap_or_default())?;
    env.pg()
        .await?
        .execute(
            "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1",
            &[&id],
        )
        .await?;
    everywhere(env, qms, &long, 401, "the key expired by an operator").await
}

/// Every refusal above is a row of `GET /v1/audit/security-events` and a count.
async fn denials_are_audited_and_counted(env: &TestEnv, qm: &Proc) -> R {
    let events = |reason: &'static str| async move {
        let path = format!("/v1/audit/security-events?reason={reason}&principal=solo");
        let (status, body) = env.admin(qm, reqwest::Method::GET, &path, None).await?;
        anyhow::ensure!(status == 200, "{status} {body}");
        Ok(body["events"].as_array().cloned().unwrap_or_default())
    };
    let forbidden = eventually(REVOCATION, "a stored forbidden event", || async {
        Ok(events("forbidden").await?.first().cloned())
    })
    .await?;
    assert_eq!(forbidden["source"], "POST /v1/requests", "{forbidden}");
    assert_eq!(forbidden["detail"]["status"], 403, "{forbidden}");
    assert!(forbidden["principal_id"].is_string(), "{forbidden}");
    eventually(REVOCATION, "a stored expired_key event", || async {
        Ok(events("expired_key").await?.first().cloned())
    })
    .await?;
    // The revoked key is unknown: no principal to name.
    let (status, body) = env
        .admin(
            qm,
            reqwest::Method::GET,
            "/v1/audit/security-events?reason=unauthenticated&limit=1",
            None,
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"].as_array().map(Vec::len), Some(1), "{body}");
    assert!(body["next"].is_number(), "a full page has a next: {body}");
    let (status, _) = env
        .admin(
            qm,
            reqwest::Method::GET,
            "/v1/audit/security-events?reason=bored",
            None,
        )
        .await?;
    assert_eq!(status, 400);

    let metrics = env
        .http
        .get(format!("{}/metrics", qm.url))
        .send()
        .await?
        .text()
        .await?;
    for reason in [
        "forbidden",
        "unauthenticated",
        "expired_key",
        "rate_limited",
    ] {
        let line = format!("provisio_denials_total{{reason=\"{reason}\"}} ");
        let value = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse::<f64>().ok());
        let value = value.unwrap_or_else(|| panic!("no {line} in\n{metrics}"));
        if reason != "rate_limited" {
            assert!(value >= 1.0, "{reason}: {value}");
        }
    }
    Ok(())
}

/// A scheduled request runs with its principal's permissions when it is due, not with those
/// it was submitted with: withdrawn meanwhile, it is dead-lettered as `forbidden`. (Request-level
/// retries and resumed requests come back through the same scheduler and engine check.)
#[tokio::test]
async fn a_scheduled_request_whose_principal_lost_execute_is_not_run() -> R {
    let env = TestEnv::new("grants-scheduled").await?;
    let (qm, _engine, _auditor) = tokio::try_join!(
        env.queue_manager(),
        env.engine(),
        env.spawn("worker", &["--role", "auditor"], &[])
    )?;
    assert_eq!(env.apply(&qm, "demo", &demo_namespace()).await?.0, 201);
    let (_, key) = env.principal(&qm, "later", &[]).await?;
    put_grants(&env, &qm, "later", json!(["execute"])).await?;
    let mut body = request("demo", "hello", json!({"name": "later"}));
    body["id"] = json!("grants-later");
    // Due later than the withdrawal below can take on a loaded machine; made due after it.
    body["not_before"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    let r = env
        .http
        .post(format!("{}/v1/requests", qm.url))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await?;
    let status = r.status().as_u16();
    let accepted: Value = r.json().await?;
    assert_eq!(
        (status, &accepted["status"]),
        (202, &json!("scheduled")),
        "{accepted}"
    );
    put_grants(&env, &qm, "later", json!([])).await?;
    let due = env
        .pg()
        .await?
        .execute(
            "UPDATE requests SET not_before = now() WHERE id = 'grants-later' AND status = 'scheduled'",
            &[],
        )
        .await?;
    assert_eq!(due, 1, "still scheduled when the grant was withdrawn");

    let record = eventually(Duration::from_mins(1), "the request refused", || async {
        let (_, r) = env.get_request(&qm, "grants-later").await?;
        Ok(matches!(r["status"].as_str(), Some("dead" | "succeeded" | "failed")).then_some(r))
    })
    .await?;
    assert_eq!(record["status"], "dead", "{record}");
    let (status, letters) = env
        .admin(
            &qm,
            reqwest::Method::GET,
            "/v1/dead-letters?request_id=grants-later",
            None,
        )
        .await?;
    assert_eq!(status, 200, "{letters}");
    let letter = letters["dead_letters"]
        .as_array()
        .and_then(|l| l.iter().find(|d| d["request_id"] == "grants-later"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(letter["reason"], "forbidden", "{letters}");
    env.cleanup().await;
    Ok(())
}
