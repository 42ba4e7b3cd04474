//! Logs, metrics and the `/metrics`, `/healthz`, `/readyz` endpoints every process serves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
    Ok(handle)
}

/// Readiness as a shared flag: the process flips it when its dependencies are usable.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// `/metrics` (Prometheus text), `/healthz` (the process runs), `/readyz` (it can do work).
pub fn ops_router(handle: PrometheusHandle, ready: Readiness) -> Router {
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
                let r = ready.clone();
                async move {
                    if r.get() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        )
}
