//! The auditor role: every auditor consumes dead letters (see [`crate::dead`]); one of them, the
//! leader, also recovers transactions whose engine died and sweeps the log into the audit
//! tables.
//!
//! Leadership is a PostgreSQL advisory lock held by a dedicated session. A lock is only as
//! good as the session holding it: when that session ends (network, server restart,
//! `pg_terminate_backend`), the lock is free and a standby may take it. So the leader checks
//! its session and its lock every [`Auditor::check_period`] and stops recovery and sweeps at
//! once when either is gone, rather than carry on beside the new leader. A standby, or a
//! leader that stepped down, opens a new session (backing off while the database is away)
//! and tries the lock again at the same period, which bounds a takeover after a leader's
//! death to about one period (2 s by default).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::Pool;
use provisio_shared::config::{Config, Secret};
use provisio_shared::reconnect::Reconnect;
use provisio_shared::telemetry::{self, Readiness};
use provisio_shared::{db, metrics as m, shutdown};
use tokio_util::sync::CancellationToken;

use crate::dead::DeadLetters;
use crate::recovery::{Recovery, Report};

/// Advisory-lock key of auditor leadership ("provaudi").
pub const LEADER_LOCK: i64 = 0x7072_6f76_6175_6469;
/// `application_name` of the lock session, so that operators can find the leader's session in
/// `pg_stat_activity`.
pub const LOCK_APPLICATION_NAME: &str = "provisio-auditor-lock";
/// Longest time between two lock attempts (standby) or two lock checks (leader), whatever
/// `auditor.interval_ms` says: it bounds how long a dead leader is waited for, and how long
/// a leader that lost its lock may go on.
const MAX_CHECK: Duration = Duration::from_secs(2);
/// A query on the lock session that takes longer means the session is gone.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the lock session. Server-side keepalives let PostgreSQL end the session (and
/// free the lock) of an auditor whose host vanished within seconds instead of hours; the idle
/// timeout frees it from a frozen auditor, which would otherwise hold the lock while doing
/// nothing (a live auditor queries its session every `MAX_CHECK`).
const SESSION_SETTINGS: &str =
    "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3";
/// PostgreSQL 14 and later only; older servers keep the session without it.
const IDLE_TIMEOUT_SETTING: &str = "SET idle_session_timeout = '15s'";

/// Whether the session holds the lock: `pg_locks` lists a `bigint` advisory key as its high
/// and low 32 bits (`classid`, `objid`) with `objsubid` 1.
const HELD_SQL: &str = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
     AND pid = pg_backend_pid() AND granted AND classid::bigint = $1 AND objid::bigint = $2 \
     AND objsubid = 1)";

