use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use provisio_shared::amqp::{Publisher, Topology};
use provisio_shared::catalog::StandardCatalog;
use provisio_shared::config::Config;
use provisio_shared::namespaces::NamespaceCache;
use provisio_shared::telemetry::{self, Readiness};
use provisio_shared::{db, shutdown};
use provisio_worker::engine::Engine;
use provisio_worker::providers::{Registry, test::TestProvider};
use provisio_worker::txlog::TxLog;

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
    /// TOML configuration file (environment variables `PROVISIO_*` override it).
    #[arg(long, env = "PROVISIO_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    print_config: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg = Config::load(cli.config.as_deref()).context("loading configuration")?;
    if cli.print_config {
        print!("{}", cfg.to_masked_toml());
        return Ok(());
    }
    telemetry::init_tracing(&cfg.log);
    if cli.role == Role::Auditor {
        bail!("the auditor role is not implemented yet (see CHANGELOG.md)");
    }
    if cfg.security.signing_key.is_empty() {
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
    // One transaction-log server for now; see docs/transaction-log.md.
    let txlog_url = servers
        .first()
        .cloned()
        .context("no transaction-log server")?;
    let txlog_pool = db::pool(&txlog_url, cfg.txlog.pool_size).context("transaction-log pool")?;
    let txlog = TxLog::start(txlog_pool, cfg.txlog.max_batch, cfg.txlog.writers);

    let mut registry = Registry::default();
    if cfg.providers.test.enabled {
        let mut pg =
            tokio_postgres::Config::from_str(cfg.database.url.expose()).context("database URL")?;
        pg.options("-c synchronous_commit=off");
        let mgr = deadpool_postgres::Manager::new(pg, tokio_postgres::NoTls);
        let test_pool = deadpool_postgres::Pool::builder(mgr)
            .max_size(cfg.database.pool_size.min(8))
            .build()
            .context("test provider pool")?;
        registry.register(Arc::new(TestProvider::new(test_pool)));
    }

    let topology = Topology::new(&cfg.amqp);
    let publisher = Publisher::new(cfg.amqp.url.expose(), topology, Duration::from_secs(5));
    let ready = Readiness::default();
    let engine = Arc::new(Engine::new(
        cfg.clone(),
        pool.clone(),
        txlog,
        registry,
        NamespaceCache::new(pool, Box::new(StandardCatalog::from_config(&cfg))),
        publisher,
        ready.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(cfg.engine.listen)
        .await
        .with_context(|| format!("binding {}", cfg.engine.listen))?;
    let addr = listener.local_addr().context("local address")?;
    let stop = shutdown::token_on_signal();
    let http_stop = stop.clone();
    let http = tokio::spawn(async move {
        let r = axum::serve(listener, telemetry::ops_router(metrics, ready))
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
    tracing::info!("engine stopped");
    Ok(())
}
