//! Logs, metrics and the `/metrics`, `/healthz`, `/readyz` endpoints every process serves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Installs the global tracing subscriber: JSON lines in production, text for humans.
pub fn init_tracing(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = if cfg.format == "json" {
        builder.json().with_current_span(true).try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests) is harmless.
    drop(result);
}

/// Installs the Prometheus recorder (once per process) and describes every metric.
pub fn install_metrics() -> Result<PrometheusHandle, String> {
    let latency = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_records".into()), &sizes))
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    crate::metrics::describe();
    metrics::gauge!(crate::metrics::RUNTIME_THREADS).set(crate::runtime::threads() as f64);
    spawn_upkeep(handle.clone());
    Ok(handle)
}

/// How often the recorder's histogram samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The recorder keeps every histogram sample until a scrape or an upkeep folds it into the
/// buckets (`install_recorder` leaves upkeep to the caller), so a process nobody scrapes would
/// grow by every sample it records. A thread of its own, so that it runs whatever runtime the
/// process has, for the process's life.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep; histograms grow until scraped");
    }
}

/// Readiness of one dependency as a shared flag: the process flips it when the dependency is
/// usable or lost.
#[derive(Clone, Default)]
pub struct Readiness {
    flag: Arc<AtomicBool>,
    /// A gauge that follows the flag (1 or 0), e.g. `provisio_broker_up`.
    gauge: Option<&'static str>,
}

impl Readiness {
    /// The broker connection: `provisio_broker_up` follows it, so that every process that
    /// uses the broker reports whether it has it (0 from the start until it connects).
    pub fn broker() -> Self {
        let r = Self {
            flag: Arc::default(),
            gauge: Some(crate::metrics::BROKER_UP),
        };
        r.set(false);
        r
    }

    pub fn set(&self, ready: bool) {
        self.flag.store(ready, Ordering::Relaxed);
        if let Some(gauge) = self.gauge {
            metrics::gauge!(gauge).set(if ready { 1.0 } else { 0.0 });
        }
    }
    pub fn get(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

/// What `/readyz` checks: named dependencies, all of which must be ready.
pub type Checks = Vec<(&'static str, Readiness)>;

/// Keeps `ready` current with whether `pool` hands out a connection that answers, checking
/// every `every`, until the task is aborted. A process whose database is gone cannot accept
/// or run anything, so its `/readyz` must say so even while the broker is fine.
pub fn watch_database(
    pool: deadpool_postgres::Pool,
    ready: Readiness,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let probe = async {
                let client = pool.get().await.ok()?;
                client.simple_query("SELECT 1").await.ok()
            };
            let up = matches!(
                tokio::time::timeout(DB_PROBE_TIMEOUT, probe).await,
                Ok(Some(_))
            );
            if up != ready.get() {
                if up {
                    tracing::info!("database reachable");
                } else {
                    tracing::warn!("database unreachable: not ready");
                }
            }
            ready.set(up);
            tokio::time::sleep(every).await;
        }
    })
}

const DB_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// `/metrics` (Prometheus text), `/healthz` (the process runs), `/readyz` (every dependency
/// in `checks` is usable; a 503 names the ones that are not).
pub fn ops_router(handle: PrometheusHandle, checks: Checks) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let h = handle.clone();
                async move { h.render() }
            }),
        )
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route(
            "/readyz",
            get(move || {
                let down: Vec<&str> = checks
                    .iter()
                    .filter(|(_, r)| !r.get())
                    .map(|(name, _)| *name)
                    .collect();
                async move {
                    if down.is_empty() {
                        (StatusCode::OK, "ready\n".to_owned())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {}\n", down.join(", ")),
                        )
                    }
                }
            }),
        )
}
