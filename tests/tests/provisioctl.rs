//! End-to-end: the real `provisioctl` binary against a real queue manager (and engine and
//! auditor where a command needs them): each command's table and JSON output, its errors on
//! stderr with the API's code, and its exit code. Routes this branch's queue manager does not
//! serve yet (dead letters, resume, pools) are checked against a stand-in server recording
//! what the client sent.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use provisio_tests::{TestEnv, binary, demo_namespace, eventually};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

type R = anyhow::Result<()>;

/// One run of the client.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or(Value::Null)
    }
}

async fn run(url: &str, key: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Out> {
    let mut cmd = tokio::process::Command::new(binary("provisioctl"));
    cmd.args(["--url", url, "--api-key", key])
        .args(args)
        .env_remove("PROVISIO_URL")
        .env_remove("PROVISIO_API_KEY")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).await?;
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_mins(2), child.wait_with_output()).await??;
    Ok(Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The first data row of a table whose first cell is `first`, split on runs of spaces.
fn row<'a>(table: &'a str, first: &str) -> Option<Vec<&'a str>> {
    table
        .lines()
        .skip(1)
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
        })
        .find(|cells| cells.first() == Some(&first))
}

/// The cells of the `n`th data row of a table.
fn nth_row(table: &str, n: usize) -> Vec<&str> {
    table
        .lines()
        .nth(n + 1)
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn apply_dry_runs_uploads_and_namespaces_are_listed() -> R {
    let env = TestEnv::new("ctl-apply").await?;
    let qm = env.queue_manager().await?;
    let (url, key) = (qm.url.as_str(), env.admin_key.as_str());
    let demo = demo_namespace();

    // A dry run checks here and stores nothing.
    let out = run(url, key, &["apply", "--dry-run", "-f", "-"], Some(&demo)).await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("demo: would apply"), "{out:?}");
    let out = run(url, key, &["get", "namespaces", "-o", "json"], None).await?;
    assert_eq!(out.json(), json!({"namespaces": []}), "{out:?}");
    // A dry run finds what the server would: an unknown action of a built-in provider.
    let bad = r#"{"namespace": "bad", "procedures": {"p": {"steps": [{"call": "test.nope"}]}}}"#;
    let out = run(url, key, &["apply", "--dry-run", "-f", "-"], Some(bad)).await?;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stdout.contains("bad: rejected") && out.stdout.contains("procedures.p.steps[0].call"),
        "{out:?}"
    );
    assert!(out.stderr.starts_with("error: "), "{out:?}");
    // Refused by the server: the API's code on stderr, exit 3.
    let out = run(url, key, &["apply", "-f", "-"], Some(bad)).await?;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr.contains("invalid: namespace is invalid"),
        "{out:?}"
    );

    // Applied from standard input, then from a file: unchanged.
    let out = run(url, key, &["apply", "-f", "-"], Some(&demo)).await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("demo: applied version 1"), "{out:?}");
    let file = std::env::temp_dir().join(format!("pvctl-{}.yaml", env.prefix));
    std::fs::write(&file, &demo)?;
    let path = file.to_string_lossy().into_owned();
    let out = run(url, key, &["apply", "-f", &path, "-o", "json"], None).await?;
    std::fs::remove_file(&file)?;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()[0]["answer"]["changed"], false, "{out:?}");

    let out = run(url, key, &["get", "namespaces"], None).await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("NAME"), "{out:?}");
    let demo_row = row(&out.stdout, "demo").unwrap_or_default();
    assert_eq!(demo_row.get(1), Some(&"1"), "{out:?}");
    let out = run(url, key, &["get", "namespaces", "-o", "json"], None).await?;
    assert_eq!(out.json()["namespaces"][0]["name"], "demo", "{out:?}");
    let out = run(url, key, &["get", "namespace", "demo", "-o", "json"], None).await?;
    assert_eq!(out.json()["document"]["namespace"], "demo", "{out:?}");
    let out = run(url, key, &["get", "namespace", "demo"], None).await?;
    assert!(out.stdout.starts_with("VERSION"), "{out:?}");

    // Not found, usage, refused, unreachable: distinct exit codes.
    let out = run(url, key, &["get", "namespace", "nope"], None).await?;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("error: not_found:"), "{out:?}");
    let out = run(url, key, &["apply"], None).await?;
    assert_eq!(out.code, 1, "{out:?}");
    let out = run(url, key, &["apply", "-f", "/nonexistent/x.yaml"], None).await?;
    assert_eq!(out.code, 1, "{out:?}");
    let out = run(url, "wrong-key", &["get", "namespaces"], None).await?;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("error: unauthorized:"), "{out:?}");
    let out = run("http://127.0.0.1:9", key, &["get", "namespaces"], None).await?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("cannot reach"), "{out:?}");
    drop(qm);
    env.cleanup().await;
    Ok(())
}

