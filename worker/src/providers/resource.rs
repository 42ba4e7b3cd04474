//! The `resource` provider, the resource manager: pools of resources with a capacity (mailbox
//! servers, IP ranges, …), stored in the configuration database (schema `provider_resource`,
//! docs/providers.md).
//!
//! | action | input | output | rollback |
//! | --- | --- | --- | --- |
//! | `allocate` | `{pool, amount? (1), consumer?, strategy?}` | `{allocation_id, pool, resource, amount}` | release |
//! | `release` | `{allocation_id}` | `{allocation_id, pool, resource, amount, released}` | allocates the same resource again, if it has room |
//! | `query` | `{pool}` | `{pool, strategy, resources: [{name, capacity, used, free, rank}]}` | none |
//!
//! Allocation never exceeds capacity under concurrency: an allocation locks its pool's row
//! (`FOR UPDATE`) before it picks a resource, so allocations in one pool happen one at a time;
//! the `used <= capacity` check constraint is the last line of defence. Strategies:
//! `least_used` picks the resource with the smallest use (then by name), `ranked` the lowest
//! rank (then least used, then name); the pool's strategy is the default.
//!
//! Idempotency: an allocation records its call's idempotency key (a repeated call returns the
//! same allocation); a release records its result in `provider_resource.idempotency`; a
//! rollback records `rollback:{idempotency_key}` there, so that repeating it does nothing.

use super::input::{boolean, invalid, kind, object, string, uuid};
use deadpool_postgres::{Pool, Transaction};
use futures_util::future::BoxFuture;
use provisio_shared::provider::{Call, Executed, Provider, ProviderError, Rollback};
use serde_json::{Map, Value, json};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::FromSql;
use uuid::Uuid;

/// Longest pool, resource or consumer name accepted.
const MAX_NAME: usize = 255;

/// How `allocate` picks a resource among those with enough free capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The smallest `used`, then by name.
    LeastUsed,
    /// The lowest `rank`, then the smallest `used`, then by name.
    Ranked,
}

impl Strategy {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "least_used" => Some(Self::LeastUsed),
            "ranked" => Some(Self::Ranked),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeastUsed => "least_used",
            Self::Ranked => "ranked",
        }
    }

    /// The candidate query: resources of pool `$1` with at least `$2` free, best first.
    fn pick_sql(self) -> &'static str {
        match self {
            Self::LeastUsed => {
                "SELECT id, name FROM provider_resource.resources \
                 WHERE pool = $1 AND capacity - used >= $2 ORDER BY used, name LIMIT 1"
            }
            Self::Ranked => {
                "SELECT id, name FROM provider_resource.resources \
                 WHERE pool = $1 AND capacity - used >= $2 ORDER BY rank, used, name LIMIT 1"
            }
        }
    }
}

pub struct ResourceProvider {
    pool: Pool,
}

impl ResourceProvider {
    /// `pool`: the configuration database, migrated (schema `provider_resource`).
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    async fn run(&self, call: &Call) -> Result<Executed, ProviderError> {
        let what = format!("resource.{} input", call.action);
        match call.action.as_str() {
            "allocate" => {
                let req = AllocateReq::parse(&call.input, &what)?;
                self.allocate(&call.idempotency_key, &req).await
            }
            "release" => {
                let m = object(&call.input, &what)?;
                let id = uuid(m, "allocation_id", &what)?;
                self.release(&call.idempotency_key, id).await
            }
            "query" => {
                let m = object(&call.input, &what)?;
                let pool = name(m, "pool", &what)?;
                self.query(&pool).await
            }
            other => Err(ProviderError::permanent(
                "unknown_action",
                format!("resource has no action `{other}`"),
            )),
        }
    }

