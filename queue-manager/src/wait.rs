//! `?wait=SECONDS`: a producer may wait for the outcome instead of polling.
//!
//! Each queue manager follows `{prefix}.results` on a private queue and wakes the handlers
//! waiting for a request id. The answer itself is read from PostgreSQL (the record is the
//! truth; the message only says "look now"), so a lost message costs a `202`, never a wrong
//! answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use provisio_shared::amqp::{Topology, connect};
use provisio_shared::reconnect::Reconnect;
use tokio::sync::{Notify, oneshot, watch};

/// How long a waiter waits for the follower's binding before submitting anyway: a broker
/// that cannot bind a queue in that time would not take the request's message either.
const FOLLOW_WAIT: Duration = Duration::from_secs(2);

/// How long the follower stays bound after the last waiter left: waiters tend to come in
/// runs, and a binding costs a round trip to the broker.
const LINGER: Duration = Duration::from_secs(30);

/// The waiters of one queue manager, and whether its follower receives outcomes now.
///
/// The follower's queue is bound to `{prefix}.results` only while someone waits (and
/// [`LINGER`] after): bound all the time, it received every outcome of the fleet, a second
/// delivery per request in the broker and in this process, whether or not anybody waited.
pub struct Waiters {
    map: Mutex<HashMap<String, Vec<oneshot::Sender<()>>>>,
    /// Someone started or stopped waiting: the follower looks again.
    changed: Notify,
    /// `true` while the follower's queue is bound. It is lowered under the `map` lock, only
    /// when nobody waits, so a waiter that found it raised cannot be left unbound.
    bound: watch::Sender<bool>,
    linger: Duration,
    /// Outcome notices received since start, and unbindings completed (tests read them).
    received: AtomicU64,
    released: watch::Sender<u64>,
}

impl Default for Waiters {
    fn default() -> Self {
        Self::with_linger(LINGER)
    }
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
        if let Ok(mut m) = self.waiters.map.lock() {
            if let Some(v) = m.get_mut(&self.id) {
                v.retain(|s| !s.is_closed());
                if v.is_empty() {
                    m.remove(&self.id);
                }
            }
            // The last one out (woken ones were removed already): the linger starts.
            if m.is_empty() {
                self.waiters.changed.notify_one();
            }
        }
    }
}

impl Registration {
    /// Waits (up to `within`) until the follower receives outcomes, so that the outcome of a
    /// request submitted after this returns cannot pass unseen. Without a broker it gives up
    /// after `within`; the waiter then learns the outcome only if it is final by the time
    /// its wait ends (a `202` otherwise, as for any lost notification).
    pub async fn followed(&self, within: Duration) {
        let mut rx = self.waiters.bound.subscribe();
        let _ = tokio::time::timeout(within, rx.wait_for(|b| *b)).await;
    }
}

impl Waiters {
    pub fn with_linger(linger: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            bound: watch::Sender::new(false),
            linger,
            received: AtomicU64::new(0),
            released: watch::Sender::new(0),
        }
    }

    /// Registers interest in `id`'s outcome; register (and await
    /// [`Registration::followed`]) before submitting, so that an outcome arriving at once is
    /// not missed.
    pub fn register(self: &Arc<Self>, id: &str) -> Registration {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut m) = self.map.lock() {
            if m.is_empty() {
                self.changed.notify_one();
            }
            m.entry(id.to_owned()).or_default().push(tx);
        }
        Registration {
            waiters: self.clone(),
            id: id.to_owned(),
            woken: rx,
        }
    }

    /// [`Waiters::register`], then [`Registration::followed`] for at most `within` (and
    /// never longer than a broker needs to bind): what a handler does before submitting.
    pub async fn register_followed(self: &Arc<Self>, id: &str, within: Duration) -> Registration {
        let reg = self.register(id);
        reg.followed(within.min(FOLLOW_WAIT)).await;
        reg
    }

    fn wake(&self, id: &str) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let senders = self.map.lock().ok().and_then(|mut m| m.remove(id));
        for s in senders.into_iter().flatten() {
            let _ = s.send(());
        }
    }

    fn nobody_waits(&self) -> bool {
        self.map.lock().map_or(true, |m| m.is_empty())
    }

    /// Lowers `bound` if nobody waits, deciding under the `map` lock (see `bound`).
    fn release_if_idle(&self) -> bool {
        let Ok(m) = self.map.lock() else { return false };
        if m.is_empty() {
            self.bound.send_replace(false);
            true
        } else {
            false
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
                // The queue went with the connection.
                waiters.bound.send_replace(false);
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
        let exchange = topology.results_exchange();
        // When the last waiter left, if the queue is still bound.
        let mut idle_since: Option<tokio::time::Instant> = None;
        loop {
            if self.nobody_waits() {
                if *self.bound.borrow() && idle_since.is_none() {
                    idle_since = Some(tokio::time::Instant::now());
                }
            } else {
                idle_since = None;
                if !*self.bound.borrow() {
                    ch.queue_bind(
                        q.name().clone(),
                        exchange.clone().into(),
                        "#".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                    self.bound.send_replace(true);
                }
            }
            let release_at = idle_since.map(|t| t + self.linger);
            tokio::select! {
                () = self.changed.notified() => {}
                () = async {
                    match release_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    idle_since = None;
                    if self.release_if_idle() {
                        ch.queue_unbind(
                            q.name().clone(),
                            exchange.clone().into(),
                            "#".into(),
                            FieldTable::default(),
                        )
                        .await?;
                        self.released.send_modify(|n| *n += 1);
                    }
                }
                d = consumer.next() => {
                    let d = match d {
                        Some(d) => d?,
                        None => anyhow::bail!("outcome stream ended"),
                    };
                    if let Some(id) = d.properties.message_id() {
                        self.wake(id.as_str());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "wait_tests.rs"]
mod tests;
