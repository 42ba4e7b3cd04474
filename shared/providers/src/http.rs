//! The `http` provider and the remote-provider protocol.
//!
//! `http.request` calls a service whose base URL is configuration
//! (`providers.http.services.NAME`); a request names the service and a path, never a URL. The
//! path is resolved against the base URL and must stay under it (same scheme, host, port and
//! base path), and the host must be on `providers.http.allowed_hosts` when that is set: a
//! procedure author or a trusted caller's inline steps cannot aim the service's bearer token
//! at another host or at another part of the service. It sends `Idempotency-Key`, honours
//! the service's timeout, treats 5xx, timeouts and connection errors as retryable and 4xx as
//! permanent, and undoes a call with the compensating call the step declared.
//!
//! A *remote provider* (`providers.remote.NAME`) is any service answering `POST /execute` and
//! `POST /rollback` with the JSON of `schemas/remote-provider.schema.json`; it becomes the
//! provider `NAME` by configuration alone (see docs/providers.md).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use percent_encoding::percent_decode_str;
use provisio_provider::{Call, Executed, Provider, ProviderError, Rollback};
use provisio_shared::config::{ConfigError, HttpProviderConfig, HttpService, RemoteProviderConfig};
use reqwest::Url;
use serde_json::{Value, json};

use crate::{BuildContext, BuildError};

/// The actions namespaces may call (remote providers have the actions configured for them).
pub const ACTIONS: &[&str] = &["request"];

/// The constructor of [`crate::BUILTINS`]: refuses a bad service configuration, so that the
/// engine stops at start-up.
pub fn build(ctx: &mut BuildContext<'_>) -> Result<Arc<dyn Provider>, BuildError> {
    Ok(Arc::new(
        HttpProvider::new(&ctx.config.providers.http)
            .map_err(|e| BuildError::Http(e.to_string()))?,
    ))
}

fn invalid(msg: impl Into<String>) -> ProviderError {
    ProviderError::permanent("invalid_input", msg)
}

/// Maps a transport failure: timeouts and connection errors may pass, the rest will not.
fn transport(e: &reqwest::Error) -> ProviderError {
    if e.is_timeout() {
        ProviderError::retryable("timeout", e.to_string())
    } else if e.is_connect() || e.is_request() {
        ProviderError::retryable("unavailable", e.to_string())
    } else {
        ProviderError::permanent("http_error", e.to_string())
    }
}

fn invalid_path(path: &str, why: &str) -> ProviderError {
    ProviderError::permanent("invalid_path", format!("path `{path}` {why}"))
}

/// A path must be a plain absolute path on the service. Refused before it is resolved: hosts
/// and schemes in any form, backslashes (URL parsers read them as `/`), control characters,
/// and `..` in any spelling (`%2e%2e`, `..%2f`, double-encoded, `..;`): a server or proxy that
/// decodes after routing would walk out of the base path although the URL as sent stays in.
fn check_path(path: &str) -> Result<(), ProviderError> {
    if !path.starts_with('/') {
        return Err(invalid_path(path, "must start with `/`"));
    }
    if path.starts_with("//") || path.contains("://") || path.contains('\\') {
        return Err(invalid_path(path, "must not name a host or a scheme"));
    }
    // Only the path part: dots in a query string walk nowhere.
    let mut text = path.split(['?', '#']).next().unwrap_or(path).to_owned();
    // Each round peels one layer of encoding; four catch any encoding anyone uses in practice,
    // and a path still changing after them is refused rather than trusted.
    for round in 0.. {
        let dot_dot = text
            .split(['/', '\\'])
            .any(|seg| seg == ".." || seg.starts_with("..;"));
        if dot_dot {
            return Err(invalid_path(
                path,
                "must not contain `..` (in any encoding)",
            ));
        }
        if text.chars().any(char::is_control) {
            return Err(invalid_path(
                path,
                "must not contain control characters (in any encoding)",
            ));
        }
        let decoded = percent_decode_str(&text).decode_utf8_lossy().into_owned();
        if decoded == text {
            return Ok(());
        }
        if round == 4 {
            return Err(invalid_path(path, "is encoded too many times over"));
        }
        text = decoded;
    }
    Ok(())
}

/// `url` lies under `base` (whose path ends with `/`): same scheme, host and port, no
/// credentials, and a path that starts with the base path.
fn is_under(base: &Url, url: &Url) -> bool {
    url.scheme() == base.scheme()
        && url.host() == base.host()
        && url.port_or_known_default() == base.port_or_known_default()
        && url.username().is_empty()
        && url.password().is_none()
        && url.path().starts_with(base.path())
}

