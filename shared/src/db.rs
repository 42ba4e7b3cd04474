//! PostgreSQL pools and the migration runner.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::config::Secret;
use crate::retry::{Attempt, Backoff, retry};

mod embedded {
    refinery::embed_migrations!("../schemas/migrations");
}

/// Arbitrary, fixed: serializes migrations between binaries that start together.
const MIGRATION_LOCK: i64 = 0x7072_6f76_6973_696f; // "provisio"

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database URL is invalid: {0}")]
    BadUrl(String),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(String),
    #[error("migration failed: {0}")]
    Migrate(String),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

pub fn pg_config(url: &Secret) -> Result<tokio_postgres::Config, DbError> {
    tokio_postgres::Config::from_str(url.expose()).map_err(|e| DbError::BadUrl(e.to_string()))
}

/// A pool whose connections are checked cheaply on reuse. Creating it does not connect.
pub fn pool(url: &Secret, size: usize) -> Result<Pool, DbError> {
    pool_with_options(url, size, None)
}

/// A pool whose sessions start with `options` (e.g. `-c enable_seqscan=off`).
pub fn pool_with_options(
    url: &Secret,
    size: usize,
    options: Option<&str>,
) -> Result<Pool, DbError> {
    let mut cfg = pg_config(url)?;
    if let Some(o) = options {
        cfg.options(o);
    }
    cfg.connect_timeout(Duration::from_secs(5));
    cfg.application_name("provisio");
    let mgr = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size.max(1))
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

async fn connect(cfg: &tokio_postgres::Config) -> Result<tokio_postgres::Client, DbError> {
    let (client, conn) = cfg.connect(NoTls).await.map_err(DbError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "migration connection ended");
        }
    });
    Ok(client)
}

/// Connects, retrying for up to `wait` so that a fleet can start before its database.
pub async fn connect_with_retry(
    url: &Secret,
    wait: Duration,
) -> Result<tokio_postgres::Client, DbError> {
    let cfg = pg_config(url)?;
    retry(&Backoff::for_duration(wait), |_| {
        let cfg = cfg.clone();
        async move {
            connect(&cfg).await.map_err(|e| {
                tracing::warn!(error = %e, "PostgreSQL not reachable yet");
                Attempt::Retry(e)
            })
        }
    })
    .await
}

/// Applies pending migrations. Safe to call from many processes at once: an advisory lock
/// makes the second wait for the first, then find nothing to do.
pub async fn migrate(url: &Secret) -> Result<(), DbError> {
    let mut client = connect_with_retry(url, Duration::from_mins(1)).await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = embedded::migrations::runner()
        .run_async(&mut client)
        .await
        .map(|_| ())
        .map_err(|e| DbError::Migrate(e.to_string()));
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    result
}

/// Creates the database named in `url` when it does not exist (used by `ops/up` and tests).
pub async fn create_database_if_missing(url: &Secret) -> Result<(), DbError> {
    let cfg = pg_config(url)?;
    let name = cfg
        .get_dbname()
        .ok_or_else(|| DbError::BadUrl("no database name".into()))?
        .to_owned();
    let mut admin = cfg.clone();
    admin.dbname("postgres");
    let client = connect(&admin).await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        if let Err(e) = client.batch_execute(&sql).await {
            // Another process may have created it between the check and the create.
            if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) {
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// Drops a database (tests clean up after themselves).
pub async fn drop_database(url: &Secret) -> Result<(), DbError> {
    let cfg = pg_config(url)?;
    let name = cfg
        .get_dbname()
        .ok_or_else(|| DbError::BadUrl("no database name".into()))?
        .to_owned();
    let mut admin = cfg.clone();
    admin.dbname("postgres");
    let client = connect(&admin).await?;
    let sql = format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        name.replace('"', "\"\"")
    );
    client.batch_execute(&sql).await?;
    Ok(())
}
