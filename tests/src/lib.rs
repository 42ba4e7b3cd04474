//! Test harness for end-to-end tests and the benchmark: a fresh database and AMQP prefix per
//! test, and the real `queue-manager` and `worker` binaries started on free ports.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use provisio_shared::amqp::Topology;
use provisio_shared::config::{AmqpConfig, Secret};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub mod load;
pub mod measure;
pub mod proxy;
pub mod tls;

/// PostgreSQL server URL without a database name.
pub fn pg_base() -> String {
    std::env::var("PROVISIO_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The URL of database `name` on the test server. `PROVISIO_TEST_PG` may carry a query
/// (`…:5432?sslmode=disable`), which stays after the database name.
pub fn pg_url(name: &str) -> String {
    let base = pg_base();
    match base.split_once('?') {
        Some((server, query)) => format!("{}/{name}?{query}", server.trim_end_matches('/')),
        None => format!("{}/{name}", base.trim_end_matches('/')),
    }
}

pub fn amqp_url() -> String {
    std::env::var("PROVISIO_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn target_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps.
    let exe = std::env::current_exe().unwrap_or_default();
    let deps = exe.parent().map(PathBuf::from).unwrap_or_default();

    if deps.ends_with("deps") {
        deps.parent().map(PathBuf::from).unwrap_or(deps)
    } else {
        deps
    }
}

/// Builds the binaries once per test process, so `cargo test` alone never runs stale ones.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        if std::env::var("PROVISIO_TEST_NO_BUILD").is_ok() {
            return Ok(());
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let profile_release = target_dir().ends_with("release");
        let mut cmd = std::process::Command::new(cargo);
        cmd.args([
            "build",
            "--bins",
            "-p",
            "provisio-queue-manager",
            "-p",
            "provisio-worker",
        ]);
        if profile_release {
            cmd.arg("--release");
        }
        let status = cmd.status().map_err(|e| e.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("cargo build failed: {status}"))
        }
    });
    if let Err(e) = built {
        panic!("building the binaries: {e}");
    }
    target_dir().join(name)
}

/// A started binary. Killed when dropped.
pub struct Proc {
    pub child: Child,
    pub url: String,
    pub log: PathBuf,
}

impl Proc {
    /// Sends SIGTERM and waits for the exit code.
    pub async fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()?;
        }
        let status = tokio::time::timeout(Duration::from_mins(1), self.child.wait()).await??;
        Ok(status)
    }

    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// One test's world: its own database, AMQP prefix and keys.
pub struct TestEnv {
    pub name: String,
    pub db_url: String,
    pub prefix: String,
    pub amqp_url: String,
    pub signing_key: String,
    pub admin_key: String,
    pub http: reqwest::Client,
    pub extra_env: Vec<(String, String)>,
    /// Set by `cleanup`; otherwise `Drop` cleans up (a failing test leaves nothing behind).
    cleaned: bool,
}

