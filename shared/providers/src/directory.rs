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
//! "already gone" as done.

use crate::input::{boolean, invalid, kind, object, string, uuid};
use std::sync::Arc;

use crate::ledger::{Ledger, require_key};
use crate::{BuildContext, BuildError};
use chrono::{DateTime, SecondsFormat, Utc};
use deadpool_postgres::{Pool, Transaction};
use futures_util::future::BoxFuture;
use provisio_provider::{Call, Executed, Provider, ProviderError, Rollback};
use serde_json::{Map, Value, json};
use tokio_postgres::Row;
use tokio_postgres::types::FromSql;
use uuid::Uuid;

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

// ------------------------------------------------------------------------------------ input

/// A parsed execute.
enum Op {
    EnsureOrg {
        name: String,
    },
    CreateUser {
        org: String,
        user: String,
        display_name: Option<String>,
    },
    AddToGroup {
        user: Uuid,
        group: String,
    },
    AddAlias {
        user: Uuid,
        alias: String,
    },
    DeleteUser {
        user: Uuid,
    },
}

impl Op {
    fn parse(action: &str, input: &Value) -> Result<Self, ProviderError> {
        let what = format!("directory.{action} input");
        let op = match action {
            "ensure_org" => {
                let m = object(input, &what)?;
                Op::EnsureOrg {
                    name: name(m, "name", &what, false)?,
                }
            }
            "create_user" => {
                let m = object(input, &what)?;
                let display_name = match m.get("display_name") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) if s.chars().count() <= MAX_NAME => Some(s.clone()),
                    Some(Value::String(_)) => {
                        return Err(invalid(format!(
                            "{what}: `display_name` is longer than {MAX_NAME} characters"
                        )));
                    }
                    Some(other) => {
                        return Err(invalid(format!(
                            "{what}: `display_name` must be a string, not {}",
                            kind(other)
                        )));
                    }
                };
                Op::CreateUser {
                    org: name(m, "org", &what, false)?,
                    user: name(m, "user", &what, true)?,
                    display_name,
                }
            }
            "add_to_group" => {
                let m = object(input, &what)?;
                Op::AddToGroup {
                    user: uuid(m, "user", &what)?,
                    group: name(m, "group", &what, false)?,
                }
            }
            "add_alias" => {
                let m = object(input, &what)?;
                Op::AddAlias {
                    user: uuid(m, "user", &what)?,
                    alias: name(m, "alias", &what, true)?,
                }
            }
            "delete_user" => {
                let m = object(input, &what)?;
                Op::DeleteUser {
                    user: uuid(m, "user", &what)?,
                }
            }
            other => {
                return Err(ProviderError::permanent(
                    "unknown_action",
                    format!("directory has no action `{other}`"),
                ));
            }
        };
        Ok(op)
    }
}

/// A parsed rollback: what the execute recorded as its rollback data.
enum Undo {
    EnsureOrg {
        org_id: Uuid,
        created: bool,
    },
    CreateUser {
        user_id: Uuid,
    },
    AddToGroup {
        group_id: Uuid,
        user_id: Uuid,
        group_created: bool,
        member_added: bool,
    },
    AddAlias {
        alias: String,
        user_id: Uuid,
        created: bool,
    },
    DeleteUser(Box<Snapshot>),
}

/// Everything `delete_user` removed, to put it back with the same ids.
struct Snapshot {
    id: Uuid,
    org_id: Uuid,
    name: String,
    display_name: Option<String>,
    created_at: DateTime<Utc>,
    aliases: Vec<String>,
    /// `(id, name)` of each group the user was a member of.
    groups: Vec<(Uuid, String)>,
}

impl Snapshot {
    fn to_json(&self) -> Value {
        json!({
            "user": {
                "id": self.id,
                "org_id": self.org_id,
                "name": self.name,
                "display_name": self.display_name,
                "created_at": self.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            },
            "aliases": self.aliases,
            "groups": self
                .groups
                .iter()
                .map(|(id, name)| json!({"id": id, "name": name}))
                .collect::<Vec<_>>(),
        })
    }

