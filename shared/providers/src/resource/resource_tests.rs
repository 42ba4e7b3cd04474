use std::sync::Arc;

use serde_json::Value;

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

    async fn exec(&self, action: &str, input: Value) -> (Call, Result<Executed, ProviderError>) {
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

    let used = "SELECT coalesce(sum(used), 0) FROM provider_resource.resources WHERE pool = 'hot'";
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
