//! The transaction-log servers an engine writes to, and their health.
//!
//! An engine keeps one pool per server (MPF's "Transaction Log Pool Size") and spreads new
//! transactions over the healthy ones. A server that stops answering is not given up at the
//! first error: writers keep retrying it until "Tran Log Timeout" has passed since the first
//! failure of the current streak, because a PostgreSQL restart or fail-over takes seconds and
//! abandoning a server rolls back every transaction on it. Past that, the server goes on the
//! bad-server list: [`LogServers::pick`] no longer offers it, and writers still on it get
//! [`ServerError::Bad`] so that they can roll back and move to another server. A probe tries
//! listed servers again every probe interval and takes them off the list once they answer.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use deadpool_postgres::{Pool, PoolError};
use provisio_shared::config::{Config, Secret, TxLogConfig};
use provisio_shared::db::{self, DbError};
use provisio_shared::metrics::{TXLOG_BAD_SERVERS, TXLOG_POOL_IN_USE, TXLOG_SERVER_UP};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

/// Session settings of every transaction-log connection. The log writer's statements join
/// `unnest`ed arrays to rows by primary key; a generic plan may estimate a scan of the whole
/// table cheaper, and on these sessions it never is.
pub const SESSION_OPTIONS: &str =
    "-c enable_seqscan=off -c enable_hashjoin=off -c enable_mergejoin=off";

/// How long a probe waits for a listed server: a server that needs longer to say `SELECT 1`
/// is not one to send transactions to.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the pool gauges are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Pauses between a writer's retries of a failing server: short at first (a dropped
/// connection is usually replaced at once), then no more than this.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("transaction-log server {server} is on the bad-server list (last error: {last})")]
    Bad { server: String, last: String },
    /// The server answered, with an error that retrying cannot fix (a constraint, a bug).
    #[error("transaction-log server {server} refused the operation: {source}")]
    Rejected {
        server: String,
        #[source]
        source: OpError,
    },
    #[error("there is no transaction-log server #{0}")]
    NoSuchServer(usize),
    #[error("transaction-log server #{index}: {source}")]
    Setup {
        index: usize,
        #[source]
        source: DbError,
    },
}

/// What an operation on a server's pool fails with; `?` converts both kinds.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

impl OpError {
    /// Whether the error says "the server is not there" (worth retrying, and counting against
    /// its health) rather than "the server refused this".
    pub fn is_unavailable(&self) -> bool {
        match self {
            // No connection could be had: refused, timed out, closed.
            Self::Pool(_) => true,
            Self::Postgres(e) => match e.code() {
                Some(code) => {
                    let c = code.code();
                    // Connection exceptions, shutdowns, "cannot connect now", out of connections.
                    c.starts_with("08")
                        || *code == SqlState::ADMIN_SHUTDOWN
                        || *code == SqlState::CRASH_SHUTDOWN
                        || *code == SqlState::CANNOT_CONNECT_NOW
                        || *code == SqlState::TOO_MANY_CONNECTIONS
                }
                // Not an answer from the server: the connection closed or its I/O failed.
                // (Encoding and row-shape errors are ours, and retrying cannot help them.)
                None => {
                    e.is_closed()
                        || std::error::Error::source(e)
                            .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some())
                }
            },
        }
    }
}

const HEALTHY: u8 = 0;
/// In a failure streak, still retried.
const FAILING: u8 = 1;
/// On the bad-server list.
const BAD: u8 = 2;

/// One transaction-log server.
pub struct Server {
    index: usize,
    name: String,
    pool: Pool,
    /// `HEALTHY`, `FAILING` or `BAD`; read without locking on every pick and every write.
    state: AtomicU8,
}

impl Server {
    pub fn index(&self) -> usize {
        self.index
    }
    /// `host:port/dbname`: stable, safe to log and to use as a metric label (no password).
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn pool(&self) -> &Pool {
        &self.pool
    }
    pub fn is_bad(&self) -> bool {
        self.state.load(Ordering::Acquire) == BAD
    }
}

#[derive(Default)]
struct Streak {
    /// When the current failure streak began; `None` while the server answers.
    since: Option<Instant>,
    last_error: String,
}

