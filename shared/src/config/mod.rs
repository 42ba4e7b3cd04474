//! One configuration for every binary: defaults, then a TOML file, then `PROVISIO_*`
//! environment variables (nested keys joined by `__`, e.g. `PROVISIO_AMQP__PREFIX`).
//!
//! Secrets never come from the TOML file: they are read from the environment or from a file
//! named by a `*_file` key, so that the file can be committed and shown (`--print-config`).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize, Serializer};

mod providers;
pub use providers::*;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration is invalid: {0}")]
    Invalid(String),
    #[error("secret `{key}` must come from the environment or a file, not from {file}")]
    InlineSecret { key: String, file: String },
    #[error("cannot read secret file {path}: {source}")]
    SecretFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A value that is masked whenever it is printed or serialized.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "\"********\""
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "********" })
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub txlog: TxLogConfig,
    pub amqp: AmqpConfig,
    pub queue_manager: QueueManagerConfig,
    pub engine: EngineConfig,
    pub auditor: AuditorConfig,
    pub security: SecurityConfig,
    pub providers: ProvidersConfig,
    pub validation: ValidationConfig,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The configuration database: namespaces, security, requests. Contains a password in
    /// production, hence a secret; the default needs none (local trust authentication).
    pub url: Secret,
    pub url_file: Option<PathBuf>,
    pub pool_size: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TxLogConfig {
    /// Transaction-log servers. Empty means: the configuration database. From the
    /// environment either as a list (`[url1, url2]`) or as one comma-separated string.
    #[serde(deserialize_with = "list_or_commas")]
    pub servers: Vec<Secret>,
    /// MPF's "Transaction Log Pool Size": connections per server per engine.
    pub pool_size: usize,
    /// MPF's "Tran Log Timeout": how long a silent server is retried before it is marked bad.
    pub timeout_seconds: u64,
    /// How often servers on the bad-server list (or failing) are tried again.
    pub probe_interval_ms: u64,
    /// Largest number of log records committed together by the group-commit writer.
    pub max_batch: usize,
    /// Batches committed concurrently per server. One (the default) commits the next batch as
    /// soon as the previous returns: fewer, larger commits, which on a database with few
    /// cores costs less CPU per request and no latency (docs/decisions.md, stop 18). A
    /// database with many cores and slow flushes may gain from more.
    pub writers: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    pub url: Secret,
    pub url_file: Option<PathBuf>,
    /// Prefix of every exchange and queue name, so that tenants and tests can share a broker.
    pub prefix: String,
    /// `x-delivery-limit` of the request queues: a message redelivered more often is dead.
    pub delivery_limit: u32,
    /// `x-max-length` of `{prefix}.dead`, the broker's raw archive of dead letters (the oldest
    /// are dropped beyond it): operators work from the `dead_letters` table, so the archive
    /// only has to cover the time to look at a message byte for byte.
    pub dead_archive_max_length: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QueueManagerConfig {
    pub listen: SocketAddr,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long a publish may wait for the broker's confirm before the request gets 503.
    pub publish_timeout_ms: u64,
    /// How long a verified API key stays cached (argon2 is deliberately slow).
    pub key_cache_seconds: u64,
    /// Upper bound of `?wait=SECONDS`.
    pub max_wait_seconds: u64,
    /// Submissions each principal may make; off by default.
    pub rate_limit: RateLimitConfig,
    /// PEM certificate chain and private key: with both, the API is served over HTTPS only.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

/// Per-principal limits on submissions (`POST /v1/requests`, `/v1/requests/trusted`,
/// `/v1/requests:batch`), so that one runaway producer cannot fill the queues for everyone.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Submissions per second a principal may sustain (fractions allowed); 0 turns limits off.
    pub per_principal_per_second: f64,
    /// Submissions a principal may make at once after being idle; 0 means one second's worth
    /// (at least 1). A batch larger than this can never pass.
    pub burst: u32,
}

impl RateLimitConfig {
    /// The time one submission's allowance takes to come back; `None` when limits are off.
    pub fn period(&self) -> Option<std::time::Duration> {
        (self.per_principal_per_second > 0.0)
            .then(|| std::time::Duration::try_from_secs_f64(1.0 / self.per_principal_per_second))
            .and_then(Result::ok)
            .filter(|d| !d.is_zero())
    }

    /// The burst in force: as configured, or one second's worth.
    pub fn effective_burst(&self) -> u32 {
        if self.burst > 0 {
            self.burst
        } else {
            (self.per_principal_per_second.ceil() as u32).max(1)
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// Deliveries held per lane (AMQP prefetch) and requests run at once.
    pub prefetch: u16,
    /// Lease on a running transaction; renewed while it runs, expired means "engine died".
    pub lease_seconds: u64,
    /// On SIGTERM: how long running requests may take before they are abandoned to recovery.
    pub grace_seconds: u64,
    /// Write a transaction's opening in the same commit as its first call's intent (one
    /// synchronous commit fewer per request) rather than on its own before the run. Off: the
    /// opening is its own commit, as before (docs/decisions.md).
    pub open_with_first_call: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuditorConfig {
    /// Time between passes (recovery, then sweep) of the active auditor.
    pub interval_ms: u64,
    /// Transactions finished more recently than this stay in the log (for operators).
    pub sweep_min_age_seconds: u64,
    /// Transactions moved per sweep batch (one PostgreSQL transaction each).
    pub sweep_batch: i64,
    /// Audit rows older than this are deleted; 0 keeps them forever.
    pub retention_days: u32,
    pub audit_level: AuditLevel,
}

impl Default for AuditorConfig {
    fn default() -> Self {
        Self {
            interval_ms: 2000,
            sweep_min_age_seconds: 60,
            sweep_batch: 500,
            retention_days: 90,
            audit_level: AuditLevel::default(),
        }
    }
}

/// MPF's Audit Level: which finished transactions are written to the audit tables, and with
/// which data. Transactions not selected are deleted from the log without an audit row.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuditLevel {
    // Which transactions.
    pub with_errors: bool,
    pub marked_for_audit: bool,
    pub aborted: bool,
    pub in_doubt: bool,
    pub successful: bool,
    /// Overrides the others.
    pub all: bool,
    // Which data.
    pub errors: bool,
    pub audit_data: bool,
    pub all_transaction_data: bool,
    pub procedures_marked: bool,
    pub procedures_aborted: bool,
    pub procedures_in_doubt: bool,
    pub procedures_successful: bool,
    pub procedures_failed: bool,
    pub procedures_all: bool,
}

impl Default for AuditLevel {
    fn default() -> Self {
        Self {
            with_errors: true,
            marked_for_audit: true,
            aborted: true,
            in_doubt: true,
            successful: false,
            all: false,
            errors: true,
            audit_data: true,
            all_transaction_data: true,
            procedures_marked: true,
            procedures_aborted: true,
            procedures_in_doubt: true,
            procedures_successful: false,
            procedures_failed: true,
            procedures_all: false,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// HMAC key that the queue manager signs envelopes with and engines verify.
    pub signing_key: Secret,
    pub signing_key_file: Option<PathBuf>,
    /// Becomes the first admin's API key when no admin exists yet.
    pub bootstrap_admin_key: Secret,
    pub bootstrap_admin_key_file: Option<PathBuf>,
    /// Keys that seal request credentials at rest: `id:hex[,id:hex…]` (32-byte keys, 64 hex
    /// digits), the first one sealing, all of them opening (rotation). Empty: one key derived
    /// from `signing_key` (`shared::sealing`).
    pub credential_keys: Secret,
    pub credential_keys_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationConfig {
    /// MPF's "Enable Schema Validation": check inputs and outputs against procedure schemas.
    pub enable_schema_validation: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `json` (production) or `text`.
    pub format: String,
    /// A `tracing` filter such as `info,provisio=debug`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://postgres@127.0.0.1:5432/provisio"),
            url_file: None,
            pool_size: 32,
        }
    }
}

impl Default for TxLogConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            pool_size: 100,
            timeout_seconds: 300,
            probe_interval_ms: 5000,
            max_batch: 256,
            writers: 1,
        }
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            url_file: None,
            prefix: "provisio".to_owned(),
            // With the engines' 2 s requeue pause, about 40 s of database outage before a
            // message is dead-lettered.
            delivery_limit: 20,
            dead_archive_max_length: 100_000,
        }
    }
}

