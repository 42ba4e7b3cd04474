//! The directory's effects and their undoing, each inside the call's transaction.

use deadpool_postgres::Transaction;
use provisio_provider::{Executed, ProviderError};
use serde_json::json;
use uuid::Uuid;

use super::parse::Snapshot;
use super::{col, db_error, raced};

pub(super) async fn ensure_org(
    tx: &Transaction<'_>,
    name: &str,
) -> Result<Executed, ProviderError> {
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

pub(super) async fn undo_ensure_org(
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

pub(super) async fn create_user(
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

pub(super) async fn add_to_group(
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

pub(super) async fn undo_add_to_group(
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

pub(super) async fn add_alias(
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

pub(super) async fn delete_user(
    tx: &Transaction<'_>,
    user: Uuid,
) -> Result<Executed, ProviderError> {
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

pub(super) async fn restore_user(tx: &Transaction<'_>, s: &Snapshot) -> Result<(), ProviderError> {
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