    async fn allocate(&self, key: &str, req: &AllocateReq) -> Result<Executed, ProviderError> {
        if key.is_empty() {
            return Err(invalid("the call has an empty idempotency key"));
        }
        let mut client = self.pool.get().await.map_err(|e| pool_error(&e))?;
        let tx = client.transaction().await.map_err(|e| db_error(&e))?;
        // One allocation per pool at a time: everything below sees every earlier allocation.
        let pool_row = tx
            .query_opt(
                "SELECT strategy FROM provider_resource.pools WHERE name = $1 FOR UPDATE",
                &[&req.pool],
            )
            .await
            .map_err(|e| db_error(&e))?
            .ok_or_else(|| not_found_pool(&req.pool))?;
        let existing = tx
            .query_opt(
                "SELECT a.id, r.pool, r.name, a.amount FROM provider_resource.allocations a \
                 JOIN provider_resource.resources r ON r.id = a.resource_id \
                 WHERE a.idempotency_key = $1",
                &[&key],
            )
            .await
            .map_err(|e| db_error(&e))?;
        if let Some(row) = existing {
            let (id, pool, resource, amount): (Uuid, String, String, i32) =
                (col(&row, 0)?, col(&row, 1)?, col(&row, 2)?, col(&row, 3)?);
            if pool != req.pool {
                return Err(ProviderError::permanent(
                    "idempotency_conflict",
                    format!("this idempotency key already allocated from pool {pool:?}"),
                ));
            }
            tracing::debug!(key, %id, "resource: repeated allocate, answering the allocation");
            return Ok(allocated(id, &pool, &resource, amount));
        }
        let pool_strategy: String = col(&pool_row, 0)?;
        let strategy = req
            .strategy
            .or_else(|| Strategy::parse(&pool_strategy))
            .unwrap_or(Strategy::LeastUsed);
        let pick = tx
            .query_opt(strategy.pick_sql(), &[&req.pool, &req.amount])
            .await
            .map_err(|e| db_error(&e))?
            .ok_or_else(|| {
                ProviderError::permanent(
                    "pool_exhausted",
                    format!("no resource of pool {:?} has {} free", req.pool, req.amount),
                )
            })?;
        let (resource_id, resource): (Uuid, String) = (col(&pick, 0)?, col(&pick, 1)?);
        tx.execute(
            "UPDATE provider_resource.resources SET used = used + $2 WHERE id = $1",
            &[&resource_id, &req.amount],
        )
        .await
        .map_err(|e| db_error(&e))?;
        let id = Uuid::now_v7();
        tx.execute(
            "INSERT INTO provider_resource.allocations \
             (id, idempotency_key, resource_id, amount, consumer) VALUES ($1, $2, $3, $4, $5)",
            &[&id, &key, &resource_id, &req.amount, &req.consumer],
        )
        .await
        .map_err(|e| db_error(&e))?;
        tx.commit().await.map_err(|e| db_error(&e))?;
        Ok(allocated(id, &req.pool, &resource, req.amount))
    }

    async fn release(&self, key: &str, allocation: Uuid) -> Result<Executed, ProviderError> {
        if key.is_empty() {
            return Err(invalid("the call has an empty idempotency key"));
        }
        let mut client = self.pool.get().await.map_err(|e| pool_error(&e))?;
        let tx = client.transaction().await.map_err(|e| db_error(&e))?;
        if let Some(done) = claim(&tx, key).await? {
            tracing::debug!(key, "resource: repeated release, answering from the record");
            return replay("release", &done);
        }
        let r = release_in(&tx, allocation).await?.ok_or_else(|| {
            ProviderError::permanent("not_found", format!("no allocation {allocation}"))
        })?;
        let executed = Executed {
            output: json!({
                "allocation_id": allocation,
                "pool": r.pool,
                "resource": r.resource,
                "amount": r.amount,
                "released": r.released_now,
            }),
            // Only a call that released something has something to undo.
            rollback: Some(json!({"allocation_id": allocation, "released": r.released_now})),
        };
        let record = json!({
            "action": "release",
            "output": executed.output,
            "rollback": executed.rollback,
        });
        tx.execute(
            "UPDATE provider_resource.idempotency SET result = $2 WHERE key = $1",
            &[&key, &record],
        )
        .await
        .map_err(|e| db_error(&e))?;
        tx.commit().await.map_err(|e| db_error(&e))?;
        Ok(executed)
    }

    async fn query(&self, pool: &str) -> Result<Executed, ProviderError> {
        let client = self.pool.get().await.map_err(|e| pool_error(&e))?;
        let row = client
            .query_opt(
                "SELECT strategy FROM provider_resource.pools WHERE name = $1",
                &[&pool],
            )
            .await
            .map_err(|e| db_error(&e))?
            .ok_or_else(|| not_found_pool(pool))?;
        let strategy: String = col(&row, 0)?;
        let resources = client
            .query(
                "SELECT name, capacity, used, rank FROM provider_resource.resources \
                 WHERE pool = $1 ORDER BY rank, name",
                &[&pool],
            )
            .await
            .map_err(|e| db_error(&e))?
            .iter()
            .map(|r| {
                let (name, capacity, used, rank): (String, i32, i32, i32) =
                    (col(r, 0)?, col(r, 1)?, col(r, 2)?, col(r, 3)?);
                Ok(json!({
                    "name": name,
                    "capacity": capacity,
                    "used": used,
                    "free": capacity - used,
                    "rank": rank,
                }))
            })
            .collect::<Result<Vec<_>, ProviderError>>()?;
        Ok(Executed {
            output: json!({"pool": pool, "strategy": strategy, "resources": resources}),
            rollback: None,
        })
    }

