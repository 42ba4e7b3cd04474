//! The OpenAPI document (`schemas/openapi.yaml`) is checked against the running service: every
//! answer below must be documented for its path, method and status, and its body must match
//! the documented schema; every documented operation must be exercised here.
#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation is the test failing"
)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use provisio_tests::{TestEnv, demo_namespace, request};
use serde_json::{Value, json};

struct Spec {
    doc: Value,
    seen: BTreeSet<(String, String, String)>,
}

impl Spec {
    fn load() -> anyhow::Result<Self> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/openapi.yaml");
        let doc: Value = serde_norway::from_str(&std::fs::read_to_string(path)?)?;
        Ok(Self {
            doc,
            seen: BTreeSet::new(),
        })
    }

    /// Follows one `$ref` inside the document.
    fn deref<'a>(&'a self, v: &'a Value) -> &'a Value {
        match v
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix('#'))
        {
            Some(pointer) => self.doc.pointer(pointer).unwrap_or(&Value::Null),
            None => v,
        }
    }

    fn check(&mut self, path: &str, method: &str, status: u16, body: &str) {
        let key = (path.to_owned(), method.to_owned(), status.to_string());
        let op = &self.doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not documented");
        let response = self.deref(&op["responses"][status.to_string()]);
        assert!(
            response.is_object(),
            "{method} {path} → {status} is not documented"
        );
        if let Some(schema) = response.pointer("/content/application~1json/schema") {
            // The response schema, with the document's components beside it for `$ref`s.
            let mut root = schema.clone();
            root["components"] = self.doc["components"].clone();
            let validator = jsonschema::validator_for(&root).expect("the schema compiles");
            let value: Value = serde_json::from_str(body)
                .unwrap_or_else(|e| panic!("{method} {path} → {status}: not JSON ({e}): {body}"));
            let errors: Vec<String> = validator
                .iter_errors(&value)
                .map(|e| format!("{}: {e}", e.instance_path()))
                .collect();
            assert!(
                errors.is_empty(),
                "{method} {path} → {status} does not match the document: {errors:?}\n{body}"
            );
        }
        self.seen.insert(key);
    }

    fn operations(&self) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (path, item) in self.doc["paths"].as_object().into_iter().flatten() {
            for method in item.as_object().into_iter().flatten().map(|(m, _)| m) {
                out.insert((path.clone(), method.clone()));
            }
        }
        out
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one running service walked through every documented operation in order, each call recorded in `spec`, which the final check needs complete: split up, the coverage check would need the same state threaded through every piece"
)]
#[tokio::test]
async fn the_running_service_matches_its_openapi_document() -> anyhow::Result<()> {
    let mut spec = Spec::load()?;
    let env = TestEnv::new("openapi").await?;
    let (qm, engine) = tokio::try_join!(env.queue_manager(), env.engine())?;
    let base = qm.url.clone();
    let http = &env.http;
    let key = env.admin_key.clone();
    macro_rules! call {
        ($path:expr, $method:expr, $req:expr) => {{
            let r = $req.send().await?;
            let status = r.status().as_u16();
            let text = r.text().await?;
            spec.check($path, $method, status, &text);
            (status, text)
        }};
    }

    let ns = demo_namespace();
    let url_ns = format!("{base}/v1/namespaces/demo");
    assert_eq!(
        call!(
            "/v1/namespaces/{name}",
            "put",
            http.put(&url_ns).bearer_auth(&key).body(ns.clone())
        )
        .0,
        201
    );
    assert_eq!(
        call!(
            "/v1/namespaces/{name}",
            "put",
            http.put(&url_ns).bearer_auth(&key).body(ns)
        )
        .0,
        200
    );
    assert_eq!(
        call!(
            "/v1/namespaces/{name}",
            "put",
            http.put(&url_ns)
                .bearer_auth(&key)
                .body("namespace: demo\nprocedures: {}\n")
        )
        .0,
        422
    );
    assert_eq!(
        call!(
            "/v1/namespaces/{name}",
            "get",
            http.get(&url_ns).bearer_auth(&key)
        )
        .0,
        200
    );
    assert_eq!(
        call!(
            "/v1/namespaces/{name}",
            "get",
            http.get(format!("{base}/v1/namespaces/none"))
                .bearer_auth(&key)
        )
        .0,
        404
    );
    assert_eq!(
        call!(
            "/v1/namespaces",
            "get",
            http.get(format!("{base}/v1/namespaces")).bearer_auth(&key)
        )
        .0,
        200
    );
    assert_eq!(
        call!(
            "/v1/namespaces",
            "get",
            http.get(format!("{base}/v1/namespaces"))
        )
        .0,
        401
    );

    let submit = format!("{base}/v1/requests");
    let mut body = request("demo", "hello", json!({"name": "Oa"}));
    body["id"] = json!("oa-1");
    assert_eq!(
        call!(
            "/v1/requests",
            "post",
            http.post(&submit).bearer_auth(&key).json(&body)
        )
        .0,
        202
    );
    let waited = request("demo", "hello", json!({"name": "Ob"}));
    assert_eq!(
        call!(
            "/v1/requests",
            "post",
            http.post(format!("{submit}?wait=30"))
                .bearer_auth(&key)
                .json(&waited)
        )
        .0,
        200
    );
    assert_eq!(
        call!("/v1/requests", "post", http.post(&submit).json(&body)).0,
        401
    );
    assert_eq!(
        call!(
            "/v1/requests",
            "post",
            http.post(&submit).bearer_auth(&key).body("{")
        )
        .0,
        400
    );
    assert_eq!(
        call!(
            "/v1/requests",
            "post",
            http.post(&submit)
                .bearer_auth(&key)
                .json(&request("demo", "none", json!({})))
        )
        .0,
        404
    );
    let mut other = body.clone();
    other["input"] = json!({"name": "changed"});
    assert_eq!(
        call!(
            "/v1/requests",
            "post",
            http.post(&submit).bearer_auth(&key).json(&other)
        )
        .0,
        409
    );
    let big = request("demo", "hello", json!({"pad": "x".repeat(300 * 1024)}));
    assert_eq!(
        call!(
            "/v1/requests",
            "post",
            http.post(&submit).bearer_auth(&key).json(&big)
        )
        .0,
        413
    );
    let scheduled = json!({"namespace": "demo", "procedure": "hello", "retry": {"count": 101, "interval_ms": 10}});
    assert_eq!(
        call!(
            "/v1/requests",
            "post",
            http.post(&submit).bearer_auth(&key).json(&scheduled)
        )
        .0,
        422
    );

    let batch = json!([request("demo", "hello", json!({"name": "Oc"})), {"namespace": "demo"}]);
    assert_eq!(
        call!(
            "/v1/requests:batch",
            "post",
            http.post(format!("{base}/v1/requests:batch"))
                .bearer_auth(&key)
                .json(&batch)
        )
        .0,
        200
    );
    let (status, text) = call!(
        "/v1/requests:batch",
        "post",
        http.post(format!("{base}/v1/requests:batch?wait=30"))
            .bearer_auth(&key)
            .json(&batch)
    );
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&text)?["results"][0]["status"],
        200,
        "finished within the wait: {text}"
    );
    assert_eq!(
        call!(
            "/v1/requests",
            "get",
            http.get(format!("{submit}?limit=2")).bearer_auth(&key)
        )
        .0,
        200
    );
    assert_eq!(
        call!(
            "/v1/requests",
            "get",
            http.get(format!("{submit}?limit=0")).bearer_auth(&key)
        )
        .0,
        400
    );
    assert_eq!(
        call!(
            "/v1/requests/{id}",
            "get",
            http.get(format!("{submit}/oa-1")).bearer_auth(&key)
        )
        .0,
        200
    );
    assert_eq!(
        call!(
            "/v1/requests/{id}",
            "get",
            http.get(format!("{submit}/nope")).bearer_auth(&key)
        )
        .0,
        404
    );

    let mut later = request("demo", "hello", json!({"name": "Od"}));
    later["id"] = json!("oa-later");
    later["not_before"] = json!("2999-01-01T00:00:00Z");
    assert_eq!(
        call!(
            "/v1/requests",
            "post",
            http.post(&submit).bearer_auth(&key).json(&later)
        )
        .0,
        202
    );
    let del = format!("{submit}/oa-later");
    assert_eq!(
        call!(
            "/v1/requests/{id}",
            "delete",
            http.delete(&del).bearer_auth(&key)
        )
        .0,
        200
    );
    assert_eq!(
        call!(
            "/v1/requests/{id}",
            "delete",
            http.delete(&del).bearer_auth(&key)
        )
        .0,
        409
    );
    assert_eq!(
        call!(
            "/v1/requests/{id}",
            "delete",
            http.delete(format!("{submit}/nope")).bearer_auth(&key)
        )
        .0,
        404
    );
    // Resuming needs a parked request (tests/dead_letter_api.rs); a cancelled one is refused.
    assert_eq!(
        call!(
            "/v1/requests/{id}:resume",
            "post",
            http.post(format!("{submit}/oa-later:resume"))
                .bearer_auth(&key)
        )
        .0,
        409
    );
    assert_eq!(
        call!(
            "/v1/requests/{id}:resume",
            "post",
            http.post(format!("{submit}/nope:resume")).bearer_auth(&key)
        )
        .0,
        404
    );

    let trusted = format!("{base}/v1/requests/trusted?wait=30");
    let inline =
        json!({"namespace": "demo", "procedure": "adhoc", "steps": [{"call": "test.echo"}]});
    assert_eq!(
        call!(
            "/v1/requests/trusted",
            "post",
            http.post(&trusted).bearer_auth(&key).json(&inline)
        )
        .0,
        200
    );
    let bad = json!({"namespace": "demo", "procedure": "adhoc", "steps": [{"call": "no.such"}]});
    assert_eq!(
        call!(
            "/v1/requests/trusted",
            "post",
            http.post(&trusted).bearer_auth(&key).json(&bad)
        )
        .0,
        422
    );

    let principals = format!("{base}/v1/principals");
    let who = json!({"name": "svc", "groups": ["producers"]});
    assert_eq!(
        call!(
            "/v1/principals",
            "post",
            http.post(&principals).bearer_auth(&key).json(&who)
        )
        .0,
        201
    );
    assert_eq!(
        call!(
            "/v1/principals",
            "post",
            http.post(&principals).bearer_auth(&key).json(&who)
        )
        .0,
        409
    );
    let groups = json!({"groups": ["producers", "trusted-users"]});
    assert_eq!(
        call!(
            "/v1/principals/{name}/groups",
            "put",
            http.put(format!("{principals}/svc/groups"))
                .bearer_auth(&key)
                .json(&groups)
        )
        .0,
        200
    );
    let (status, text) = call!(
        "/v1/principals/{name}/keys",
        "post",
        http.post(format!("{principals}/svc/keys"))
            .bearer_auth(&key)
    );
    assert_eq!(status, 201);
    let key_id = serde_json::from_str::<Value>(&text)?["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let revoke = format!("{principals}/svc/keys/{key_id}");
    assert_eq!(
        call!(
            "/v1/principals/{name}/keys/{key_id}",
            "delete",
            http.delete(&revoke).bearer_auth(&key)
        )
        .0,
        200
    );
    assert_eq!(
        call!(
            "/v1/principals/{name}/keys/{key_id}",
            "delete",
            http.delete(&revoke).bearer_auth(&key)
        )
        .0,
        404
    );
    let expiring = json!({"ttl_seconds": 3600});
    assert_eq!(
        call!(
            "/v1/principals/{name}/keys",
            "post",
            http.post(format!("{principals}/svc/keys"))
                .bearer_auth(&key)
                .json(&expiring)
        )
        .0,
        201
    );
    let grants = format!("{principals}/svc/grants");
    assert_eq!(
        call!(
            "/v1/principals/{name}/grants",
            "put",
            http.put(&grants)
                .bearer_auth(&key)
                .json(&json!(["execute_private"]))
        )
        .0,
        200
    );
    assert_eq!(
        call!(
            "/v1/principals/{name}/grants",
            "put",
            http.put(&grants).bearer_auth(&key).json(&json!(["root"]))
        )
        .0,
        422
    );
    assert_eq!(
        call!(
            "/v1/principals/{name}/grants",
            "get",
            http.get(&grants).bearer_auth(&key)
        )
        .0,
        200
    );
    assert_eq!(
        call!(
            "/v1/principals/{name}/grants",
            "get",
            http.get(format!("{principals}/nobody/grants"))
                .bearer_auth(&key)
        )
        .0,
        404
    );
    let disabled = format!("{principals}/svc/disabled");
    for (body, status) in [
        (json!(true), 200),
        (json!({"disabled": false}), 200),
        (json!("no"), 400),
    ] {
        assert_eq!(
            call!(
                "/v1/principals/{name}/disabled",
                "put",
                http.put(&disabled).bearer_auth(&key).json(&body)
            )
            .0,
            status
        );
    }
    assert_eq!(
        call!(
            "/v1/principals/{name}/disabled",
            "put",
            http.put(format!("{principals}/admin/disabled"))
                .bearer_auth(&key)
                .json(&json!(true))
        )
        .0,
        409
    );
    // A refusal, which the security events record.
    assert_eq!(
        call!(
            "/v1/principals/{name}/grants",
            "get",
            http.get(&grants).bearer_auth("pv_not-a-key")
        )
        .0,
        401
    );
    let (status, text) = call!(
        "/v1/audit/security-events",
        "get",
        http.get(format!("{base}/v1/audit/security-events?limit=10"))
            .bearer_auth(&key)
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        call!(
            "/v1/audit/security-events",
            "get",
            http.get(format!("{base}/v1/audit/security-events?reason=bored"))
                .bearer_auth(&key)
        )
        .0,
        400
    );

    // In-doubt transactions (the whole flow is in tests/in_doubt.rs): the list, and the
    // actions' refusals.
    assert_eq!(
        call!(
            "/v1/transactions",
            "get",
            http.get(format!("{base}/v1/transactions?status=in_doubt"))
                .bearer_auth(&key)
        )
        .0,
        200
    );
    let nobody = uuid::Uuid::now_v7();
    assert_eq!(
        call!(
            "/v1/audit/transactions",
            "get",
            http.get(format!("{base}/v1/audit/transactions?limit=10"))
                .bearer_auth(&key)
        )
        .0,
        200
    );
    assert_eq!(
        call!(
            "/v1/audit/transactions/{id}",
            "get",
            http.get(format!("{base}/v1/audit/transactions/{nobody}"))
                .bearer_auth(&key)
        )
        .0,
        404
    );
    assert_eq!(
        call!(
            "/v1/transactions/{id}:retry-rollback",
            "post",
            http.post(format!("{base}/v1/transactions/{nobody}:retry-rollback"))
                .bearer_auth(&key)
        )
        .0,
        404
    );
    assert_eq!(
        call!(
            "/v1/transactions/{id}:resolve",
            "post",
            http.post(format!("{base}/v1/transactions/{nobody}:resolve"))
                .bearer_auth(&key)
                .json(&json!({}))
        )
        .0,
        400
    );

    // Dead letters (the whole flow is in tests/dead_letter_api.rs): none here.
    assert_eq!(
        call!(
            "/v1/dead-letters",
            "get",
            http.get(format!("{base}/v1/dead-letters?status=all"))
                .bearer_auth(&key)
        )
        .0,
        200
    );
    assert_eq!(
        call!(
            "/v1/dead-letters",
            "get",
            http.get(format!("{base}/v1/dead-letters?status=gone"))
                .bearer_auth(&key)
        )
        .0,
        400
    );
    assert_eq!(
        call!(
            "/v1/dead-letters/{id}:requeue",
            "post",
            http.post(format!("{base}/v1/dead-letters/1:requeue"))
                .bearer_auth(&key)
        )
        .0,
        404
    );
    assert_eq!(
        call!(
            "/v1/dead-letters:requeue",
            "post",
            http.post(format!("{base}/v1/dead-letters:requeue"))
                .bearer_auth(&key)
                .json(&json!({"reason": "delivery_limit"}))
        )
        .0,
        200
    );
    assert_eq!(
        call!(
            "/v1/dead-letters/{id}",
            "delete",
            http.delete(format!("{base}/v1/dead-letters/1"))
                .bearer_auth(&key)
        )
        .0,
        404
    );
    assert_eq!(
        call!(
            "/v1/resources/pools",
            "get",
            http.get(format!("{base}/v1/resources/pools"))
                .bearer_auth(&key)
        )
        .0,
        200
    );

    for p in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(call!(p, "get", http.get(format!("{base}{p}"))).0, 200);
    }

    // Every documented operation was exercised.
    let exercised: BTreeSet<(String, String)> = spec
        .seen
        .iter()
        .map(|(p, m, _)| (p.clone(), m.clone()))
        .collect();
    let missing: Vec<_> = spec.operations().difference(&exercised).cloned().collect();
    assert!(
        missing.is_empty(),
        "documented but not exercised: {missing:?}"
    );
    drop((qm, engine));
    env.cleanup().await;
    Ok(())
}
