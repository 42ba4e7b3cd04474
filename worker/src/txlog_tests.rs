//! The writer's statements against a real database: what one batch writes, in how many
//! statements, and what fencing refuses.

use std::sync::Arc;

use provisio_shared::domain::{Status, TxStatus};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{
    Begin, Finish, LogError, Record, Reply, Sorted, StepRecord, TxLog, renumber, write_together,
};

/// An opening of `t.p` by engine `unit`, as the engine writes it.
pub(crate) fn begin_as(tx_id: Uuid, request_id: &str, model: &'static str) -> Begin {
    Begin {
        tx_id,
        request_id: request_id.into(),
        namespace: "t".into(),
        procedure: "p".into(),
        namespace_version: 1,
        model,
        audit: false,
        engine_id: "unit".into(),
        lease_seconds: 30.0,
        input: Value::Null,
        principal_id: None,
        priority: "normal",
        first_only: false,
    }
}

fn begin(tx_id: Uuid, request_id: &str) -> Begin {
    begin_as(tx_id, request_id, "compensating")
}

fn step(tx_id: Uuid, seq: i32, owner: &str) -> StepRecord {
    StepRecord {
        tx_id,
        seq,
        kind: "execute",
        path: "0".into(),
        provider: Some("test".into()),
        action: Some("echo".into()),
        input: Some(json!({"n": seq})),
        output: Some(json!({"n": seq})),
        rollback_data: None,
        error: None,
        owner: Arc::from(owner),
        procedure: Some("t.p".into()),
    }
}

fn finish(tx_id: Uuid, request_id: &str, owner: &str) -> Finish {
    Finish {
        tx_id,
        request_id: request_id.into(),
        open: None,
        steps: vec![step(tx_id, 2, owner)],
        tx_status: TxStatus::Committed,
        request_status: Status::Succeeded,
        output: Some(json!({"done": true})),
        error: None,
        summary: json!([]),
        retry_at: None,
        owner: Arc::from(owner),
        audit: false,
        audit_data: None,
    }
}

#[test]
fn renumber_moves_every_parameter_and_nothing_else() {
    assert_eq!(
        renumber("a = $1 AND b = ANY($12::text[]) AND c = '$' || $3", 12),
        "a = $13 AND b = ANY($24::text[]) AND c = '$' || $15"
    );
    assert_eq!(renumber("no parameters", 5), "no parameters");
}

#[test]
fn a_last_result_with_its_outcome_is_one_statement() {
    let tx_id = Uuid::now_v7();
    let last = Record::Finish(Box::new(finish(tx_id, "r", "unit")));
    let alone = Record::Steps(vec![step(tx_id, 1, "unit")]);
    assert_eq!(Sorted::of(&[&last]).statements(), 1);
    assert_eq!(Sorted::of(&[&alone, &last]).statements(), 1);
}

/// The last call's result and the outcome land in one commit (the step row, the transaction
/// row and the request row share an `xmin`); an engine that no longer owns the transaction
/// writes neither, and a batch neighbour's records still commit.
#[tokio::test]
async fn a_last_result_and_its_outcome_commit_together_and_are_fenced_together() {
    let db = crate::testing::TempDb::new(4).await;
    let log = TxLog::start(db.pool.clone(), 16, 2);
    let (mine, theirs) = (Uuid::now_v7(), Uuid::now_v7());
    for (tx, rid) in [(mine, "req-mine"), (theirs, "req-theirs")] {
        let opened = log.write(Record::Begin(begin(tx, rid))).await;
        assert!(
            matches!(opened, Ok(Reply::Began { attempt: 1 })),
            "{opened:?}"
        );
    }
    // One batch, as the collector would hand it to the writer.
    let (ours, fenced_one) = (
        Record::Finish(Box::new(finish(mine, "req-mine", "unit"))),
        Record::Finish(Box::new(finish(theirs, "req-theirs", "another-engine"))),
    );
    let replies = write_together(&db.pool, &[&ours, &fenced_one])
        .await
        .expect("written");
    assert!(matches!(replies[0], Ok(Reply::Done)), "{:?}", replies[0]);
    assert!(
        matches!(replies[1], Err(LogError::Fenced(t)) if t == theirs),
        "{:?}",
        replies[1]
    );
    let client = db.pool.get().await.expect("client");
    let row = client
        .query_one(
            "SELECT s.xmin::text, t.xmin::text, r.xmin::text, t.status, r.status \
             FROM tx_steps s JOIN transactions t ON t.id = s.tx_id JOIN requests r ON r.current_tx = t.id \
             WHERE s.tx_id = $1 AND s.seq = 2",
            &[&mine],
        )
        .await
        .expect("written");
    let xmins: [String; 3] = [row.get(0), row.get(1), row.get(2)];
    assert!(
        xmins.iter().all(|x| *x == xmins[0]),
        "one commit: {xmins:?}"
    );
    assert_eq!(
        (row.get::<_, String>(3), row.get::<_, String>(4)),
        ("committed".to_owned(), "succeeded".to_owned())
    );
    let fenced = client
        .query_one(
            "SELECT (SELECT count(*) FROM tx_steps WHERE tx_id = $1), t.finished_at IS NULL, r.status \
             FROM transactions t JOIN requests r ON r.id = t.request_id WHERE t.id = $1",
            &[&theirs],
        )
        .await
        .expect("row");
    assert_eq!(
        fenced.get::<_, i64>(0),
        0,
        "no step record for the fenced writer"
    );
    assert!(fenced.get::<_, bool>(1), "the transaction stays unfinished");
    assert_eq!(fenced.get::<_, String>(2), "running");
}

