//! End-to-end: `ops/up` supervises its fleet. An engine killed with SIGKILL is reported and
//! restarted on its own port while the rest of the fleet keeps serving, and Ctrl-C (SIGINT)
//! still stops everything and exits 0.
//!
//! ops/up runs against this test's own database, AMQP prefix, state directory and ports, with
//! the debug binaries, so it never touches a developer's `.provisio/` or fleet.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use provisio_tests::{TestEnv, request};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Kills ops/up's whole process group (ops/up and every process it started), drops the
/// test's database and AMQP names and removes its state directory, also when the test fails
/// half-way (the failure carries ops/up's output, with the tails of the logs it reported).
struct Guard {
    pgid: Option<u32>,
    env: Option<TestEnv>,
    dir: Option<PathBuf>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pgid}")])
                .stderr(Stdio::null())
                .status();
        }
        if let Some(env) = self.env.take() {
            // Drop may run inside the test's runtime, which cannot be blocked on: clean up on
            // a runtime of its own.
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    rt.block_on(env.cleanup());
                }
            })
            .join();
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A port base whose ports (engines on +1 and +2, auditor +9, mail platform +100) are free.
fn free_port_base() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let r = u16::try_from(uuid::Uuid::new_v4().as_u128() % 30_000)?;
        let base = 20_000 + r;
        let free = [1, 2, 9, 100]
            .iter()
            .all(|off| TcpListener::bind(("127.0.0.1", base + off)).is_ok());
        if free {
            return Ok(base);
        }
    }
    bail!("no free port base found")
}

