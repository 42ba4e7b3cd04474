//! Interpreter unit tests: every step kind, `when`, `save`, retries, nested procedures and
//! expression errors, against an in-memory provider. Logged models write to a real
//! PostgreSQL database of their own.

use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use provisio_shared::config::Secret;
use provisio_shared::domain::TxModel;
use provisio_shared::namespaces::NamespaceCache;
use provisio_shared::procedure::{self, Catalog, Namespace, NoExternal};
use provisio_shared::provider::{Call, Executed, Provider, ProviderError, Rollback};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Outcome, Run};
use crate::txlog::TxLog;
use provisio_providers::Registry;

/// Records every call; `fail` fails, `flaky` fails (retryably) its first `n` calls per key.
#[derive(Default)]
struct Mem {
    log: Mutex<Vec<(String, String, Value)>>,
    flaky: Mutex<std::collections::HashMap<String, u32>>,
}

impl Provider for Mem {
    fn name(&self) -> &'static str {
        "mem"
    }
    fn execute<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Executed, ProviderError>> {
        Box::pin(async move {
            if let Ok(mut l) = self.log.lock() {
                l.push(("execute".into(), call.step_path.clone(), call.input.clone()));
            }
            match call.action.as_str() {
                "echo" => Ok(Executed {
                    output: call.input.clone(),
                    rollback: Some(call.input.clone()),
                }),
                "fail" => Err(ProviderError::permanent(
                    call.input
                        .get("code")
                        .and_then(Value::as_str)
                        .unwrap_or("boom"),
                    "failed on purpose",
                )),
                "flaky" => {
                    let n = call.input.get("n").and_then(Value::as_u64).unwrap_or(1) as u32;
                    let mut m = self.flaky.lock().expect("lock");
                    let c = m.entry(call.idempotency_key.clone()).or_insert(0);
                    *c += 1;
                    if *c <= n {
                        Err(ProviderError::retryable(
                            "transient",
                            format!("attempt {c}"),
                        ))
                    } else {
                        Ok(Executed {
                            output: json!({"attempts": *c}),
                            rollback: None,
                        })
                    }
                }
                "panic" => panic!("mem provider panics"),
                other => Err(ProviderError::permanent("unknown_action", other.to_owned())),
            }
        })
    }
    fn rollback<'a>(&'a self, rb: &'a Rollback) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            if let Ok(mut l) = self.log.lock() {
                l.push(("rollback".into(), rb.step_path.clone(), rb.data.clone()));
            }
            Ok(())
        })
    }
}

struct MemCatalog;
impl Catalog for MemCatalog {
    fn check_action(&self, provider: &str, _action: &str) -> Result<(), String> {
        if provider == "mem" {
            Ok(())
        } else {
            Err(format!("unknown provider `{provider}`"))
        }
    }
}

struct World {
    mem: Arc<Mem>,
    registry: Registry,
    txlog: TxLog,
    cache: NamespaceCache,
    db: Option<crate::testing::TempDb>,
}

impl World {
    /// `logged`: give the transaction log a real database (compensating model).
    async fn new(logged: bool) -> Self {
        let db = if logged {
            Some(crate::testing::TempDb::new(4).await)
        } else {
            None
        };
        // Without a database the pool points nowhere; `read` runs never touch it.
        let pool = match &db {
            Some(d) => d.pool.clone(),
            None => {
                provisio_shared::db::pool(&Secret::new("postgres://nobody@127.0.0.1:1/none"), 4)
                    .expect("pool")
            }
        };
        let mem = Arc::new(Mem::default());
        let mut registry = Registry::default();
        registry.register(mem.clone());
        Self {
            mem,
            registry,
            txlog: TxLog::start(pool.clone(), 16, 2),
            cache: NamespaceCache::new(pool, Box::new(MemCatalog)),
            db,
        }
    }

    fn compile(doc: &Value) -> Arc<Namespace> {
        Arc::new(procedure::compile(doc, 1, &MemCatalog, &NoExternal).expect("compiles"))
    }

