//! End-to-end: the procedure language through the API and the queue.

use provisio_tests::{Proc, TestEnv, binary, request};
use serde_json::{Value, json};

type R = anyhow::Result<()>;

const EVERY_KIND: &str = r#"
namespace: kinds
procedures:
  main:
    access: public
    transaction: compensating
    steps:
      - id: org
        call: test.echo
        input: '{org: .input.org}'
        save: '{id: ("org-" + .result.org)}'
      - set:
          plan: '.input.plan // "basic"'
      - id: user
        procedure: make_user
        input: '{org: .steps.org.id, user: .input.user}'
      - id: aliases
        for_each: '.input.aliases'
        as: alias
        steps:
          - id: alias_step
            call: test.echo
            input: '{alias: .alias, user: .steps.user}'
      - switch: '.vars.plan'
        cases:
          gold:
            - set: {quota: '100'}
        default:
          - set: {quota: '10'}
      - try:
          - call: test.fail
            input: '{code: "dup", message: "already there"}'
        catch:
          - id: recovered
            call: test.echo
            input: '{saw: .error.code}'
      - id: skipped
        when: '.vars.quota > 50'
        call: test.echo
    output: '{org: .steps.org.id, user: .steps.user, aliases: [.steps.aliases[].alias_step.alias], quota: .vars.quota, recovered: .steps.recovered.saw, skipped: .steps.skipped}'
  make_user:
    steps:
      - id: u
        call: test.echo
        input: '{name: (.input.user + "@" + .input.org)}'
    output: '.steps.u.name'
  refuse:
    access: public
    steps:
      - fail: {code: not_allowed, message: '"no " + .input.what'}
"#;

async fn run(env: &TestEnv, qm: &Proc, procedure: &str, input: Value) -> anyhow::Result<Value> {
    let mut outcomes = env.outcomes().await?;
    let (status, body) = env.submit(qm, &request("kinds", procedure, input)).await?;
    anyhow::ensure!(status == 202, "submit: {status} {body}");
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    outcomes.wait_for(&id).await?;
    let (_, rec) = env.get_request(qm, &id).await?;
    Ok(rec)
}