impl Default for QueueManagerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 256 * 1024,
            publish_timeout_ms: 3000,
            max_wait_seconds: 60,
            key_cache_seconds: 60,
            rate_limit: RateLimitConfig::default(),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9100)),
            // A run waits on the log and its providers far more than it computes: more of them
            // in flight fill each group commit and keep the cores busy (docs/decisions.md,
            // "Prefetch 128").
            prefetch: 128,
            lease_seconds: 30,
            grace_seconds: 20,
            open_with_first_call: true,
        }
    }
}

/// The async runtime of a queue manager, engine or auditor process.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads that run the process's tasks. 0 (the default): one per CPU the process may use
    /// (a cgroup CPU limit counts). 1: one thread for everything, with no hand-offs between
    /// threads; that costs less CPU per request where several processes share few cores
    /// (docs/decisions.md, stop 21), and caps the process at one core.
    pub threads: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "json".to_owned(),
            level: "info".to_owned(),
        }
    }
}

/// A list, or one string of comma-separated items: environment variables are strings, and
/// `PROVISIO_TXLOG__SERVERS=url1,url2` is what operators type.
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        One(String),
    }
    Ok(match ListOrString::deserialize(d)? {
        ListOrString::List(v) => v,
        ListOrString::One(s) => s.split(',').map(str::to_owned).collect(),
    }
    .into_iter()
    .map(|s| s.trim().to_owned())
    .filter(|s| !s.is_empty())
    .map(Secret::new)
    .collect())
}