/// Runs the role until SIGTERM: ops endpoint, dead letters, leadership.
pub async fn run(
    cfg: Config,
    pool: Pool,
    recovery: Arc<Recovery>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> anyhow::Result<()> {
    provisio_shared::metrics::auditor_baseline();
    let ready = Readiness::default();
    let broker = Readiness::broker();
    let listener = tokio::net::TcpListener::bind(cfg.engine.listen)
        .await
        .with_context(|| format!("binding {}", cfg.engine.listen))?;
    let addr = listener.local_addr().context("local address")?;
    let stop = shutdown::token_on_signal();
    let http_stop = stop.clone();
    // Ready while the leadership session is open (database) and dead letters can be read.
    let router = telemetry::ops_router(
        metrics,
        vec![("database", ready.clone()), ("broker", broker.clone())],
    );
    let http = tokio::spawn(async move {
        let r = axum::serve(listener, router)
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    let dead =
        tokio::spawn(Arc::new(DeadLetters::new(&cfg, pool.clone(), broker)).run(stop.clone()));
    tracing::info!(%addr, "auditor started");
    println!("listening on http://{addr}");
    let auditor = Auditor {
        cfg,
        pool,
        recovery,
        ready,
    };
    auditor.run(&stop).await;
    if let Err(e) = dead.await {
        tracing::warn!(error = %e, "dead-letter consumer ended abnormally");
    }
    http.abort();
    tracing::info!("auditor stopped");
    Ok(())
}

pub struct Auditor {
    pub cfg: Config,
    pub pool: Pool,
    pub recovery: Arc<Recovery>,
    /// Up while the lock session is open, leading or not.
    pub ready: Readiness,
}

/// Why a lock session was given up.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    Stopped,
    Lost(String),
}

impl Auditor {
    /// Between lock attempts of a standby and lock checks of a leader.
    pub fn check_period(&self) -> Duration {
        Duration::from_millis(self.cfg.auditor.interval_ms)
            .clamp(Duration::from_millis(100), MAX_CHECK)
    }

    /// Leads or stands by until `stop`, opening a new lock session whenever one is lost.
    pub async fn run(&self, stop: &CancellationToken) {
        metrics::gauge!(m::AUDITOR_LEADER).set(0.0);
        // Present from the start, so that a standby shows 0 rather than nothing.
        metrics::counter!(m::AUDIT_ROWS_SWEPT).increment(0);
        metrics::counter!(m::AUDITOR_STEP_DOWNS).increment(0);
        let mut reconnect = Reconnect::broker();
        while !stop.is_cancelled() {
            match LockSession::open(&self.cfg.database.url).await {
                Ok(session) => {
                    let opened = Instant::now();
                    self.ready.set(true);
                    tracing::info!(pid = session.pid, "leadership session open; standing by");
                    let end = self.hold(&session, stop).await;
                    drop(session);
                    self.ready.set(false);
                    match end {
                        Ended::Stopped => break,
                        Ended::Lost(why) => {
                            tracing::warn!(why, "leadership session lost; reconnecting");
                        }
                    }
                    reconnect.lasted(opened.elapsed());
                }
                Err(e) => {
                    self.ready.set(false);
                    tracing::warn!(error = format!("{e:#}"), retry_in = ?reconnect.next_delay(), "cannot open the leadership session");
                }
            }
            if !reconnect.pause(stop).await {
                break;
            }
        }
        self.ready.set(false);
    }

    /// Stands by on `session`, trying the lock every check period, and leads once it has it.
    async fn hold(&self, session: &LockSession, stop: &CancellationToken) -> Ended {
        let check = self.check_period();
        loop {
            match session.try_lock().await {
                Err(why) => return Ended::Lost(why),
                Ok(true) => return self.lead(session, stop, check).await,
                Ok(false) => {}
            }
            tokio::select! {
                () = stop.cancelled() => return Ended::Stopped,
                () = session.closed.cancelled() => return Ended::Lost("the session closed".into()),
                () = tokio::time::sleep(check) => {}
            }
        }
    }

    /// Recovers and sweeps while `session` holds the lock. The work is dropped mid-pass when
    /// the lock goes: what it left undone is what a crashed auditor leaves (leases expire,
    /// sweeps are per-batch transactions), and the new leader picks it up.
    async fn lead(
        &self,
        session: &LockSession,
        stop: &CancellationToken,
        check: Duration,
    ) -> Ended {
        metrics::gauge!(m::AUDITOR_LEADER).set(1.0);
        tracing::info!(
            pid = session.pid,
            "auditor is the leader: recovering and sweeping"
        );
        let end = tokio::select! {
            why = session.watch(check) => Ended::Lost(why),
            () = self.work(stop) => Ended::Stopped,
        };
        metrics::gauge!(m::AUDITOR_LEADER).set(0.0);
        // Only the leader counts in-doubt transactions; a former leader's last count would
        // keep an alert (which takes the max over auditors) firing after an operator resolves.
        metrics::gauge!(m::IN_DOUBT).set(0.0);
        match &end {
            Ended::Lost(why) => {
                metrics::counter!(m::AUDITOR_STEP_DOWNS).increment(1);
                tracing::warn!(why, "auditor stepped down: recovery and sweeps stopped");
            }
            Ended::Stopped => tracing::info!("auditor stops leading: shutting down"),
        }
        end
    }

    /// The leader's passes until `stop`, which lets the pass under way finish (losing the
    /// lock does not: the caller drops this future).
    async fn work(&self, stop: &CancellationToken) {
        let interval = Duration::from_millis(self.cfg.auditor.interval_ms);
        while !stop.is_cancelled() {
            // Operator commands first, so that this pass's in-doubt gauge reflects them.
            match self.recovery.run_commands().await {
                Ok(r) if r != crate::operator::CommandsReport::default() => {
                    tracing::info!(?r, "operator commands");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "operator commands failed"),
            }
            match self.recovery.run_once().await {
                Ok(r) if r != Report::default() => tracing::info!(?r, "recovery pass"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "recovery pass failed"),
            }
            match crate::audit::sweep(
                &self.pool,
                &self.recovery.servers,
                self.recovery.separate,
                &self.cfg.auditor,
                20,
            )
            .await
            {
                Ok(r) if r.swept > 0 || r.expired > 0 => tracing::info!(?r, "audit sweep"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "audit sweep failed"),
            }
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}

/// The dedicated session that holds the leader lock (a pooled connection would hand the lock
/// to whoever borrows it next).
struct LockSession {
    client: tokio_postgres::Client,
    /// Cancelled when the connection ends, whatever ended it.
    closed: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    pid: i32,
}

impl Drop for LockSession {
    /// Closes the connection, which frees the lock if this session held it.
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LockSession {
    async fn open(url: &Secret) -> anyhow::Result<Self> {
        let mut pg = db::PgTarget::parse(url).context("database URL")?;
        pg.config_mut().application_name(LOCK_APPLICATION_NAME);
        pg.config_mut().connect_timeout(QUERY_TIMEOUT);
        let (client, conn) = tokio::time::timeout(QUERY_TIMEOUT, pg.connect())
            .await
            .context("connecting: timed out")?
            .context("connecting")?;
        let closed = CancellationToken::new();
        let on_close = closed.clone();
        let task = tokio::spawn(async move {
            match conn.await {
                Ok(()) => tracing::debug!("leadership session closed"),
                Err(e) => {
                    let e = anyhow::Error::from(e);
                    tracing::warn!(error = format!("{e:#}"), "leadership session failed");
                }
            }
            on_close.cancel();
        });
        let mut session = Self {
            client,
            closed,
            task,
            pid: 0,
        };
        session
            .query(session.client.batch_execute(SESSION_SETTINGS))
            .await
            .map_err(anyhow::Error::msg)?;
        if let Err(e) = session
            .query(session.client.batch_execute(IDLE_TIMEOUT_SETTING))
            .await
        {
            tracing::debug!(error = e, "idle_session_timeout not set (PostgreSQL < 14?)");
        }
        let row = session
            .query(session.client.query_one("SELECT pg_backend_pid()", &[]))
            .await
            .map_err(anyhow::Error::msg)?;
        session.pid = row.get(0);
        Ok(session)
    }

    /// Runs a query on the session with [`QUERY_TIMEOUT`]; any failure is a lost session.
    async fn query<T>(
        &self,
        q: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(QUERY_TIMEOUT, q).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!(
                "query on the lock session failed: {:#}",
                anyhow::Error::from(e)
            )),
            Err(_) => Err(format!(
                "the lock session did not answer within {QUERY_TIMEOUT:?}"
            )),
        }
    }

    async fn try_lock(&self) -> Result<bool, String> {
        let row = self
            .query(
                self.client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK]),
            )
            .await?;
        Ok(row.get(0))
    }

    async fn still_held(&self) -> Result<bool, String> {
        let (high, low) = (LEADER_LOCK >> 32, LEADER_LOCK & 0xffff_ffff);
        let row = self
            .query(self.client.query_one(HELD_SQL, &[&high, &low]))
            .await?;
        Ok(row.get(0))
    }

    /// Returns (with the reason) as soon as the session closes or, at the next check, when
    /// it no longer answers or no longer holds the lock.
    async fn watch(&self, check: Duration) -> String {
        loop {
            tokio::select! {
                () = self.closed.cancelled() => return "the session closed".into(),
                () = tokio::time::sleep(check) => {}
            }
            match self.still_held().await {
                Ok(true) => {}
                Ok(false) => return "the session no longer holds the lock".into(),
                Err(why) => return why,
            }
        }
    }
}
