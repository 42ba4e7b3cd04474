//! End-to-end: the demo namespace `hosting` (directory, resource manager, http) as the README
//! shows it: create_customer → create_mailbox → delete_mailbox, and a mailbox that does not
//! fit rolled back completely.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::Context;
use provisio_tests::{TestEnv, request};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Starts the mail platform stand-in that ops/up runs too; the process (killed on drop) and
/// its URL.
async fn mail_platform() -> anyhow::Result<(tokio::process::Child, String)> {
    let mut platform = tokio::process::Command::new("python3")
        .arg(repo().join("ops/demo/mailplatform.py"))
        .arg("0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(platform.stdout.take().context("stdout")?).lines();
    let platform_url = loop {
        let line = lines
            .next_line()
            .await?
            .ok_or_else(|| anyhow::anyhow!("mail platform did not start"))?;
        if let Some(u) = line.strip_prefix("listening on ") {
            break u.to_owned();
        }
    };
    Ok((platform, platform_url))
}

#[tokio::test]
async fn hosting_demo_creates_and_deletes_a_mailbox() -> anyhow::Result<()> {
    let (_platform, platform_url) = mail_platform().await?;

    let mut env = TestEnv::new("hosting").await?;
    let config = std::env::temp_dir().join(format!("provisio-{}.toml", env.prefix));
    std::fs::write(
        &config,
        format!(
            "[providers.http.services.mailplatform]\nbase_url = \"{platform_url}\"\n\n\
             [[providers.resource.pools]]\nname = \"mailbox-storage\"\nresources = [{{name = \"mbx1\", capacity = 4096}}, {{name = \"mbx2\", capacity = 2048}}]\n"
        ),
    )?;
    env.extra_env
        .push(("PROVISIO_CONFIG".into(), config.display().to_string()));
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let text = std::fs::read_to_string(repo().join("schemas/examples/hosting.yaml"))?;
    let (status, body) = env.apply(&qm, "hosting", &text).await?;
    assert_eq!(status, 201, "{body}");
    let mut outcomes = env.outcomes().await?;
    let mut run = async |procedure: &str, input: Value| -> anyhow::Result<Value> {
        let (status, body) = env
            .submit(&qm, &request("hosting", procedure, input))
            .await?;
        anyhow::ensure!(status == 202, "{body}");
        outcomes
            .wait_for(body["id"].as_str().unwrap_or_default())
            .await
    };

    let customer = run("create_customer", json!({"org": "acme"})).await?;
    assert_eq!(customer["status"], "succeeded", "{customer}");
    assert_eq!(customer["output"]["org"], "acme");

    let mailbox = run(
        "create_mailbox",
        json!({"org": "acme", "user": "ada", "quota_mb": 3000, "aliases": ["ada.lovelace"]}),
    )
    .await?;
    assert_eq!(mailbox["status"], "succeeded", "{mailbox}");
    let out = mailbox["output"].clone();
    assert_eq!(out["mailbox"], "ada@acme");
    assert_eq!(out["server"], "mbx1", "least used with room for 3000");

    let pg = env.pg().await?;
    let used: i64 = pg
        .query_one("SELECT sum(used) FROM provider_resource.resources", &[])
        .await?
        .get(0);
    assert_eq!(used, 3000);
    let listed: Value = reqwest::get(format!("{platform_url}/mailboxes"))
        .await?
        .json()
        .await?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));

    // Too big for any server: the user created first is rolled back, nothing is left over.
    let too_big = run(
        "create_mailbox",
        json!({"org": "acme", "user": "bob", "quota_mb": 5000}),
    )
    .await?;
    assert_eq!(too_big["status"], "failed");
    assert_eq!(too_big["error"]["code"], "pool_exhausted", "{too_big}");
    let bob: i64 = pg
        .query_one(
            "SELECT count(*) FROM provider_directory.users WHERE name = 'bob'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(bob, 0);

    let deleted = run(
        "delete_mailbox",
        json!({"user_id": out["user_id"], "allocation_id": out["allocation_id"], "platform_id": out["platform_id"]}),
    )
    .await?;
    assert_eq!(deleted["status"], "succeeded", "{deleted}");
    assert_eq!(
        deleted["output"],
        json!({"deleted": true, "released_mb": 3000})
    );
    let used: i64 = pg
        .query_one("SELECT sum(used) FROM provider_resource.resources", &[])
        .await?
        .get(0);
    assert_eq!(used, 0);
    let ada: i64 = pg
        .query_one(
            "SELECT count(*) FROM provider_directory.users WHERE name = 'ada'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(ada, 0);
    let listed: Value = reqwest::get(format!("{platform_url}/mailboxes"))
        .await?
        .json()
        .await?;
    assert_eq!(listed, json!([]));
    drop((qm, engine));
    let _ = std::fs::remove_file(config);
    env.cleanup().await;
    Ok(())
}