#[tokio::test]
async fn a_namespace_using_every_step_kind_runs_through_the_queue() -> R {
    let env = TestEnv::new("kinds").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let (status, body) = env.apply(&qm, "kinds", EVERY_KIND).await?;
    assert_eq!(status, 201, "{body}");
    let rec = run(
        &env,
        &qm,
        "main",
        json!({"org": "acme", "user": "ada", "aliases": ["a1", "a2"]}),
    )
    .await?;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert_eq!(
        rec["output"],
        json!({"org": "org-acme", "user": "ada@org-acme", "aliases": ["a1", "a2"], "quota": 10, "recovered": "dup", "skipped": null})
    );
    let rec = run(
        &env,
        &qm,
        "main",
        json!({"org": "acme", "user": "bo", "aliases": [], "plan": "gold"}),
    )
    .await?;
    assert_eq!(rec["output"]["quota"], 100);
    assert_eq!(
        rec["output"]["skipped"],
        json!({"org": "acme", "user": "bo", "aliases": [], "plan": "gold"}),
        "`when` was true"
    );
    let rec = run(&env, &qm, "refuse", json!({"what": "way"})).await?;
    assert_eq!(rec["status"], "failed");
    assert_eq!(
        rec["error"],
        json!({"code": "not_allowed", "message": "no way", "step": "0"})
    );
    // A private procedure cannot be named by a plain producer.
    let (status, body) = env
        .submit(&qm, &request("kinds", "make_user", json!({})))
        .await?;
    assert_eq!(status, 202, "admins hold execute_private: {body}");
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn an_invalid_namespace_is_rejected_with_all_errors_and_the_previous_version_stays() -> R {
    let env = TestEnv::new("invalid").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let (status, _) = env.apply(&qm, "kinds", EVERY_KIND).await?;
    assert_eq!(status, 201);
    let broken = r"
namespace: kinds
procedures:
  main:
    access: public
    transaction: sometimes
    input_schema: {type: 12}
    steps:
      - call: nosuch.action
      - call: test.echo
        input: '{unclosed'
      - procedure: missing
  a: {steps: [{procedure: b}]}
  b: {steps: [{procedure: a}]}
";
    let (status, body) = env.apply(&qm, "kinds", broken).await?;
    assert_eq!(status, 422, "{body}");
    let details = body["error"]["details"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let paths: Vec<&str> = details.iter().filter_map(|d| d["path"].as_str()).collect();
    for expected in [
        "procedures.main.transaction",
        "procedures.main.input_schema",
        "procedures.main.steps[0].call",
        "procedures.main.steps[1].input",
        "procedures.main.steps[2].procedure",
        "procedures.a",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {details:?}"
        );
    }
    // Version 1 is still current and still runs.
    let r = env
        .http
        .get(format!("{}/v1/namespaces/kinds", qm.url))
        .bearer_auth(&env.admin_key)
        .send()
        .await?;
    let ns: Value = r.json().await?;
    assert_eq!(ns["version"], 1);
    assert_eq!(ns["history"].as_array().map(Vec::len), Some(1));
    let rec = run(&env, &qm, "refuse", json!({"what": "change"})).await?;
    assert_eq!(rec["error"]["code"], "not_allowed");
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_new_version_is_used_by_the_next_request_without_restarting_engines() -> R {
    let env = TestEnv::new("reload").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let v1 = "namespace: kinds\nprocedures:\n  hi:\n    access: public\n    steps: [{call: test.echo}]\n    output: '\"v1\"'\n";
    let v2 = v1.replace("\"v1\"", "\"v2\"");
    assert_eq!(env.apply(&qm, "kinds", v1).await?.0, 201);
    assert_eq!(run(&env, &qm, "hi", json!({})).await?["output"], "v1");
    let (status, body) = env.apply(&qm, "kinds", &v2).await?;
    assert_eq!((status, body["version"].clone()), (201, json!(2)));
    let rec = run(&env, &qm, "hi", json!({})).await?;
    assert_eq!(rec["output"], "v2");
    // Another queue manager that already cached version 2 also runs version 3 at once after
    // it is applied elsewhere: the version is read again inside the accepting transaction.
    let other = env.queue_manager().await?;
    assert_eq!(run(&env, &other, "hi", json!({})).await?["output"], "v2");
    let v3 = v1.replace("\"v1\"", "\"v3\"");
    assert_eq!(env.apply(&qm, "kinds", &v3).await?.0, 201);
    assert_eq!(run(&env, &other, "hi", json!({})).await?["output"], "v3");
    drop(other);
    // Applying the same document again changes nothing.
    let (status, body) = env.apply(&qm, "kinds", &v3).await?;
    assert_eq!((status, body["changed"].clone()), (200, json!(false)));
    // Each transaction records the version it ran.
    let pg = env.pg().await?;
    let rows = pg
        .query(
            "SELECT namespace_version FROM transactions ORDER BY started_at",
            &[],
        )
        .await?;
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, vec![1, 2, 2, 3]);
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn schema_validation_rejects_bad_input_with_the_validators_paths() -> R {
    let env = TestEnv::new("schema").await?;
    let qm = env
        .spawn(
            "queue-manager",
            &[],
            &[("PROVISIO_VALIDATION__ENABLE_SCHEMA_VALIDATION", "true")],
        )
        .await?;
    let doc = "namespace: kinds\nprocedures:\n  p:\n    access: public\n    input_schema: {type: object, required: [user], properties: {user: {type: string}, quota: {type: integer}}}\n    steps: [{call: test.echo}]\n";
    env.apply(&qm, "kinds", doc).await?;
    let (status, body) = env
        .submit(&qm, &request("kinds", "p", json!({"quota": "lots"})))
        .await?;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid");
    let paths: Vec<&str> = body["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["path"].as_str())
        .collect();
    assert!(paths.contains(&"/quota"), "{body}");
    assert!(
        paths.contains(&""),
        "missing `user` is reported at the root: {body}"
    );
    let (status, _) = env
        .submit(
            &qm,
            &request("kinds", "p", json!({"user": "ada", "quota": 5})),
        )
        .await?;
    assert_eq!(status, 202);
    drop(qm);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_private_procedure_needs_execute_private() -> R {
    let env = TestEnv::new("private").await?;
    let qm = env.queue_manager().await?;
    env.apply(&qm, "kinds", EVERY_KIND).await?;
    let (_, key) = env.principal(&qm, "portal", &["producers"]).await?;
    let key = key.as_str();
    let url = format!("{}/v1/requests", qm.url);
    let r = env
        .http
        .post(&url)
        .bearer_auth(key)
        .json(&request("kinds", "make_user", json!({})))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 403);
    let r = env
        .http
        .post(&url)
        .bearer_auth(key)
        .json(&request("kinds", "refuse", json!({})))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 202, "public procedures are fine");
    // Producers are not admins.
    let r = env
        .http
        .put(format!("{}/v1/namespaces/kinds", qm.url))
        .bearer_auth(key)
        .body(EVERY_KIND)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 403);
    drop(qm);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn provisioctl_apply_uploads_a_folder_and_prints_what_changed() -> R {
    let env = TestEnv::new("ctl").await?;
    let qm = env.queue_manager().await?;
    let dir = std::env::temp_dir().join(format!("pvctl-{}", env.prefix));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("kinds.yaml"), EVERY_KIND)?;
    std::fs::write(
        dir.join("other.json"),
        r#"{"namespace": "other", "procedures": {"p": {"steps": [{"call": "test.echo"}]}}}"#,
    )?;
    let ctl = |dir: std::path::PathBuf| {
        let (url, key) = (qm.url.clone(), env.admin_key.clone());
        async move {
            tokio::process::Command::new(binary("provisioctl"))
                .args(["--url", &url, "--api-key", &key, "apply", "-f"])
                .arg(dir)
                .output()
                .await
        }
    };
    let out = ctl(dir.clone()).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("kinds: applied version 1"), "{text}");
    assert!(text.contains("other: applied version 1"), "{text}");
    let out = ctl(dir.clone()).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("kinds: unchanged, version 1"), "{text}");
    std::fs::write(
        dir.join("other.json"),
        r#"{"namespace": "other", "procedures": {"p": {"steps": [{"call": "test.nope"}]}}}"#,
    )?;
    let out = ctl(dir.clone()).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success());
    assert!(
        text.contains("other: rejected") && text.contains("procedures.p.steps[0].call"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir)?;
    drop(qm);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn trusted_requests_run_inline_steps_as_another_principal() -> R {
    let env = TestEnv::new("trusted").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    assert_eq!(env.apply(&qm, "kinds", EVERY_KIND).await?.0, 201);
    let (_, key) = env.principal(&qm, "alice", &["producers"]).await?;
    let key = key.as_str();
    let url = format!("{}/v1/requests/trusted?wait=30", qm.url);
    let body = json!({
        "namespace": "kinds", "procedure": "adhoc", "input": {"user": "zed"}, "run_as": "alice",
        "steps": [
            {"id": "who", "call": "test.echo", "input": "{caller: .caller.name}"},
            {"id": "made", "procedure": "make_user", "input": "{org: \"acme\", user: .input.user}"}
        ],
        "output": "{caller: .steps.who.caller, user: .steps.made}"
    });
    let r = env
        .http
        .post(&url)
        .bearer_auth(&env.admin_key)
        .json(&body)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    let rec: Value = r.json().await?;
    assert_eq!(
        rec["output"],
        json!({"caller": "alice", "user": "zed@acme"}),
        "{rec}"
    );
    // The inline procedure is checked like a namespace: every problem, with its path.
    let bad = json!({"namespace": "kinds", "procedure": "adhoc", "steps": [{"call": "nosuch.x"}, {"call": "test.echo", "input": "{"}]});
    let r = env
        .http
        .post(&url)
        .bearer_auth(&env.admin_key)
        .json(&bad)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 422);
    let details = r.json::<Value>().await?["error"]["details"].to_string();
    assert!(
        details.contains("inline.steps[0].call") && details.contains("inline.steps[1].input"),
        "{details}"
    );
    let r = env
        .http
        .post(&url)
        .bearer_auth(&env.admin_key)
        .json(&json!({"namespace": "kinds", "procedure": "refuse", "run_as": "nobody"}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 422, "run_as must name a principal");
    // A producer may not send trusted requests, nor trusted fields to the queued endpoint.
    let r = env
        .http
        .post(&url)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 403);
    let r = env
        .http
        .post(format!("{}/v1/requests", qm.url))
        .bearer_auth(&env.admin_key)
        .json(&body)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}
