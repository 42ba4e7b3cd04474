//! Publishes scheduled requests when they are due (docs/design.md §2.4). Several queue
//! managers may run it at once: `FOR UPDATE SKIP LOCKED` hands each due request to exactly one
//! of them, and a request turns `queued` in the same transaction that waited for its publish
//! confirm.

use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::future::join_all;
use provisio_shared::amqp::{Outgoing, Publisher};
use provisio_shared::config::Secret;
use provisio_shared::domain::Envelope;
use provisio_shared::signing;
use tokio_util::sync::CancellationToken;

/// One pass: publishes what is due (at most `limit`), returns how many.
pub async fn publish_due(
    pool: &Pool,
    publisher: &Publisher,
    signing_key: &Secret,
    limit: i64,
) -> anyhow::Result<usize> {
    Ok(publish(pool, publisher, signing_key, limit, None)
        .await?
        .len())
}

/// Publishes these requests now if they are due (an operator just made them `scheduled` for
/// now: resumed or requeued), instead of at the scheduler's next pass; returns those
/// published. The others stay for the scheduler (locked by another pass, or the broker away).
pub async fn publish_now(
    pool: &Pool,
    publisher: &Publisher,
    signing_key: &Secret,
    ids: &[String],
) -> anyhow::Result<Vec<String>> {
    let limit = i64::try_from(ids.len()).unwrap_or(i64::MAX);
    publish(pool, publisher, signing_key, limit, Some(ids)).await
}

async fn publish(
    pool: &Pool,
    publisher: &Publisher,
    signing_key: &Secret,
    limit: i64,
    only: Option<&[String]>,
) -> anyhow::Result<Vec<String>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "SELECT id, envelope, namespace_version, not_before FROM requests \
             WHERE status = 'scheduled' AND not_before <= now() \
               AND ($2::text[] IS NULL OR id = ANY($2)) \
             ORDER BY not_before LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&limit, &only],
        )
        .await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let exchange = publisher.topology().requests_exchange();
    let trusted_exchange = publisher.topology().trusted_exchange();
    let work = rows.iter().filter_map(|r| {
        let id: String = r.get(0);
        let mut envelope: Envelope = serde_json::from_value(r.get(1)).ok()?;
        // The version current when the request was accepted (the row has the final word).
        envelope.namespace_version = r.get::<_, Option<i32>>(2).or(envelope.namespace_version);
        // The engine measures the request's duration from here, not from submission.
        envelope.not_before = r.get(3);
        let (bytes, props) = signing::signed_envelope(&envelope, signing_key.expose().as_bytes());
        let trusted = envelope.kind == provisio_shared::domain::RequestKind::Trusted;
        let exchange = if trusted {
            &trusted_exchange
        } else {
            &exchange
        };
        Some(async move {
            let lane = if trusted {
                ""
            } else {
                envelope.priority.as_str()
            };
            let r = publisher
                .publish(Outgoing {
                    exchange,
                    routing_key: lane,
                    body: &bytes,
                    properties: props,
                })
                .await;
            (id, r)
        })
    });
    let results = join_all(work).await;
    let published: Vec<String> = results
        .into_iter()
        .filter_map(|(id, r)| match r {
            Ok(()) => Some(id),
            Err(e) => {
                tracing::warn!(request_id = %id, error = %e, "cannot publish a due request; will retry");
                None
            }
        })
        .collect();
    tx.execute(
        "UPDATE requests SET status = 'queued', envelope = NULL WHERE id = ANY($1)",
        &[&published],
    )
    .await?;
    tx.commit().await?;
    Ok(published)
}

/// Runs passes every `every` until `stop`.
pub async fn run(
    pool: Pool,
    publisher: Publisher,
    signing_key: Secret,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        match publish_due(&pool, &publisher, &signing_key, 500).await {
            Ok(n) if n > 0 => tracing::info!(published = n, "scheduled requests published"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "scheduler pass failed"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
