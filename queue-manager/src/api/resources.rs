//! The resource manager's pools (admin), read from the `resource` provider's tables in the
//! configuration database: what capacity planning and "why did this allocation fail" need,
//! without running a procedure that calls `resource.query`.

use provisio_shared::domain::Permission;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::{ApiError, Caller};
use crate::app::App;

/// `GET /v1/resources/pools`: every pool with its totals and its resources.
pub async fn pools(State(app): State<Arc<App>>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let client = app.pool.get().await.map_err(ApiError::db)?;
    // One statement, so that totals and resources are of the same moment.
    let rows = client
        .query(
            "SELECT p.name, p.strategy, r.name, r.capacity, r.used, r.rank \
             FROM provider_resource.pools p \
             LEFT JOIN provider_resource.resources r ON r.pool = p.name \
             ORDER BY p.name, r.name",
            &[],
        )
        .await
        .map_err(ApiError::db)?;
    let mut pools: Vec<Value> = Vec::new();
    let mut totals: Vec<(i64, i64)> = Vec::new();
    for row in &rows {
        let name: String = row.get(0);
        if pools.last().is_none_or(|p| p["name"] != name.as_str()) {
            pools.push(json!({"name": name, "strategy": row.get::<_, String>(1), "resources": []}));
            totals.push((0, 0));
        }
        let Some(resource) = row.get::<_, Option<String>>(2) else {
            continue;
        };
        let (capacity, used, rank): (i32, i32, i32) = (row.get(3), row.get(4), row.get(5));
        if let (Some(pool), Some(total)) = (pools.last_mut(), totals.last_mut()) {
            total.0 += i64::from(capacity);
            total.1 += i64::from(used);
            if let Some(list) = pool["resources"].as_array_mut() {
                list.push(json!({
                    "name": resource, "capacity": capacity, "used": used,
                    "free": capacity - used, "rank": rank,
                }));
            }
        }
    }
    for (pool, (capacity, used)) in pools.iter_mut().zip(totals) {
        pool["capacity"] = json!(capacity);
        pool["used"] = json!(used);
        pool["free"] = json!(capacity - used);
    }
    Ok(Json(json!({"pools": pools})))
}