/// The URL a path names on a service: checked, resolved with `Url::join` (which removes dot
/// segments as any client or server would), and checked again against the base, so that
/// whatever the parser makes of the path, the request cannot leave the service.
fn resolve(base: &Url, path: &str) -> Result<Url, ProviderError> {
    check_path(path)?;
    // `./rest` keeps `rest` relative even when it looks like a scheme (`urn:x`).
    let url = base
        .join(&format!(".{path}"))
        .map_err(|e| invalid_path(path, &format!("does not resolve: {e}")))?;
    if !is_under(base, &url) {
        return Err(invalid_path(
            path,
            &format!("leaves the service's base URL {base}"),
        ));
    }
    Ok(url)
}

async fn body_of(resp: reqwest::Response) -> Value {
    let text = resp.text().await.unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::String(text))
}

/// Replaces `{response.FIELD}` in every string of `template` with that field of `body`.
fn fill(template: &Value, body: &Value) -> Value {
    match template {
        Value::String(s) if s.contains("{response.") => {
            let mut out = s.clone();
            if let Some(obj) = body.as_object() {
                for (k, v) in obj {
                    let text = match v {
                        Value::String(t) => t.clone(),
                        other => other.to_string(),
                    };
                    out = out.replace(&format!("{{response.{k}}}"), &text);
                }
            }
            Value::String(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(|v| fill(v, body)).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), fill(v, body))).collect())
        }
        other => other.clone(),
    }
}

pub struct HttpProvider {
    client: reqwest::Client,
    services: HashMap<String, Service>,
    config: HttpProviderConfig,
}

/// A configured service with its base URL parsed once, its path ending with `/`.
struct Service {
    base: Url,
    cfg: HttpService,
}

struct Request {
    service: String,
    method: reqwest::Method,
    path: String,
    body: Option<Value>,
}

fn request_of(v: &Value, what: &str) -> Result<Request, ProviderError> {
    let service = v.get("service").and_then(Value::as_str).ok_or_else(|| {
        invalid(format!(
            "{what}: `service` (a configured service name) is required"
        ))
    })?;
    let path = v.get("path").and_then(Value::as_str).unwrap_or("/");
    check_path(path)?;
    let method = v
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or("POST")
        .to_ascii_uppercase();
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .map_err(|_| invalid(format!("{what}: bad method `{method}`")))?;
    Ok(Request {
        service: service.to_owned(),
        method,
        path: path.to_owned(),
        body: v.get("body").cloned(),
    })
}

impl HttpProvider {
    /// Refuses a service whose base URL is not a plain http(s) URL or whose host is not on
    /// the allow-list, so that a bad configuration stops the engine at start-up.
    pub fn new(config: &HttpProviderConfig) -> Result<Self, ConfigError> {
        let mut services = HashMap::new();
        for (name, cfg) in &config.services {
            let mut base = config.base_url(name)?;
            if !base.path().ends_with('/') {
                base.set_path(&format!("{}/", base.path()));
            }
            services.insert(
                name.clone(),
                Service {
                    base,
                    cfg: cfg.clone(),
                },
            );
        }
        Ok(Self {
            client: reqwest::Client::new(),
            services,
            config: config.clone(),
        })
    }

    /// The URL a request goes to; refusals are permanent (`invalid_path`, `host_not_allowed`).
    fn target(&self, req: &Request) -> Result<(&Service, Url), ProviderError> {
        let svc = self
            .services
            .get(&req.service)
            .ok_or_else(|| invalid(format!("no http service `{}` is configured", req.service)))?;
        let url = resolve(&svc.base, &req.path)?;
        if !self.config.host_allowed(&url) {
            return Err(ProviderError::permanent(
                "host_not_allowed",
                format!(
                    "host `{}` is not in providers.http.allowed_hosts",
                    url.host_str().unwrap_or_default()
                ),
            ));
        }
        Ok((svc, url))
    }