    fn from_json(data: &Value, what: &str) -> Result<Self, ProviderError> {
        let m = object(data, what)?;
        let user_what = format!("{what} `user`");
        let user = object(m.get("user").unwrap_or(&Value::Null), &user_what)?;
        let created_at = string(user, "created_at", &user_what)?;
        let created_at = DateTime::parse_from_rfc3339(created_at)
            .map_err(|e| invalid(format!("{user_what}: `created_at` is not RFC 3339: {e}")))?
            .with_timezone(&Utc);
        let display_name = match user.get("display_name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(invalid(format!(
                    "{user_what}: `display_name` must be a string or null, not {}",
                    kind(other)
                )));
            }
        };
        let aliases = array(m, "aliases", what)?
            .iter()
            .map(|a| {
                a.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| invalid(format!("{what}: `aliases` must hold strings")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let groups = array(m, "groups", what)?
            .iter()
            .map(|g| {
                let gwhat = format!("{what} `groups` item");
                let g = object(g, &gwhat)?;
                Ok((
                    uuid(g, "id", &gwhat)?,
                    string(g, "name", &gwhat)?.to_owned(),
                ))
            })
            .collect::<Result<Vec<_>, ProviderError>>()?;
        Ok(Self {
            id: uuid(user, "id", &user_what)?,
            org_id: uuid(user, "org_id", &user_what)?,
            name: string(user, "name", &user_what)?.to_owned(),
            display_name,
            created_at,
            aliases,
            groups,
        })
    }
}

impl Undo {
    fn parse(action: &str, data: &Value) -> Result<Self, ProviderError> {
        let what = format!("directory.{action} rollback data");
        let m = || object(data, &what);
        let undo = match action {
            "ensure_org" => {
                let m = m()?;
                Undo::EnsureOrg {
                    org_id: uuid(m, "org_id", &what)?,
                    created: boolean(m, "created", &what)?,
                }
            }
            "create_user" => Undo::CreateUser {
                user_id: uuid(m()?, "user_id", &what)?,
            },
            "add_to_group" => {
                let m = m()?;
                Undo::AddToGroup {
                    group_id: uuid(m, "group_id", &what)?,
                    user_id: uuid(m, "user_id", &what)?,
                    group_created: boolean(m, "group_created", &what)?,
                    member_added: boolean(m, "member_added", &what)?,
                }
            }
            "add_alias" => {
                let m = m()?;
                Undo::AddAlias {
                    alias: string(m, "alias", &what)?.to_owned(),
                    user_id: uuid(m, "user_id", &what)?,
                    created: boolean(m, "created", &what)?,
                }
            }
            "delete_user" => Undo::DeleteUser(Box::new(Snapshot::from_json(data, &what)?)),
            other => {
                return Err(ProviderError::permanent(
                    "unknown_action",
                    format!("directory has no action `{other}` to roll back"),
                ));
            }
        };
        Ok(undo)
    }
}

fn array<'v>(
    m: &'v Map<String, Value>,
    field: &str,
    what: &str,
) -> Result<&'v Vec<Value>, ProviderError> {
    match m.get(field) {
        None | Some(Value::Null) => Err(invalid(format!("{what}: `{field}` is required"))),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(invalid(format!(
            "{what}: `{field}` must be an array, not {}",
            kind(other)
        ))),
    }
}