/// The failed request is audited; describe shows steps, rollbacks and audit rows; a success
/// at the default audit level is not audited, and describe says so.
async fn describe_shows_steps_rollbacks_and_audit(
    url: &str,
    key: &str,
    broken: &str,
    odd: &str,
) -> R {
    eventually(Duration::from_mins(1), "the audit row", || async {
        let out = run(
            url,
            key,
            &["get", "audit", "--request-id", broken, "-o", "json"],
            None,
        )
        .await?;
        Ok(out.json()["transactions"]
            .as_array()
            .is_some_and(|t| !t.is_empty())
            .then_some(()))
    })
    .await?;
    let out = run(
        url,
        key,
        &["get", "audit", "--outcome", "rolled_back"],
        None,
    )
    .await?;
    assert_eq!(nth_row(&out.stdout, 0).get(1), Some(&broken), "{out:?}");
    let out = run(url, key, &["describe", "request", broken], None).await?;
    assert_eq!(out.code, 0, "{out:?}");
    let text = &out.stdout;
    for want in [
        "Status:    failed",
        "Error:     quota_exceeded: no room left",
        "Steps:",
        "test.fail",
        "Rollbacks:",
        "rolled_back",
        "Audit:",
        "Errors:",
        "quota_exceeded",
    ] {
        assert!(text.contains(want), "`{want}` missing from:\n{text}");
    }
    let rollbacks = text
        .split("Rollbacks:")
        .nth(1)
        .and_then(|t| t.split("Audit:").next())
        .unwrap_or("");
    assert_eq!(
        rollbacks.matches("rolled_back").count(),
        2,
        "the two steps done were undone:\n{text}"
    );
    let out = run(
        url,
        key,
        &["describe", "request", broken, "-o", "json"],
        None,
    )
    .await?;
    let v = out.json();
    assert_eq!(v["request"]["id"], broken, "{out:?}");
    assert_eq!(v["audit"][0]["outcome"], "rolled_back", "{out:?}");
    assert!(
        v["audit"][0]["errors"]
            .as_array()
            .is_some_and(|e| !e.is_empty()),
        "{out:?}"
    );
    // A success at the default audit level is not audited; describe says so.
    let out = run(url, key, &["describe", "request", odd], None).await?;
    assert!(out.stdout.contains("(not audited"), "{out:?}");
    Ok(())
}

/// Cancel: a scheduled request is cancelled, a finished one is a conflict. Trusted
/// submissions go to their own route; --run-as needs --trusted.
async fn cancel_and_trusted_submissions(url: &str, key: &str) -> R {
    let out = run(
        url,
        key,
        &[
            "submit",
            "demo",
            "hello",
            "--input",
            r#"{"name": "Later"}"#,
            "--id",
            "later",
            "--not-before",
            "2999-01-01T00:00:00Z",
        ],
        None,
    )
    .await?;
    assert_eq!(
        row(&out.stdout, "later").unwrap_or_default().get(1),
        Some(&"scheduled"),
        "{out:?}"
    );
    let out = run(url, key, &["cancel", "later", "-o", "json"], None).await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["status"], "cancelled", "{out:?}");
    let out = run(url, key, &["cancel", "later"], None).await?;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("error: conflict:"), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");

    // Trusted submissions go to their own route; --run-as needs --trusted.
    let out = run(
        url,
        key,
        &[
            "submit",
            "demo",
            "hello",
            "--trusted",
            "--run-as",
            "nobody",
            "--input",
            r#"{"name": "T"}"#,
        ],
        None,
    )
    .await?;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr
            .contains("`run_as`: no enabled principal `nobody`"),
        "{out:?}"
    );
    let out = run(
        url,
        key,
        &["submit", "demo", "hello", "--run-as", "x"],
        None,
    )
    .await?;
    assert_eq!(out.code, 1, "{out:?}");
    Ok(())
}

