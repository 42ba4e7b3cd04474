//! End-to-end: admins create principals, give them groups and keys; keys work at once and
//! stop working when revoked.

use provisio_tests::{TestEnv, demo_namespace, request};
use serde_json::{Value, json};

#[tokio::test]
async fn admins_manage_principals_groups_and_keys() -> anyhow::Result<()> {
    let env = TestEnv::new("principals").await?;
    // No key cache, so that a revocation is visible to the very next request.
    let qm = env
        .spawn(
            "queue-manager",
            &[],
            &[("PROVISIO_QUEUE_MANAGER__KEY_CACHE_SECONDS", "0")],
        )
        .await?;
    env.apply(&qm, "demo", &demo_namespace()).await?;
    let admin = |method: reqwest::Method, path: &str| {
        env.http
            .request(method, format!("{}{path}", qm.url))
            .bearer_auth(&env.admin_key)
    };
    let r = admin(reqwest::Method::POST, "/v1/principals")
        .json(&json!({"name": "portal", "groups": ["producers"]}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 201);
    let r = admin(reqwest::Method::POST, "/v1/principals")
        .json(&json!({"name": "portal"}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 409);
    let r = admin(reqwest::Method::POST, "/v1/principals")
        .json(&json!({"name": "other", "groups": ["no-such-group"]}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 422);

    let r = admin(reqwest::Method::POST, "/v1/principals/portal/keys")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 201);
    let created: Value = r.json().await?;
    let key = created["key"].as_str().expect("key").to_owned();
    let key_id = created["id"].as_str().expect("id").to_owned();

    let submit = |k: &str| {
        env.http
            .post(format!("{}/v1/requests", qm.url))
            .bearer_auth(k)
            .json(&request("demo", "hello", json!({"name": "p"})))
            .send()
    };
    assert_eq!(
        submit(&key).await?.status().as_u16(),
        202,
        "a producer may submit"
    );
    let r = env
        .http
        .post(format!("{}/v1/principals", qm.url))
        .bearer_auth(&key)
        .json(&json!({"name": "x"}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 403, "but not administer");

    // Without groups it may do nothing.
    let r = admin(reqwest::Method::PUT, "/v1/principals/portal/groups")
        .json(&json!({"groups": []}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(submit(&key).await?.status().as_u16(), 403);

    let r = admin(
        reqwest::Method::DELETE,
        &format!("/v1/principals/portal/keys/{key_id}"),
    )
    .send()
    .await?;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        submit(&key).await?.status().as_u16(),
        401,
        "a revoked key is refused"
    );
    let r = admin(
        reqwest::Method::DELETE,
        &format!("/v1/principals/portal/keys/{key_id}"),
    )
    .send()
    .await?;
    assert_eq!(r.status().as_u16(), 404);
    drop(qm);
    env.cleanup().await;
    Ok(())
}
