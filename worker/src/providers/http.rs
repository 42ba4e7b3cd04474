//! The `http` provider and the remote-provider protocol.
//!
//! `http.request` calls a service whose base URL is configuration
//! (`providers.http.services.NAME`); a request names the service and a path, never a URL. It
//! sends `Idempotency-Key`, honours the service's timeout, treats 5xx, timeouts and connection
//! errors as retryable and 4xx as permanent, and undoes a call with the compensating call the
//! step declared.
//!
//! A *remote provider* (`providers.remote.NAME`) is any service answering `POST /execute` and
//! `POST /rollback` with the JSON of `schemas/remote-provider.schema.json`; it becomes the
//! provider `NAME` by configuration alone (see docs/providers.md).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::BoxFuture;
use provisio_shared::config::{HttpService, RemoteProviderConfig};
use provisio_shared::provider::{Call, Executed, Provider, ProviderError, Rollback};
use serde_json::{Value, json};

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

/// Paths are appended to the configured base URL; they may not smuggle in another host.
fn check_path(path: &str) -> Result<(), ProviderError> {
    if !path.starts_with('/')
        || path.starts_with("//")
        || path.contains("://")
        || path.split('/').any(|s| s == "..")
        || path.chars().any(char::is_control)
    {
        return Err(invalid(format!(
            "path `{path}` must be an absolute path on the service (no host, no `..`)"
        )));
    }
    Ok(())
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
    services: HashMap<String, HttpService>,
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
    pub fn new(services: HashMap<String, HttpService>) -> Self {
        Self {
            client: reqwest::Client::new(),
            services,
        }
    }

    async fn send(&self, req: &Request, key: &str) -> Result<Value, ProviderError> {
        let svc = self
            .services
            .get(&req.service)
            .ok_or_else(|| invalid(format!("no http service `{}` is configured", req.service)))?;
        let url = format!("{}{}", svc.base_url.trim_end_matches('/'), req.path);
        let mut rb = self
            .client
            .request(req.method.clone(), &url)
            .timeout(Duration::from_millis(svc.timeout_ms))
            .header("Idempotency-Key", key);
        if !svc.token.is_empty() {
            rb = rb.bearer_auth(svc.token.expose());
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
mod tests {
    use super::*;

    #[test]
    fn compensating_calls_can_use_the_answer() {
        let c = json!({"method": "DELETE", "path": "/accounts/{response.id}", "body": {"n": "{response.n}"}});
        let filled = fill(&c, &json!({"id": "a1", "n": 3}));
        assert_eq!(
            filled,
            json!({"method": "DELETE", "path": "/accounts/a1", "body": {"n": "3"}})
        );
    }

    #[test]
    fn paths_cannot_change_the_host() {
        assert!(check_path("/users/1").is_ok());
        for bad in [
            "users",
            "//evil.example/x",
            "/a/../b",
            "/x?u=http://e",
            "/a\nb",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }
}
