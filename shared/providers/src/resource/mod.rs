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
//! rollback records `rollback:{idempotency_key}` there, so that repeating it does nothing. (The record keeping is [`crate::ledger`], shared with
//! `directory`.)

mod parse;
mod pools;

pub use pools::{define_pool, define_pools};

use std::sync::Arc;

use deadpool_postgres::{Pool, Transaction};
use futures_util::future::BoxFuture;
use provisio_provider::{Call, Executed, Provider, ProviderError, Rollback};
use serde_json::json;
use tokio_postgres::Row;
use tokio_postgres::types::FromSql;
use uuid::Uuid;

use crate::input::{boolean, object, uuid};
use crate::ledger::{Ledger, require_key};
use crate::{BuildContext, BuildError};
use parse::{AllocateReq, name};

/// The actions namespaces may call (see the table above).
pub const ACTIONS: &[&str] = &["allocate", "release", "query"];

/// The constructor of [`crate::BUILTINS`]: the provider keeps its state in the configuration
/// database.
pub fn build(ctx: &mut BuildContext<'_>) -> Result<Arc<dyn Provider>, BuildError> {
    Ok(Arc::new(ResourceProvider::new(ctx.pool.clone())))
}

/// Where this provider records the calls it performed (an allocation records its key in its
/// own row instead).
const LEDGER: Ledger = Ledger {
    provider: "resource",
    schema: "provider_resource",
};

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
        require_key("call", key)?;
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
        require_key("call", key)?;
        let mut client = self.pool.get().await.map_err(|e| pool_error(&e))?;
        let tx = client.transaction().await.map_err(|e| db_error(&e))?;
        if let Some(done) = LEDGER.claim(&tx, key).await? {
            tracing::debug!(key, "resource: repeated release, answering from the record");
            return LEDGER.replay("release", &done);
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
        LEDGER.record(&tx, key, "release", &executed).await?;
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
        require_key("rollback", &rb.idempotency_key)?;
        let mut client = self.pool.get().await.map_err(|e| pool_error(&e))?;
        let tx = client.transaction().await.map_err(|e| db_error(&e))?;
        if !LEDGER.claim_rollback(&tx, rb).await? {
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

fn not_found_pool(pool: &str) -> ProviderError {
    ProviderError::permanent("not_found", format!("no resource pool {pool:?}"))
}

// ------------------------------------------------------------------------------------ database

fn db_error(e: &tokio_postgres::Error) -> ProviderError {
    LEDGER.db_error(e)
}

fn pool_error(e: &deadpool_postgres::PoolError) -> ProviderError {
    LEDGER.pool_error(e)
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
    LEDGER.col(row, idx)
}

#[cfg(test)]
#[path = "resource_tests.rs"]
mod tests;