    async fn undo(&self, rb: &Rollback) -> Result<(), ProviderError> {
        let what = format!("resource.{} rollback data", rb.action);
        let (allocation, reallocate) = match rb.action.as_str() {
            "allocate" => (
                uuid(object(&rb.data, &what)?, "allocation_id", &what)?,
                false,
            ),
            "release" => {
                let m = object(&rb.data, &what)?;
                let id = uuid(m, "allocation_id", &what)?;
                if !boolean(m, "released", &what)? {
                    // That release found the allocation released already: nothing to undo.
                    return Ok(());
                }
                (id, true)
            }
            // `query` changes nothing.
            "query" => return Ok(()),
            other => {
                return Err(ProviderError::permanent(
                    "unknown_action",
                    format!("resource has no action `{other}` to roll back"),
                ));
            }
        };
        if rb.idempotency_key.is_empty() {
            return Err(invalid("the rollback has an empty idempotency key"));
        }
        let marker = format!("rollback:{}", rb.idempotency_key);
        let mut client = self.pool.get().await.map_err(|e| pool_error(&e))?;
        let tx = client.transaction().await.map_err(|e| db_error(&e))?;
        let fresh = tx
            .execute(
                "INSERT INTO provider_resource.idempotency (key, result) VALUES ($1, $2) \
                 ON CONFLICT (key) DO NOTHING",
                &[&marker, &json!({"action": rb.action, "data": rb.data})],
            )
            .await
            .map_err(|e| db_error(&e))?;
        if fresh == 0 {
            tracing::debug!(
                key = %rb.idempotency_key,
                action = %rb.action,
                "resource: already rolled back"
            );
            return Ok(());
        }
        if reallocate {
            reallocate_in(&tx, allocation).await?;
        } else if release_in(&tx, allocation).await?.is_none() {
            // Undoing an allocation that is not there: nothing to release.
            tracing::debug!(%allocation, "resource: rollback of an unknown allocation");
        }
        tx.commit().await.map_err(|e| db_error(&e))?;
        Ok(())
    }
}

impl Provider for ResourceProvider {
    fn name(&self) -> &'static str {
        "resource"
    }

    fn execute<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Executed, ProviderError>> {
        Box::pin(self.run(call))
    }

    fn rollback<'a>(&'a self, rb: &'a Rollback) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.undo(rb))
    }
}

/// Creates pool `name` or updates its strategy, and creates or updates its `resources`
/// (`(name, capacity, rank)`): capacity and rank are set, `used` is left as it is, resources
/// not listed are left alone. Used by engines at start-up (from configuration) and by tests.
/// A capacity below a resource's current use is refused (`invalid_input`).
pub async fn define_pool(
    pool: &Pool,
    name: &str,
    strategy: &str,
    resources: &[(String, i32, i32)],
) -> Result<(), ProviderError> {
    check_name("pool", name)?;
    let strategy = Strategy::parse(strategy).ok_or_else(|| {
        invalid(format!(
            "pool {name:?}: strategy must be `least_used` or `ranked`, not {strategy:?}"
        ))
    })?;
    let mut seen = std::collections::HashSet::new();
    for (resource, capacity, _) in resources {
        check_name("resource", resource)?;
        if *capacity < 0 {
            return Err(invalid(format!(
                "pool {name:?}: resource {resource:?} has a negative capacity ({capacity})"
            )));
        }
        if !seen.insert(resource.as_str()) {
            return Err(invalid(format!(
                "pool {name:?}: resource {resource:?} is listed twice"
            )));
        }
    }
    let mut client = pool.get().await.map_err(|e| pool_error(&e))?;
    let tx = client.transaction().await.map_err(|e| db_error(&e))?;
    // The upsert locks the pool row, as an allocation does.
    tx.execute(
        "INSERT INTO provider_resource.pools (name, strategy) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET strategy = EXCLUDED.strategy",
        &[&name, &strategy.as_str()],
    )
    .await
    .map_err(|e| db_error(&e))?;
    for (resource, capacity, rank) in resources {
        tx.execute(
            "INSERT INTO provider_resource.resources (id, pool, name, capacity, rank) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (pool, name) DO UPDATE SET capacity = EXCLUDED.capacity, rank = EXCLUDED.rank",
            &[&Uuid::now_v7(), &name, resource, capacity, rank],
        )
        .await
        .map_err(|e| {
            if e.code() == Some(&SqlState::CHECK_VIOLATION) {
                invalid(format!(
                    "pool {name:?}: resource {resource:?} uses more than the new capacity {capacity}"
                ))
            } else {
                db_error(&e)
            }
        })?;
    }
    tx.commit().await.map_err(|e| db_error(&e))?;
    Ok(())
}

// ------------------------------------------------------------------------------------ input

struct AllocateReq {
    pool: String,
    amount: i32,
    consumer: Option<String>,
    strategy: Option<Strategy>,
}