    async fn run(
        &self,
        ns: &Arc<Namespace>,
        procedure: &str,
        model: TxModel,
        input: Value,
    ) -> Outcome {
        let tx_id = Uuid::now_v7();
        if model != TxModel::Read {
            // Step records reference their transaction row.
            let b = begin(tx_id, &tx_id.to_string(), model);
            self.txlog
                .write(crate::txlog::Record::Begin(b))
                .await
                .expect("begin");
        }
        let run = Run::new(
            tx_id,
            std::sync::Arc::from("unit"),
            model,
            &self.registry,
            &self.txlog,
            &self.cache,
            None,
            None,
            json!({"id": "r"}),
            true,
        );
        run.execute(ns, &ns.procedures[procedure].clone(), input)
            .await
    }

    fn calls(&self) -> Vec<(String, String)> {
        self.mem
            .log
            .lock()
            .expect("lock")
            .iter()
            .map(|(k, p, _)| (k.clone(), p.clone()))
            .collect()
    }
}

fn begin(tx_id: Uuid, request_id: &str, model: TxModel) -> crate::txlog::Begin {
    crate::txlog::tests::begin_as(tx_id, request_id, model.as_str())
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[tokio::test]
async fn call_input_save_and_output() {
    let w = World::new(false).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {"p": {"steps": [
        {"id": "a", "call": "mem.echo", "input": "{x: .input.n * 2}", "save": "{doubled: .result.x}"},
        {"id": "b", "call": "mem.echo"}
    ], "output": "{a: .steps.a, b: .steps.b, req: .request.id}"}}}));
    let out = w.run(&ns, "p", TxModel::Read, json!({"n": 21})).await;
    assert_eq!(
        out.result,
        Ok(json!({"a": {"doubled": 42}, "b": {"n": 21}, "req": "r"}))
    );
}

#[tokio::test]
async fn when_skips_and_set_writes_vars() {
    let w = World::new(false).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {"p": {"steps": [
        {"set": {"greeting": "\"hi \" + .input.name", "n": "3"}},
        {"id": "skipped", "when": ".vars.n > 5", "call": "mem.echo"},
        {"id": "ran", "when": ".vars.n < 5", "call": "mem.echo", "input": "{g: .vars.greeting}"}
    ], "output": "{vars: .vars, skipped: .steps.skipped, ran: .steps.ran}"}}}));
    let out = w.run(&ns, "p", TxModel::Read, json!({"name": "Ada"})).await;
    assert_eq!(
        out.result,
        Ok(
            json!({"vars": {"greeting": "hi Ada", "n": 3}, "skipped": null, "ran": {"g": "hi Ada"}})
        )
    );
    assert_eq!(w.calls(), pairs(&[("execute", "2")]));
}

/// Expressions see the scope as one object in key order, with locals beside the fixed
/// fields and `result` only in `save`: the context is assembled field by field for jq, so
/// this pins what the whole-object version showed.
#[tokio::test]
async fn an_expression_sees_the_whole_context_in_key_order() {
    let w = World::new(false).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {"p": {"steps": [
        {"set": {"v": "1"}},
        {"id": "first", "call": "mem.echo", "input": "{a: .input.a}"},
        {"id": "loop", "for_each": "[2]", "as": "item", "steps": [
            {"id": "seen", "call": "mem.echo",
             "input": "{keys: keys_unsorted, item: .item, v: .vars.v, req: .request.id, caller: .caller, first: .steps.first.a}",
             "save": "{keys: keys_unsorted, item: .result.item}"}
        ]}
    ], "output": "{keys: keys_unsorted, seen: .steps.loop, values: [.[] | type]}"}}}));
    let out = w.run(&ns, "p", TxModel::Read, json!({"a": "x"})).await;
    let fixed = ["caller", "input", "request", "steps", "vars"];
    let with = |extra: &[&'static str]| {
        let mut k: Vec<&'static str> = fixed.iter().chain(extra).copied().collect();
        k.sort_unstable();
        k
    };
    let calls = w.mem.log.lock().expect("lock").clone();
    assert_eq!(
        calls[1].2,
        json!({"keys": with(&["item"]), "item": 2, "v": 1, "req": "r", "caller": null, "first": "x"})
    );
    assert_eq!(
        out.result,
        Ok(json!({
            "keys": fixed,
            "seen": [{"seen": {"keys": with(&["item", "result"]), "item": 2}}],
            "values": ["null", "object", "object", "object", "object"],
        }))
    );
}