/// Errors: not found, refused input, usage.
async fn errors_have_their_exit_codes(url: &str, key: &str) -> R {
    let out = run(url, key, &["get", "request", "nope"], None).await?;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .contains("error: not_found: request `nope` does not exist"),
        "{out:?}"
    );
    let out = run(url, key, &["describe", "request", "nope"], None).await?;
    assert_eq!(out.code, 2, "{out:?}");
    let out = run(
        url,
        key,
        &["submit", "demo", "hello", "--priority", "urgent"],
        None,
    )
    .await?;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("error: malformed:"), "{out:?}");
    let out = run(
        url,
        key,
        &["submit", "demo", "hello", "--input", "{nope"],
        None,
    )
    .await?;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("--input is not JSON"), "{out:?}");
    Ok(())
}

#[tokio::test]
async fn requests_are_submitted_listed_described_and_cancelled() -> R {
    let env = TestEnv::new("ctl-requests").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let auditor = env
        .spawn(
            "worker",
            &["--role", "auditor"],
            &[
                ("PROVISIO_AUDITOR__INTERVAL_MS", "200"),
                ("PROVISIO_AUDITOR__SWEEP_MIN_AGE_SECONDS", "0"),
            ],
        )
        .await?;
    assert_eq!(env.apply(&qm, "demo", &demo_namespace()).await?.0, 201);
    let (url, key) = (qm.url.as_str(), env.admin_key.as_str());

    // An id that needs escaping in a path.
    let odd = "ord/1 x?y#z%:";
    let out = run(
        url,
        key,
        &[
            "submit",
            "demo",
            "hello",
            "--input",
            r#"{"name": "Ada"}"#,
            "--id",
            odd,
            "--wait",
            "30",
        ],
        None,
    )
    .await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("ID"), "{out:?}");
    assert!(out.stdout.contains("succeeded"), "{out:?}");
    let out = run(url, key, &["get", "request", odd, "-o", "json"], None).await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["id"], odd);
    assert_eq!(out.json()["output"]["message"], "hello, Ada", "{out:?}");
    let out = run(url, key, &["get", "request", odd], None).await?;
    let cells = row(&out.stdout, odd).unwrap_or_default();
    assert_eq!(cells.get(3), Some(&"succeeded"), "{out:?}");

    // Without --wait: accepted, then finished.
    let out = run(url, key, &["submit", "demo", "broken", "-o", "json"], None).await?;
    assert_eq!(out.code, 0, "{out:?}");
    let broken = out.json()["id"].as_str().unwrap_or_default().to_owned();
    assert!(!broken.is_empty(), "{out:?}");
    eventually(
        Duration::from_mins(1),
        "the broken request to fail",
        || async {
            let out = run(url, key, &["get", "request", &broken, "-o", "json"], None).await?;
            Ok((out.json()["status"] == "failed").then_some(()))
        },
    )
    .await?;

    // Lists with filters; the next page is hinted on stderr.
    let out = run(
        url,
        key,
        &[
            "get",
            "requests",
            "--namespace",
            "demo",
            "--status",
            "succeeded",
            "-o",
            "json",
        ],
        None,
    )
    .await?;
    let listed = out.json()["requests"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(listed.len(), 1, "{out:?}");
    assert_eq!(listed[0]["id"], odd);
    let out = run(url, key, &["get", "requests", "--limit", "1"], None).await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout.lines().count(),
        2,
        "a header and one row: {out:?}"
    );
    assert!(out.stderr.contains("more: --after"), "{out:?}");
    let out = run(url, key, &["get", "requests", "--status", "bogus"], None).await?;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("error: malformed:"), "{out:?}");

    describe_shows_steps_rollbacks_and_audit(url, key, &broken, odd).await?;
    cancel_and_trusted_submissions(url, key).await?;
    errors_have_their_exit_codes(url, key).await?;
    drop((auditor, engine, qm));
    env.cleanup().await;
    Ok(())
}

const DOUBT: &str = r#"
namespace: doubt
procedures:
  fragile:
    access: public
    transaction: compensating
    steps:
      - {call: test.echo, input: '{n: 1}'}
      - {call: test.echo, input: '{n: 2, fail_rollback_while: .input.flag}'}
      - {call: test.fail, input: '{code: "boom"}'}
