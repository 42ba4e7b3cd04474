//! Outcomes after the fact: whether a request is already final, its stored record, the outcome
//! message on `{prefix}.results` (and `reply_to`), and the duration metrics.

use super::{
    BasicProperties, Context, DateTime, Engine, Envelope, Outgoing, Status, Utc, Value, json,
};

impl Engine {
    pub(super) async fn is_final(&self, id: &str) -> anyhow::Result<bool> {
        let client = self.pool.get().await.context("database")?;
        let row = client
            .query_opt("SELECT status FROM requests WHERE id = $1", &[&id])
            .await
            .context("reading the request")?;
        Ok(row.is_some_and(|r| {
            r.get::<_, String>(0)
                .parse::<Status>()
                .is_ok_and(Status::is_final)
        }))
    }

    /// Publishes the stored record of a request that finished earlier.
    pub(super) async fn publish_stored_outcome(&self, env: &Envelope, props: &BasicProperties) {
        match self.record(env.id.as_str()).await {
            Ok(Some(r)) => self.publish_outcome(env, props, &r).await,
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the outcome to publish it"),
        }
    }

    /// Publishes an outcome to `{prefix}.results` (and `reply_to`). Best effort: the record in
    /// PostgreSQL is the truth, so a lost notification loses nothing.
    pub(super) async fn publish_outcome(
        &self,
        env: &Envelope,
        props: &BasicProperties,
        record: &Value,
    ) {
        let status = record
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned();
        // Sealed values (a sensitive procedure's output, error messages) are shown redacted:
        // producers hold no key, and ciphertext has no business on the broker twice.
        let body = provisio_shared::sealing::redacted(record).to_string();
        let rk = format!("{}.{}.{}", env.namespace, env.procedure, status);
        let exchange = self.topology.results_exchange();
        let props_out = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(env.id.as_str().into());
        if let Err(e) = self
            .publisher
            .publish_unconfirmed(Outgoing {
                exchange: &exchange,
                routing_key: &rk,
                body: body.as_bytes(),
                properties: props_out.clone(),
            })
            .await
        {
            tracing::warn!(error = %e, "cannot publish the outcome");
        }
        if let Some(reply_to) = props.reply_to() {
            let mut p = props_out;
            if let Some(c) = props.correlation_id() {
                p = p.with_correlation_id(c.clone());
            }
            let _ = self
                .publisher
                .publish_unconfirmed(Outgoing {
                    exchange: "",
                    routing_key: reply_to.as_str(),
                    body: body.as_bytes(),
                    properties: p,
                })
                .await;
        }
    }

    pub(super) async fn record(&self, id: &str) -> anyhow::Result<Option<Value>> {
        let client = self.pool.get().await.context("database")?;
        let row = client
            .query_opt(
                "SELECT id, namespace, procedure, status, output, error, attempts, submitted_at, finished_at FROM requests WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(row.map(|r| {
            json!({
                "id": r.get::<_, String>(0), "namespace": r.get::<_, String>(1), "procedure": r.get::<_, String>(2),
                "status": r.get::<_, String>(3), "output": r.get::<_, Option<Value>>(4), "error": r.get::<_, Option<Value>>(5),
                "attempts": r.get::<_, i32>(6), "submitted_at": r.get::<_, DateTime<Utc>>(7),
                "finished_at": r.get::<_, Option<DateTime<Utc>>>(8),
            })
        }))
    }
}

/// The outcome message of a request just finished (the same fields as the stored record).
pub(super) fn outcome_record(
    env: &Envelope,
    status: Status,
    output: Option<&Value>,
    error: Option<&Value>,
    attempts: i32,
) -> Value {
    json!({
        "id": env.id, "namespace": env.namespace, "procedure": env.procedure, "status": status,
        "output": output, "error": error, "attempts": attempts,
        "submitted_at": env.submitted_at, "finished_at": Utc::now(),
    })
}

/// Seconds from `from` to `to`, never negative (clocks of different hosts).
fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    ((to - from).num_microseconds().unwrap_or(0) as f64 / 1e6).max(0.0)
}

/// The request's duration counts from when it could run: submission, or its `not_before`
/// when it waited in the schedule (a request-level retry: its due time). The wait a producer
/// asked for goes to its own histogram, so that latency alerts do not fire on schedules.
pub(super) fn record_durations(env: &Envelope, labels: &[(&'static str, String); 3]) {
    let Some(submitted) = env.submitted_at else {
        return;
    };
    let due = env.not_before.filter(|t| *t > submitted);
    if let Some(due) = due {
        metrics::histogram!(provisio_shared::metrics::SCHEDULED_WAIT,
            "namespace" => labels[0].1.clone(), "procedure" => labels[1].1.clone())
        .record(seconds_between(submitted, due));
    }
    metrics::histogram!(provisio_shared::metrics::REQUEST_DURATION, labels)
        .record(seconds_between(due.unwrap_or(submitted), Utc::now()));
}
