//! Principals as the engine and the queue manager see them: one query for permissions, with
//! the implications between permissions applied in one place (docs/design.md §8).

use crate::domain::PrincipalRef;

/// The channel on which PostgreSQL announces every change to keys, grants, group membership
/// and principals (triggers of migration V11): caches of permissions are emptied on it.
pub const AUTH_CHANNEL: &str = "provisio_auth";

/// Which column identifies the principal.
#[derive(Debug, Clone, Copy)]
pub enum PrincipalBy {
    Name,
    /// The RabbitMQ user a direct AMQP producer connects as.
    AmqpUser,
}

/// Permissions granted to the principal directly or through its groups.
pub async fn permissions_of(
    client: &tokio_postgres::Client,
    principal: uuid::Uuid,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT DISTINCT g.permission FROM grants g \
             LEFT JOIN group_members m ON m.group_name = g.group_name \
             WHERE g.principal_id = $1 OR m.principal_id = $1 ORDER BY 1",
            &[&principal],
        )
        .await?;
    let mut perms: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    // execute_trusted implies execute_with_credentials: a trusted caller may act for others.
    if perms.iter().any(|p| p == "execute_trusted")
        && !perms.iter().any(|p| p == "execute_with_credentials")
    {
        perms.push("execute_with_credentials".to_owned());
    }
    Ok(perms)
}

/// The enabled principal identified by `value`, with its permissions.
pub async fn principal(
    client: &tokio_postgres::Client,
    by: PrincipalBy,
    value: &str,
) -> Result<Option<PrincipalRef>, tokio_postgres::Error> {
    let sql = match by {
        PrincipalBy::Name => "SELECT id, name FROM principals WHERE name = $1 AND NOT disabled",
        PrincipalBy::AmqpUser => {
            "SELECT id, name FROM principals WHERE amqp_user = $1 AND NOT disabled"
        }
    };
    let Some(row) = client.query_opt(sql, &[&value]).await? else {
        return Ok(None);
    };
    let id: uuid::Uuid = row.get(0);
    Ok(Some(PrincipalRef {
        id,
        name: row.get(1),
        permissions: permissions_of(client, id).await?,
    }))
}

/// The principal `id` with its current permissions, or `None` when it is gone or disabled:
/// what a scheduled or retried request runs with, rather than what it was submitted with.
pub async fn principal_by_id(
    client: &tokio_postgres::Client,
    id: uuid::Uuid,
) -> Result<Option<PrincipalRef>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT name FROM principals WHERE id = $1 AND NOT disabled",
            &[&id],
        )
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(PrincipalRef {
        id,
        name: row.get(0),
        permissions: permissions_of(client, id).await?,
    }))
}