impl AllocateReq {
    fn parse(input: &Value, what: &str) -> Result<Self, ProviderError> {
        let m = object(input, what)?;
        let amount = match m.get("amount") {
            None | Some(Value::Null) => 1,
            Some(v) => v
                .as_i64()
                .and_then(|a| i32::try_from(a).ok())
                .filter(|a| *a >= 1)
                .ok_or_else(|| {
                    invalid(format!(
                        "{what}: `amount` must be a whole number from 1 to {}, not {v}",
                        i32::MAX
                    ))
                })?,
        };
        let consumer = match m.get("consumer") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.chars().count() <= MAX_NAME => Some(s.clone()),
            Some(Value::String(_)) => {
                return Err(invalid(format!(
                    "{what}: `consumer` is longer than {MAX_NAME} characters"
                )));
            }
            Some(other) => {
                return Err(invalid(format!(
                    "{what}: `consumer` must be a string, not {}",
                    kind(other)
                )));
            }
        };
        let strategy = match m.get("strategy") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(Strategy::parse(s).ok_or_else(|| {
                invalid(format!(
                    "{what}: `strategy` must be `least_used` or `ranked`, not {s:?}"
                ))
            })?),
            Some(other) => {
                return Err(invalid(format!(
                    "{what}: `strategy` must be a string, not {}",
                    kind(other)
                )));
            }
        };
        Ok(Self {
            pool: name(m, "pool", what)?,
            amount,
            consumer,
            strategy,
        })
    }
}

fn not_found_pool(pool: &str) -> ProviderError {
    ProviderError::permanent("not_found", format!("no resource pool {pool:?}"))
}

fn check_name(what: &str, s: &str) -> Result<(), ProviderError> {
    let problem = if s.is_empty() {
        "is empty"
    } else if s.chars().count() > MAX_NAME {
        "is too long"
    } else if s.trim() != s {
        "has leading or trailing blanks"
    } else if s.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    Err(invalid(format!("{what} name {problem}: {s:?}")))
}

fn name(m: &Map<String, Value>, field: &str, what: &str) -> Result<String, ProviderError> {
    let s = string(m, field, what)?;
    check_name(&format!("{what}: `{field}`"), s)?;
    Ok(s.to_owned())
}

// ------------------------------------------------------------------------------------ database

fn db_error(e: &tokio_postgres::Error) -> ProviderError {
    // `Display` of a server error is just "db error": show its code and message.
    let detail = e.as_db_error().map_or_else(
        || e.to_string(),
        |d| format!("{} ({})", d.message(), d.code().code()),
    );
    ProviderError::retryable("unavailable", format!("resource database: {detail}"))
}

fn pool_error(e: &deadpool_postgres::PoolError) -> ProviderError {
    ProviderError::retryable("unavailable", format!("resource database: {e}"))
}

fn allocated(id: Uuid, pool: &str, resource: &str, amount: i32) -> Executed {
    Executed {
        output: json!({
            "allocation_id": id,
            "pool": pool,
            "resource": resource,
            "amount": amount,
        }),
        rollback: Some(json!({"allocation_id": id})),
    }
}

/// Claims `key` for this transaction. `Some(result)` when a committed call already holds it
/// (a concurrent call with the same key makes this one wait for its outcome).
async fn claim(tx: &Transaction<'_>, key: &str) -> Result<Option<Value>, ProviderError> {
    let inserted = tx
        .execute(
            "INSERT INTO provider_resource.idempotency (key, result) VALUES ($1, 'null'::jsonb) \
             ON CONFLICT (key) DO NOTHING",
            &[&key],
        )
        .await
        .map_err(|e| db_error(&e))?;
    if inserted == 1 {
        return Ok(None);
    }
    let row = tx
        .query_opt(
            "SELECT result FROM provider_resource.idempotency WHERE key = $1",
            &[&key],
        )
        .await
        .map_err(|e| db_error(&e))?;
    match row {
        Some(row) => Ok(Some(col(&row, 0)?)),
        None => Err(ProviderError::retryable(
            "conflict",
            "the idempotency record changed concurrently; try again",
        )),
    }
}

fn replay(action: &str, done: &Value) -> Result<Executed, ProviderError> {
    let recorded = done.get("action").and_then(Value::as_str).unwrap_or("");
    if recorded != action {
        return Err(ProviderError::permanent(
            "idempotency_conflict",
            format!("this idempotency key was already used for resource.{recorded}, not {action}"),
        ));
    }
    Ok(Executed {
        output: done.get("output").cloned().unwrap_or(Value::Null),
        rollback: done.get("rollback").filter(|v| !v.is_null()).cloned(),
    })
}

struct Freed {
    pool: String,
    resource: String,
    amount: i32,
    /// False when the allocation was released already.
    released_now: bool,
}

