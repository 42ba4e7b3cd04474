//! The `directory` provider: organizations, users, groups and aliases, stored in the
//! configuration database (schema `provider_directory`, docs/providers.md).
//!
//! Actions and their rollbacks:
//!
//! | action | input | output | rollback |
//! | --- | --- | --- | --- |
//! | `ensure_org` | `{name}` | `{id, name, created}` | deletes the organization if this call created it and it has no users |
//! | `create_user` | `{org (name or id), user, display_name?}` | `{id, org, org_id, name, display_name, address}` | deletes the user, its aliases and memberships |
//! | `add_to_group` | `{user (id), group (name)}` | `{group_id, group, user, group_created, added}` | removes the membership this call added, and the group if this call created it and it is empty |
//! | `add_alias` | `{user (id), alias}` | `{alias, user, created}` | removes the alias if this call added it |
//! | `delete_user` | `{user (id)}` | `{deleted, user}` | restores the user, its aliases and memberships with the same ids |
//!
//! Every execute runs in one PostgreSQL transaction together with a record of its result in
//! `provider_directory.idempotency`, keyed by the call's idempotency key: a repeated call
//! returns the first result and has no further effect. A rollback records
//! `rollback:{idempotency_key}` in the same way, so repeating it does nothing, and treats
//! "already gone" as done. (The record keeping is [`crate::ledger`], shared with `resource`.)

mod parse;
mod store;

use std::sync::Arc;

use deadpool_postgres::Pool;
use futures_util::future::BoxFuture;
use provisio_provider::{Call, Executed, Provider, ProviderError, Rollback};
use tokio_postgres::Row;
use tokio_postgres::types::FromSql;

use crate::ledger::{Ledger, require_key};
use crate::{BuildContext, BuildError};
use parse::{Op, Undo};
use store::{
    add_alias, add_to_group, create_user, delete_user, ensure_org, restore_user, undo_add_to_group,
    undo_ensure_org,
};

/// Where this provider records the calls it performed.
const LEDGER: Ledger = Ledger {
    provider: "directory",
    schema: "provider_directory",
};

/// Longest organization, user, group or alias name accepted.
const MAX_NAME: usize = 255;

/// The actions namespaces may call (see the table above).
pub const ACTIONS: &[&str] = &[
    "ensure_org",
    "create_user",
    "add_to_group",
    "add_alias",
    "delete_user",
];

/// The constructor of [`crate::BUILTINS`]: the provider keeps its state in the configuration
/// database.
pub fn build(ctx: &mut BuildContext<'_>) -> Result<Arc<dyn Provider>, BuildError> {
    Ok(Arc::new(DirectoryProvider::new(ctx.pool.clone())))
}

pub struct DirectoryProvider {
    pool: Pool,
}

impl DirectoryProvider {
    /// `pool`: the configuration database, migrated (schema `provider_directory`).
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    async fn run(&self, call: &Call) -> Result<Executed, ProviderError> {
        let op = Op::parse(&call.action, &call.input)?;
        let key = call.idempotency_key.as_str();
        require_key("call", key)?;
        let mut client = self.pool.get().await.map_err(|e| pool_error(&e))?;
        let tx = client.transaction().await.map_err(|e| db_error(&e))?;
        if let Some(done) = LEDGER.claim(&tx, key).await? {
            tracing::debug!(
                key,
                action = %call.action,
                "directory: repeated call, answering from the record"
            );
            return LEDGER.replay(&call.action, &done);
        }
        let executed = match op {
            Op::EnsureOrg { name } => ensure_org(&tx, &name).await?,
            Op::CreateUser {
                org,
                user,
                display_name,
            } => create_user(&tx, &org, &user, display_name.as_deref()).await?,
            Op::AddToGroup { user, group } => add_to_group(&tx, user, &group).await?,
            Op::AddAlias { user, alias } => add_alias(&tx, user, &alias).await?,
            Op::DeleteUser { user } => delete_user(&tx, user).await?,
        };
        LEDGER.record(&tx, key, &call.action, &executed).await?;
        tx.commit().await.map_err(|e| db_error(&e))?;
        Ok(executed)
    }

    async fn undo(&self, rb: &Rollback) -> Result<(), ProviderError> {
        let undo = Undo::parse(&rb.action, &rb.data)?;
        require_key("rollback", &rb.idempotency_key)?;
        let mut client = self.pool.get().await.map_err(|e| pool_error(&e))?;
        let tx = client.transaction().await.map_err(|e| db_error(&e))?;
        if !LEDGER.claim_rollback(&tx, rb).await? {
            return Ok(());
        }
        match undo {
            Undo::EnsureOrg { org_id, created } => undo_ensure_org(&tx, org_id, created).await?,
            Undo::CreateUser { user_id } => {
                // Aliases and memberships go with the user (ON DELETE CASCADE).
                tx.execute(
                    "DELETE FROM provider_directory.users WHERE id = $1",
                    &[&user_id],
                )
                .await
                .map_err(|e| db_error(&e))?;
            }
            Undo::AddToGroup {
                group_id,
                user_id,
                group_created,
                member_added,
            } => undo_add_to_group(&tx, group_id, user_id, group_created, member_added).await?,
            Undo::AddAlias {
                alias,
                user_id,
                created,
            } => {
                if created {
                    tx.execute(
                        "DELETE FROM provider_directory.aliases WHERE alias = $1 AND user_id = $2",
                        &[&alias, &user_id],
                    )
                    .await
                    .map_err(|e| db_error(&e))?;
                }
            }
            Undo::DeleteUser(snapshot) => restore_user(&tx, &snapshot).await?,
        }
        tx.commit().await.map_err(|e| db_error(&e))?;
        Ok(())
    }
}

impl Provider for DirectoryProvider {
    fn name(&self) -> &'static str {
        "directory"
    }

    fn execute<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Executed, ProviderError>> {
        Box::pin(self.run(call))
    }

    fn rollback<'a>(&'a self, rb: &'a Rollback) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.undo(rb))
    }
}

// ------------------------------------------------------------------------------------ database

fn db_error(e: &tokio_postgres::Error) -> ProviderError {
    LEDGER.db_error(e)
}

fn pool_error(e: &deadpool_postgres::PoolError) -> ProviderError {
    LEDGER.pool_error(e)
}

/// A concurrent call changed what this one just read; trying again sees the new state.
fn raced(what: &str) -> ProviderError {
    ProviderError::retryable(
        "conflict",
        format!("{what} changed concurrently; try again"),
    )
}

fn col<'r, T: FromSql<'r>>(row: &'r Row, idx: usize) -> Result<T, ProviderError> {
    LEDGER.col(row, idx)
}

#[cfg(test)]
#[path = "directory_tests.rs"]
mod tests;
