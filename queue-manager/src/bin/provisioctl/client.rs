//! The HTTP side: one client for every command, with the API's errors turned into
//! [`Failure`]s that carry the exit code.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Exit codes (listed in `--help` and docs/operations.md); scripts rely on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Usage = 1,
    NotFound = 2,
    Refused = 3,
    Server = 4,
    Partial = 5,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// Why a command failed, when that decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A non-2xx answer.
    #[error("{code}: {message} (HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
        details: Value,
    },
    #[error("cannot reach the queue manager at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{0}")]
    Usage(String),
}

impl Failure {
    pub fn exit(&self) -> Exit {
        match self {
            Self::Api { status: 404, .. } => Exit::NotFound,
            Self::Api { status, .. } if (400..500).contains(status) => Exit::Refused,
            Self::Api { .. } | Self::Unreachable { .. } => Exit::Server,
            Self::Usage(_) => Exit::Usage,
        }
    }

    /// An error answer: the API's `{"error": {code, message, details}}`, or whatever the body
    /// was when something else (a proxy) answered.
    pub fn from_answer(status: StatusCode, body: &Value) -> Self {
        let code = body
            .pointer("/error/code")
            .and_then(Value::as_str)
            .map_or_else(|| format!("http_{}", status.as_u16()), str::to_owned);
        let message = body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| body.as_str().filter(|s| !s.is_empty()).map(str::to_owned))
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
        Self::Api {
            status: status.as_u16(),
            code,
            message,
            details: body
                .pointer("/error/details")
                .cloned()
                .unwrap_or(Value::Null),
        }
    }
}

/// Every byte but the unreserved ones is escaped, so that an id with `/`, `?`, `#`, `%` or
/// `:` stays one path segment (request ids are any printable text).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// One path segment, percent-encoded.
pub fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

pub enum Body<'a> {
    Empty,
    Json(&'a Value),
    Yaml(String),
}

pub struct Api {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Api {
    pub fn new(base: &str, key: Option<String>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Longer than any `?wait` the API honours (a minute), so waits end on the server.
            .timeout(Duration::from_mins(3))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            key: key.filter(|k| !k.is_empty()),
        })
    }

    /// Sends one request; any HTTP answer is `Ok` with its status and JSON body (a non-JSON
    /// body becomes a JSON string).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Body<'_>,
    ) -> Result<(StatusCode, Value), Failure> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        req = match body {
            Body::Empty => req,
            Body::Json(v) => req.json(v),
            Body::Yaml(text) => req.header("content-type", "application/yaml").body(text),
        };
        let unreachable = |source| Failure::Unreachable {
            url: self.base.clone(),
            source,
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        let value = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(&bytes).trim().to_owned())
            })
        };
        Ok((status, value))
    }

    /// [`Api::send`], with a non-2xx answer as an error.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Body<'_>,
    ) -> Result<(StatusCode, Value), Failure> {
        let (status, value) = self.send(method, path, query, body).await?;
        if status.is_success() {
            Ok((status, value))
        } else {
            Err(Failure::from_answer(status, &value))
        }
    }

    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, Failure> {
        Ok(self.call(Method::GET, path, query, Body::Empty).await?.1)
    }
}

/// `(name, value)` for each filter that is set, for `RequestBuilder::query`.
pub fn filters<'a>(pairs: &[(&'a str, Option<String>)]) -> Vec<(&'a str, String)> {
    pairs
        .iter()
        .filter_map(|(k, v)| v.clone().map(|v| (*k, v)))
        .collect()
}