#[tokio::test]
async fn for_each_runs_per_item_and_records_each_iteration() {
    let w = World::new(false).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {"p": {"steps": [
        {"id": "loop", "for_each": ".input.items", "as": "item", "steps": [
            {"id": "each", "call": "mem.echo", "input": "{v: .item}"}
        ]}
    ], "output": ".steps.loop"}}}));
    let out = w
        .run(&ns, "p", TxModel::Read, json!({"items": ["a", "b"]}))
        .await;
    assert_eq!(
        out.result,
        Ok(json!([{"each": {"v": "a"}}, {"each": {"v": "b"}}]))
    );
    assert_eq!(
        w.calls(),
        pairs(&[("execute", "0[0].0"), ("execute", "0[1].0")])
    );
    let bad = w
        .run(&ns, "p", TxModel::Read, json!({"items": "nope"}))
        .await;
    assert_eq!(
        bad.result.expect_err("not an array").code,
        "expression_failed"
    );
}

#[tokio::test]
async fn switch_picks_a_case_or_the_default() {
    let w = World::new(false).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {"p": {"steps": [
        {"switch": ".input.plan", "cases": {
            "gold": [{"set": {"quota": "100"}}],
            "1": [{"set": {"quota": "1"}}]
        }, "default": [{"set": {"quota": "10"}}]}
    ], "output": ".vars.quota"}}}));
    assert_eq!(
        w.run(&ns, "p", TxModel::Read, json!({"plan": "gold"}))
            .await
            .result,
        Ok(json!(100))
    );
    assert_eq!(
        w.run(&ns, "p", TxModel::Read, json!({"plan": 1}))
            .await
            .result,
        Ok(json!(1))
    );
    assert_eq!(
        w.run(&ns, "p", TxModel::Read, json!({"plan": "tin"}))
            .await
            .result,
        Ok(json!(10))
    );
}

#[tokio::test]
async fn fail_raises_a_coded_error_with_its_step() {
    let w = World::new(false).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {"p": {"steps": [
        {"call": "mem.echo"},
        {"fail": {"code": "no_quota", "message": "\"user \" + .input.user + \" has no quota\""}}
    ]}}}));
    let f = w
        .run(&ns, "p", TxModel::Read, json!({"user": "bo"}))
        .await
        .result
        .expect_err("fails");
    assert_eq!(
        (f.code.as_str(), f.message.as_str(), f.step.as_deref()),
        ("no_quota", "user bo has no quota", Some("1"))
    );
}

#[tokio::test]
async fn nested_procedures_see_their_own_input_and_return_output() {
    let w = World::new(false).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {
        "outer": {"steps": [{"id": "u", "procedure": "inner", "input": "{name: .input.who}"}], "output": ".steps.u"},
        "inner": {"steps": [{"id": "e", "call": "mem.echo", "input": "{hello: .input.name}"}], "output": ".steps.e.hello"}
    }}));
    let out = w
        .run(&ns, "outer", TxModel::Read, json!({"who": "Cy"}))
        .await;
    assert_eq!(out.result, Ok(json!("Cy")));
    assert_eq!(w.calls(), pairs(&[("execute", "0>inner.0")]));
}

