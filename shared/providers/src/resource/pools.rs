//! Defining pools: from configuration at an engine's start-up, and in tests.

use deadpool_postgres::Pool;
use provisio_provider::ProviderError;
use provisio_shared::config::Config;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use super::parse::check_name;
use super::{Strategy, db_error, pool_error};
use crate::input::invalid;

/// Upserts the resource pools named in configuration (engines do this at start-up).
pub async fn define_pools(cfg: &Config, pool: &Pool) -> Result<(), ProviderError> {
    for p in &cfg.providers.resource.pools {
        let resources: Vec<(String, i32, i32)> = p
            .resources
            .iter()
            .map(|r| (r.name.clone(), r.capacity, r.rank))
            .collect();
        define_pool(pool, &p.name, &p.strategy, &resources).await?;
    }
    Ok(())
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