/// A name: non-empty, at most [`MAX_NAME`] characters, no surrounding blanks, no control
/// characters; `local` (user names and aliases) also forbids blanks and `@`.
fn name(
    m: &Map<String, Value>,
    field: &str,
    what: &str,
    local: bool,
) -> Result<String, ProviderError> {
    let s = string(m, field, what)?;
    let problem = if s.is_empty() {
        Some("is empty")
    } else if s.chars().count() > MAX_NAME {
        Some("is too long")
    } else if s.trim() != s {
        Some("has leading or trailing blanks")
    } else if s.chars().any(char::is_control) {
        Some("contains control characters")
    } else if local && s.chars().any(|c| c.is_whitespace() || c == '@') {
        Some("may not contain blanks or `@`")
    } else {
        None
    };
    match problem {
        Some(p) => Err(invalid(format!("{what}: `{field}` {p}: {s:?}"))),
        None => Ok(s.to_owned()),
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

async fn ensure_org(tx: &Transaction<'_>, name: &str) -> Result<Executed, ProviderError> {
    let id = Uuid::now_v7();
    let inserted = tx
        .execute(
            "INSERT INTO provider_directory.organizations (id, name) VALUES ($1, $2) \
             ON CONFLICT (name) DO NOTHING",
            &[&id, &name],
        )
        .await
        .map_err(|e| db_error(&e))?;
    let (id, created) = if inserted == 1 {
        (id, true)
    } else {
        let row = tx
            .query_opt(
                "SELECT id FROM provider_directory.organizations WHERE name = $1 FOR KEY SHARE",
                &[&name],
            )
            .await
            .map_err(|e| db_error(&e))?
            .ok_or_else(|| raced("the organization"))?;
        (col(&row, 0)?, false)
    };
    Ok(Executed {
        output: json!({"id": id, "name": name, "created": created}),
        rollback: Some(json!({"org_id": id, "name": name, "created": created})),
    })
}

async fn undo_ensure_org(
    tx: &Transaction<'_>,
    org_id: Uuid,
    created: bool,
) -> Result<(), ProviderError> {
    if !created {
        return Ok(());
    }
    // Lock first: a user being added concurrently (FK lock on the row) commits before we look.
    let exists = tx
        .query_opt(
            "SELECT 1 FROM provider_directory.organizations WHERE id = $1 FOR UPDATE",
            &[&org_id],
        )
        .await
        .map_err(|e| db_error(&e))?
        .is_some();
    if !exists {
        return Ok(());
    }
    let has_users = tx
        .query_opt(
            "SELECT 1 FROM provider_directory.users WHERE org_id = $1 LIMIT 1",
            &[&org_id],
        )
        .await
        .map_err(|e| db_error(&e))?
        .is_some();
    if has_users {
        tracing::warn!(%org_id, "directory: not deleting an organization that still has users");
        return Ok(());
    }
    tx.execute(
        "DELETE FROM provider_directory.organizations WHERE id = $1",
        &[&org_id],
    )
    .await
    .map_err(|e| db_error(&e))?;
    Ok(())
}

/// `org` is an organization's id or name; locks the row against deletion.
async fn find_org(
    tx: &Transaction<'_>,
    org: &str,
) -> Result<Option<(Uuid, String)>, ProviderError> {
    if let Ok(id) = Uuid::parse_str(org) {
        let row = tx
            .query_opt(
                "SELECT id, name FROM provider_directory.organizations WHERE id = $1 FOR KEY SHARE",
                &[&id],
            )
            .await
            .map_err(|e| db_error(&e))?;
        if let Some(row) = row {
            return Ok(Some((col(&row, 0)?, col(&row, 1)?)));
        }
    }
    let row = tx
        .query_opt(
            "SELECT id, name FROM provider_directory.organizations WHERE name = $1 FOR KEY SHARE",
            &[&org],
        )
        .await
        .map_err(|e| db_error(&e))?;
    match row {
        Some(row) => Ok(Some((col(&row, 0)?, col(&row, 1)?))),
        None => Ok(None),
    }
}

async fn create_user(
    tx: &Transaction<'_>,
    org: &str,
    user: &str,
    display_name: Option<&str>,
) -> Result<Executed, ProviderError> {
    let (org_id, org_name) = find_org(tx, org)
        .await?
        .ok_or_else(|| ProviderError::permanent("not_found", format!("no organization {org:?}")))?;
    let id = Uuid::now_v7();
    let inserted = tx
        .execute(
            "INSERT INTO provider_directory.users (id, org_id, name, display_name) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (org_id, name) DO NOTHING",
            &[&id, &org_id, &user, &display_name],
        )
        .await
        .map_err(|e| db_error(&e))?;
    if inserted == 0 {
        return Err(ProviderError::permanent(
            "already_exists",
            format!("user {user:?} already exists in organization {org_name:?}"),
        ));
    }
    Ok(Executed {
        output: json!({
            "id": id,
            "org": org_name,
            "org_id": org_id,
            "name": user,
            "display_name": display_name,
            "address": format!("{user}@{org_name}"),
        }),
        rollback: Some(json!({"user_id": id})),
    })
}

/// The organization of user `id`, locking the user against deletion.
async fn user_org(tx: &Transaction<'_>, id: Uuid) -> Result<Uuid, ProviderError> {
    let row = tx
        .query_opt(
            "SELECT org_id FROM provider_directory.users WHERE id = $1 FOR KEY SHARE",
            &[&id],
        )
        .await
        .map_err(|e| db_error(&e))?
        .ok_or_else(|| ProviderError::permanent("not_found", format!("no user {id}")))?;
    col(&row, 0)
}

async fn add_to_group(
    tx: &Transaction<'_>,
    user: Uuid,
    group: &str,
) -> Result<Executed, ProviderError> {
    let org_id = user_org(tx, user).await?;
    let id = Uuid::now_v7();
    let group_created = tx
        .execute(
            "INSERT INTO provider_directory.groups (id, org_id, name) VALUES ($1, $2, $3) \
             ON CONFLICT (org_id, name) DO NOTHING",
            &[&id, &org_id, &group],
        )
        .await
        .map_err(|e| db_error(&e))?
        == 1;
    let group_id = if group_created {
        id
    } else {
        let row = tx
            .query_opt(
                "SELECT id FROM provider_directory.groups WHERE org_id = $1 AND name = $2 FOR KEY SHARE",
                &[&org_id, &group],
            )
            .await
            .map_err(|e| db_error(&e))?
            .ok_or_else(|| raced("the group"))?;
        col(&row, 0)?
    };
    let added = tx
        .execute(
            "INSERT INTO provider_directory.group_members (group_id, user_id) VALUES ($1, $2) \
             ON CONFLICT DO NOTHING",
            &[&group_id, &user],
        )
        .await
        .map_err(|e| db_error(&e))?
        == 1;
    Ok(Executed {
        output: json!({
            "group_id": group_id,
            "group": group,
            "user": user,
            "group_created": group_created,
            "added": added,
        }),
        rollback: Some(json!({
            "group_id": group_id,
            "user_id": user,
            "group_created": group_created,
            "member_added": added,
        })),
    })
}

async fn undo_add_to_group(
    tx: &Transaction<'_>,
    group_id: Uuid,
    user_id: Uuid,
    group_created: bool,
    member_added: bool,
) -> Result<(), ProviderError> {
    if member_added {
        tx.execute(
            "DELETE FROM provider_directory.group_members WHERE group_id = $1 AND user_id = $2",
            &[&group_id, &user_id],
        )
        .await
        .map_err(|e| db_error(&e))?;
    }
    if group_created {
        // Lock first, so that a member being added concurrently is seen below.
        let exists = tx
            .query_opt(
                "SELECT 1 FROM provider_directory.groups WHERE id = $1 FOR UPDATE",
                &[&group_id],
            )
            .await
            .map_err(|e| db_error(&e))?
            .is_some();
        if exists {
            let has_members = tx
                .query_opt(
                    "SELECT 1 FROM provider_directory.group_members WHERE group_id = $1 LIMIT 1",
                    &[&group_id],
                )
                .await
                .map_err(|e| db_error(&e))?
                .is_some();
            if !has_members {
                tx.execute(
                    "DELETE FROM provider_directory.groups WHERE id = $1",
                    &[&group_id],
                )
                .await
                .map_err(|e| db_error(&e))?;
            }
        }
    }
    Ok(())
}

/// The user that owns `alias`, if any.
async fn alias_owner(tx: &Transaction<'_>, alias: &str) -> Result<Option<Uuid>, ProviderError> {
    let row = tx
        .query_opt(
            "SELECT user_id FROM provider_directory.aliases WHERE alias = $1",
            &[&alias],
        )
        .await
        .map_err(|e| db_error(&e))?;
    match row {
        Some(row) => Ok(Some(col(&row, 0)?)),
        None => Ok(None),
    }
}

async fn add_alias(
    tx: &Transaction<'_>,
    user: Uuid,
    alias: &str,
) -> Result<Executed, ProviderError> {
    user_org(tx, user).await?;
    let created = tx
        .execute(
            "INSERT INTO provider_directory.aliases (alias, user_id) VALUES ($1, $2) \
             ON CONFLICT (alias) DO NOTHING",
            &[&alias, &user],
        )
        .await
        .map_err(|e| db_error(&e))?
        == 1;
    if !created {
        match alias_owner(tx, alias).await? {
            Some(owner) if owner == user => {}
            Some(_) => {
                return Err(ProviderError::permanent(
                    "alias_taken",
                    format!("alias {alias:?} belongs to another user"),
                ));
            }
            None => return Err(raced("the alias")),
        }
    }
    Ok(Executed {
        output: json!({"alias": alias, "user": user, "created": created}),
        rollback: Some(json!({"alias": alias, "user_id": user, "created": created})),
    })
}

async fn delete_user(tx: &Transaction<'_>, user: Uuid) -> Result<Executed, ProviderError> {
    // FOR UPDATE waits for calls adding aliases or memberships (they lock the row FOR KEY
    // SHARE), so the snapshot below sees everything they committed.
    let row = tx
        .query_opt(
            "SELECT id, org_id, name, display_name, created_at FROM provider_directory.users \
             WHERE id = $1 FOR UPDATE",
            &[&user],
        )
        .await
        .map_err(|e| db_error(&e))?
        .ok_or_else(|| ProviderError::permanent("not_found", format!("no user {user}")))?;
    let aliases = tx
        .query(
            "SELECT alias FROM provider_directory.aliases WHERE user_id = $1 ORDER BY alias",
            &[&user],
        )
        .await
        .map_err(|e| db_error(&e))?
        .iter()
        .map(|r| col::<String>(r, 0))
        .collect::<Result<Vec<_>, _>>()?;
    let groups = tx
        .query(
            "SELECT g.id, g.name FROM provider_directory.group_members m \
             JOIN provider_directory.groups g ON g.id = m.group_id \
             WHERE m.user_id = $1 ORDER BY g.name",
            &[&user],
        )
        .await
        .map_err(|e| db_error(&e))?
        .iter()
        .map(|r| Ok((col::<Uuid>(r, 0)?, col::<String>(r, 1)?)))
        .collect::<Result<Vec<_>, ProviderError>>()?;
    let snapshot = Snapshot {
        id: col(&row, 0)?,
        org_id: col(&row, 1)?,
        name: col(&row, 2)?,
        display_name: col(&row, 3)?,
        created_at: col(&row, 4)?,
        aliases,
        groups,
    };
    tx.execute(
        "DELETE FROM provider_directory.users WHERE id = $1",
        &[&user],
    )
    .await
    .map_err(|e| db_error(&e))?;
    Ok(Executed {
        output: json!({"deleted": true, "user": user}),
        rollback: Some(snapshot.to_json()),
    })
}

async fn restore_user(tx: &Transaction<'_>, s: &Snapshot) -> Result<(), ProviderError> {
    let org = tx
        .query_opt(
            "SELECT 1 FROM provider_directory.organizations WHERE id = $1 FOR KEY SHARE",
            &[&s.org_id],
        )
        .await
        .map_err(|e| db_error(&e))?;
    if org.is_none() {
        return Err(ProviderError::permanent(
            "not_found",
            format!(
                "cannot restore user {}: organization {} no longer exists",
                s.id, s.org_id
            ),
        ));
    }
    let inserted = tx
        .execute(
            "INSERT INTO provider_directory.users (id, org_id, name, display_name, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[&s.id, &s.org_id, &s.name, &s.display_name, &s.created_at],
        )
        .await
        .map_err(|e| db_error(&e))?;
    if inserted == 0 {
        // Either the user is back already, or someone else has taken its name.
        let same = tx
            .query_opt(
                "SELECT 1 FROM provider_directory.users WHERE id = $1 FOR KEY SHARE",
                &[&s.id],
            )
            .await
            .map_err(|e| db_error(&e))?
            .is_some();
        if !same {
            return Err(ProviderError::permanent(
                "already_exists",
                format!(
                    "cannot restore user {}: another user is now called {:?}",
                    s.id, s.name
                ),
            ));
        }
    }
    for alias in &s.aliases {
        let added = tx
            .execute(
                "INSERT INTO provider_directory.aliases (alias, user_id) VALUES ($1, $2) \
                 ON CONFLICT (alias) DO NOTHING",
                &[alias, &s.id],
            )
            .await
            .map_err(|e| db_error(&e))?;
        if added == 0 && alias_owner(tx, alias).await? != Some(s.id) {
            return Err(ProviderError::permanent(
                "alias_taken",
                format!(
                    "cannot restore user {}: alias {alias:?} belongs to another user now",
                    s.id
                ),
            ));
        }
    }
    for (group_id, group_name) in &s.groups {
        // The group comes back with its id if it was deleted meanwhile; if another group of
        // that name exists now, the user joins that one.
        tx.execute(
            "INSERT INTO provider_directory.groups (id, org_id, name) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
            &[group_id, &s.org_id, group_name],
        )
        .await
        .map_err(|e| db_error(&e))?;
        let row = tx
            .query_opt(
                "SELECT id FROM provider_directory.groups \
                 WHERE id = $1 OR (org_id = $2 AND name = $3) \
                 ORDER BY id = $1 DESC LIMIT 1 FOR KEY SHARE",
                &[group_id, &s.org_id, group_name],
            )
            .await
            .map_err(|e| db_error(&e))?
            .ok_or_else(|| raced("the group"))?;
        let actual: Uuid = col(&row, 0)?;
        tx.execute(
            "INSERT INTO provider_directory.group_members (group_id, user_id) VALUES ($1, $2) \
             ON CONFLICT DO NOTHING",
            &[&actual, &s.id],
        )
        .await
        .map_err(|e| db_error(&e))?;
    }
    Ok(())
}

fn col<'r, T: FromSql<'r>>(row: &'r Row, idx: usize) -> Result<T, ProviderError> {
    LEDGER.col(row, idx)
}

#[cfg(test)]
#[path = "directory_tests.rs"]
mod tests;