#[tokio::test]
async fn retries_only_retryable_errors_up_to_max_attempts() {
    let w = World::new(false).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {
        "ok": {"steps": [{"id": "f", "call": "mem.flaky", "input": "{n: 2}", "retry": {"max_attempts": 3, "initial_ms": 1, "max_ms": 2}}], "output": ".steps.f"},
        "exhausted": {"steps": [{"call": "mem.flaky", "input": "{n: 5}", "retry": {"max_attempts": 2, "initial_ms": 1, "max_ms": 2}}]},
        "permanent": {"steps": [{"call": "mem.fail", "retry": {"max_attempts": 5, "initial_ms": 1}}]}
    }}));
    assert_eq!(
        w.run(&ns, "ok", TxModel::Read, json!({})).await.result,
        Ok(json!({"attempts": 3}))
    );
    let f = w
        .run(&ns, "exhausted", TxModel::Read, json!({}))
        .await
        .result
        .expect_err("exhausted");
    assert_eq!(f.code, "transient");
    let before = w.calls().len();
    let f = w
        .run(&ns, "permanent", TxModel::Read, json!({}))
        .await
        .result
        .expect_err("permanent");
    assert_eq!(f.code, "boom");
    assert_eq!(
        w.calls().len(),
        before + 1,
        "a permanent error is not retried"
    );
}

#[tokio::test]
async fn expression_errors_fail_the_step_without_panicking() {
    let w = World::new(false).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {
        "input": {"steps": [{"call": "mem.echo", "input": ".input.n + \"x\""}]},
        "when": {"steps": [{"call": "mem.echo", "when": "error(\"nope\")"}]},
        "output": {"steps": [{"call": "mem.echo"}], "output": "empty"}
    }}));
    for (p, step) in [("input", "0"), ("when", "0"), ("output", "output.output")] {
        let f = w
            .run(&ns, p, TxModel::Read, json!({"n": 1}))
            .await
            .result
            .expect_err("fails");
        assert_eq!(f.code, "expression_failed", "{p}: {f:?}");
        assert_eq!(f.step.as_deref(), Some(step), "{p}");
    }
    assert_eq!(
        w.calls().len(),
        1,
        "only the step before the bad output ran"
    );
}

#[tokio::test]
async fn a_panicking_provider_fails_the_step() {
    let w = World::new(false).await;
    let ns = World::compile(
        &json!({"namespace": "t", "procedures": {"p": {"steps": [{"call": "mem.panic"}]}}}),
    );
    let f = w
        .run(&ns, "p", TxModel::Read, json!({}))
        .await
        .result
        .expect_err("fails");
    assert_eq!(f.code, "provider_panic");
}

#[tokio::test]
async fn compensating_failure_rolls_back_completed_steps_in_reverse_including_nested() {
    let w = World::new(true).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {
        "p": {"steps": [
            {"call": "mem.echo", "input": "{n: 0}"},
            {"procedure": "sub"},
            {"call": "mem.fail"}
        ]},
        "sub": {"steps": [{"call": "mem.echo", "input": "{n: 1}"}, {"call": "mem.echo", "input": "{n: 2}"}]}
    }}));
    let out = w.run(&ns, "p", TxModel::Compensating, json!({})).await;
    assert_eq!(out.result.expect_err("fails").code, "boom");
    assert_eq!(out.rolled_back, 3);
    assert!(!out.rollback_failed);
    assert_eq!(
        w.calls(),
        pairs(&[
            ("execute", "0"),
            ("execute", "1>sub.0"),
            ("execute", "1>sub.1"),
            ("execute", "2"),
            ("rollback", "1>sub.1"),
            ("rollback", "1>sub.0"),
            ("rollback", "0"),
        ])
    );
}

