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
/// table cheaper, and on these sessions it never is. With those choices ruled out, one plan
/// per statement is right for every batch size, so it is planned once (`force_generic_plan`)
/// instead of again at every execution: PostgreSQL keeps custom plans for array parameters
/// because a one-element batch always looks cheaper to plan afresh, and that planning was the
/// largest single cost of a commit under light load (docs/decisions.md, "Generic plans for
/// the log writer").
pub const SESSION_OPTIONS: &str = "-c enable_seqscan=off -c enable_hashjoin=off -c enable_mergejoin=off \
     -c plan_cache_mode=force_generic_plan";

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
#[path = "logservers_tests.rs"]
mod tests;
