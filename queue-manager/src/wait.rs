//! `?wait=SECONDS`: a producer may wait for the outcome instead of polling.
//!
//! Each queue manager follows `{prefix}.results` on a private queue and wakes the handlers
//! waiting for a request id. The answer itself is read from PostgreSQL (the record is the
//! truth; the message only says "look now"), so a lost message costs a `202`, never a wrong
//! answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use provisio_shared::amqp::{Topology, connect};
use provisio_shared::reconnect::Reconnect;
use tokio::sync::oneshot;

#[derive(Default)]
pub struct Waiters {
    map: Mutex<HashMap<String, Vec<oneshot::Sender<()>>>>,
}

/// Removes its registration when the waiting handler is done, answered or not.
pub struct Registration {
    waiters: Arc<Waiters>,
    id: String,
    pub woken: oneshot::Receiver<()>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Close our end first, so that our sender counts as closed below.
        self.woken.close();
        if let Ok(mut m) = self.waiters.map.lock()
            && let Some(v) = m.get_mut(&self.id)
        {
            v.retain(|s| !s.is_closed());
            if v.is_empty() {
                m.remove(&self.id);
            }
        }
    }
}

impl Waiters {
    /// Registers interest in `id`'s outcome; register before submitting, so that an outcome
    /// arriving at once is not missed.
    pub fn register(self: &Arc<Self>, id: &str) -> Registration {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut m) = self.map.lock() {
            m.entry(id.to_owned()).or_default().push(tx);
        }
        Registration {
            waiters: self.clone(),
            id: id.to_owned(),
            woken: rx,
        }
    }

    fn wake(&self, id: &str) {
        let senders = self.map.lock().ok().and_then(|mut m| m.remove(id));
        for s in senders.into_iter().flatten() {
            let _ = s.send(());
        }
    }

    /// Follows the outcome exchange until the process ends, reconnecting as needed.
    pub fn follow(self: &Arc<Self>, url: String, topology: Topology) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            // Ends when the waiters are dropped, never by a stop of its own.
            let never = tokio_util::sync::CancellationToken::new();
            let mut reconnect = Reconnect::broker();
            loop {
                let Some(waiters) = me.upgrade() else { return };
                let started = std::time::Instant::now();
                if let Err(e) = waiters.follow_once(&url, &topology).await {
                    tracing::debug!(error = %e, "outcome follower stopped; reconnecting");
                }
                drop(waiters);
                reconnect.lasted(started.elapsed());
                reconnect.pause(&never).await;
            }
        });
    }

    async fn follow_once(&self, url: &str, topology: &Topology) -> anyhow::Result<()> {
        let conn = connect(url, Duration::from_secs(5)).await?;
        let ch = conn.create_channel().await?;
        topology.declare(&ch).await?;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        ch.queue_bind(
            q.name().clone(),
            topology.results_exchange().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let mut consumer = ch
            .basic_consume(
                q.name().clone(),
                "waiters".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        while let Some(d) = consumer.next().await {
            let d = d?;
            if let Some(id) = d.properties.message_id() {
                self.wake(id.as_str());
            }
        }
        anyhow::bail!("outcome stream ended")
    }
}

#[cfg(test)]
#[path = "wait_tests.rs"]
mod tests;