pub struct LogServers {
    servers: Vec<Server>,
    /// Per server; transitions happen under this one lock so that the bad-server gauge is
    /// always the count of one consistent state.
    streaks: Mutex<Vec<Streak>>,
    next: AtomicUsize,
    timeout: Duration,
    probe_interval: Duration,
}

impl LogServers {
    /// The servers of `cfg` (the configuration database when none are listed).
    pub fn from_config(cfg: &Config) -> Result<Self, ServerError> {
        Self::new(&cfg.txlog_servers(), &cfg.txlog)
    }

    /// Pools for `urls` sized by `settings`; connects lazily.
    pub fn new(urls: &[Secret], settings: &TxLogConfig) -> Result<Self, ServerError> {
        let mut servers = Vec::with_capacity(urls.len());
        for (index, url) in urls.iter().enumerate() {
            let setup = |source| ServerError::Setup { index, source };
            let name = server_name(&db::pg_config(url).map_err(setup)?);
            let pool = db::pool_with_options(url, settings.pool_size, Some(SESSION_OPTIONS))
                .map_err(setup)?;
            metrics::gauge!(TXLOG_SERVER_UP, "server" => name.clone()).set(1.0);
            metrics::gauge!(TXLOG_POOL_IN_USE, "server" => name.clone()).set(0.0);
            servers.push(Server {
                index,
                name,
                pool,
                state: AtomicU8::new(HEALTHY),
            });
        }
        metrics::gauge!(TXLOG_BAD_SERVERS).set(0.0);
        Ok(Self {
            streaks: Mutex::new(servers.iter().map(|_| Streak::default()).collect()),
            servers,
            next: AtomicUsize::new(0),
            timeout: Duration::from_secs(settings.timeout_seconds.max(1)),
            probe_interval: Duration::from_millis(settings.probe_interval_ms.max(1)),
        })
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    pub fn server(&self, idx: usize) -> Option<&Server> {
        self.servers.get(idx)
    }

    pub fn servers(&self) -> &[Server] {
        &self.servers
    }

    pub fn is_bad(&self, idx: usize) -> bool {
        self.servers.get(idx).is_some_and(Server::is_bad)
    }

    /// The number of servers on the bad-server list.
    pub fn bad_count(&self) -> usize {
        self.servers.iter().filter(|s| s.is_bad()).count()
    }

    /// The server for a new transaction: round robin over the servers that answer, else over
    /// those still being retried; `None` when every server is on the bad-server list.
    pub fn pick(&self) -> Option<usize> {
        let n = self.servers.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for wanted in [HEALTHY, FAILING] {
            for k in 0..n {
                let idx = (start + k) % n;
                if self.servers[idx].state.load(Ordering::Acquire) == wanted {
                    return Some(idx);
                }
            }
        }
        None
    }

    /// The server answered: its failure streak (if any) ends, and it leaves the bad-server
    /// list (if it was on it).
    pub fn report_ok(&self, idx: usize) {
        let Some(server) = self.servers.get(idx) else {
            return;
        };
        // The common case, on every write: nothing to change, no lock.
        if server.state.load(Ordering::Acquire) == HEALTHY {
            return;
        }
        let Ok(mut streaks) = self.streaks.lock() else {
            return;
        };
        let was = server.state.swap(HEALTHY, Ordering::AcqRel);
        let streak = std::mem::take(&mut streaks[idx]);
        if was == BAD {
            tracing::info!(server = %server.name, index = idx, "transaction-log server answers again; taken off the bad-server list");
            self.publish_health(idx);
        } else if was == FAILING {
            let failed_for = streak.since.map(|s| s.elapsed());
            tracing::info!(server = %server.name, index = idx, ?failed_for, "transaction-log server answers again");
        }
    }

    /// The server failed to answer. Returns whether it is (now) on the bad-server list.
    pub fn report_err(&self, idx: usize, error: &str) -> bool {
        self.report_err_since(idx, Instant::now(), error)
    }

    /// Like [`Self::report_err`] for an attempt that began at `started`: a server that hung
    /// has been failing since the attempt began, not since it was given up.
    fn report_err_since(&self, idx: usize, started: Instant, error: &str) -> bool {
        let Some(server) = self.servers.get(idx) else {
            return false;
        };
        let Ok(mut streaks) = self.streaks.lock() else {
            return server.is_bad();
        };
        let streak = &mut streaks[idx];
        error.clone_into(&mut streak.last_error);
        if server.is_bad() {
            return true;
        }
        let since = *streak.since.get_or_insert(started);
        let since = since.min(started);
        streak.since = Some(since);
        let failing_for = since.elapsed();
        if failing_for < self.timeout {
            if server.state.swap(FAILING, Ordering::AcqRel) == HEALTHY {
                tracing::info!(server = %server.name, index = idx, %error, "transaction-log server failing; retrying");
            }
            return false;
        }
        server.state.store(BAD, Ordering::Release);
        tracing::warn!(
            server = %server.name, index = idx, ?failing_for, %error,
            "transaction-log server put on the bad-server list"
        );
        self.publish_health(idx);
        drop(streaks);
        // Idle connections to it are most likely dead: the probe and later writers start afresh.
        server.pool.retain(|_, _| false);
        true
    }

    fn publish_health(&self, idx: usize) {
        metrics::gauge!(TXLOG_BAD_SERVERS).set(self.bad_count() as f64);
        if let Some(s) = self.servers.get(idx) {
            metrics::gauge!(TXLOG_SERVER_UP, "server" => s.name.clone()).set(if s.is_bad() {
                0.0
            } else {
                1.0
            });
        }
    }

    fn bad_error(&self, idx: usize) -> ServerError {
        let last = self
            .streaks
            .lock()
            .map(|s| s[idx].last_error.clone())
            .unwrap_or_default();
        ServerError::Bad {
            server: self.servers[idx].name.clone(),
            last,
        }
    }

    /// How long an attempt on `idx` may take: until the server would be declared bad, or a
    /// probe's worth when that moment has come.
    fn attempt_limit(&self, idx: usize) -> Duration {
        let since = self.streaks.lock().ok().and_then(|s| s[idx].since);
        match since {
            None => self.timeout,
            Some(since) => self
                .timeout
                .saturating_sub(since.elapsed())
                .max(PROBE_TIMEOUT.min(self.timeout)),
        }
    }

    /// Runs `op` against server `idx`'s pool, retrying with back-off while the server does
    /// not answer and is not on the bad-server list. What a writer gets:
    /// - `Ok`: `op` succeeded (the server is healthy again if it was failing);
    /// - [`ServerError::Bad`]: the server is on the bad-server list (already, or now, after
    ///   failing for the whole timeout): roll back and move to another server;
    /// - [`ServerError::Rejected`]: the server answered with an error retrying cannot fix.
    ///
    /// `op` must be safe to repeat: an attempt that failed may have been cut off anywhere.
    pub async fn run<T, F, Fut>(&self, idx: usize, mut op: F) -> Result<T, ServerError>
    where
        F: FnMut(Pool) -> Fut,
        Fut: Future<Output = Result<T, OpError>>,
    {
        let server = self
            .servers
            .get(idx)
            .ok_or(ServerError::NoSuchServer(idx))?;
        let mut pause = FIRST_PAUSE;
        loop {
            if server.is_bad() {
                return Err(self.bad_error(idx));
            }
            let started = Instant::now();
            let limit = self.attempt_limit(idx);
            let error = match tokio::time::timeout(limit, op(server.pool.clone())).await {
                Ok(Ok(v)) => {
                    self.report_ok(idx);
                    return Ok(v);
                }
                Ok(Err(e)) if !e.is_unavailable() => {
                    // An answer, if not the one hoped for: the server is there.
                    self.report_ok(idx);
                    return Err(ServerError::Rejected {
                        server: server.name.clone(),
                        source: e,
                    });
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {limit:?}"),
            };
            tracing::debug!(server = %server.name, %error, "transaction-log write failed; retrying");
            if self.report_err_since(idx, started, &error) {
                return Err(self.bad_error(idx));
            }
            // Never sleep past the moment the server would be declared bad.
            let left = self.attempt_deadline_in(idx);
            tokio::time::sleep(pause.min(left).max(Duration::from_millis(10))).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// Time until server `idx` has been failing for the whole timeout.
    fn attempt_deadline_in(&self, idx: usize) -> Duration {
        self.streaks
            .lock()
            .ok()
            .and_then(|s| s[idx].since)
            .map_or(self.timeout, |since| {
                self.timeout.saturating_sub(since.elapsed())
            })
    }

    /// Asks server `idx` for `SELECT 1` under a short timeout and reports the result.
    pub async fn probe(&self, idx: usize) -> bool {
        let Some(server) = self.servers.get(idx) else {
            return false;
        };
        let started = Instant::now();
        let attempt = async {
            let client = server.pool.get().await?;
            if let Err(e) = client.simple_query("SELECT 1").await {
                // Never hand this connection out again.
                drop(deadpool_postgres::Object::take(client));
                return Err(OpError::from(e));
            }
            Ok(())
        };
        match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
            Ok(Ok(())) => {
                self.report_ok(idx);
                true
            }
            other => {
                let error = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer to a probe within {PROBE_TIMEOUT:?}"),
                };
                // A connection cut off mid-probe went back to the pool: drop every idle one.
                server.pool.retain(|_, _| false);
                tracing::debug!(server = %server.name, %error, "transaction-log server probe failed");
                self.report_err_since(idx, started, &error);
                false
            }
        }
    }

    /// Sets each server's pool gauge to the connections checked out right now.
    pub fn sample_pools(&self) {
        for s in &self.servers {
            let st = s.pool.status();
            metrics::gauge!(TXLOG_POOL_IN_USE, "server" => s.name.clone())
                .set(st.size.saturating_sub(st.available) as f64);
        }
    }

    /// Probes every server that is listed or failing once per probe interval (so that a
    /// failing server nobody writes to still ends its streak one way or the other), and
    /// samples the pool gauges every second, until `shutdown`.
    pub fn spawn_probe(self: &Arc<Self>, shutdown: CancellationToken) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut probe = tokio::time::interval(me.probe_interval);
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sample = tokio::time::interval(SAMPLE_EVERY);
            sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = sample.tick() => me.sample_pools(),
                    _ = probe.tick() => {
                        let troubled: Vec<usize> = me
                            .servers
                            .iter()
                            .filter(|s| s.state.load(Ordering::Acquire) != HEALTHY)
                            .map(|s| s.index)
                            .collect();
                        let probes = troubled.iter().map(|&i| me.probe(i));
                        futures_util::future::join_all(probes).await;
                    }
                }
            }
        })
    }
}