#[tokio::test]
async fn try_rolls_back_its_own_steps_then_catch_sees_the_error() {
    let w = World::new(true).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {"p": {"steps": [
        {"id": "keep", "call": "mem.echo", "input": "{n: 0}"},
        {"try": [
            {"call": "mem.echo", "input": "{n: 1}"},
            {"call": "mem.fail", "input": "{code: \"taken\"}"}
        ], "catch": [
            {"id": "handled", "call": "mem.echo", "input": "{saw: .error.code, at: .error.step}"}
        ]}
    ], "output": ".steps.handled"}}}));
    let out = w.run(&ns, "p", TxModel::Compensating, json!({})).await;
    assert_eq!(out.result, Ok(json!({"saw": "taken", "at": "1.try.1"})));
    assert_eq!(
        w.calls(),
        pairs(&[
            ("execute", "0"),
            ("execute", "1.try.0"),
            ("execute", "1.try.1"),
            ("rollback", "1.try.0"),
            ("execute", "1.catch.0")
        ])
    );
}

#[tokio::test]
async fn read_procedures_are_not_rolled_back() {
    let w = World::new(false).await;
    let ns = World::compile(
        &json!({"namespace": "t", "procedures": {"p": {"transaction": "read", "steps": [
            {"call": "mem.echo"}, {"call": "mem.fail"}
        ]}}}),
    );
    let out = w.run(&ns, "p", TxModel::Read, json!({})).await;
    assert!(out.result.is_err());
    assert_eq!(w.calls(), pairs(&[("execute", "0"), ("execute", "1")]));
    assert!(out.pending.is_empty(), "read logs nothing step by step");
}

#[tokio::test]
async fn output_schema_is_enforced_when_validation_is_on() {
    let w = World::new(false).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {"p": {
        "output_schema": {"type": "object", "required": ["id"]},
        "steps": [{"call": "mem.echo"}], "output": "{name: .input.name}"}}}));
    let f = w
        .run(&ns, "p", TxModel::Read, json!({"name": "x"}))
        .await
        .result
        .expect_err("fails");
    assert_eq!(f.code, "output_invalid");
}

/// A sensitive procedure taints the run from its start: what was logged before stays clear,
/// everything after is sealed (input, output, rollback data, error messages) and so are the
/// outcome's flag; rollback still hands the provider clear data, from the engine and from
/// recovery (which opens the sealed rows).
#[tokio::test]
async fn a_sensitive_procedure_seals_what_its_run_logs_and_rollback_still_works() {
    let w = World::new(true).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {
        "p": {"steps": [
            {"id": "a", "call": "mem.echo", "input": "{plain: 1}"},
            {"id": "b", "procedure": "inner", "input": "{secret: .input.secret}"},
            {"id": "c", "call": "mem.echo", "input": "{copy: .steps.b}"}
        ], "output": ".steps.c"},
        "inner": {"steps": [{"id": "s", "call": "mem.echo", "input": "{secret: .input.secret}", "sensitive": true}],
                  "output": ".steps.s.secret"}
    }}));
    assert!(ns.procedures["inner"].sensitive && !ns.procedures["p"].sensitive);
    let keyring = provisio_shared::sealing::Keyring::derived("unit");
    let tx_id = Uuid::now_v7();
    w.txlog
        .write(crate::txlog::Record::Begin(begin(
            tx_id,
            "req-s",
            TxModel::Compensating,
        )))
        .await
        .expect("begin");
    let run = Run::new(
        tx_id,
        std::sync::Arc::from("unit"),
        TxModel::Compensating,
        &w.registry,
        &w.txlog,
        &w.cache,
        None,
        None,
        json!({"id": "req-s"}),
        true,
    )
    .with_sealing(keyring.clone(), "req-s");
    let out = run
        .execute(&ns, &ns.procedures["p"].clone(), json!({"secret": "S3"}))
        .await;
    assert_eq!(out.result, Ok(json!({"copy": "S3"})));
    assert!(out.tainted);
    // The last step's records ride with the outcome; write them as the outcome would.
    w.txlog
        .write(crate::txlog::Record::Steps(out.pending))
        .await
        .expect("steps");
    let pool = w.db.as_ref().expect("db").pool.clone();
    let client = pool.get().await.expect("client");
    sealed_after_the_taint(&client, tx_id).await;

    // Recovery rolls the transaction back from the log: sealed rows opened for the provider,
    // its own records sealed.
    let recovery = recovery_of(&w, keyring);
    let not_undone = recovery.roll_back_logged(0, tx_id).await.expect("recovery");
    assert_eq!(not_undone, Vec::<Value>::new());
    let undone: Vec<(String, Value)> = w
        .mem
        .log
        .lock()
        .expect("lock")
        .iter()
        .filter(|(k, _, _)| k == "rollback")
        .map(|(_, p, d)| (p.clone(), d.clone()))
        .collect();
    assert_eq!(
        undone,
        vec![
            ("2".to_owned(), json!({"copy": "S3"})),
            ("1>inner.0".to_owned(), json!({"secret": "S3"})),
            ("0".to_owned(), json!({"plain": 1})),
        ]
    );
    let logged: Vec<String> = client
        .query(
            "SELECT input::text FROM tx_steps WHERE tx_id = $1 AND kind = 'rollback' ORDER BY seq",
            &[&tx_id],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(logged.len(), 3);
    assert!(
        logged
            .iter()
            .all(|t| t.contains(provisio_shared::sealing::SEALED)),
        "{logged:?}"
    );
}

