use super::*;
use crate::testing::{call, rollback_of};
use serde_json::{Value, json};
use uuid::Uuid;

/// A fresh, migrated database of its own; dropped when the value is.
struct TestDb {
    temp: crate::testing::TempDb,
    pool: Pool,
    provider: DirectoryProvider,
}

impl TestDb {
    async fn new() -> Self {
        let temp = crate::testing::TempDb::new(4).await;
        let pool = temp.pool.clone();
        Self {
            temp,
            provider: DirectoryProvider::new(pool.clone()),
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

fn id_of(v: &Value, field: &str) -> Uuid {
    Uuid::parse_str(v[field].as_str().expect("id string")).expect("uuid")
}

/// An organization and a user in it; returns the user's id.
async fn org_and_user(db: &TestDb, org: &str, user: &str) -> Uuid {
    db.ok("ensure_org", json!({"name": org})).await;
    let (_, e) = db
        .ok("create_user", json!({"org": org, "user": user}))
        .await;
    id_of(&e.output, "id")
}

#[tokio::test]
async fn ensure_org_creates_once_and_rollback_deletes_only_what_it_created() {
    let db = TestDb::new().await;
    let (c1, e1) = db.ok("ensure_org", json!({"name": "acme"})).await;
    assert_eq!(e1.output["created"], json!(true));
    assert_eq!(e1.output["name"], json!("acme"));
    // Same key again: the first result, no second effect.
    let again = db.provider.execute(&c1).await.expect("repeat");
    assert_eq!(again, e1);
    // Another call finds it.
    let (c2, e2) = db.ok("ensure_org", json!({"name": "acme"})).await;
    assert_eq!(e2.output["created"], json!(false));
    assert_eq!(e2.output["id"], e1.output["id"]);
    let count = "SELECT count(*) FROM provider_directory.organizations";
    assert_eq!(db.scalar_i64(count, &[]).await, 1);
    // Undoing the call that found it leaves it.
    db.undo(&c2, &e2).await.expect("rollback 2");
    assert_eq!(db.scalar_i64(count, &[]).await, 1);
    // Undoing the call that created it deletes it; twice is once.
    db.undo(&c1, &e1).await.expect("rollback 1");
    db.undo(&c1, &e1).await.expect("rollback 1 again");
    assert_eq!(db.scalar_i64(count, &[]).await, 0);
}

#[tokio::test]
async fn ensure_org_rollback_keeps_an_org_with_users() {
    let db = TestDb::new().await;
    let (c, e) = db.ok("ensure_org", json!({"name": "acme"})).await;
    db.ok("create_user", json!({"org": "acme", "user": "ann"}))
        .await;
    db.undo(&c, &e).await.expect("rollback");
    let count = "SELECT count(*) FROM provider_directory.organizations";
    assert_eq!(db.scalar_i64(count, &[]).await, 1);
}

#[tokio::test]
async fn create_user_and_rollback() {
    let db = TestDb::new().await;
    let (_, r) = db
        .exec("create_user", json!({"org": "nope", "user": "ann"}))
        .await;
    assert_eq!(r.expect_err("no org").code, "not_found");

    let (_, org) = db.ok("ensure_org", json!({"name": "acme"})).await;
    let (c, e) = db
        .ok(
            "create_user",
            json!({"org": "acme", "user": "ann", "display_name": "Ann A."}),
        )
        .await;
    assert_eq!(e.output["address"], json!("ann@acme"));
    assert_eq!(e.output["org"], json!("acme"));
    assert_eq!(e.output["name"], json!("ann"));
    let user = id_of(&e.output, "id");

    // By organization id as well; the name is taken.
    let (_, r) = db
        .exec(
            "create_user",
            json!({"org": org.output["id"], "user": "ann"}),
        )
        .await;
    let err = r.expect_err("duplicate");
    assert_eq!(err.code, "already_exists");
    assert!(!err.retryable);
    let (_, bob) = db
        .ok(
            "create_user",
            json!({"org": org.output["id"], "user": "bob"}),
        )
        .await;
    assert_eq!(bob.output["address"], json!("bob@acme"));

    // The rollback takes the user's aliases and memberships with it.
    db.ok("add_alias", json!({"user": user, "alias": "a.nn"}))
        .await;
    db.ok("add_to_group", json!({"user": user, "group": "staff"}))
        .await;
    db.undo(&c, &e).await.expect("rollback");
    db.undo(&c, &e).await.expect("rollback again");
    let users = "SELECT count(*) FROM provider_directory.users WHERE id = $1";
    assert_eq!(db.scalar_i64(users, &[&user]).await, 0);
    let aliases = "SELECT count(*) FROM provider_directory.aliases";
    assert_eq!(db.scalar_i64(aliases, &[]).await, 0);
    let members = "SELECT count(*) FROM provider_directory.group_members";
    assert_eq!(db.scalar_i64(members, &[]).await, 0);
    let all = "SELECT count(*) FROM provider_directory.users";
    assert_eq!(db.scalar_i64(all, &[]).await, 1, "bob stays");
}

#[tokio::test]
async fn same_key_twice_acts_once() {
    let db = TestDb::new().await;
    db.ok("ensure_org", json!({"name": "acme"})).await;
    let (c, first) = db
        .ok("create_user", json!({"org": "acme", "user": "ann"}))
        .await;
    // A repeat would fail with already_exists if it ran again; it answers the first result.
    let second = db.provider.execute(&c).await.expect("repeat");
    assert_eq!(first, second);
    let users = "SELECT count(*) FROM provider_directory.users";
    assert_eq!(db.scalar_i64(users, &[]).await, 1);

    // Concurrent repeats of one call: still once.
    let c = call(
        "add_alias",
        json!({"user": first.output["id"], "alias": "x"}),
    );
    let (a, b) = tokio::join!(db.provider.execute(&c), db.provider.execute(&c));
    assert_eq!(a.expect("a"), b.expect("b"));

    // The same key for another action is refused.
    let mut other = c.clone();
    other.action = "delete_user".into();
    other.input = json!({"user": first.output["id"]});
    let err = db.provider.execute(&other).await.expect_err("conflict");
    assert_eq!(err.code, "idempotency_conflict");
    assert_eq!(db.scalar_i64(users, &[]).await, 1);
}

#[tokio::test]
async fn add_to_group_and_rollback() {
    let db = TestDb::new().await;
    let ann = org_and_user(&db, "acme", "ann").await;
    let (_, bob) = db
        .ok("create_user", json!({"org": "acme", "user": "bob"}))
        .await;
    let bob = id_of(&bob.output, "id");

    let (c1, e1) = db
        .ok("add_to_group", json!({"user": ann, "group": "staff"}))
        .await;
    assert_eq!(e1.output["group"], json!("staff"));
    assert_eq!(e1.output["user"], json!(ann));
    assert_eq!(e1.output["group_created"], json!(true));
    let (c2, e2) = db
        .ok("add_to_group", json!({"user": bob, "group": "staff"}))
        .await;
    assert_eq!(e2.output["group_created"], json!(false));
    assert_eq!(e2.output["group_id"], e1.output["group_id"]);
    let (c3, e3) = db
        .ok("add_to_group", json!({"user": ann, "group": "staff"}))
        .await;
    assert_eq!(e3.output["added"], json!(false));

    let groups = "SELECT count(*) FROM provider_directory.groups";
    let members = "SELECT count(*) FROM provider_directory.group_members";
    assert_eq!(db.scalar_i64(groups, &[]).await, 1);
    assert_eq!(db.scalar_i64(members, &[]).await, 2);

    // The call that found ann already a member changes nothing when undone.
    db.undo(&c3, &e3).await.expect("rollback 3");
    assert_eq!(db.scalar_i64(members, &[]).await, 2);
    // Undoing the creating call while bob is a member: ann leaves, the group stays.
    db.undo(&c1, &e1).await.expect("rollback 1");
    db.undo(&c1, &e1).await.expect("rollback 1 again");
    assert_eq!(db.scalar_i64(members, &[]).await, 1);
    assert_eq!(db.scalar_i64(groups, &[]).await, 1);
    db.undo(&c2, &e2).await.expect("rollback 2");
    assert_eq!(db.scalar_i64(members, &[]).await, 0);
    assert_eq!(db.scalar_i64(groups, &[]).await, 1, "c2 did not create it");

    // A group created by the call goes when the call is undone.
    let (c4, e4) = db
        .ok("add_to_group", json!({"user": ann, "group": "ops"}))
        .await;
    assert_eq!(db.scalar_i64(groups, &[]).await, 2);
    db.undo(&c4, &e4).await.expect("rollback 4");
    db.undo(&c4, &e4).await.expect("rollback 4 again");
    assert_eq!(db.scalar_i64(groups, &[]).await, 1);

    let (_, r) = db
        .exec(
            "add_to_group",
            json!({"user": Uuid::new_v4(), "group": "staff"}),
        )
        .await;
    assert_eq!(r.expect_err("no user").code, "not_found");
}

#[tokio::test]
async fn add_alias_and_rollback() {
    let db = TestDb::new().await;
    let ann = org_and_user(&db, "acme", "ann").await;
    let (_, bob) = db
        .ok("create_user", json!({"org": "acme", "user": "bob"}))
        .await;
    let bob = id_of(&bob.output, "id");

    let (c1, e1) = db
        .ok("add_alias", json!({"user": ann, "alias": "annie"}))
        .await;
    assert_eq!(e1.output["alias"], json!("annie"));
    assert_eq!(e1.output["user"], json!(ann));
    let (_, r) = db
        .exec("add_alias", json!({"user": bob, "alias": "annie"}))
        .await;
    let err = r.expect_err("taken");
    assert_eq!(err.code, "alias_taken");
    assert!(!err.retryable);
    // Asking again for ann's own alias succeeds without creating anything.
    let (c2, e2) = db
        .ok("add_alias", json!({"user": ann, "alias": "annie"}))
        .await;
    assert_eq!(e2.output["created"], json!(false));

    let owner =
        "SELECT count(*) FROM provider_directory.aliases WHERE alias = 'annie' AND user_id = $1";
    db.undo(&c2, &e2).await.expect("rollback 2");
    assert_eq!(db.scalar_i64(owner, &[&ann]).await, 1);
    db.undo(&c1, &e1).await.expect("rollback 1");
    assert_eq!(db.scalar_i64(owner, &[&ann]).await, 0);
    // Rolling back twice is once, even if the alias has been given to bob since.
    db.ok("add_alias", json!({"user": bob, "alias": "annie"}))
        .await;
    db.undo(&c1, &e1).await.expect("rollback 1 again");
    assert_eq!(db.scalar_i64(owner, &[&bob]).await, 1);
}

/// A user's row (`created_at` as text), aliases and group ids: what deleting takes away.
type UserState = (
    Option<(Uuid, Uuid, String, Option<String>, String)>,
    Vec<String>,
    Vec<Uuid>,
);

async fn user_state(db: &TestDb, ann: Uuid) -> UserState {
    let client = db.pool.get().await.expect("connection");
    let user = client
        .query_opt(
            "SELECT id, org_id, name, display_name, created_at::text \
             FROM provider_directory.users WHERE id = $1",
            &[&ann],
        )
        .await
        .expect("user")
        .map(|r| {
            (
                r.get::<_, Uuid>(0),
                r.get::<_, Uuid>(1),
                r.get::<_, String>(2),
                r.get::<_, Option<String>>(3),
                r.get::<_, String>(4),
            )
        });
    let aliases: Vec<String> = client
        .query(
            "SELECT alias FROM provider_directory.aliases WHERE user_id = $1 ORDER BY alias",
            &[&ann],
        )
        .await
        .expect("aliases")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let groups: Vec<Uuid> = client
        .query(
            "SELECT group_id FROM provider_directory.group_members WHERE user_id = $1 ORDER BY group_id",
            &[&ann],
        )
        .await
        .expect("groups")
        .iter()
        .map(|r| r.get(0))
        .collect();
    (user, aliases, groups)
}

#[tokio::test]
async fn delete_user_and_rollback_restores_everything() {
    let db = TestDb::new().await;
    db.ok("ensure_org", json!({"name": "acme"})).await;
    let (_, e) = db
        .ok(
            "create_user",
            json!({"org": "acme", "user": "ann", "display_name": "Ann A."}),
        )
        .await;
    let ann = id_of(&e.output, "id");
    let bob = {
        let (_, b) = db
            .ok("create_user", json!({"org": "acme", "user": "bob"}))
            .await;
        id_of(&b.output, "id")
    };
    db.ok("add_alias", json!({"user": ann, "alias": "annie"}))
        .await;
    db.ok("add_alias", json!({"user": ann, "alias": "a.a"}))
        .await;
    let (_, staff) = db
        .ok("add_to_group", json!({"user": ann, "group": "staff"}))
        .await;
    let (_, ops) = db
        .ok("add_to_group", json!({"user": ann, "group": "ops"}))
        .await;
    db.ok("add_to_group", json!({"user": bob, "group": "staff"}))
        .await;

    let state = || user_state(&db, ann);
    let before = state().await;
    assert!(before.0.is_some());
    assert_eq!(before.1.len(), 2);
    assert_eq!(before.2.len(), 2);

    let (c, d) = db.ok("delete_user", json!({"user": ann})).await;
    assert_eq!(d.output["deleted"], json!(true));
    let after = state().await;
    assert_eq!(after, (None, vec![], vec![]));
    let (_, r) = db.exec("delete_user", json!({"user": ann})).await;
    assert_eq!(r.expect_err("gone").code, "not_found");

    // The now empty group `ops` is deleted meanwhile: it comes back with its id.
    {
        let client = db.pool.get().await.expect("connection");
        client
            .execute(
                "DELETE FROM provider_directory.groups WHERE id = $1",
                &[&id_of(&ops.output, "group_id")],
            )
            .await
            .expect("delete group");
    }

    db.undo(&c, &d).await.expect("rollback");
    assert_eq!(state().await, before);
    db.undo(&c, &d).await.expect("rollback again");
    assert_eq!(state().await, before);
    let staff_members = "SELECT count(*) FROM provider_directory.group_members WHERE group_id = $1";
    assert_eq!(
        db.scalar_i64(staff_members, &[&id_of(&staff.output, "group_id")])
            .await,
        2
    );
    // Once restored, deleting twice with the same key is once (the repeat answers the record).
    let repeat = db.provider.execute(&c).await.expect("repeat");
    assert_eq!(repeat, d);
    assert_eq!(state().await, before);
}

#[tokio::test]
async fn bad_input_is_invalid_input() {
    let db = TestDb::new().await;
    let cases = [
        ("ensure_org", json!({})),
        ("ensure_org", json!({"name": 3})),
        ("ensure_org", json!({"name": ""})),
        ("ensure_org", json!({"name": " acme"})),
        ("ensure_org", json!("acme")),
        ("ensure_org", Value::Null),
        ("create_user", json!({"org": "acme"})),
        ("create_user", json!({"org": "acme", "user": "a b"})),
        ("create_user", json!({"org": "acme", "user": "a@b"})),
        (
            "create_user",
            json!({"org": "acme", "user": "ann", "display_name": 7}),
        ),
        ("create_user", json!({"org": ["acme"], "user": "ann"})),
        ("add_to_group", json!({"user": "not-a-uuid", "group": "g"})),
        ("add_to_group", json!({"user": Uuid::new_v4()})),
        ("add_alias", json!({"user": Uuid::new_v4(), "alias": true})),
        ("add_alias", json!({"alias": "x"})),
        ("delete_user", json!({"user": 12})),
        ("delete_user", json!([])),
    ];
    for (action, input) in cases {
        let (_, r) = db.exec(action, input.clone()).await;
        let err = r.expect_err("invalid");
        assert_eq!(err.code, "invalid_input", "{action} {input}: {err}");
        assert!(!err.retryable);
        assert!(!err.message.is_empty());
    }
    let (_, r) = db.exec("frobnicate", json!({})).await;
    assert_eq!(r.expect_err("unknown").code, "unknown_action");

    let c = call("delete_user", json!({"user": Uuid::new_v4()}));
    for data in [json!({}), json!({"user": {"id": "x"}}), json!(null)] {
        let rb = Rollback {
            tx_id: c.tx_id,
            idempotency_key: c.idempotency_key.clone(),
            step_path: c.step_path.clone(),
            action: "delete_user".into(),
            data,
        };
        let err = db.provider.rollback(&rb).await.expect_err("invalid");
        assert_eq!(err.code, "invalid_input");
    }
    let rb = Rollback {
        tx_id: c.tx_id,
        idempotency_key: c.idempotency_key.clone(),
        step_path: c.step_path.clone(),
        action: "add_alias".into(),
        data: json!({"alias": "x", "user_id": Uuid::new_v4(), "created": "yes"}),
    };
    assert_eq!(
        db.provider.rollback(&rb).await.expect_err("invalid").code,
        "invalid_input"
    );
    // Nothing was recorded by refused calls.
    let records = "SELECT count(*) FROM provider_directory.idempotency";
    assert_eq!(db.scalar_i64(records, &[]).await, 0);
}