/// Releases `allocation` unless it is released already; `None` when there is no such
/// allocation.
async fn release_in(
    tx: &Transaction<'_>,
    allocation: Uuid,
) -> Result<Option<Freed>, ProviderError> {
    let Some(row) = tx
        .query_opt(
            "SELECT a.resource_id, a.amount, a.released_at IS NOT NULL, r.pool, r.name \
             FROM provider_resource.allocations a \
             JOIN provider_resource.resources r ON r.id = a.resource_id \
             WHERE a.id = $1 FOR UPDATE OF a",
            &[&allocation],
        )
        .await
        .map_err(|e| db_error(&e))?
    else {
        return Ok(None);
    };
    let (resource_id, amount, released): (Uuid, i32, bool) =
        (col(&row, 0)?, col(&row, 1)?, col(&row, 2)?);
    if !released {
        tx.execute(
            "UPDATE provider_resource.allocations SET released_at = now() WHERE id = $1",
            &[&allocation],
        )
        .await
        .map_err(|e| db_error(&e))?;
        tx.execute(
            "UPDATE provider_resource.resources SET used = used - $2 WHERE id = $1",
            &[&resource_id, &amount],
        )
        .await
        .map_err(|e| db_error(&e))?;
    }
    Ok(Some(Freed {
        pool: col(&row, 3)?,
        resource: col(&row, 4)?,
        amount,
        released_now: !released,
    }))
}

/// Undoes a release: `allocation` holds its resource again, if the resource has room.
async fn reallocate_in(tx: &Transaction<'_>, allocation: Uuid) -> Result<(), ProviderError> {
    let row = tx
        .query_opt(
            "SELECT r.pool FROM provider_resource.allocations a \
             JOIN provider_resource.resources r ON r.id = a.resource_id WHERE a.id = $1",
            &[&allocation],
        )
        .await
        .map_err(|e| db_error(&e))?
        .ok_or_else(|| {
            ProviderError::permanent("not_found", format!("no allocation {allocation}"))
        })?;
    let pool: String = col(&row, 0)?;
    // Same order as `allocate`: the pool first, so this cannot overbook a resource either.
    tx.execute(
        "SELECT 1 FROM provider_resource.pools WHERE name = $1 FOR UPDATE",
        &[&pool],
    )
    .await
    .map_err(|e| db_error(&e))?;
    let row = tx
        .query_one(
            "SELECT resource_id, amount, released_at IS NOT NULL \
             FROM provider_resource.allocations WHERE id = $1 FOR UPDATE",
            &[&allocation],
        )
        .await
        .map_err(|e| db_error(&e))?;
    let (resource_id, amount, released): (Uuid, i32, bool) =
        (col(&row, 0)?, col(&row, 1)?, col(&row, 2)?);
    if !released {
        return Ok(());
    }
    let booked = tx
        .execute(
            "UPDATE provider_resource.resources SET used = used + $2 \
             WHERE id = $1 AND capacity - used >= $2",
            &[&resource_id, &amount],
        )
        .await
        .map_err(|e| db_error(&e))?;
    if booked == 0 {
        return Err(ProviderError::permanent(
            "pool_exhausted",
            format!(
                "cannot restore allocation {allocation}: its resource in pool {pool:?} has no room"
            ),
        ));
    }
    tx.execute(
        "UPDATE provider_resource.allocations SET released_at = NULL WHERE id = $1",
        &[&allocation],
    )
    .await
    .map_err(|e| db_error(&e))?;
    Ok(())
}