/// A recoverer of `w`'s log that owns what the unit runs opened (`engine_id` "unit").
fn recovery_of(w: &World, keyring: provisio_shared::sealing::Keyring) -> crate::recovery::Recovery {
    let db = w.db.as_ref().expect("db");
    let servers = crate::logservers::LogServers::new(
        std::slice::from_ref(&db.url),
        &provisio_shared::config::TxLogConfig::default(),
    )
    .expect("servers");
    crate::recovery::Recovery {
        pool: db.pool.clone(),
        servers: Arc::new(servers),
        separate: false,
        registry: w.registry.clone(),
        sql: None,
        owner: "unit".into(),
        lease_seconds: 30.0,
        keyring,
    }
}

/// The step rows of `tx_id` hold nothing clear of the secret `S3`: step `0`, logged before the
/// taint, is clear; every other row is sealed.
async fn sealed_after_the_taint(client: &tokio_postgres::Client, tx_id: Uuid) {
    let rows = client
        .query(
            "SELECT path, kind, input::text, output::text, rollback_data::text FROM tx_steps WHERE tx_id = $1 ORDER BY seq",
            &[&tx_id],
        )
        .await
        .expect("rows");
    for r in &rows {
        let (path, kind): (String, String) = (r.get(0), r.get(1));
        let text: Vec<Option<String>> = (2..5).map(|i| r.get(i)).collect();
        let joined = format!("{text:?}");
        assert!(!joined.contains("S3"), "{path} {kind}: {joined}");
        if path == "0" {
            assert!(
                joined.contains("plain"),
                "logged before the taint: {joined}"
            );
        } else {
            assert!(
                text.iter()
                    .flatten()
                    .all(|t| t.contains(provisio_shared::sealing::SEALED)),
                "{path} {kind}: {joined}"
            );
        }
    }
}

impl World {
    /// Runs `p` of `ns` as `tx_id` of request `request_id`, its opening (`first_only`) written
    /// with the first call's intent; the returned flag says whether it was opened.
    async fn run_opening(
        &self,
        ns: &Arc<Namespace>,
        tx_id: Uuid,
        request_id: &str,
    ) -> (Outcome, bool) {
        let mut b = begin(tx_id, request_id, TxModel::Compensating);
        b.first_only = true;
        let opened = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let run = Run::new(
            tx_id,
            std::sync::Arc::from("unit"),
            TxModel::Compensating,
            &self.registry,
            &self.txlog,
            &self.cache,
            None,
            None,
            json!({"id": request_id, "attempt": 1}),
            true,
        )
        .with_opening(b, opened.clone());
        let out = run
            .execute(ns, &ns.procedures["p"].clone(), json!({}))
            .await;
        (out, opened.load(std::sync::atomic::Ordering::Relaxed))
    }
}

