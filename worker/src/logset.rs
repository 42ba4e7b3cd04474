//! The transaction log as an engine sees it: one group-commit writer per log server, and the
//! server set's health.
//!
//! Two layouts:
//! - **combined** (the default: `txlog.servers` empty or only the configuration database):
//!   requests and transactions live in one database, and an attempt's opening and outcome
//!   each commit requests and transactions together;
//! - **separate** (`txlog.servers` lists other databases): requests stay in the configuration
//!   database and each transaction lives only on its own log server. The request row is
//!   then where an attempt's outcome is decided (fenced by `requests.current_tx` and
//!   `requests.tx_owner`); the transaction row follows, and recovery completes it from that
//!   decision when the engine could not.
//!
//! In the separate layout a write to a server that stops answering is retried until the
//! server is declared bad ([`LogServers`]); the run then gets [`LogError::Bad`], undoes what it
//! did and the request moves to another server.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use provisio_shared::config::Config;

use crate::logservers::LogServers;
use crate::txlog::{LogError, LogSink, Record, Reply, TxLog};

/// How long one write may take before it counts as a failure of its server.
const WRITE_ATTEMPT: Duration = Duration::from_secs(5);

pub struct LogSet {
    pub servers: Arc<LogServers>,
    writers: Vec<TxLog>,
    /// Whether the log servers are databases other than the configuration database.
    pub separate: bool,
}

impl LogSet {
    /// Writers for every server of `servers`.
    pub fn start(servers: Arc<LogServers>, separate: bool, cfg: &Config) -> Self {
        let writers = servers
            .servers()
            .iter()
            .map(|s| TxLog::start(s.pool().clone(), cfg.txlog.max_batch, cfg.txlog.writers))
            .collect();
        Self {
            servers,
            writers,
            separate,
        }
    }

    /// Whether `cfg` names log servers other than the configuration database.
    pub fn is_separate(cfg: &Config) -> bool {
        cfg.txlog.servers.iter().any(|s| *s != cfg.database.url)
    }

    /// The server for a new transaction (`None`: every server is on the bad-server list).
    pub fn pick(&self) -> Option<usize> {
        if self.separate {
            self.servers.pick()
        } else {
            Some(0)
        }
    }

    /// The writer of server `idx`, through its health tracking.
    pub fn sink(&self, idx: usize) -> ServerSink<'_> {
        ServerSink { set: self, idx }
    }

    pub fn name(&self, idx: usize) -> &str {
        self.servers.server(idx).map_or("", |s| s.name())
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.servers.servers().iter().position(|s| s.name() == name)
    }

    pub fn pool(&self, idx: usize) -> Option<&deadpool_postgres::Pool> {
        self.servers
            .server(idx)
            .map(crate::logservers::Server::pool)
    }
}

/// One server's writer. In the combined layout a failure is reported at once (the engine
/// requeues the delivery, as for any database outage); in the separate layout it is retried
/// until the server answers or goes on the bad-server list.
pub struct ServerSink<'a> {
    set: &'a LogSet,
    idx: usize,
}

impl ServerSink<'_> {
    async fn write(&self, record: Record) -> Result<Reply, LogError> {
        let Some(writer) = self.set.writers.get(self.idx) else {
            return Err(LogError::Bad(format!("no log server #{}", self.idx)));
        };
        if !self.set.separate {
            return writer.write(record).await;
        }
        let servers = &self.set.servers;
        let bad = || {
            LogError::Bad(format!(
                "transaction-log server {} is on the bad-server list",
                self.set.name(self.idx)
            ))
        };
        let mut pause = Duration::from_millis(50);
        loop {
            if servers.is_bad(self.idx) {
                return Err(bad());
            }
            let error =
                match tokio::time::timeout(WRITE_ATTEMPT, writer.write(record.clone())).await {
                    Ok(Ok(reply)) => {
                        servers.report_ok(self.idx);
                        return Ok(reply);
                    }
                    Ok(Err(LogError::Unavailable(e))) => e,
                    Ok(Err(e)) => return Err(e),
                    Err(_) => format!("no answer within {WRITE_ATTEMPT:?}"),
                };
            if servers.report_err(self.idx, &error) {
                return Err(bad());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}

impl LogSink for ServerSink<'_> {
    fn write_record(&self, record: Record) -> BoxFuture<'_, Result<Reply, LogError>> {
        Box::pin(self.write(record))
    }
}
