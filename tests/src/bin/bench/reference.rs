//! The reference run: the irreducible work of a durable queue-driven system, on the same
//! broker and database.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use provisio_shared::config::Secret;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::drive::{RunFigures, SubmitFn, measure, shared_groups};
use crate::{Args, Plan};

/// Publish with confirm → deliver → two commits → ack, per message; nothing else.
pub(crate) async fn run(args: &Args, plan: Plan) -> anyhow::Result<RunFigures> {
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let database = format!("pvref_{suffix}");
    let secret = Secret::new(provisio_tests::pg_url(&database));
    provisio_shared::db::create_database_if_missing(&secret).await?;
    let pool = provisio_shared::db::pool(&secret, 32)?;
    pool.get().await?.batch_execute("CREATE TABLE ref (id text PRIMARY KEY, body jsonb, done boolean NOT NULL DEFAULT false)").await?;
    let queue = format!("pvref.{suffix}");
    let conn = lapin::Connection::connect(
        &provisio_tests::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await?;
    let setup = conn.create_channel().await?;
    let mut qargs = FieldTable::default();
    qargs.insert(
        "x-queue-type".into(),
        provisio_shared::amqp::long_str("quorum"),
    );
    setup
        .queue_declare(queue.clone().into(), QueueDeclareOptions::durable(), qargs)
        .await?;

    let (tx, rx) = mpsc::unbounded_channel();
    let consumers = consume(&conn, args, &pool, &queue, tx).await?;
    let submit = publisher(&conn, args.concurrency, &queue).await?;

    let figures = measure(plan, submit, rx, shared_groups(&database)).await;
    for c in consumers {
        c.abort();
    }
    let _ = setup
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    drop(pool);
    let _ = provisio_shared::db::drop_database(&secret).await;
    figures
}

/// One consumer per "engine", each with the engines' prefetch: two commits and an ack per
/// message, its index reported on `tx`.
async fn consume(
    conn: &lapin::Connection,
    args: &Args,
    pool: &deadpool_postgres::Pool,
    queue: &str,
    tx: mpsc::UnboundedSender<(usize, String)>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    // Consumers: one channel per "engine", each with the engines' prefetch.
    let mut consumers = Vec::new();
    for e in 0..args.engines {
        let ch = conn.create_channel().await?;
        ch.basic_qos(args.prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = ch
            .basic_consume(
                queue.to_owned().into(),
                format!("ref-{e}").into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let (pool, tx) = (pool.clone(), tx.clone());
        consumers.push(tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let (pool, tx) = (pool.clone(), tx.clone());
                tokio::spawn(async move {
                    let id = String::from_utf8_lossy(
                        d.properties
                            .message_id()
                            .as_ref()
                            .map_or(&[][..], |m| m.as_str().as_bytes()),
                    )
                    .into_owned();
                    let body: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
                    let Ok(client) = pool.get().await else { return };
                    // Two commits: the message recorded, then its outcome.
                    let _ = client
                        .execute(
                            "INSERT INTO ref (id, body) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                            &[&id, &body],
                        )
                        .await;
                    let _ = client
                        .execute("UPDATE ref SET done = true WHERE id = $1", &[&id])
                        .await;
                    drop(client);
                    let _ = d.ack(BasicAckOptions::default()).await;
                    if let Some(i) = id.strip_prefix("ref-").and_then(|i| i.parse().ok()) {
                        let _ = tx.send((i, "done".to_owned()));
                    }
                });
            }
        }));
    }
    Ok(consumers)
}

/// `concurrency` confirming channels, request i on channel i mod C.
async fn publisher(
    conn: &lapin::Connection,
    concurrency: usize,
    queue: &str,
) -> anyhow::Result<SubmitFn> {
    let mut channels = Vec::new();
    for _ in 0..concurrency.max(1) {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        channels.push(ch);
    }
    let channels = Arc::new(channels);
    let q = queue.to_owned();
    let submit: SubmitFn = Arc::new(move |i| {
        let (channels, queue) = (channels.clone(), q.clone());
        Box::pin(async move {
            let id = format!("ref-{i}");
            let body = json!({"id": id, "namespace": "demo", "procedure": "hello", "input": {"name": format!("User{i}")}}).to_string();
            let ch = &channels[i % channels.len()];
            let confirm = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default()
                        .with_message_id(id.into())
                        .with_delivery_mode(2),
                )
                .await
                .map_err(|_| "transport".to_owned())?
                .await
                .map_err(|_| "transport".to_owned())?;
            if confirm.is_ack() {
                Ok(())
            } else {
                Err("nacked".to_owned())
            }
        })
    });
    Ok(submit)
}
