//! The `sql` provider: parameterized statements against target databases named in
//! configuration. Compensating procedures undo a call with the rollback statement it declared;
//! two-phase procedures hold one transaction per target open until the engine prepares
//! (`PREPARE TRANSACTION`) and commits (`COMMIT PREPARED`) them all.
//!
//! Input of `execute` and `query`:
//! `{target, sql, params?: [...], rollback?: {sql, params?}}`. Parameters are bound by
//! PostgreSQL's inferred types (bool, integers, floats, text, json/jsonb, uuid); values
//! never become SQL text.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::{Object, Pool};
use futures_util::future::BoxFuture;
use provisio_provider::{Call, Executed, Participation, Provider, ProviderError, Rollback};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::{BuildContext, BuildError};

/// Prefix of every global transaction id this provider prepares; recovery looks for it.
pub const GID_PREFIX: &str = "provisio_";

pub fn gid(tx_id: Uuid, target: &str) -> String {
    format!("{GID_PREFIX}{}_{target}", tx_id.simple())
}

/// Parses a gid back into its transaction id and target.
pub fn parse_gid(gid: &str) -> Option<(Uuid, String)> {
    let rest = gid.strip_prefix(GID_PREFIX)?;
    let (id, target) = rest.split_once('_')?;
    Some((Uuid::parse_str(id).ok()?, target.to_owned()))
}

/// The actions namespaces may call.
pub const ACTIONS: &[&str] = &["execute", "query"];

/// The constructor of [`crate::BUILTINS`]: one pool per configured target. The provider is
/// also left in `ctx.sql`, for recovery.
pub fn build(ctx: &mut BuildContext<'_>) -> Result<Arc<dyn Provider>, BuildError> {
    let mut targets = HashMap::new();
    for (name, t) in &ctx.config.providers.sql.targets {
        let p = provisio_shared::db::pool(&t.url, t.pool_size.unwrap_or(8))
            .map_err(|e| BuildError::SqlTarget(name.clone(), e.to_string()))?;
        targets.insert(name.clone(), p);
    }
    let sql = Arc::new(SqlProvider::new(targets));
    ctx.sql = Some(sql.clone());
    Ok(sql)
}

pub struct SqlProvider {
    targets: HashMap<String, Pool>,
    /// Two-phase transactions in progress: one open connection per target.
    open: Mutex<HashMap<Uuid, Vec<(String, Object)>>>,
}

fn invalid(msg: impl Into<String>) -> ProviderError {
    ProviderError::permanent("invalid_input", msg)
}

fn db_error(e: &tokio_postgres::Error) -> ProviderError {
    match e.code() {
        // Constraint violations, syntax errors, …: trying again cannot help.
        Some(code)
            if !code.code().starts_with("08")
                && !code.code().starts_with("40")
                && !code.code().starts_with("57") =>
        {
            ProviderError::permanent(format!("sql_{}", code.code()), e.to_string())
        }
        _ => ProviderError::retryable("unavailable", e.to_string()),
    }
}

fn param(ty: &Type, v: &Value) -> Result<Box<dyn ToSql + Sync + Send>, ProviderError> {
    let mismatch = || invalid(format!("parameter {v} does not fit type {ty}"));
    Ok(match *ty {
        Type::BOOL => Box::new(if v.is_null() {
            None
        } else {
            Some(v.as_bool().ok_or_else(mismatch)?)
        }),
        Type::INT2 => Box::new(if v.is_null() {
            None
        } else {
            Some(i16::try_from(v.as_i64().ok_or_else(mismatch)?).map_err(|_| mismatch())?)
        }),
        Type::INT4 => Box::new(if v.is_null() {
            None
        } else {
            Some(i32::try_from(v.as_i64().ok_or_else(mismatch)?).map_err(|_| mismatch())?)
        }),
        Type::INT8 => Box::new(if v.is_null() {
            None
        } else {
            Some(v.as_i64().ok_or_else(mismatch)?)
        }),
        Type::FLOAT4 => Box::new(if v.is_null() {
            None
        } else {
            Some(v.as_f64().ok_or_else(mismatch)? as f32)
        }),
        Type::FLOAT8 => Box::new(if v.is_null() {
            None
        } else {
            Some(v.as_f64().ok_or_else(mismatch)?)
        }),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            Box::new(match v {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            })
        }
        Type::JSON | Type::JSONB => Box::new(v.clone()),
        Type::UUID => Box::new(if v.is_null() {
            None
        } else {
            Some(Uuid::parse_str(v.as_str().ok_or_else(mismatch)?).map_err(|_| mismatch())?)
        }),
        _ => {
            return Err(invalid(format!(
                "parameter type {ty} is not supported; cast it to text in the statement"
            )));
        }
    })
}

