//! PostgreSQL pools and the migration runner.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::Secret;
use crate::retry::{Attempt, Backoff, retry};
use crate::tls::{self, Verify};

mod embedded {
    refinery::embed_migrations!("../schemas/migrations");
}

/// Arbitrary, fixed: serializes migrations between binaries that start together.
const MIGRATION_LOCK: i64 = 0x7072_6f76_6973_696f; // "provisio"

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database URL is invalid: {0}")]
    BadUrl(String),
    #[error("database TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(String),
    #[error("migration failed: {0}")]
    Migrate(String),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

/// A PostgreSQL server as a URL names it: what tokio-postgres parses, plus the TLS that the
/// URL's `sslmode` and `sslrootcert` ask for. tokio-postgres knows only `disable`, `prefer`
/// and `require`, and verifies nothing itself, so the verifying modes are taken out of the
/// URL here and become the rustls configuration.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    tls: PgTls,
    mode: &'static str,
}

/// rustls for PostgreSQL connections, which also opens connections over a Unix-domain socket.
///
/// tokio-postgres asks for a TLS connector for every host, with an empty name for a socket,
/// and rustls refuses to build one for an empty name. PostgreSQL never speaks TLS on a socket
/// (and [`PgTarget::parse`] turns TLS off for socket-only targets, as libpq ignores `sslmode`
/// there), so the connector built under a placeholder name is never used to shake hands.
#[derive(Clone)]
pub struct PgTls(MakeRustlsConnect);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for PgTls
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::TlsConnect;
    type Error = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, hostname: &str) -> Result<Self::TlsConnect, Self::Error> {
        let name = if hostname.is_empty() {
            "localhost"
        } else {
            hostname
        };
        tokio_postgres::tls::MakeTlsConnect::<S>::make_tls_connect(&mut self.0, name)
    }
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("hosts", &self.config.get_hosts())
            .field("sslmode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl PgTarget {
    pub fn parse(url: &Secret) -> Result<Self, DbError> {
        let (rest, mode, rootcert) = split_tls_params(url.expose());
        let mut config =
            tokio_postgres::Config::from_str(&rest).map_err(|e| DbError::BadUrl(e.to_string()))?;
        let (ssl, verify, mode) = match mode.as_deref().unwrap_or("prefer") {
            "disable" => (SslMode::Disable, Verify::Nothing, "disable"),
            "prefer" => (SslMode::Prefer, Verify::Nothing, "prefer"),
            // libpq: `require` with a root certificate behaves as `verify-ca`.
            "require" if rootcert.is_some() => (SslMode::Require, Verify::Chain, "require"),
            "require" => (SslMode::Require, Verify::Nothing, "require"),
            "verify-ca" => (SslMode::Require, Verify::Chain, "verify-ca"),
            "verify-full" => (SslMode::Require, Verify::Full, "verify-full"),
            other => {
                return Err(DbError::BadUrl(format!(
                    "sslmode={other} is not supported (disable, prefer, require, verify-ca, verify-full)"
                )));
            }
        };
        config.ssl_mode(if socket_only(&config) {
            SslMode::Disable
        } else {
            ssl
        });
        let roots = match (&rootcert, verify) {
            (Some(source), _) => tls::roots(source)?,
            (None, Verify::Nothing) => rustls::RootCertStore::empty(),
            (None, _) => {
                return Err(DbError::BadUrl(format!(
                    "sslmode={mode} needs sslrootcert=<PEM file> (or sslrootcert=system)"
                )));
            }
        };
        let tls = PgTls(MakeRustlsConnect::new(tls::client_config(verify, roots)?));
        Ok(Self { config, tls, mode })
    }

    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub fn config_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }

    pub fn tls(&self) -> PgTls {
        self.tls.clone()
    }

    /// One connection outside any pool; its driver future is the caller's to run.
    pub async fn connect(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<tokio_postgres::Socket, TlsStream>,
        ),
        tokio_postgres::Error,
    > {
        self.config.connect(self.tls.clone()).await
    }
}

/// The stream under a connection made by [`PgTarget::connect`] (a TLS stream that may be plain).
pub type TlsStream = <PgTls as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream;

/// Whether every host is a Unix-domain socket (a directory: `host=/var/run/postgresql`, or
/// `postgres://user@%2Fvar%2Frun%2Fpostgresql/db`): the cheapest way to a local server, with
/// no TCP and no TLS on either side.
fn socket_only(config: &tokio_postgres::Config) -> bool {
    let hosts = config.get_hosts();
    !hosts.is_empty()
        && hosts
            .iter()
            .all(|h| !matches!(h, tokio_postgres::config::Host::Tcp(_)))
}