"#;

/// Resolved by hand; again is a conflict; a note is required; a bad id is refused; then
/// nothing is in doubt any more.
async fn resolved_by_hand(url: &str, key: &str, tx: &str) -> R {
    let out = run(url, key, &["resolve", tx], None).await?;
    assert_eq!(out.code, 1, "{out:?}");
    let out = run(
        url,
        key,
        &[
            "resolve",
            tx,
            "--note",
            "removed by hand, OPS-7",
            "--wait",
            "30",
            "-o",
            "json",
        ],
        None,
    )
    .await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["kind"], "resolve", "{out:?}");
    assert_eq!(
        out.json()["result"]["transaction_status"],
        "rolled_back",
        "{out:?}"
    );
    let out = run(url, key, &["resolve", tx, "--note", "again"], None).await?;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("error: conflict:"), "{out:?}");
    let out = run(url, key, &["retry-rollback", "not-a-uuid"], None).await?;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("error: malformed:"), "{out:?}");
    let out = run(url, key, &["get", "transactions", "-o", "json"], None).await?;
    assert_eq!(out.json(), json!({"transactions": []}), "{out:?}");
    Ok(())
}

#[tokio::test]
async fn in_doubt_transactions_are_listed_retried_and_resolved() -> R {
    let env = TestEnv::new("ctl-doubt").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let auditor = env
        .spawn(
            "worker",
            &["--role", "auditor"],
            &[("PROVISIO_AUDITOR__INTERVAL_MS", "200")],
        )
        .await?;
    env.apply(&qm, "doubt", DOUBT).await?;
    let (url, key) = (qm.url.as_str(), env.admin_key.as_str());
    let pg = env.pg().await?;
    pg.execute(
        "INSERT INTO provider_test.counters (key, calls) VALUES ('broken-a', 1), ('broken-b', 1)",
        &[],
    )
    .await?;
    let mut ids = Vec::new();
    for flag in ["broken-a", "broken-b"] {
        let input = json!({"flag": flag}).to_string();
        let out = run(
            url,
            key,
            &[
                "submit", "doubt", "fragile", "--input", &input, "-o", "json",
            ],
            None,
        )
        .await?;
        assert_eq!(out.code, 0, "{out:?}");
        ids.push(out.json()["id"].as_str().unwrap_or_default().to_owned());
    }
    let listed = eventually(
        Duration::from_mins(1),
        "two in-doubt transactions",
        || async {
            let out = run(url, key, &["get", "transactions", "-o", "json"], None).await?;
            let l = out.json()["transactions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            Ok((l.len() == 2).then_some(l))
        },
    )
    .await?;
    let tx_of = |id: &str| {
        listed
            .iter()
            .find(|t| t["request_id"] == id)
            .and_then(|t| t["id"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let (tx_a, tx_b) = (tx_of(&ids[0]), tx_of(&ids[1]));
    let out = run(url, key, &["get", "transactions"], None).await?;
    assert!(out.stdout.starts_with("ID"), "{out:?}");
    let cells = row(&out.stdout, &tx_a).unwrap_or_default();
    assert_eq!(cells.get(1), Some(&ids[0].as_str()), "{out:?}");
    assert!(cells.contains(&"1"), "one step not undone: {out:?}");

    // Retried while still broken: still in doubt; fixed: rolled back.
    let out = run(url, key, &["retry-rollback", &tx_a, "--wait", "30"], None).await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(nth_row(&out.stdout, 0).last(), Some(&"in_doubt"), "{out:?}");
    pg.execute(
        "DELETE FROM provider_test.counters WHERE key = 'broken-a'",
        &[],
    )
    .await?;
    let out = run(
        url,
        key,
        &[
            "retry-rollback",
            &tx_a,
            "--note",
            "provider fixed",
            "--wait",
            "30",
            "-o",
            "json",
        ],
        None,
    )
    .await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.json()["result"]["transaction_status"],
        "rolled_back",
        "{out:?}"
    );

    resolved_by_hand(url, key, &tx_b).await?;
    drop((auditor, engine, qm));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn principals_and_keys_are_managed() -> R {
    let env = TestEnv::new("ctl-principals").await?;
    let qm = env
        .spawn(
            "queue-manager",
            &[],
            &[("PROVISIO_QUEUE_MANAGER__KEY_CACHE_SECONDS", "0")],
        )
        .await?;
    let (url, key) = (qm.url.as_str(), env.admin_key.as_str());
    let out = run(
        url,
        key,
        &[
            "principals",
            "create",
            "alice",
            "--group",
            "producers",
            "--group",
            "trusted-users",
        ],
        None,
    )
    .await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("ID"), "{out:?}");
    assert!(out.stdout.contains("producers,trusted-users"), "{out:?}");
    let out = run(url, key, &["principals", "create", "alice"], None).await?;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("error: conflict:"), "{out:?}");
    let out = run(
        url,
        key,
        &["principals", "groups", "alice", "producers", "-o", "json"],
        None,
    )
    .await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.json(),
        json!({"name": "alice", "groups": ["producers"]})
    );
    let out = run(
        url,
        key,
        &["principals", "groups", "nobody", "producers"],
        None,
    )
    .await?;
    assert_eq!(out.code, 2, "{out:?}");

    let out = run(url, key, &["keys", "create", "alice", "-o", "json"], None).await?;
    assert_eq!(out.code, 0, "{out:?}");
    let (key_id, alice_key) = (
        out.json()["id"].as_str().unwrap_or_default().to_owned(),
        out.json()["key"].as_str().unwrap_or_default().to_owned(),
    );
    let out = run(url, &alice_key, &["get", "requests"], None).await?;
    assert_eq!(out.code, 0, "alice's key works: {out:?}");
    assert_eq!(
        out.stdout.trim(),
        "ID  NAMESPACE  PROCEDURE  STATUS  ATTEMPTS  SUBMITTED  FINISHED  ERROR"
    );
    let out = run(url, &alice_key, &["get", "namespaces"], None).await?;
    assert_eq!(out.code, 3, "not an admin: {out:?}");
    assert!(out.stderr.contains("error: forbidden:"), "{out:?}");
    let out = run(url, key, &["keys", "revoke", "alice", &key_id], None).await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        row(&out.stdout, &key_id).unwrap_or_default().get(1),
        Some(&"true"),
        "{out:?}"
    );
    let out = run(url, &alice_key, &["get", "requests"], None).await?;
    assert_eq!(out.code, 3, "a revoked key is refused: {out:?}");
    let out = run(url, key, &["keys", "create", "nobody"], None).await?;
    assert_eq!(out.code, 2, "{out:?}");
    grants_and_expiring_keys(url, key).await?;
    drop(qm);
    env.cleanup().await;
    Ok(())
}

