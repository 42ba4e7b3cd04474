//! The providers' section of the configuration (`[providers.*]`): which built-in providers
//! are on, their targets and services, remote providers, and per-provider limits.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProvidersConfig {
    pub test: TestProviderConfig,
    pub sql: SqlProviderConfig,
    pub http: HttpProviderConfig,
    pub resource: ResourceProviderConfig,
    /// Remote providers (the remote-provider protocol), by provider name.
    pub remote: BTreeMap<String, RemoteProviderConfig>,
    /// Per-provider limits, enforced per engine, by provider name.
    pub limits: BTreeMap<String, ProviderLimits>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SqlProviderConfig {
    /// Target databases by name; a namespace names the target, never a URL.
    pub targets: BTreeMap<String, SqlTarget>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SqlTarget {
    pub url: Secret,
    pub url_file: Option<PathBuf>,
    pub pool_size: Option<usize>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpProviderConfig {
    /// External services by name; requests name the service and a path, never a URL.
    pub services: BTreeMap<String, HttpService>,
    /// Hosts the `http` provider may call; empty means any host of a configured service.
    /// A second line of defence: a service pointed at another host (a typo, a tampered file)
    /// fails start-up instead of receiving the requests and the service's bearer token.
    pub allowed_hosts: Vec<String>,
}

impl HttpProviderConfig {
    /// Whether `url`'s host is on the allow-list (always, when the list is empty). Names
    /// compare case-insensitively; IPv6 addresses may be listed with or without brackets.
    pub fn host_allowed(&self, url: &url::Url) -> bool {
        if self.allowed_hosts.is_empty() {
            return true;
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            None => return false,
        };
        self.allowed_hosts.iter().any(|h| {
            h.trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .eq_ignore_ascii_case(&host)
        })
    }

    /// A service's base URL, checked: http(s), with a host on the allow-list, and neither
    /// credentials, query nor fragment (a path joined to it would drop or carry them).
    pub fn base_url(&self, name: &str) -> Result<url::Url, ConfigError> {
        let invalid = |why: &str| {
            ConfigError::Invalid(format!("providers.http.services.{name}.base_url {why}"))
        };
        let svc = self
            .services
            .get(name)
            .ok_or_else(|| invalid("is missing (no such service)"))?;
        let url =
            url::Url::parse(&svc.base_url).map_err(|e| invalid(&format!("is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(invalid("must be an http(s) URL with a host"));
        }
        if !url.username().is_empty()
            || url.password().is_some()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(invalid(
                "must not carry credentials, a query or a fragment (use `token` for credentials)",
            ));
        }
        if !self.host_allowed(&url) {
            return Err(invalid(&format!(
                "names host `{}`, which is not in providers.http.allowed_hosts",
                url.host_str().unwrap_or_default()
            )));
        }
        Ok(url)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpService {
    pub base_url: String,
    pub timeout_ms: u64,
    /// Sent as `Authorization: Bearer …` when set.
    pub token: Secret,
}

impl Default for HttpService {
    fn default() -> Self {
        Self {
            base_url: String::new(),
            timeout_ms: 5000,
            token: Secret::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteProviderConfig {
    /// The service answering `POST /execute` and `POST /rollback`.
    pub base_url: String,
    /// Actions namespaces may call (checked at apply time).
    pub actions: Vec<String>,
    pub timeout_ms: u64,
    pub token: Secret,
}

impl Default for RemoteProviderConfig {
    fn default() -> Self {
        Self {
            base_url: String::new(),
            actions: Vec::new(),
            timeout_ms: 5000,
            token: Secret::default(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderLimits {
    /// Calls in flight at once per engine; 0 = unlimited.
    pub concurrency: usize,
    /// Calls started per second per engine; 0 = unlimited.
    pub rate_per_second: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceProviderConfig {
    /// Pools defined (upserted) by engines at start-up.
    pub pools: Vec<PoolConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    #[serde(default = "default_strategy")]
    pub strategy: String,
    pub resources: Vec<PoolResource>,
}

fn default_strategy() -> String {
    "least_used".to_owned()
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolResource {
    pub name: String,
    pub capacity: i32,
    #[serde(default)]
    pub rank: i32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TestProviderConfig {
    /// Fault injection is off unless asked for: a production fleet must not offer `panic`.
    pub enabled: bool,
    /// Fault injection: an engine pauses this long between preparing and committing a
    /// two-phase transaction (lets tests kill it there). Honoured only when `enabled`.
    pub pause_after_prepare_ms: u64,
}