/// The configuration flags every binary takes, so that they layer configuration alike.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file (environment variables `PROVISIO_*` override it).
    #[arg(long, env = "PROVISIO_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl ConfigArgs {
    /// Loads the configuration; with `--print-config`, prints it and returns `None`.
    pub fn load_or_print(&self) -> Result<Option<Config>, ConfigError> {
        let cfg = Config::load(self.config.as_deref())?;
        if self.print_config {
            print!("{}", cfg.to_masked_toml());
            return Ok(None);
        }
        Ok(Some(cfg))
    }
}

/// Keys that hold secrets; the TOML file may not set them.
const SECRET_KEYS: &[&str] = &[
    "database.url",
    "amqp.url",
    "security.signing_key",
    "security.bootstrap_admin_key",
    "security.credential_keys",
];

impl Config {
    /// Loads defaults ← `file` (if given) ← environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, Env::prefixed("PROVISIO_"))
    }

    fn load_from(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let mut fig = Figment::new();
        if let Some(path) = file {
            let toml_only = Figment::from(Toml::file_exact(path));
            for key in SECRET_KEYS {
                if toml_only.find_value(key).is_ok() {
                    return Err(ConfigError::InlineSecret {
                        key: (*key).to_owned(),
                        file: path.display().to_string(),
                    });
                }
            }
            fig = fig.merge(Toml::file_exact(path));
        }
        // Short aliases for the variables that operators type most; the rest use `__` nesting.
        let env = env.map(|key| {
            let lower = key.as_str().to_ascii_lowercase();
            match lower.as_str() {
                "bootstrap_admin_key" => "security.bootstrap_admin_key".into(),
                "signing_key" => "security.signing_key".into(),
                "database_url" => "database.url".into(),
                "amqp_url" => "amqp.url".into(),
                "prefix" => "amqp.prefix".into(),
                other => other.replace("__", ".").into(),
            }
        });
        // Only keys of known sections are settings: other `PROVISIO_*` variables (a client's
        // `PROVISIO_URL`, a test's `PROVISIO_TEST_PG`) are not ours to refuse. A typo inside a
        // known section (`PROVISIO_ENGINE__PREFECH`) is still an error.
        let env = env.filter(|key| {
            let k = key.as_str().to_ascii_lowercase();
            // Keys arrive mapped: `amqp.prefix`, `security.signing_key`, …
            let section = k.split('.').next().unwrap_or("");
            matches!(
                section,
                "database"
                    | "txlog"
                    | "amqp"
                    | "queue_manager"
                    | "engine"
                    | "auditor"
                    | "security"
                    | "providers"
                    | "validation"
                    | "log"
                    | "runtime"
            )
        });
        fig = fig.merge(env);
        let mut cfg: Config = fig
            .extract()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        cfg.read_secret_files()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        fn read(slot: &mut Secret, path: Option<&PathBuf>) -> Result<(), ConfigError> {
            if let Some(path) = path {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
                        path: path.clone(),
                        source,
                    })?;
                *slot = Secret::new(text.trim());
            }
            Ok(())
        }
        read(&mut self.database.url, self.database.url_file.as_ref())?;
        read(&mut self.amqp.url, self.amqp.url_file.as_ref())?;
        read(
            &mut self.security.signing_key,
            self.security.signing_key_file.as_ref(),
        )?;
        read(
            &mut self.security.bootstrap_admin_key,
            self.security.bootstrap_admin_key_file.as_ref(),
        )?;
        read(
            &mut self.security.credential_keys,
            self.security.credential_keys_file.as_ref(),
        )?;
        for target in self.providers.sql.targets.values_mut() {
            let file = target.url_file.clone();
            read(&mut target.url, file.as_ref())?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        crate::sealing::Keyring::from_config(&self.security)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let p = &self.amqp.prefix;
        if p.is_empty()
            || p.len() > 64
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::Invalid(format!(
                "amqp.prefix `{p}` must be 1-64 characters of [A-Za-z0-9_-]"
            )));
        }
        if self.engine.prefetch == 0 {
            return Err(ConfigError::Invalid(
                "engine.prefetch must be at least 1".into(),
            ));
        }
        if self.txlog.max_batch == 0 || self.txlog.writers == 0 {
            return Err(ConfigError::Invalid(
                "txlog.max_batch and txlog.writers must be at least 1".into(),
            ));
        }
        if self.txlog.pool_size == 0
            || self.txlog.timeout_seconds == 0
            || self.txlog.probe_interval_ms == 0
        {
            return Err(ConfigError::Invalid(
                "txlog.pool_size, txlog.timeout_seconds and txlog.probe_interval_ms must be at least 1"
                    .into(),
            ));
        }
        if self.queue_manager.tls_cert_file.is_some() != self.queue_manager.tls_key_file.is_some() {
            return Err(ConfigError::Invalid(
                "queue_manager.tls_cert_file and queue_manager.tls_key_file go together".into(),
            ));
        }
        let rl = &self.queue_manager.rate_limit;
        if !rl.per_principal_per_second.is_finite()
            || rl.per_principal_per_second < 0.0
            || (rl.per_principal_per_second > 0.0 && rl.period().is_none())
        {
            return Err(ConfigError::Invalid(format!(
                "queue_manager.rate_limit.per_principal_per_second `{}` must be 0 (off) or a \
                 positive number of submissions per second",
                rl.per_principal_per_second
            )));
        }
        for name in self.providers.http.services.keys() {
            self.providers.http.base_url(name)?;
        }
        for (name, remote) in &self.providers.remote {
            if crate::domain::Name::parse(name.clone()).is_err()
                || matches!(
                    name.as_str(),
                    "test" | "directory" | "resource" | "sql" | "http"
                )
            {
                return Err(ConfigError::Invalid(format!(
                    "providers.remote.{name}: not a valid or free provider name"
                )));
            }
            if !(remote.base_url.starts_with("http://") || remote.base_url.starts_with("https://"))
            {
                return Err(ConfigError::Invalid(format!(
                    "providers.remote.{name}.base_url must be an http(s) URL"
                )));
            }
        }
        if !matches!(self.log.format.as_str(), "json" | "text") {
            return Err(ConfigError::Invalid(format!(
                "log.format `{}` must be `json` or `text`",
                self.log.format
            )));
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Transaction-log server URLs, defaulting to the configuration database.
    pub fn txlog_servers(&self) -> Vec<Secret> {
        if self.txlog.servers.is_empty() {
            vec![self.database.url.clone()]
        } else {
            self.txlog.servers.clone()
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return its large error type
#[path = "config_tests.rs"]
mod tests;