#[tokio::test]
async fn the_opening_is_written_in_the_first_intents_commit() {
    let w = World::new(true).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {"p": {"steps": [
        {"id": "a", "call": "mem.echo", "input": "{n: 1}"},
        {"id": "b", "call": "mem.echo", "input": "{n: 2}"}
    ], "output": ".steps.b.n"}}}));
    let tx_id = Uuid::now_v7();
    let (out, opened) = w.run_opening(&ns, tx_id, "req-o").await;
    assert_eq!(out.result, Ok(json!(2)));
    assert!(opened && !out.not_opened && !out.open_pending());
    let client = w.db.as_ref().expect("db").pool.get().await.expect("client");
    // One PostgreSQL transaction wrote the request row, the transaction row and the first
    // intent (the outcome, which would update the first two, is not written here).
    let row = client
        .query_one(
            "SELECT r.xmin::text, t.xmin::text, s.xmin::text, t.attempt, r.attempts, r.status \
             FROM requests r JOIN transactions t ON t.request_id = r.id \
             JOIN tx_steps s ON s.tx_id = t.id AND s.seq = 1 AND s.kind = 'intent' \
             WHERE t.id = $1",
            &[&tx_id],
        )
        .await
        .expect("opened");
    let (r, t, s): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert!(r == t && t == s, "one commit: {r} {t} {s}");
    assert_eq!((row.get::<_, i32>(3), row.get::<_, i32>(4)), (1, 1));
    assert_eq!(row.get::<_, String>(5), "running");
    // The second intent (and the first completion) came in a commit of their own.
    let later: i64 = client
        .query_one(
            "SELECT count(*) FROM tx_steps WHERE tx_id = $1 AND xmin::text <> $2",
            &[&tx_id, &s],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(later, 2);
}

#[tokio::test]
async fn a_first_only_opening_of_a_request_already_attempted_writes_and_calls_nothing() {
    let w = World::new(true).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {"p": {"steps": [
        {"id": "a", "call": "mem.echo", "input": "{n: .request.attempt}"}
    ]}}}));
    // A first attempt that ran and was scheduled for a retry.
    let first = Uuid::now_v7();
    w.txlog
        .write(crate::txlog::Record::Begin(begin(
            first,
            "req-r",
            TxModel::Compensating,
        )))
        .await
        .expect("begin");
    let client = w.db.as_ref().expect("db").pool.get().await.expect("client");
    client
        .batch_execute(
            "UPDATE transactions SET status = 'rolled_back', finished_at = now(), lease_until = NULL; \
             UPDATE requests SET status = 'scheduled'",
        )
        .await
        .expect("retry");
    let tx_id = Uuid::now_v7();
    let (out, opened) = w.run_opening(&ns, tx_id, "req-r").await;
    assert!(out.not_opened && !opened, "{:?}", out.result);
    assert!(w.calls().is_empty(), "no call may be made: {:?}", w.calls());
    let written: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM transactions WHERE id = $1) \
                  + (SELECT count(*) FROM tx_steps WHERE tx_id = $1)",
            &[&tx_id],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(written, 0);
    let row = client
        .query_one(
            "SELECT status, attempts FROM requests WHERE id = 'req-r'",
            &[],
        )
        .await
        .expect("request");
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1)),
        ("scheduled".into(), 1)
    );
}

#[tokio::test]
async fn a_run_without_calls_leaves_its_opening_to_the_outcome() {
    let w = World::new(true).await;
    let ns = World::compile(&json!({"namespace": "t", "procedures": {"p": {"steps": [
        {"set": {"x": "1"}}
    ], "output": ".vars.x"}}}));
    let tx_id = Uuid::now_v7();
    let (out, opened) = w.run_opening(&ns, tx_id, "req-z").await;
    assert_eq!(out.result, Ok(json!(1)));
    assert!(out.open_pending() && !opened && !out.not_opened);
    let client = w.db.as_ref().expect("db").pool.get().await.expect("client");
    let n: i64 = client
        .query_one("SELECT count(*) FROM transactions WHERE id = $1", &[&tx_id])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 0, "nothing written before the outcome");
}