/// Own grants, shown and set; keys with an expiry.
async fn grants_and_expiring_keys(url: &str, key: &str) -> R {
    let set = ["principals", "grants", "alice", "--set", "execute_private"];
    let out = run(url, key, &[&set[..], &["-o", "json"]].concat(), None).await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["grants"], json!(["execute_private"]), "{out:?}");
    let out = run(url, key, &["principals", "grants", "alice"], None).await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("execute_private"), "{out:?}");
    let out = run(
        url,
        key,
        &["principals", "grants", "alice", "--set", "root"],
        None,
    )
    .await?;
    assert_ne!(out.code, 0, "an unknown permission: {out:?}");
    let ttl = [
        "keys",
        "create",
        "alice",
        "--ttl-seconds",
        "600",
        "-o",
        "json",
    ];
    let out = run(url, key, &ttl, None).await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.json()["expires_at"].is_string(), "{out:?}");
    Ok(())
}

#[tokio::test]
async fn a_bulk_submission_of_ten_thousand_lines_ends_with_a_summary() -> R {
    let env = TestEnv::new("ctl-bulk").await?;
    let qm = env.queue_manager().await?;
    assert_eq!(env.apply(&qm, "demo", &demo_namespace()).await?.0, 201);
    let (url, key) = (qm.url.as_str(), env.admin_key.as_str());
    // 10,000 lines: two malformed, two with an unknown priority (400), one with too many
    // retries (422), one for a namespace that does not exist (404), one blank (skipped); the
    // rest accepted.
    let mut text = String::new();
    for n in 1..=10_000 {
        let line = match n {
            17 => "not json".to_owned(),
            4242 => "[1, 2]".to_owned(),
            100 | 200 => json!({"namespace": "demo", "procedure": "hello", "priority": "urgent", "input": {"name": "x"}}).to_string(),
            300 => json!({"namespace": "demo", "procedure": "hello", "retry": {"count": 101, "interval_ms": 10, "on_exhausted": "fail"}, "input": {"name": "x"}}).to_string(),
            5000 => json!({"namespace": "nope", "procedure": "hello", "input": {"name": "x"}}).to_string(),
            777 => String::new(),
            _ => json!({"namespace": "demo", "procedure": "hello", "id": format!("bulk-{n}"), "input": {"name": format!("user{n}")}}).to_string(),
        };
        text.push_str(&line);
        text.push('\n');
    }
    let file = std::env::temp_dir().join(format!("pvctl-bulk-{}.jsonl", env.prefix));
    std::fs::write(&file, &text)?;
    let path = file.to_string_lossy().into_owned();
    let started = std::time::Instant::now();
    let out = run(url, key, &["submit", "--bulk", &path, "--progress"], None).await?;
    let took = started.elapsed();
    std::fs::remove_file(&file)?;
    eprintln!("10,000 lines submitted in {took:?}");
    assert_eq!(out.code, 5, "{out:?}");
    let first: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        first,
        [
            "lines: 9999, accepted: 9993, refused: 4, unreachable: 0, malformed: 2",
            "refused by status: 400: 2, 404: 1, 422: 1",
            "malformed lines: 17, 4242",
        ],
        "{out:?}"
    );
    for want in [
        "error: line 100: 400 malformed:",
        "error: line 300: 422 invalid:",
        "error: line 5000: 404 not_found:",
        "error: line 17: malformed:",
        "error: line 4242: malformed: not a JSON object",
        "progress: 9997/9997 submitted",
    ] {
        assert!(
            out.stderr.contains(want),
            "`{want}` missing: {}",
            out.stderr
        );
    }
    let pg = env.pg().await?;
    let stored: i64 = pg
        .query_one("SELECT count(*) FROM requests WHERE id LIKE 'bulk-%'", &[])
        .await?
        .get(0);
    assert_eq!(stored, 9993);

    // Again, through `:batch` in chunks of two, as JSON: the same ids and bodies are accepted
    // again (idempotent), and stdin works.
    let few: String = (1..=3)
        .map(|n| {
            json!({"namespace": "demo", "procedure": "hello", "id": format!("bulk-{n}"), "input": {"name": format!("user{n}")}})
                .to_string()
                + "\n"
        })
        .collect();
    let out = run(
        url,
        key,
        &["submit", "--bulk", "-", "--chunk", "2", "-o", "json"],
        Some(&few),
    )
    .await?;
    assert_eq!(out.code, 0, "{out:?}");
    let v = out.json();
    assert_eq!(
        (
            v["lines"].as_u64(),
            v["accepted"].as_u64(),
            v["refused"].as_u64()
        ),
        (Some(3), Some(3), Some(0)),
        "{out:?}"
    );
    assert!(
        !out.stderr.contains("progress"),
        "no progress unless asked off a terminal: {out:?}"
    );
    // Nothing reachable: exit 4.
    let out = run(
        "http://127.0.0.1:9",
        key,
        &["submit", "--bulk", "-"],
        Some(&few),
    )
    .await?;
    assert_eq!(out.code, 4, "{out:?}");
    drop(qm);
    env.cleanup().await;
    Ok(())
}