    async fn send(&self, req: &Request, key: &str) -> Result<Value, ProviderError> {
        let (svc, url) = self.target(req)?;
        let mut rb = self
            .client
            .request(req.method.clone(), url)
            .timeout(Duration::from_millis(svc.cfg.timeout_ms))
            .header("Idempotency-Key", key);
        if !svc.cfg.token.is_empty() {
            rb = rb.bearer_auth(svc.cfg.token.expose());
        }
        if let Some(b) = &req.body {
            rb = rb.json(b);
        }
        let resp = rb.send().await.map_err(|e| transport(&e))?;
        let status = resp.status();
        let body = body_of(resp).await;
        if status.is_success() {
            Ok(json!({"status": status.as_u16(), "body": body}))
        } else if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            Err(ProviderError::retryable(
                format!("http_{}", status.as_u16()),
                format!("{} answered {status}: {body}", req.service),
            ))
        } else {
            Err(ProviderError::permanent(
                format!("http_{}", status.as_u16()),
                format!("{} answered {status}: {body}", req.service),
            ))
        }
    }

    async fn execute_call(&self, call: &Call) -> Result<Executed, ProviderError> {
        if call.action != "request" {
            return Err(ProviderError::permanent(
                "unknown_action",
                format!("http has no action `{}`", call.action),
            ));
        }
        let req = request_of(&call.input, "input")?;
        // Validate the compensating call now, not when it is needed.
        let rollback = match call.input.get("compensate") {
            None | Some(Value::Null) => None,
            Some(c) => {
                let mut c = c.clone();
                if c.get("service").is_none() {
                    c["service"] = json!(req.service);
                }
                request_of(&c, "compensate")?;
                Some(c)
            }
        };
        let output = self.send(&req, &call.idempotency_key).await?;
        // The compensating call may refer to the answer: `/accounts/{response.id}`.
        let rollback = rollback.map(|c| fill(&c, &output["body"]));
        Ok(Executed { output, rollback })
    }

    async fn rollback_call(&self, rb: &Rollback) -> Result<(), ProviderError> {
        let req = request_of(&rb.data, "compensate")?;
        match self
            .send(&req, &format!("{}:rollback", rb.idempotency_key))
            .await
        {
            Ok(_) => Ok(()),
            // Already undone (or never there) counts as undone.
            Err(e) if e.code == "http_404" || e.code == "http_410" => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Provider for HttpProvider {
    fn name(&self) -> &'static str {
        "http"
    }
    fn execute<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Executed, ProviderError>> {
        Box::pin(self.execute_call(call))
    }
    fn rollback<'a>(&'a self, rb: &'a Rollback) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.rollback_call(rb))
    }
}

/// A provider implemented by another service, over the remote-provider protocol.
pub struct RemoteProvider {
    name: String,
    cfg: RemoteProviderConfig,
    client: reqwest::Client,
}

impl RemoteProvider {
    pub fn new(name: String, cfg: RemoteProviderConfig) -> Self {
        Self {
            name,
            cfg,
            client: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: &Value, key: &str) -> Result<Value, ProviderError> {
        let url = format!("{}{path}", self.cfg.base_url.trim_end_matches('/'));
        let mut rb = self
            .client
            .post(&url)
            .timeout(Duration::from_millis(self.cfg.timeout_ms))
            .header("Idempotency-Key", key)
            .json(body);
        if !self.cfg.token.is_empty() {
            rb = rb.bearer_auth(self.cfg.token.expose());
        }
        let resp = rb.send().await.map_err(|e| transport(&e))?;
        let status = resp.status();
        let body = body_of(resp).await;
        if status.is_success() {
            return Ok(body);
        }
        // The documented error body wins; otherwise 5xx may pass and 4xx will not.
        let err = body.get("error");
        let code = err
            .and_then(|e| e.get("code"))
            .and_then(Value::as_str)
            .map_or_else(|| format!("http_{}", status.as_u16()), str::to_owned);
        let message = err
            .and_then(|e| e.get("message"))
            .and_then(Value::as_str)
            .map_or_else(|| format!("{} answered {status}", self.name), str::to_owned);
        let retryable = err
            .and_then(|e| e.get("retryable"))
            .and_then(Value::as_bool)
            .unwrap_or(status.is_server_error());
        Err(ProviderError {
            code,
            message,
            retryable,
        })
    }
}

impl Provider for RemoteProvider {
    fn name(&self) -> &str {
        &self.name
    }
    fn execute<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Executed, ProviderError>> {
        Box::pin(async move {
            let mut body = json!({
                "tx_id": call.tx_id, "idempotency_key": call.idempotency_key, "step_path": call.step_path,
                "action": call.action, "input": call.input,
                "caller": call.caller.as_ref().map(|c| json!({"id": c.id, "name": c.name})),
            });
            if let Some(c) = &call.credentials {
                body["credentials"] = c.clone();
            }
            let answer = self.post("/execute", &body, &call.idempotency_key).await?;
            let Some(obj) = answer.as_object() else {
                return Err(ProviderError::permanent(
                    "bad_answer",
                    format!("{} did not answer with a JSON object", self.name),
                ));
            };
            Ok(Executed {
                output: obj.get("output").cloned().unwrap_or(Value::Null),
                rollback: obj.get("rollback").cloned().filter(|v| !v.is_null()),
            })
        })
    }
    fn rollback<'a>(&'a self, rb: &'a Rollback) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let body = json!({"tx_id": rb.tx_id, "idempotency_key": rb.idempotency_key, "step_path": rb.step_path, "action": rb.action, "data": rb.data});
            self.post("/rollback", &body, &rb.idempotency_key)
                .await
                .map(|_| ())
        })
    }
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