struct Statement {
    target: String,
    sql: String,
    params: Vec<Value>,
}

fn statement(v: &Value, what: &str) -> Result<Statement, ProviderError> {
    let target = v.get("target").and_then(Value::as_str).ok_or_else(|| {
        invalid(format!(
            "{what}: `target` (a configured target name) is required"
        ))
    })?;
    let sql = v
        .get("sql")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{what}: `sql` is required")))?;
    let params = match v.get("params") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(invalid(format!("{what}: `params` must be an array"))),
    };
    Ok(Statement {
        target: target.to_owned(),
        sql: sql.to_owned(),
        params,
    })
}

/// Runs one statement on `client`; rows come back as JSON objects.
async fn run(
    client: &tokio_postgres::Client,
    st: &Statement,
    rows_wanted: bool,
) -> Result<Value, ProviderError> {
    let returns_rows = rows_wanted || st.sql.to_ascii_lowercase().contains("returning");
    let text = if returns_rows {
        format!(
            "WITH provisio_rows AS ({}) SELECT coalesce(json_agg(provisio_rows), '[]'::json) FROM provisio_rows",
            st.sql
        )
    } else {
        st.sql.clone()
    };
    let prepared = client.prepare(&text).await.map_err(|e| db_error(&e))?;
    if prepared.params().len() != st.params.len() {
        return Err(invalid(format!(
            "the statement takes {} parameters, {} given",
            prepared.params().len(),
            st.params.len()
        )));
    }
    let boxed: Vec<Box<dyn ToSql + Sync + Send>> = prepared
        .params()
        .iter()
        .zip(&st.params)
        .map(|(t, v)| param(t, v))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&(dyn ToSql + Sync)> = boxed
        .iter()
        .map(|b| b.as_ref() as &(dyn ToSql + Sync))
        .collect();
    if returns_rows {
        let row = client
            .query_one(&prepared, &refs)
            .await
            .map_err(|e| db_error(&e))?;
        let rows: Value = row.get(0);
        let n = rows.as_array().map_or(0, Vec::len);
        Ok(json!({"rows": rows, "affected": n}))
    } else {
        let n = client
            .execute(&prepared, &refs)
            .await
            .map_err(|e| db_error(&e))?;
        Ok(json!({"rows": [], "affected": n}))
    }
}

impl SqlProvider {
    pub fn new(targets: HashMap<String, Pool>) -> Self {
        Self {
            targets,
            open: Mutex::new(HashMap::new()),
        }
    }

    pub fn targets(&self) -> impl Iterator<Item = (&String, &Pool)> {
        self.targets.iter()
    }

    fn pool(&self, target: &str) -> Result<&Pool, ProviderError> {
        self.targets
            .get(target)
            .ok_or_else(|| invalid(format!("no sql target `{target}` is configured")))
    }

    async fn execute_call(&self, call: &Call) -> Result<Executed, ProviderError> {
        let st = statement(&call.input, "input")?;
        let rows_wanted = call.action == "query";
        let rollback = match call.input.get("rollback") {
            None | Some(Value::Null) => None,
            Some(r) => {
                let mut r = r.clone();
                if r.get("target").is_none() {
                    r["target"] = json!(st.target);
                }
                statement(&r, "rollback")?;
                Some(r)
            }
        };
        let pool = self.pool(&st.target)?;
        if call.participation == Participation::TwoPhase && call.action == "execute" {
            // Hold the target's transaction open until prepare/commit. The connection is taken
            // out of the map while the statement runs, so other transactions are not held up.
            let held = {
                let mut open = self.open.lock().await;
                let conns = open.entry(call.tx_id).or_default();
                conns
                    .iter()
                    .position(|(t, _)| *t == st.target)
                    .map(|i| conns.swap_remove(i).1)
            };
            let client = if let Some(c) = held {
                c
            } else {
                let c = pool
                    .get()
                    .await
                    .map_err(|e| ProviderError::retryable("unavailable", e.to_string()))?;
                c.batch_execute("BEGIN").await.map_err(|e| db_error(&e))?;
                c
            };
            let out = run(&client, &st, rows_wanted).await;
            self.open
                .lock()
                .await
                .entry(call.tx_id)
                .or_default()
                .push((st.target.clone(), client));
            return Ok(Executed {
                output: out?,
                rollback: Some(json!({"two_phase": true, "target": st.target})),
            });
        }
        let client = pool
            .get()
            .await
            .map_err(|e| ProviderError::retryable("unavailable", e.to_string()))?;
        let out = run(&client, &st, rows_wanted).await?;
        Ok(Executed {
            output: out,
            rollback: if rows_wanted { None } else { rollback },
        })
    }