/// What the stand-in server received: method, path with query, body.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// A stand-in for the routes of the dead-letter, resume and pool API: records each call and
/// answers like the real handlers.
async fn stand_in() -> anyhow::Result<(String, Seen, tokio::task::JoinHandle<()>)> {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().fallback(
        move |method: axum::http::Method, uri: axum::http::Uri, body: String| {
            let record = record.clone();
            async move {
                let path = uri.path_and_query().map(ToString::to_string).unwrap_or_default();
                if let Ok(mut s) = record.lock() {
                    s.push((method.to_string(), path.clone(), body));
                }
                let p = uri.path();
                let answer = if p == "/v1/dead-letters" {
                    json!({"dead_letters": [{"id": 7, "request_id": "r-1", "namespace": "demo", "procedure": "hello", "reason": "expired", "status": "dead", "dead_at": "2025-01-01T00:00:00.5Z"}], "next": null})
                } else if p == "/v1/dead-letters:requeue" {
                    json!({"requeued": [{"id": 7, "request_id": "r-1", "request_status": "queued"}], "skipped": [{"id": 8, "reason": "carried credentials"}], "more": false})
                } else if p.ends_with(":requeue") {
                    json!({"dead_letter": {"id": 7, "status": "requeued"}, "request": {"id": "r-1", "status": "queued"}})
                } else if p.starts_with("/v1/dead-letters/") {
                    json!({"id": 7, "deleted": true})
                } else if p.ends_with(":resume") {
                    json!({"id": "a/b:c", "namespace": "demo", "procedure": "hello", "status": "queued", "attempts": 1, "submitted_at": "2025-01-01T00:00:00Z"})
                } else if p == "/v1/resources/pools" {
                    json!({"pools": [{"name": "ips", "strategy": "spread", "capacity": 10, "used": 4, "free": 6, "resources": [{"name": "a"}, {"name": "b"}]}]})
                } else {
                    return (axum::http::StatusCode::NOT_FOUND, axum::Json(json!({"error": {"code": "not_found", "message": "no such route"}})));
                };
                (axum::http::StatusCode::OK, axum::Json(answer))
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, seen, server))
}

#[tokio::test]
async fn dead_letter_resume_and_pool_commands_call_their_routes() -> R {
    let (url, seen, server) = stand_in().await?;
    let key = "k";
    let out = run(
        &url,
        key,
        &["get", "dead-letters", "--reason", "expired", "--limit", "5"],
        None,
    )
    .await?;
    assert_eq!(out.code, 0, "{out:?}");
    let cells = row(&out.stdout, "7").unwrap_or_default();
    assert_eq!(
        cells,
        [
            "7",
            "r-1",
            "demo",
            "hello",
            "expired",
            "dead",
            "2025-01-01T00:00:00Z"
        ],
        "{out:?}"
    );
    let out = run(&url, key, &["requeue", "7"], None).await?;
    assert_eq!(
        row(&out.stdout, "7").unwrap_or_default(),
        ["7", "r-1", "queued"],
        "{out:?}"
    );
    let out = run(
        &url,
        key,
        &["requeue", "--all", "--reason", "expired"],
        None,
    )
    .await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        row(&out.stdout, "7").unwrap_or_default(),
        ["7", "r-1", "queued"],
        "{out:?}"
    );
    assert!(
        out.stderr
            .contains("skipped: dead letter 8: carried credentials"),
        "{out:?}"
    );
    let out = run(&url, key, &["requeue"], None).await?;
    assert_eq!(out.code, 1, "an id or --all: {out:?}");
    let out = run(&url, key, &["requeue", "7", "--reason", "x"], None).await?;
    assert_eq!(out.code, 1, "--reason goes with --all: {out:?}");
    let out = run(
        &url,
        key,
        &["delete", "dead-letter", "7", "-o", "json"],
        None,
    )
    .await?;
    assert_eq!(out.json(), json!({"id": 7, "deleted": true}), "{out:?}");
    let out = run(&url, key, &["resume", "a/b:c"], None).await?;
    assert_eq!(
        row(&out.stdout, "a/b:c").unwrap_or_default().get(3),
        Some(&"queued"),
        "{out:?}"
    );
    let out = run(&url, key, &["get", "pools"], None).await?;
    assert_eq!(
        out.stdout,
        "NAME  STRATEGY  CAPACITY  USED  FREE  RESOURCES\nips   spread    10        4     6     2\n"
    );
    let out = run(&url, key, &["get", "pools", "-o", "json"], None).await?;
    assert_eq!(out.json()["pools"][0]["name"], "ips", "{out:?}");
    let seen: Vec<(String, String, String)> = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let calls: Vec<(&str, &str, &str)> = seen
        .iter()
        .map(|(m, p, b)| (m.as_str(), p.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        calls,
        [
            ("GET", "/v1/dead-letters?reason=expired&limit=5", ""),
            ("POST", "/v1/dead-letters/7:requeue", ""),
            (
                "POST",
                "/v1/dead-letters:requeue",
                r#"{"reason":"expired"}"#
            ),
            ("DELETE", "/v1/dead-letters/7", ""),
            ("POST", "/v1/requests/a%2Fb%3Ac:resume", ""),
            ("GET", "/v1/resources/pools", ""),
            ("GET", "/v1/resources/pools", ""),
        ]
    );
    server.abort();
    Ok(())
}