/// `host:port[,host:port…]/dbname` of a connection configuration.
fn server_name(cfg: &tokio_postgres::Config) -> String {
    let ports = cfg.get_ports();
    let mut name = String::new();
    for (i, host) in cfg.get_hosts().iter().enumerate() {
        if i > 0 {
            name.push(',');
        }
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        match host {
            tokio_postgres::config::Host::Tcp(h) => {
                let _ = write!(name, "{h}:{port}");
            }
            tokio_postgres::config::Host::Unix(p) => {
                let _ = write!(name, "{}:{port}", p.display());
            }
        }
    }
    if name.is_empty() {
        name.push_str("localhost:5432");
    }
    let _ = write!(name, "/{}", cfg.get_dbname().unwrap_or(""));
    name
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use metrics_exporter_prometheus::PrometheusHandle;

    use super::*;
    use crate::testing::{Proxy, TempDb, pg_base};

    /// The recorder is global and `provisio_txlog_bad_servers` has no label: tests that look
    /// at it, or move it, take turns.
    static METRICS_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn recorder() -> &'static PrometheusHandle {
        static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
        HANDLE.get_or_init(|| {
            provisio_shared::telemetry::install_metrics().expect("the only recorder in this binary")
        })
    }

    /// The value of a gauge, optionally the series of one server.
    fn gauge(name: &str, server: Option<&str>) -> Option<f64> {
        let text = recorder().render();
        let series = match server {
            Some(s) => format!("{name}{{server=\"{s}\"}} "),
            None => format!("{name} "),
        };
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
    }

    fn settings(timeout_seconds: u64, probe_interval_ms: u64) -> TxLogConfig {
        TxLogConfig {
            pool_size: 4,
            timeout_seconds,
            probe_interval_ms,
            ..TxLogConfig::default()
        }
    }

    async fn select_one(pool: Pool) -> Result<i32, OpError> {
        let client = pool.get().await?;
        Ok(client.query_one("SELECT 1", &[]).await?.get(0))
    }

    /// Polls `cond` every 50 ms for at most `within`.
    async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cond()
    }

    #[test]
    fn server_names_carry_no_password() {
        let cfg = db::pg_config(&Secret::new("postgres://u:s3cret@db1:6000/txlog")).expect("url");
        assert_eq!(server_name(&cfg), "db1:6000/txlog");
        let cfg = db::pg_config(&Secret::new("postgres://u:s3cret@a,b:5433/x")).expect("url");
        assert_eq!(server_name(&cfg), "a:5432,b:5433/x");
    }

    #[tokio::test]
    async fn a_cut_server_goes_bad_after_the_timeout_and_the_probe_brings_it_back() {
        let _turn = METRICS_TURN.lock().await;
        recorder();
        let a = TempDb::empty(1).await;
        let b = TempDb::empty(1).await;
        let upstream = tokio::net::lookup_host(
            pg_base()
                .rsplit('@')
                .next()
                .unwrap_or("127.0.0.1:5432")
                .to_owned(),
        )
        .await
        .expect("PostgreSQL address")
        .next()
        .expect("an address");
        let proxy = Proxy::start(upstream).await;
        let via_proxy = Secret::new(format!("postgres://postgres@{}/{}", proxy.addr, b.name()));
        let servers = Arc::new(
            LogServers::new(&[a.url.clone(), via_proxy], &settings(2, 100)).expect("servers"),
        );
        let (name_a, name_b) = (
            servers.servers()[0].name().to_owned(),
            servers.servers()[1].name().to_owned(),
        );
        assert!(!name_b.contains("postgres@"), "{name_b}");
        let stop = CancellationToken::new();
        let probe = servers.spawn_probe(stop.clone());
        assert_eq!(gauge(TXLOG_BAD_SERVERS, None), Some(0.0));

        // Both answer; picks alternate.
        for idx in 0..2 {
            assert_eq!(servers.run(idx, select_one).await.expect("answers"), 1);
        }
        let picks: Vec<_> = (0..4).filter_map(|_| servers.pick()).collect();
        assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");

        // A connection held from server a shows in its pool gauge.
        let held = servers.servers()[0].pool().get().await.expect("connection");
        servers.sample_pools();
        assert_eq!(gauge(TXLOG_POOL_IN_USE, Some(&name_a)), Some(1.0));
        drop(held);
        servers.sample_pools();
        assert_eq!(gauge(TXLOG_POOL_IN_USE, Some(&name_a)), Some(0.0));

        // Cut b: a writer on it retries for the timeout, then learns it is bad.
        proxy.cut().await;
        let outcome = tokio::time::timeout(Duration::from_secs(30), servers.run(1, select_one))
            .await
            .expect("the writer gives up within the timeout, not never");
        assert!(
            matches!(outcome, Err(ServerError::Bad { .. })),
            "{outcome:?}"
        );
        assert!(servers.is_bad(1));
        assert_eq!(gauge(TXLOG_BAD_SERVERS, None), Some(1.0));
        assert_eq!(gauge(TXLOG_SERVER_UP, Some(&name_b)), Some(0.0));
        for _ in 0..6 {
            assert_eq!(servers.pick(), Some(0));
        }
        // Later writers on b are told at once.
        assert!(matches!(
            servers.run(1, select_one).await,
            Err(ServerError::Bad { .. })
        ));
        // The other server is untouched.
        assert_eq!(servers.run(0, select_one).await.expect("a answers"), 1);

        // Restore b: the probe takes it off the list.
        proxy.restore().await;
        assert!(
            eventually(Duration::from_secs(30), || !servers.is_bad(1)).await,
            "the probe brought b back"
        );
        assert_eq!(gauge(TXLOG_BAD_SERVERS, None), Some(0.0));
        assert_eq!(gauge(TXLOG_SERVER_UP, Some(&name_b)), Some(1.0));
        assert_eq!(servers.run(1, select_one).await.expect("b answers"), 1);
        let picks: Vec<_> = (0..4).filter_map(|_| servers.pick()).collect();
        assert!(picks.contains(&1), "{picks:?}");

        stop.cancel();
        probe.await.expect("probe task ends");
    }

    #[tokio::test]
    async fn a_streak_shorter_than_the_timeout_is_forgiven_and_a_longer_one_is_not() {
        let _turn = METRICS_TURN.lock().await;
        recorder();
        // Never connected to: health is driven by reports alone.
        let urls = [
            Secret::new("postgres://postgres@127.0.0.1:1/one"),
            Secret::new("postgres://postgres@127.0.0.1:1/two"),
        ];
        let servers = LogServers::new(&urls, &settings(2, 100)).expect("servers");
        let ago = |secs: u64| {
            Instant::now()
                .checked_sub(Duration::from_secs(secs))
                .expect("the clock is past a few seconds")
        };

        // Failing, not yet bad: still retried, but new transactions prefer the other.
        assert!(!servers.report_err(0, "refused"));
        assert!(!servers.is_bad(0));
        for _ in 0..4 {
            assert_eq!(servers.pick(), Some(1));
        }
        // It answers again: the streak is over, and a new one starts from scratch.
        servers.report_ok(0);
        assert!(!servers.report_err_since(0, ago(1), "refused"));
        servers.report_ok(0);
        let picks: Vec<_> = (0..4).filter_map(|_| servers.pick()).collect();
        assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");

        // Failing since longer than the timeout: listed.
        assert!(!servers.report_err_since(0, ago(1), "refused"));
        assert!(servers.report_err_since(0, ago(3), "refused"));
        assert!(servers.is_bad(0));
        assert_eq!(gauge(TXLOG_BAD_SERVERS, None), Some(1.0));
        assert_eq!(servers.pick(), Some(1));
        // A writer on a listed server is told at once, without an attempt.
        let mut attempts = 0;
        let r = servers
            .run(0, |_| {
                attempts += 1;
                async { Ok::<_, OpError>(()) }
            })
            .await;
        assert!(
            matches!(r, Err(ServerError::Bad { ref last, .. }) if last == "refused"),
            "{r:?}"
        );
        assert_eq!(attempts, 0);

        // Every server listed: nothing to pick.
        assert!(servers.report_err_since(1, ago(3), "refused"));
        assert_eq!(servers.pick(), None);
        assert_eq!(gauge(TXLOG_BAD_SERVERS, None), Some(2.0));
        servers.report_ok(0);
        servers.report_ok(1);
        assert_eq!(servers.bad_count(), 0);
        assert_eq!(gauge(TXLOG_BAD_SERVERS, None), Some(0.0));
    }

    #[tokio::test]
    async fn unavailable_errors_are_retried_and_refusals_are_not() {
        let _turn = METRICS_TURN.lock().await;
        recorder();
        let db = TempDb::empty(1).await;
        let servers =
            LogServers::new(std::slice::from_ref(&db.url), &settings(30, 100)).expect("servers");

        // Two "no connection" failures, then an answer: the writer never sees the failures.
        let mut attempts = 0;
        let r = servers
            .run(0, |pool| {
                attempts += 1;
                let fail = attempts <= 2;
                async move {
                    if fail {
                        return Err(OpError::Pool(PoolError::Closed));
                    }
                    select_one(pool).await
                }
            })
            .await;
        assert_eq!(r.expect("third attempt answers"), 1);
        assert_eq!(attempts, 3);
        assert!(!servers.is_bad(0));
        assert_eq!(servers.pick(), Some(0));

        // A server that answers with an error is healthy: no retry, no streak.
        let mut attempts = 0;
        let r = servers
            .run(0, |pool| {
                attempts += 1;
                async move {
                    let client = pool.get().await?;
                    Ok(client.query_one("SELECT 1/0", &[]).await?.get::<_, i32>(0))
                }
            })
            .await;
        assert!(matches!(r, Err(ServerError::Rejected { .. })), "{r:?}");
        assert_eq!(attempts, 1);
        assert_eq!(servers.servers()[0].state.load(Ordering::Acquire), HEALTHY);
    }
}