fn alive(pid: u32) -> bool {
    // A zombie has ended; only its parent has not collected it yet.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

fn read_pid(state: &Path, name: &str) -> Option<u32> {
    std::fs::read_to_string(state.join("pids").join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn output(out: &Path) -> String {
    std::fs::read_to_string(out).unwrap_or_default()
}

async fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .await?;
    ensure!(status.success(), "kill -{sig} {pid}: {status}");
    Ok(())
}

/// Polls `check` every 200 ms until it yields a value; fails after `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("gave up after {limit:?} waiting for {what}");
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (bounded) until NAME runs again under a new pid and READYZ answers 200; the new pid.
async fn comes_back(
    http: &reqwest::Client,
    state: &Path,
    name: &str,
    old: u32,
    readyz: &str,
) -> anyhow::Result<u32> {
    eventually(
        Duration::from_mins(1),
        &format!("{name} to come back"),
        || {
            let pid = read_pid(state, name);
            let http = http.clone();
            let readyz = readyz.to_owned();
            async move {
                let pid = pid.filter(|&p| p != old && alive(p))?;
                let resp = http.get(&readyz).send().await.ok()?;
                (resp.status() == 200).then_some(pid)
            }
        },
    )
    .await
}

/// Submits `demo.hello` and waits for its outcome; the record, or why it did not succeed.
async fn hello(http: &reqwest::Client, url: &str, key: &str, name: &str) -> anyhow::Result<Value> {
    let resp = http
        .post(format!("{url}/v1/requests?wait=30"))
        .bearer_auth(key)
        .json(&request("demo", "hello", json!({ "name": name })))
        .send()
        .await?;
    let status = resp.status().as_u16();
    let rec: Value = resp.json().await.unwrap_or(Value::Null);
    ensure!(status == 200, "demo.hello for {name}: HTTP {status} {rec}");
    ensure!(rec["status"] == "succeeded", "demo.hello for {name}: {rec}");
    ensure!(
        rec["output"]["message"] == format!("hello, {name}"),
        "{rec}"
    );
    Ok(rec)
}

#[expect(
    clippy::too_many_lines,
    reason = "one ops/up session from start to SIGINT: the steps act on the same supervised processes in order"
)]
#[tokio::test]
async fn ops_up_restarts_a_killed_engine_and_stops_cleanly_on_sigint() -> anyhow::Result<()> {
    let env = TestEnv::new("ops_up").await?;
    let (db_url, amqp_url, prefix, http) = (
        env.db_url.clone(),
        env.amqp_url.clone(),
        env.prefix.clone(),
        env.http.clone(),
    );
    let root = std::env::temp_dir().join(format!("provisio-ops-up-{prefix}"));
    let mut guard = Guard {
        pgid: None,
        env: Some(env),
        dir: Some(root.clone()),
    };
    let state = root.join("state");
    std::fs::create_dir_all(&root)?;
    let out = root.join("ops-up.out");
    let bin_dir = provisio_tests::binary("worker")
        .parent()
        .context("binary directory")?
        .to_owned();
    let base = free_port_base()?;
    let out_file = std::fs::File::create(&out)?;
    // SIGINT back to its default first: a test run started in the background of a
    // non-interactive shell inherits SIGINT ignored, and a shell cannot trap a signal ignored
    // on entry, so ops/up would never see the Ctrl-C this test sends.
    let mut up: Child = Command::new("env")
        .arg("--default-signal=INT")
        .arg(repo().join("ops/up"))
        .args(["--no-build", "--engines", "2"])
        .current_dir(repo())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::var("HOME").unwrap_or_default())
        .env("PROVISIO_STATE_DIR", &state)
        .env("PROVISIO_BIN_DIR", &bin_dir)
        .env("PROVISIO_PORT_BASE", base.to_string())
        .env("PROVISIO_DATABASE_URL", &db_url)
        .env("PROVISIO_AMQP_URL", &amqp_url)
        .env("PROVISIO_AMQP__PREFIX", &prefix)
        .env("PROVISIO_QUEUE_MANAGER__LISTEN", "127.0.0.1:0")
        .env("PROVISIO_DATABASE__POOL_SIZE", "8")
        .env("PROVISIO_TXLOG__POOL_SIZE", "8")
        .stdin(Stdio::null())
        .stdout(out_file.try_clone()?)
        .stderr(out_file)
        // Its own process group, so that the guard can end the whole fleet.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .context("starting ops/up")?;
    guard.pgid = up.id();
    let up_pid = up.id().context("ops/up pid")?;

    let result = async {
        // Serving: the banner is printed once the namespaces are applied.
        let url = eventually(Duration::from_mins(3), "ops/up to start the fleet", || {
            let started = output(&out);
            let exited = up.try_wait().ok().flatten();
            async move {
                if let Some(status) = exited {
                    return Some(Err(anyhow::anyhow!(
                        "ops/up exited during start-up: {status}"
                    )));
                }
                started.contains("press Ctrl-C to stop").then(|| {
                    started
                        .lines()
                        .find_map(|l| l.trim().strip_prefix("URL:"))
                        .map(|u| u.trim().to_owned())
                        .context("no URL line")
                })
            }
        })
        .await??;
        let key = std::fs::read_to_string(state.join("admin-key"))?
            .trim()
            .to_owned();
        hello(&http, &url, &key, "before").await?;

        let names = [
            "queue-manager",
            "engine-1",
            "engine-2",
            "auditor",
            "mailplatform",
        ];
        let mut pids = Vec::new();
        for name in names {
            let pid = read_pid(&state, name).with_context(|| format!("no pid file for {name}"))?;
            ensure!(alive(pid), "{name} (pid {pid}) does not run");
            pids.push(pid);
        }
        let (old, other) = (pids[1], pids[2]);

        signal(old, "KILL").await?;
        // The fleet keeps serving while engine-1 is down or restarting.
        for i in 0..3 {
            hello(&http, &url, &key, &format!("during-{i}")).await?;
        }

        let engine_1 = format!("http://127.0.0.1:{}/readyz", base + 1);
        let new = comes_back(&http, &state, "engine-1", old, &engine_1).await?;
        ensure!(!alive(old), "the killed engine-1 (pid {old}) still runs");
        ensure!(
            read_pid(&state, "engine-2") == Some(other) && alive(other),
            "engine-2 was not left alone"
        );
        let text = output(&out);
        ensure!(
            text.contains(&format!(
                "engine-1 (pid {old}) died: killed by SIGKILL (status 137)"
            )) && text.contains("restarting engine-1 in 1s"),
            "ops/up did not report the death:\n{text}"
        );
        ensure!(
            text.contains(&format!("restarted engine-1 (pid {new})")),
            "ops/up did not report the restart:\n{text}"
        );
        ensure!(
            !text.contains("stopping the fleet"),
            "ops/up stopped the fleet:\n{text}"
        );
        hello(&http, &url, &key, "after").await?;

        // Dying again soon after a restart doubles the back-off.
        signal(new, "KILL").await?;
        let newer = comes_back(&http, &state, "engine-1", new, &engine_1).await?;
        let text = output(&out);
        ensure!(
            text.contains(&format!("engine-1 (pid {new}) died"))
                && text.contains("restarting engine-1 in 2s"),
            "no doubled back-off:\n{text}"
        );
        pids[1] = newer;

        // The queue manager too, on the address it had (its configured port was 0).
        signal(pids[0], "KILL").await?;
        pids[0] = comes_back(
            &http,
            &state,
            "queue-manager",
            pids[0],
            &format!("{url}/readyz"),
        )
        .await?;
        hello(&http, &url, &key, "after-queue-manager").await?;

        // Ctrl-C: everything stops and ops/up exits 0.
        signal(up_pid, "INT").await?;
        let status = tokio::time::timeout(Duration::from_mins(2), up.wait())
            .await
            .context("ops/up did not exit within 2 minutes of SIGINT")??;
        ensure!(status.success(), "ops/up exited with {status}");
        for (name, pid) in names.iter().zip(&pids) {
            ensure!(
                !alive(*pid),
                "{name} (pid {pid}) still runs after ops/up exited"
            );
        }
        let left: Vec<_> = std::fs::read_dir(state.join("pids"))?.collect();
        ensure!(left.is_empty(), "pid files left: {left:?}");
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        bail!("{e:#}\nops/up output:\n{}", output(&out));
    }
    drop(guard);
    Ok(())
}