/// Takes `sslmode` and `sslrootcert` out of a URL (`postgres://…?sslmode=…`) or a key/value
/// string (`host=… sslmode=…`); the rest goes to tokio-postgres unchanged.
fn split_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let (mut mode, mut rootcert) = (None, None);
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (rest, mut taken) = tls::take_query_params(url, &["sslmode", "sslrootcert"]);
        return (rest, taken.remove("sslmode"), taken.remove("sslrootcert"));
    }
    let mut kept = Vec::new();
    for token in url.split_whitespace() {
        if let Some(v) = token.strip_prefix("sslmode=") {
            mode = Some(v.trim_matches('\'').to_owned());
        } else if let Some(v) = token.strip_prefix("sslrootcert=") {
            rootcert = Some(v.trim_matches('\'').to_owned());
        } else {
            kept.push(token);
        }
    }
    (kept.join(" "), mode, rootcert)
}

/// The tokio-postgres part of a URL (host, database, user…), TLS settings taken out.
pub fn pg_config(url: &Secret) -> Result<tokio_postgres::Config, DbError> {
    Ok(PgTarget::parse(url)?.config)
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
    let target = PgTarget::parse(url)?;
    let tls = target.tls();
    let mut cfg = target.config;
    if let Some(o) = options {
        cfg.options(o);
    }
    cfg.connect_timeout(Duration::from_secs(5));
    cfg.application_name("provisio");
    let mgr = Manager::from_config(
        cfg,
        tls,
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

async fn connect(target: &PgTarget) -> Result<tokio_postgres::Client, DbError> {
    let (client, conn) = target.connect().await.map_err(DbError::Connect)?;
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
    let target = PgTarget::parse(url)?;
    retry(&Backoff::for_duration(wait), |_| {
        let target = target.clone();
        async move {
            connect(&target).await.map_err(|e| {
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
    let mut admin = PgTarget::parse(url)?;
    let name = admin
        .config()
        .get_dbname()
        .ok_or_else(|| DbError::BadUrl("no database name".into()))?
        .to_owned();
    admin.config_mut().dbname("postgres");
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
    let mut admin = PgTarget::parse(url)?;
    let name = admin
        .config()
        .get_dbname()
        .ok_or_else(|| DbError::BadUrl("no database name".into()))?
        .to_owned();
    admin.config_mut().dbname("postgres");
    let client = connect(&admin).await?;
    let sql = format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        name.replace('"', "\"\"")
    );
    client.batch_execute(&sql).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<PgTarget, DbError> {
        PgTarget::parse(&Secret::new(url))
    }

    #[test]
    fn tls_parameters_are_taken_out_of_urls_and_key_value_strings() {
        assert_eq!(
            split_tls_params(
                "postgres://u@h:5/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x"
            ),
            (
                "postgres://u@h:5/db?application_name=x".to_owned(),
                Some("verify-full".to_owned()),
                Some("/tmp/ca.pem".to_owned())
            )
        );
        assert_eq!(
            split_tls_params("postgresql://h/db?sslmode=require"),
            (
                "postgresql://h/db".to_owned(),
                Some("require".to_owned()),
                None
            )
        );
        assert_eq!(
            split_tls_params("host=h dbname=d sslmode=verify-ca sslrootcert=/ca.pem"),
            (
                "host=h dbname=d".to_owned(),
                Some("verify-ca".to_owned()),
                Some("/ca.pem".to_owned())
            )
        );
    }

    #[test]
    fn sslmode_is_honoured_and_prefer_is_the_default() {
        let mode = |url: &str| parse(url).map(|t| (t.mode, t.config.get_ssl_mode()));
        assert_eq!(
            mode("postgres://h/db").ok(),
            Some(("prefer", SslMode::Prefer))
        );
        assert_eq!(
            mode("postgres://h/db?sslmode=disable").ok(),
            Some(("disable", SslMode::Disable))
        );
        assert_eq!(
            mode("postgres://h/db?sslmode=require").ok(),
            Some(("require", SslMode::Require))
        );
    }

    #[test]
    fn a_socket_directory_is_a_host_without_tls() {
        for url in [
            "postgres://u@%2Fvar%2Frun%2Fpostgresql/db",
            "host=/var/run/postgresql dbname=db",
            "postgres://u@%2Fvar%2Frun%2Fpostgresql/db?sslmode=require",
        ] {
            let target = parse(url).ok();
            assert_eq!(
                target.map(|t| t.config.get_ssl_mode()),
                Some(SslMode::Disable),
                "{url}"
            );
        }
        assert_eq!(
            parse("postgres://u@127.0.0.1/db")
                .ok()
                .map(|t| t.config.get_ssl_mode()),
            Some(SslMode::Prefer)
        );
    }

    #[test]
    fn verifying_modes_need_a_root_certificate_and_unknown_modes_are_refused() {
        for url in [
            "postgres://h/db?sslmode=verify-full",
            "postgres://h/db?sslmode=verify-ca",
            "postgres://h/db?sslmode=allow",
        ] {
            assert!(matches!(parse(url), Err(DbError::BadUrl(_))), "{url}");
        }
        assert!(matches!(
            parse("postgres://h/db?sslmode=verify-full&sslrootcert=/no/such/file.pem"),
            Err(DbError::Tls(_))
        ));
    }
}
