use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use provisio_providers::catalog::StandardCatalog;
use provisio_shared::amqp::{Publisher, Topology};
use provisio_shared::config::{Config, ConfigArgs};
use provisio_shared::namespaces::NamespaceCache;
use provisio_shared::telemetry::{self, Readiness};
use provisio_shared::{db, shutdown};
use provisio_worker::engine::Engine;
use provisio_worker::logservers::LogServers;
use provisio_worker::logset::LogSet;
use provisio_worker::recovery::Recovery;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Consume requests and run their procedures.
    Engine,
    /// Sweep the transaction log into audit tables and recover crashed transactions.
    Auditor,
}

/// Provisio worker.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[arg(long, value_enum, default_value = "engine")]
    role: Role,
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
        .block_on(run(cli.role, cfg))
}

async fn run(role: Role, cfg: Config) -> anyhow::Result<()> {
    telemetry::init_tracing(&cfg.log);
    if role == Role::Engine && cfg.security.signing_key.is_empty() {
        bail!(
            "security.signing_key is required (set PROVISIO_SIGNING_KEY or security.signing_key_file)"
        );
    }
    let metrics = telemetry::install_metrics()
        .map_err(anyhow::Error::msg)
        .context("installing the metrics recorder")?;
    db::migrate(&cfg.database.url)
        .await
        .context("migrating the configuration database")?;
    let servers = cfg.txlog_servers();
    for s in &servers {
        db::migrate(s)
            .await
            .context("migrating a transaction-log server")?;
    }
    let pool = db::pool(&cfg.database.url, cfg.database.pool_size).context("database pool")?;
    // The transaction-log servers (the configuration database alone by default), each with its
    // own pool, health and bad-server list; a probe takes a listed server back when it answers.
    let separate = LogSet::is_separate(&cfg);
    let servers = Arc::new(LogServers::from_config(&cfg).context("transaction-log servers")?);
    let stop = shutdown::token_on_signal();
    let _probe = servers.spawn_probe(stop.clone());
    let log = Arc::new(LogSet::start(servers.clone(), separate, &cfg));

    let built = provisio_providers::build(&cfg, &pool).context("building providers")?;
    provisio_providers::define_pools(&cfg, &pool)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("defining resource pools")?;
    let recovery = Arc::new(Recovery {
        pool: pool.clone(),
        servers,
        separate,
        registry: built.registry.clone(),
        sql: built.sql.clone(),
        owner: format!("recovery-{}", uuid::Uuid::now_v7()),
        lease_seconds: cfg.engine.lease_seconds as f64,
        keyring: provisio_shared::sealing::Keyring::from_config(&cfg.security)
            .context("security.credential_keys")?,
    });
    if role == Role::Auditor {
        return provisio_worker::auditor::run(cfg, pool, recovery, metrics).await;
    }

    let topology = Topology::new(&cfg.amqp);
    let publisher = Publisher::new(cfg.amqp.url.expose(), topology, Duration::from_secs(5));
    provisio_shared::metrics::engine_baseline(built.registry.names());
    let ready = Readiness::broker();
    let db_ready = Readiness::default();
    let db_watch =
        telemetry::watch_database(pool.clone(), db_ready.clone(), Duration::from_secs(2));
    let mut engine = Engine::new(
        cfg.clone(),
        pool.clone(),
        log,
        built.registry,
        NamespaceCache::new(pool, Box::new(StandardCatalog::from_config(&cfg))),
        publisher,
        ready.clone(),
    );
    engine.recovery = Some(recovery);
    engine.keyring = provisio_shared::sealing::Keyring::from_config(&cfg.security)
        .context("security.credential_keys")?;
    let engine = Arc::new(engine);

    let listener = tokio::net::TcpListener::bind(cfg.engine.listen)
        .await
        .with_context(|| format!("binding {}", cfg.engine.listen))?;
    let addr = listener.local_addr().context("local address")?;
    let http_stop = stop.clone();
    let http = tokio::spawn(async move {
        let checks = vec![("broker", ready), ("database", db_ready)];
        let r = axum::serve(listener, telemetry::ops_router(metrics, checks))
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    tracing::info!(%addr, engine = %engine.engine_id, "engine started");
    println!("listening on http://{addr}");
    engine.clone().run(stop).await?;
    http.abort();
    db_watch.abort();
    tracing::info!("engine stopped");
    Ok(())
}