impl TestEnv {
    pub async fn new(name: &str) -> anyhow::Result<Self> {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let db_url = pg_url(&format!("pv_{suffix}"));
        provisio_shared::db::create_database_if_missing(&Secret::new(db_url.clone())).await?;
        Ok(Self {
            name: name.to_owned(),
            db_url,
            prefix: format!("t{suffix}"),
            amqp_url: amqp_url(),
            signing_key: format!("sign-{suffix}"),
            admin_key: format!("admin-{suffix}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            extra_env: vec![("PROVISIO_PROVIDERS__TEST__ENABLED".into(), "true".into())],
            cleaned: false,
        })
    }

    pub fn env(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = [
            ("PROVISIO_DATABASE_URL", self.db_url.as_str()),
            ("PROVISIO_AMQP_URL", self.amqp_url.as_str()),
            ("PROVISIO_PREFIX", self.prefix.as_str()),
            ("PROVISIO_SIGNING_KEY", self.signing_key.as_str()),
            ("PROVISIO_BOOTSTRAP_ADMIN_KEY", self.admin_key.as_str()),
            ("PROVISIO_QUEUE_MANAGER__LISTEN", "127.0.0.1:0"),
            ("PROVISIO_ENGINE__LISTEN", "127.0.0.1:0"),
            ("PROVISIO_LOG__FORMAT", "text"),
            ("PROVISIO_DATABASE__POOL_SIZE", "8"),
            ("PROVISIO_TXLOG__POOL_SIZE", "8"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        v.extend(self.extra_env.iter().cloned());
        v
    }

    /// Starts a binary with this environment plus `overrides`, waiting for its ready line.
    pub async fn spawn(
        &self,
        bin: &str,
        args: &[&str],
        overrides: &[(&str, &str)],
    ) -> anyhow::Result<Proc> {
        let logs = target_dir().join("e2e-logs");
        std::fs::create_dir_all(&logs)?;
        // One file per process started, even for several of the same binary in one test.
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let log = logs.join(format!(
            "{}-{}-{}-{}-{}.log",
            self.name,
            bin,
            self.prefix,
            std::process::id(),
            STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(binary(bin));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env())
            .envs(overrides.iter().map(|(k, v)| (*k, *v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {bin}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let wait = async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("listening on ") {
                    return Ok::<_, anyhow::Error>(Some(url.to_owned()));
                }
            }
            Ok(None)
        };
        let url = match tokio::time::timeout(Duration::from_mins(2), wait).await {
            Ok(Ok(Some(url))) => url,
            other => {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("{bin} did not become ready ({other:?}); log:\n{text}");
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Proc { child, url, log })
    }

    pub async fn queue_manager(&self) -> anyhow::Result<Proc> {
        self.spawn("queue-manager", &[], &[]).await
    }

    pub async fn engine(&self) -> anyhow::Result<Proc> {
        self.spawn("worker", &["--role", "engine"], &[]).await
    }

    /// The value of a metric in `p`'s `/metrics`: `name` alone sums every series of the
    /// metric, whatever their labels (an unlabelled gauge is its value); `name{labels}` is that
    /// one series. `None` when the process serves no such series.
    pub async fn metric(&self, p: &Proc, name: &str) -> anyhow::Result<Option<f64>> {
        let text = self
            .http
            .get(format!("{}/metrics", p.url))
            .send()
            .await?
            .text()
            .await?;
        let mut found = None;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if rest.starts_with(' ') || rest.starts_with('{') {
                let v: f64 = rest.rsplit(' ').next().unwrap_or_default().parse()?;
                *found.get_or_insert(0.0) += v;
            }
        }
        Ok(found)
    }

    pub async fn pg(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.db_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    pub fn topology(&self) -> Topology {
        Topology::new(&AmqpConfig {
            prefix: self.prefix.clone(),
            ..AmqpConfig::default()
        })
    }

    /// Any admin API call as the bootstrap admin; returns (status, JSON body or null).
    pub async fn admin(
        &self,
        qm: &Proc,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", qm.url))
            .bearer_auth(&self.admin_key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// PUT a namespace document (YAML or JSON text) as admin; returns (status, body).
    pub async fn apply(&self, qm: &Proc, name: &str, text: &str) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .http
            .put(format!("{}/v1/namespaces/{name}", qm.url))
            .bearer_auth(&self.admin_key)
            .header("content-type", "application/yaml")
            .body(text.to_owned())
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// POST /v1/requests as admin; returns (status, body).
    pub async fn submit(&self, qm: &Proc, body: &Value) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .http
            .post(format!("{}/v1/requests", qm.url))
            .bearer_auth(&self.admin_key)
            .json(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    pub async fn get_request(&self, qm: &Proc, id: &str) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .http
            .get(format!("{}/v1/requests/{id}", qm.url))
            .bearer_auth(&self.admin_key)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// Creates principal `name` in `groups` (groups carry the permissions) and an API key for
    /// it, through the admin API as the bootstrap admin: the same path an operator takes, so
    /// tests never write principals or keys into the database behind the queue manager's back.
    /// Returns the principal's id and its key.
    pub async fn principal(
        &self,
        qm: &Proc,
        name: &str,
        groups: &[&str],
    ) -> anyhow::Result<(uuid::Uuid, String)> {
        let r = self
            .http
            .post(format!("{}/v1/principals", qm.url))
            .bearer_auth(&self.admin_key)
            .json(&json!({"name": name, "groups": groups}))
            .send()
            .await?;
        let status = r.status().as_u16();
        let created: Value = r.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(
            status == 201,
            "creating principal {name}: {status} {created}"
        );
        let id = created["id"]
            .as_str()
            .and_then(|s| uuid::Uuid::parse_str(s).ok())
            .with_context(|| format!("principal {name} created without an id: {created}"))?;
        let r = self
            .http
            .post(format!("{}/v1/principals/{name}/keys", qm.url))
            .bearer_auth(&self.admin_key)
            .send()
            .await?;
        let status = r.status().as_u16();
        let key: Value = r.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(status == 201, "creating a key for {name}: {status} {key}");
        let key = key["key"]
            .as_str()
            .with_context(|| format!("key for {name} without its secret: {key}"))?
            .to_owned();
        Ok((id, key))
    }

    /// Subscribes to the outcome exchange. Create it before submitting, then `wait_for`.
    pub async fn outcomes(&self) -> anyhow::Result<Outcomes> {
        let conn =
            lapin::Connection::connect(&self.amqp_url, lapin::ConnectionProperties::default())
                .await?;
        let ch = conn.create_channel().await?;
        self.topology().declare(&ch).await?;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        ch.queue_bind(
            q.name().clone(),
            self.topology().results_exchange().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let consumer = ch
            .basic_consume(
                q.name().clone(),
                "outcomes".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(Outcomes {
            _conn: conn,
            consumer,
            seen: Vec::new(),
        })
    }

    /// Drops the database and the AMQP names of this test.
    pub async fn cleanup(mut self) {
        remove_world(&self.amqp_url, &self.db_url, &self.prefix, &self.topology()).await;
        self.cleaned = true;
    }
}

/// A test that panics before `cleanup` still removes its database and AMQP names: on a
/// thread of its own with its own runtime, since `Drop` cannot await and may run inside the
/// test's runtime.
impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let (amqp, db, prefix, topology) = (
            self.amqp_url.clone(),
            self.db_url.clone(),
            self.prefix.clone(),
            self.topology(),
        );
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(30),
                        remove_world(&amqp, &db, &prefix, &topology),
                    )
                    .await;
                });
            }
        })
        .join();
    }
}

async fn remove_world(amqp_url: &str, db_url: &str, prefix: &str, topology: &Topology) {
    kill_processes_of(prefix);
    if let Ok(conn) =
        lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default()).await
        && let Ok(ch) = conn.create_channel().await
    {
        let _ = topology.delete(&ch).await;
    }
    let _ = provisio_shared::db::drop_database(&Secret::new(db_url.to_owned())).await;
}

/// Kills every process started with this test's environment (`PROVISIO_PREFIX` names its
/// prefix) that still runs. A test that cleans up while its fleet is alive would otherwise
/// race it: an engine whose queue is deleted under it declares the topology again, and the
/// queues outlive the test on the broker.
fn kill_processes_of(prefix: &str) {
    let needle = format!("PROVISIO_PREFIX={prefix}\0");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        // Other users' processes cannot be read, and need not be.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
        {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Polls `probe` every 100 ms until it yields a value; fails after `limit`, naming `what`.
/// For conditions no event announces (a row's status, a gauge): the bound keeps a broken
/// system from hanging the suite.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Outcome notifications from `{prefix}.results`: the event tests wait on.
pub struct Outcomes {
    _conn: lapin::Connection,
    consumer: lapin::Consumer,
    seen: Vec<Value>,
}

impl Outcomes {
    /// The next outcome, whichever request it is for.
    pub async fn next_any(&mut self) -> anyhow::Result<Value> {
        if !self.seen.is_empty() {
            return Ok(self.seen.remove(0));
        }
        let d = self
            .consumer
            .next()
            .await
            .context("outcome stream ended")??;
        Ok(serde_json::from_slice(&d.data)?)
    }

    /// Waits (bounded) for the outcome of request `id`.
    pub async fn wait_for(&mut self, id: &str) -> anyhow::Result<Value> {
        if let Some(pos) = self.seen.iter().position(|v| v["id"] == id) {
            return Ok(self.seen.remove(pos));
        }
        let fut = async {
            while let Some(d) = self.consumer.next().await {
                let d = d?;
                let v: Value = serde_json::from_slice(&d.data)?;
                if v["id"] == id {
                    return Ok(v);
                }
                self.seen.push(v);
            }
            bail!("outcome stream ended")
        };
        tokio::time::timeout(Duration::from_mins(1), fut)
            .await
            .with_context(|| format!("no outcome for {id} within 60 s"))?
    }
}

/// The demo namespace shipped in `schemas/examples/`.
pub fn demo_namespace() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/examples/demo.yaml");
    std::fs::read_to_string(path).unwrap_or_default()
}

#[allow(clippy::needless_pass_by_value)] // call sites read better with `json!(..)` inline
pub fn request(namespace: &str, procedure: &str, input: Value) -> Value {
    json!({"namespace": namespace, "procedure": procedure, "input": input})
}