#[test]
fn openings_step_records_and_outcomes_are_one_statement_unless_an_outcome_opens() {
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let opening = Record::BeginWith(begin(a, "ra"), vec![step(a, 1, "unit")]);
    let last = Record::Finish(Box::new(finish(b, "rb", "unit")));
    assert_eq!(Sorted::of(&[&opening, &last]).statements(), 1);
    let mut read = finish(Uuid::now_v7(), "rc", "unit");
    read.open = Some(begin(read.tx_id, "rc"));
    let read = Record::Finish(Box::new(read));
    assert_eq!(Sorted::of(&[&opening, &last, &read]).statements(), 2);
}

/// One batch of every kind: a new opening with its first record, a step record of a running
/// transaction, the outcome of another, and an opening refused because its request is busy —
/// one commit for all that was written, and each record its own answer.
#[tokio::test]
async fn a_batch_of_every_kind_commits_once_and_answers_each_record() {
    let db = crate::testing::TempDb::new(4).await;
    let log = TxLog::start(db.pool.clone(), 16, 2);
    let (new, running, ending) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    for (tx, rid) in [(running, "req-running"), (ending, "req-ending")] {
        let opened = log.write(Record::Begin(begin(tx, rid))).await;
        assert!(
            matches!(opened, Ok(Reply::Began { attempt: 1 })),
            "{opened:?}"
        );
    }
    let records = [
        Record::BeginWith(begin(new, "req-new"), vec![step(new, 1, "unit")]),
        Record::Steps(vec![step(running, 1, "unit")]),
        Record::Finish(Box::new(finish(ending, "req-ending", "unit"))),
        Record::Begin(begin(Uuid::now_v7(), "req-running")),
        Record::Steps(vec![step(ending, 1, "another-engine")]),
    ];
    let refs: Vec<&Record> = records.iter().collect();
    assert_eq!(Sorted::of(&refs).statements(), 1);
    let replies = write_together(&db.pool, &refs).await.expect("written");
    assert!(
        matches!(replies[0], Ok(Reply::Began { attempt: 1 })),
        "{:?}",
        replies[0]
    );
    assert!(matches!(replies[1], Ok(Reply::Done)), "{:?}", replies[1]);
    assert!(matches!(replies[2], Ok(Reply::Done)), "{:?}", replies[2]);
    assert!(matches!(replies[3], Ok(Reply::Busy)), "{:?}", replies[3]);
    assert!(
        matches!(replies[4], Err(LogError::Fenced(t)) if t == ending),
        "{:?}",
        replies[4]
    );
    let client = db.pool.get().await.expect("client");
    let xmins: Vec<String> = client
        .query(
            "SELECT xmin::text FROM tx_steps WHERE (tx_id, seq) IN (($1, 1), ($2, 1), ($3, 2)) \
             UNION ALL SELECT xmin::text FROM transactions WHERE id IN ($1, $3) \
             UNION ALL SELECT xmin::text FROM requests WHERE id IN ('req-new', 'req-ending')",
            &[&new, &running, &ending],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(xmins.len(), 7, "{xmins:?}");
    assert!(
        xmins.iter().all(|x| *x == xmins[0]),
        "one commit: {xmins:?}"
    );
    let status: String = client
        .query_one("SELECT status FROM requests WHERE id = 'req-ending'", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(status, "succeeded");
}
