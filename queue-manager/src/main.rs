use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use deadpool_postgres::Pool;
use provisio_providers::catalog::StandardCatalog;
use provisio_queue_manager::api;
use provisio_queue_manager::app::App;
use provisio_queue_manager::auth::{KeyStore, bootstrap_admin};
use provisio_shared::amqp::{Publisher, Topology};
use provisio_shared::config::{Config, ConfigArgs};
use provisio_shared::namespaces::NamespaceCache;
use provisio_shared::telemetry::{self, Readiness};
use provisio_shared::{db, shutdown};

/// Provisio queue manager: accepts provisioning requests over HTTP and queues them.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
}

/// mimalloc: the engine and the queue manager allocate many small JSON values per request,
/// where glibc's allocator showed up at ~8 % of all CPU under `ops/bench`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let Some(cfg) = cli
        .config
        .load_or_print()
        .context("loading configuration")?
    else {
        return Ok(());
    };
    provisio_shared::runtime::build(&cfg.runtime)
        .context("starting the async runtime")?
        .block_on(run(cfg))
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    telemetry::init_tracing(&cfg.log);
    if cfg.security.signing_key.is_empty() {
        bail!(
            "security.signing_key is required (set PROVISIO_SIGNING_KEY or security.signing_key_file)"
        );
    }
    let metrics = telemetry::install_metrics()
        .map_err(anyhow::Error::msg)
        .context("installing the metrics recorder")?;

    let pool = prepare_database(&cfg).await?;
    let publisher = Publisher::new(
        cfg.amqp.url.expose(),
        Topology::new(&cfg.amqp),
        Duration::from_millis(cfg.queue_manager.publish_timeout_ms),
    );
    provisio_shared::metrics::queue_manager_baseline(api::ApiError::CODES);
    let ready = Readiness::broker();
    let db_ready = Readiness::default();
    let db_watch =
        telemetry::watch_database(pool.clone(), db_ready.clone(), Duration::from_secs(2));
    match publisher.ensure_connected().await {
        Ok(()) => ready.set(true),
        // Not fatal: requests get 503 until the broker is back, and `/readyz` says so.
        Err(e) => tracing::warn!(error = %e, "broker not reachable at start-up"),
    }
    let app = build_app(&cfg, &pool, &publisher, &ready)?;
    app.keys.wait_listening(Duration::from_secs(2)).await;

    // Keep readiness and the broker gauge current without waiting for traffic.
    let watch = {
        let (publisher, ready) = (publisher.clone(), ready.clone());
        tokio::spawn(async move {
            loop {
                ready.set(publisher.ensure_connected().await.is_ok());
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };

    let scheduler_stop = tokio_util::sync::CancellationToken::new();
    let scheduler = tokio::spawn(provisio_queue_manager::scheduler::run(
        pool.clone(),
        publisher.clone(),
        cfg.security.signing_key.clone(),
        Duration::from_millis(500),
        scheduler_stop.clone(),
    ));
    let depth = tokio::spawn(provisio_queue_manager::depth::run(
        publisher.clone(),
        Duration::from_secs(5),
        scheduler_stop.clone(),
    ));
    let router = api::router(app).merge(telemetry::ops_router(
        metrics,
        vec![("broker", ready), ("database", db_ready)],
    ));
    let listener = tokio::net::TcpListener::bind(cfg.queue_manager.listen)
        .await
        .with_context(|| format!("binding {}", cfg.queue_manager.listen))?;
    let addr = listener.local_addr().context("local address")?;
    let qm = &cfg.queue_manager;
    if let (Some(cert), Some(key)) = (&qm.tls_cert_file, &qm.tls_key_file) {
        let tls = provisio_shared::tls::server_config(cert, key).context("HTTPS certificate")?;
        let listener = provisio_queue_manager::https::TlsListener::new(listener, tls)
            .context("HTTPS listener")?;
        tracing::info!(%addr, "queue manager listening (HTTPS)");
        // Machine-readable line for scripts and tests that start us on port 0.
        println!("listening on https://{addr}");
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown::signal())
            .await
            .context("serving HTTPS")?;
    } else {
        tracing::info!(%addr, "queue manager listening");
        println!("listening on http://{addr}");
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown::signal())
            .await
            .context("serving HTTP")?;
    }
    watch.abort();
    db_watch.abort();
    scheduler_stop.cancel();
    let _ = tokio::join!(scheduler, depth);
    tracing::info!("queue manager stopped");
    Ok(())
}

/// Migrates the configuration database and installs the bootstrap admin key, if configured.
async fn prepare_database(cfg: &Config) -> anyhow::Result<Pool> {
    db::migrate(&cfg.database.url)
        .await
        .context("migrating the configuration database")?;
    let pool = db::pool(&cfg.database.url, cfg.database.pool_size).context("database pool")?;
    if !cfg.security.bootstrap_admin_key.is_empty()
        && bootstrap_admin(&pool, cfg.security.bootstrap_admin_key.expose())
            .await
            .context("bootstrapping the admin key")?
    {
        tracing::info!("bootstrap admin key installed");
    }
    Ok(pool)
}

/// The state the API handlers share, with the acceptor and the waiters started.
fn build_app(
    cfg: &Config,
    pool: &Pool,
    publisher: &Publisher,
    ready: &Readiness,
) -> anyhow::Result<Arc<App>> {
    let namespaces = Arc::new(NamespaceCache::new(
        pool.clone(),
        Box::new(StandardCatalog::from_config(cfg)),
    ));
    namespaces.listen(&cfg.database.url);
    let acceptor = provisio_queue_manager::accept::Acceptor::start(
        pool.clone(),
        publisher.clone(),
        namespaces.clone(),
        cfg.validation.enable_schema_validation,
        cfg.security.signing_key.clone(),
        ready.clone(),
        provisio_shared::sealing::Keyring::from_config(&cfg.security)
            .context("security.credential_keys")?,
    );
    let keys = Arc::new(KeyStore::new(
        pool.clone(),
        Duration::from_secs(cfg.queue_manager.key_cache_seconds),
    ));
    keys.listen(&cfg.database.url);
    let waiters = Arc::new(provisio_queue_manager::wait::Waiters::default());
    waiters.follow(cfg.amqp.url.expose().to_owned(), Topology::new(&cfg.amqp));
    Ok(Arc::new(App {
        keyring: provisio_shared::sealing::Keyring::from_config(&cfg.security)
            .context("security.credential_keys")?,
        rate_limits: provisio_queue_manager::ratelimit::RateLimits::new(
            &cfg.queue_manager.rate_limit,
        ),
        acceptor,
        waiters,
        keys,
        security: provisio_queue_manager::denials::SecurityEvents::start(pool.clone()),
        namespaces,
        publisher: publisher.clone(),
        ready: ready.clone(),
        pool: pool.clone(),
        cfg: cfg.clone(),
    }))
}