    async fn rollback_call(&self, rb: &Rollback) -> Result<(), ProviderError> {
        if rb.data.get("two_phase").and_then(Value::as_bool) == Some(true) {
            // Undone by `abort`, not statement by statement.
            return Ok(());
        }
        let st = statement(&rb.data, "rollback")?;
        let client = self
            .pool(&st.target)?
            .get()
            .await
            .map_err(|e| ProviderError::retryable("unavailable", e.to_string()))?;
        run(&client, &st, false).await.map(|_| ())
    }

    async fn prepare_tx(&self, tx_id: Uuid) -> Result<(), ProviderError> {
        let conns = self.open.lock().await.remove(&tx_id).unwrap_or_default();
        let mut failed = None;
        let mut prepared = Vec::new();
        for (target, client) in conns {
            if failed.is_some() {
                let _ = client.batch_execute("ROLLBACK").await;
                continue;
            }
            match client
                .batch_execute(&format!("PREPARE TRANSACTION '{}'", gid(tx_id, &target)))
                .await
            {
                Ok(()) => prepared.push(target),
                Err(e) => failed = Some(db_error(&e)),
            }
        }
        match failed {
            None => Ok(()),
            Some(e) => {
                for target in prepared {
                    let _ = self.finish_prepared(tx_id, &target, false).await;
                }
                Err(e)
            }
        }
    }

    /// COMMIT PREPARED or ROLLBACK PREPARED; a gid that no longer exists counts as done.
    pub async fn finish_prepared(
        &self,
        tx_id: Uuid,
        target: &str,
        commit: bool,
    ) -> Result<(), ProviderError> {
        let client = self
            .pool(target)?
            .get()
            .await
            .map_err(|e| ProviderError::retryable("unavailable", e.to_string()))?;
        let verb = if commit { "COMMIT" } else { "ROLLBACK" };
        match client
            .batch_execute(&format!("{verb} PREPARED '{}'", gid(tx_id, target)))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) => {
                Ok(())
            }
            Err(e) => Err(ProviderError::retryable("unavailable", e.to_string())),
        }
    }

    /// Prepared transactions of this provider on every target: (tx id, target).
    pub async fn prepared(&self) -> Result<Vec<(Uuid, String)>, ProviderError> {
        let mut out = Vec::new();
        for (name, pool) in &self.targets {
            let client = pool
                .get()
                .await
                .map_err(|e| ProviderError::retryable("unavailable", e.to_string()))?;
            let rows = client
                .query("SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'provisio\\_%' AND database = current_database()", &[])
                .await
                .map_err(|e| db_error(&e))?;
            for r in rows {
                if let Some((tx, target)) = parse_gid(&r.get::<_, String>(0))
                    && target == *name
                {
                    out.push((tx, target));
                }
            }
        }
        Ok(out)
    }

    async fn finish_all(&self, tx_id: Uuid, commit: bool) -> Result<(), ProviderError> {
        if !commit {
            // Still open (never prepared): a plain rollback.
            if let Some(conns) = self.open.lock().await.remove(&tx_id) {
                for (_, client) in conns {
                    let _ = client.batch_execute("ROLLBACK").await;
                }
            }
        }
        let targets: Vec<String> = self.targets.keys().cloned().collect();
        let prepared = self.prepared().await?;
        for target in targets {
            if prepared.iter().any(|(t, tg)| *t == tx_id && *tg == target) {
                self.finish_prepared(tx_id, &target, commit).await?;
            }
        }
        Ok(())
    }
}

impl Provider for SqlProvider {
    fn name(&self) -> &'static str {
        "sql"
    }
    fn execute<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Executed, ProviderError>> {
        Box::pin(self.execute_call(call))
    }
    fn rollback<'a>(&'a self, rb: &'a Rollback) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.rollback_call(rb))
    }
    fn supports_two_phase(&self) -> bool {
        true
    }
    fn prepare(&self, tx_id: Uuid) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(self.prepare_tx(tx_id))
    }
    fn commit(&self, tx_id: Uuid) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(self.finish_all(tx_id, true))
    }
    fn abort(&self, tx_id: Uuid) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(self.finish_all(tx_id, false))
    }
}

/// Keeps the provider shareable as `Arc<SqlProvider>` for recovery as well as `dyn Provider`.
pub type Shared = Arc<SqlProvider>;

#[cfg(test)]
#[path = "sql_tests.rs"]
mod tests;