fn col<'r, T: FromSql<'r>>(row: &'r Row, idx: usize) -> Result<T, ProviderError> {
    row.try_get(idx).map_err(|e| db_error(&e))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testing::{call, rollback_of};

    /// A fresh, migrated database of its own; dropped when the value is.
    struct TestDb {
        temp: crate::testing::TempDb,
        pool: Pool,
        provider: Arc<ResourceProvider>,
    }

    impl TestDb {
        async fn new(connections: usize) -> Self {
            let temp = crate::testing::TempDb::new(connections).await;
            let pool = temp.pool.clone();
            Self {
                temp,
                provider: Arc::new(ResourceProvider::new(pool.clone())),
                pool,
            }
        }

        async fn scalar_i64(
            &self,
            sql: &str,
            params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        ) -> i64 {
            self.temp.scalar_i64(sql, params).await
        }

        /// `(name, used)` of each resource of `pool`, by name.
        async fn used(&self, pool: &str) -> Vec<(String, i32)> {
            let client = self.pool.get().await.expect("connection");
            client
                .query(
                    "SELECT name, used FROM provider_resource.resources WHERE pool = $1 ORDER BY name",
                    &[&pool],
                )
                .await
                .expect("query")
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()
        }

        async fn exec(
            &self,
            action: &str,
            input: Value,
        ) -> (Call, Result<Executed, ProviderError>) {
            let c = call(action, input);
            let r = self.provider.execute(&c).await;
            (c, r)
        }

        async fn ok(&self, action: &str, input: Value) -> (Call, Executed) {
            let (c, r) = self.exec(action, input).await;
            (c, r.unwrap_or_else(|e| panic!("{action} failed: {e}")))
        }

        async fn undo(&self, c: &Call, e: &Executed) -> Result<(), ProviderError> {
            self.provider.rollback(&rollback_of(c, e)).await
        }
    }

    fn res(name: &str, capacity: i32, rank: i32) -> (String, i32, i32) {
        (name.to_owned(), capacity, rank)
    }

    #[tokio::test]
    async fn allocate_least_used_query_and_rollback() {
        let db = TestDb::new(4).await;
        define_pool(
            &db.pool,
            "mail",
            "least_used",
            &[res("b", 3, 0), res("a", 3, 1)],
        )
        .await
        .expect("define");
        let mut done = Vec::new();
        for expected in ["a", "b", "a"] {
            let (c, e) = db
                .ok("allocate", json!({"pool": "mail", "consumer": "ann"}))
                .await;
            assert_eq!(e.output["resource"], json!(expected));
            assert_eq!(e.output["pool"], json!("mail"));
            assert_eq!(e.output["amount"], json!(1));
            assert_eq!(
                e.rollback,
                Some(json!({"allocation_id": e.output["allocation_id"]}))
            );
            done.push((c, e));
        }
        // Amount 2: only b (1 used of 3) has room; a (2 of 3) does not.
        let (c, e) = db
            .ok("allocate", json!({"pool": "mail", "amount": 2}))
            .await;
        assert_eq!(e.output["resource"], json!("b"));
        done.push((c, e));
        let (_, r) = db
            .exec("allocate", json!({"pool": "mail", "amount": 2}))
            .await;
        let err = r.expect_err("full");
        assert_eq!(err.code, "pool_exhausted");
        assert!(!err.retryable);

        let (_, q) = db.ok("query", json!({"pool": "mail"})).await;
        assert_eq!(q.rollback, None);
        assert_eq!(
            q.output,
            json!({"pool": "mail", "strategy": "least_used", "resources": [
                {"name": "b", "capacity": 3, "used": 3, "free": 0, "rank": 0},
                {"name": "a", "capacity": 3, "used": 2, "free": 1, "rank": 1},
            ]})
        );

        // Rolling back releases; twice is once.
        for (c, e) in &done {
            db.undo(c, e).await.expect("rollback");
            db.undo(c, e).await.expect("rollback again");
        }
        assert_eq!(
            db.used("mail").await,
            vec![("a".into(), 0), ("b".into(), 0)]
        );
        let active = "SELECT count(*) FROM provider_resource.allocations WHERE released_at IS NULL";
        assert_eq!(db.scalar_i64(active, &[]).await, 0);

        let (_, r) = db.exec("allocate", json!({"pool": "nope"})).await;
        assert_eq!(r.expect_err("no pool").code, "not_found");
        let (_, r) = db.exec("query", json!({"pool": "nope"})).await;
        assert_eq!(r.expect_err("no pool").code, "not_found");
    }

    #[tokio::test]
    async fn same_key_twice_allocates_once() {
        let db = TestDb::new(4).await;
        define_pool(
            &db.pool,
            "ips",
            "least_used",
            &[res("r1", 5, 0), res("r2", 5, 0)],
        )
        .await
        .expect("define");
        let (c, first) = db.ok("allocate", json!({"pool": "ips"})).await;
        let second = db.provider.execute(&c).await.expect("repeat");
        assert_eq!(first, second);
        // Concurrent repeats too.
        let (a, b) = tokio::join!(db.provider.execute(&c), db.provider.execute(&c));
        assert_eq!(a.expect("a"), first);
        assert_eq!(b.expect("b"), first);
        let used = "SELECT sum(used) FROM provider_resource.resources";
        assert_eq!(db.scalar_i64(used, &[]).await, 1);
        let allocations = "SELECT count(*) FROM provider_resource.allocations";
        assert_eq!(db.scalar_i64(allocations, &[]).await, 1);
        // The same key for another pool is a conflict, not a second allocation.
        define_pool(&db.pool, "other", "least_used", &[res("x", 5, 0)])
            .await
            .expect("define");
        let mut other = c.clone();
        other.input = json!({"pool": "other"});
        let err = db.provider.execute(&other).await.expect_err("conflict");
        assert_eq!(err.code, "idempotency_conflict");
        assert_eq!(db.scalar_i64(allocations, &[]).await, 1);
    }

    #[tokio::test]
    async fn ranked_strategy_fills_lowest_rank_first() {
        let db = TestDb::new(4).await;
        define_pool(
            &db.pool,
            "mbox",
            "ranked",
            &[
                res("big", 10, 2),
                res("fast", 2, 0),
                res("fast2", 2, 0),
                res("mid", 1, 1),
            ],
        )
        .await
        .expect("define");
        let mut got = Vec::new();
        for _ in 0..6 {
            let (_, e) = db.ok("allocate", json!({"pool": "mbox"})).await;
            got.push(e.output["resource"].as_str().expect("name").to_owned());
        }
        // Rank 0 first (least used, then name, within the rank), then rank 1, then rank 2.
        assert_eq!(got, ["fast", "fast2", "fast", "fast2", "mid", "big"]);
        // The input may override the pool's strategy; only `big` has room left anyway.
        let (_, e) = db
            .ok(
                "allocate",
                json!({"pool": "mbox", "strategy": "least_used"}),
            )
            .await;
        assert_eq!(e.output["resource"], json!("big"));
        let (_, q) = db.ok("query", json!({"pool": "mbox"})).await;
        assert_eq!(q.output["strategy"], json!("ranked"));

        // A least_used pool can be asked for ranked.
        define_pool(
            &db.pool,
            "lu",
            "least_used",
            &[res("a", 5, 1), res("z", 5, 0)],
        )
        .await
        .expect("define");
        let (_, e) = db
            .ok("allocate", json!({"pool": "lu", "strategy": "ranked"}))
            .await;
        assert_eq!(e.output["resource"], json!("z"));
        let (_, e) = db.ok("allocate", json!({"pool": "lu"})).await;
        assert_eq!(e.output["resource"], json!("a"));
    }

    #[tokio::test]
    async fn release_is_idempotent_and_its_rollback_reallocates() {
        let db = TestDb::new(4).await;
        define_pool(&db.pool, "p", "least_used", &[res("only", 2, 0)])
            .await
            .expect("define");
        let (ca, ea) = db.ok("allocate", json!({"pool": "p", "amount": 2})).await;
        let id = ea.output["allocation_id"].clone();

        let (c1, e1) = db.ok("release", json!({"allocation_id": id})).await;
        assert_eq!(e1.output["released"], json!(true));
        assert_eq!(e1.output["resource"], json!("only"));
        assert_eq!(db.used("p").await, vec![("only".into(), 0)]);
        // Same key: the first answer, no second decrement.
        let again = db.provider.execute(&c1).await.expect("repeat");
        assert_eq!(again, e1);
        // Another release of a released allocation: success, nothing released.
        let (c2, e2) = db.ok("release", json!({"allocation_id": id})).await;
        assert_eq!(e2.output["released"], json!(false));
        assert_eq!(db.used("p").await, vec![("only".into(), 0)]);
        // Rolling back the allocation now releases nothing more.
        db.undo(&ca, &ea).await.expect("rollback allocate");
        assert_eq!(db.used("p").await, vec![("only".into(), 0)]);

        // Undoing the release that did nothing does nothing; undoing the one that released
        // re-allocates, once.
        db.undo(&c2, &e2).await.expect("rollback release 2");
        assert_eq!(db.used("p").await, vec![("only".into(), 0)]);
        db.undo(&c1, &e1).await.expect("rollback release 1");
        db.undo(&c1, &e1).await.expect("rollback release 1 again");
        assert_eq!(db.used("p").await, vec![("only".into(), 2)]);
        let active = "SELECT count(*) FROM provider_resource.allocations WHERE released_at IS NULL";
        assert_eq!(db.scalar_i64(active, &[]).await, 1);

        // Release again, let someone else take the room: the release cannot be undone.
        let (c3, e3) = db.ok("release", json!({"allocation_id": id})).await;
        assert_eq!(e3.output["released"], json!(true));
        db.ok("allocate", json!({"pool": "p"})).await;
        let err = db.undo(&c3, &e3).await.expect_err("no room");
        assert_eq!(err.code, "pool_exhausted");
        assert!(!err.retryable);
        assert_eq!(db.used("p").await, vec![("only".into(), 1)]);

        let (_, r) = db
            .exec("release", json!({"allocation_id": Uuid::new_v4()}))
            .await;
        assert_eq!(r.expect_err("unknown").code, "not_found");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_allocations_never_exceed_capacity() {
        let db = TestDb::new(8).await;
        define_pool(
            &db.pool,
            "hot",
            "least_used",
            &[res("r12", 12, 0), res("r8", 8, 0)],
        )
        .await
        .expect("define");
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let provider = db.provider.clone();
                tokio::spawn(async move {
                    let c = call(
                        "allocate",
                        json!({"pool": "hot", "amount": 1, "consumer": format!("c{i}")}),
                    );
                    let r = provider.execute(&c).await;
                    (c, r)
                })
            })
            .collect();
        let mut won = Vec::new();
        let mut exhausted = 0;
        for t in tasks {
            let (c, r) = t.await.expect("task");
            match r {
                Ok(e) => won.push((c, e)),
                Err(e) if e.code == "pool_exhausted" => exhausted += 1,
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!(won.len(), 20);
        assert_eq!(exhausted, 30);

        let used =
            "SELECT coalesce(sum(used), 0) FROM provider_resource.resources WHERE pool = 'hot'";
        let booked = "SELECT coalesce(sum(amount), 0) FROM provider_resource.allocations WHERE released_at IS NULL";
        let over = "SELECT count(*) FROM provider_resource.resources WHERE used > capacity";
        assert_eq!(db.scalar_i64(used, &[]).await, 20);
        assert_eq!(db.scalar_i64(booked, &[]).await, 20);
        assert_eq!(db.scalar_i64(over, &[]).await, 0);
        assert_eq!(
            db.used("hot").await,
            vec![("r12".into(), 12), ("r8".into(), 8)]
        );

        let rollbacks: Vec<_> = won
            .into_iter()
            .map(|(c, e)| {
                let provider = db.provider.clone();
                tokio::spawn(async move { provider.rollback(&rollback_of(&c, &e)).await })
            })
            .collect();
        for t in rollbacks {
            t.await.expect("task").expect("rollback");
        }
        assert_eq!(db.scalar_i64(used, &[]).await, 0);
        assert_eq!(db.scalar_i64(booked, &[]).await, 0);
    }

    #[tokio::test]
    async fn define_pool_updates_capacity_and_keeps_use() {
        let db = TestDb::new(4).await;
        define_pool(&db.pool, "p", "least_used", &[res("a", 3, 0)])
            .await
            .expect("define");
        db.ok("allocate", json!({"pool": "p", "amount": 2})).await;
        let err = define_pool(&db.pool, "p", "least_used", &[res("a", 1, 0)])
            .await
            .expect_err("below use");
        assert_eq!(err.code, "invalid_input");
        define_pool(&db.pool, "p", "ranked", &[res("a", 5, 3), res("b", 1, 0)])
            .await
            .expect("redefine");
        let (_, q) = db.ok("query", json!({"pool": "p"})).await;
        assert_eq!(
            q.output,
            json!({"pool": "p", "strategy": "ranked", "resources": [
                {"name": "b", "capacity": 1, "used": 0, "free": 1, "rank": 0},
                {"name": "a", "capacity": 5, "used": 2, "free": 3, "rank": 3},
            ]})
        );
        for (name, strategy, resources) in [
            ("", "least_used", vec![]),
            ("p", "random", vec![]),
            ("p", "ranked", vec![res("a", -1, 0)]),
            ("p", "ranked", vec![res("a", 1, 0), res("a", 2, 0)]),
            ("p", "ranked", vec![res("", 1, 0)]),
        ] {
            let err = define_pool(&db.pool, name, strategy, &resources)
                .await
                .expect_err("invalid");
            assert_eq!(err.code, "invalid_input", "{name} {strategy}: {err}");
        }
    }

    #[tokio::test]
    async fn bad_input_is_invalid_input() {
        let db = TestDb::new(4).await;
        define_pool(&db.pool, "p", "least_used", &[res("a", 3, 0)])
            .await
            .expect("define");
        let cases = [
            ("allocate", json!({})),
            ("allocate", json!({"pool": 1})),
            ("allocate", json!({"pool": ""})),
            ("allocate", json!({"pool": "p", "amount": 0})),
            ("allocate", json!({"pool": "p", "amount": -3})),
            ("allocate", json!({"pool": "p", "amount": 1.5})),
            ("allocate", json!({"pool": "p", "amount": "2"})),
            (
                "allocate",
                json!({"pool": "p", "amount": 4_000_000_000_i64}),
            ),
            ("allocate", json!({"pool": "p", "strategy": "random"})),
            ("allocate", json!({"pool": "p", "strategy": 1})),
            ("allocate", json!({"pool": "p", "consumer": {}})),
            ("allocate", json!("p")),
            ("release", json!({})),
            ("release", json!({"allocation_id": "x"})),
            ("release", json!({"allocation_id": 5})),
            ("query", json!({})),
            ("query", Value::Null),
        ];
        for (action, input) in cases {
            let (_, r) = db.exec(action, input.clone()).await;
            let err = r.expect_err("invalid");
            assert_eq!(err.code, "invalid_input", "{action} {input}: {err}");
            assert!(!err.retryable);
        }
        let (_, r) = db.exec("frobnicate", json!({})).await;
        assert_eq!(r.expect_err("unknown").code, "unknown_action");
        let c = call("allocate", json!({"pool": "p"}));
        for (action, data) in [
            ("allocate", json!({})),
            ("allocate", json!({"allocation_id": "x"})),
            ("release", json!({"allocation_id": Uuid::new_v4()})),
            (
                "release",
                json!({"allocation_id": Uuid::new_v4(), "released": "yes"}),
            ),
        ] {
            let rb = Rollback {
                tx_id: c.tx_id,
                idempotency_key: c.idempotency_key.clone(),
                step_path: c.step_path.clone(),
                action: action.into(),
                data,
            };
            let err = db.provider.rollback(&rb).await.expect_err("invalid");
            assert_eq!(err.code, "invalid_input");
        }
        assert_eq!(db.used("p").await, vec![("a".into(), 0)]);
        let records = "SELECT count(*) FROM provider_resource.idempotency";
        assert_eq!(db.scalar_i64(records, &[]).await, 0);
    }
}
