//! The consume loop around [`Engine::handle`]: consumers per lane (high first), bounded
//! concurrency, lease renewal, reconnects with back-off, and draining on shutdown.

use super::{
    Arc, BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicQosOptions, CancellationToken, Channel, Disposition, Duration, Engine, FieldTable,
    JoinSet, Priority, REQUEUE_DELAY, Semaphore, Source, StreamExt, amqp,
};

impl Engine {
    /// Consumes until `shutdown`; reconnects when the broker goes away. On shutdown, stops
    /// consuming, lets running requests finish within the grace period, and returns; anything
    /// unacked goes back to the queue when the connection closes.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let leases = {
            let me = self.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let every = Duration::from_secs((me.cfg.engine.lease_seconds / 3).max(1));
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(every) => {}
                    }
                    if let Err(e) = me.renew_leases().await {
                        tracing::warn!(error = %e, "cannot renew leases");
                    }
                }
            })
        };
        let mut reconnect = provisio_shared::reconnect::Reconnect::broker();
        while !shutdown.is_cancelled() {
            match self.clone().consume(&shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    // A session that got as far as consuming was a success.
                    if self.ready.get() {
                        reconnect.healthy();
                    }
                    self.ready.set(false);
                    tracing::warn!(error = %e, retry_in = ?reconnect.next_delay(), "broker connection lost; reconnecting");
                    if !reconnect.pause(&shutdown).await {
                        break;
                    }
                }
            }
        }
        leases.abort();
        Ok(())
    }

    pub(super) async fn consume(
        self: Arc<Self>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let conn = amqp::connect(self.cfg.amqp.url.expose(), Duration::from_secs(5)).await?;
        let prefetch = self.cfg.engine.prefetch;
        let setup = conn.create_channel().await?;
        self.topology.declare(&setup).await?;
        let mut channels: Vec<(Channel, String, Source)> = Vec::new();
        let sources = [
            (
                self.topology.lane_queue(Priority::High),
                Source::Lane(Priority::High),
            ),
            (self.topology.trusted_queue(), Source::Trusted),
            (
                self.topology.lane_queue(Priority::Normal),
                Source::Lane(Priority::Normal),
            ),
            (
                self.topology.lane_queue(Priority::Low),
                Source::Lane(Priority::Low),
            ),
        ];
        let mut consumers = Vec::new();
        for (i, (queue, source)) in sources.into_iter().enumerate() {
            let ch = conn.create_channel().await?;
            ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let tag = format!("{}-{i}", self.engine_id);
            let consumer = ch
                .basic_consume(
                    queue.clone().into(),
                    tag.clone().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            consumers.push((consumer, source));
            channels.push((ch, tag, source));
        }
        self.ready.set(true);
        tracing::info!(engine = %self.engine_id, prefetch, "consuming");
        let permits = Arc::new(Semaphore::new(usize::from(prefetch)));
        let mut tasks = JoinSet::new();
        let (mut high, mut trusted, mut normal, mut low) = {
            let mut it = consumers.into_iter().map(|(c, _)| c);
            let (Some(a), Some(b), Some(c), Some(d)) = (it.next(), it.next(), it.next(), it.next())
            else {
                anyhow::bail!("consumers missing");
            };
            (a, b, c, d)
        };
        let result: anyhow::Result<()> = loop {
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                p = permits.clone().acquire_owned() => p?,
            };
            // `biased`: when several lanes have messages, high wins, then trusted, normal, low.
            let (delivery, source) = tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                d = high.next() => (d, Source::Lane(Priority::High)),
                d = trusted.next() => (d, Source::Trusted),
                d = normal.next() => (d, Source::Lane(Priority::Normal)),
                d = low.next() => (d, Source::Lane(Priority::Low)),
            };
            let delivery = match delivery {
                Some(Ok(d)) => d,
                Some(Err(e)) => break Err(e.into()),
                None => break Err(anyhow::anyhow!("consumer stream ended")),
            };
            let me = self.clone();
            tasks.spawn(me.settle(delivery, source, permit));
        };
        // Stop new deliveries first, then drain what we hold.
        for (ch, tag, _) in &channels {
            let _ = ch
                .basic_cancel(tag.clone().into(), BasicCancelOptions::default())
                .await;
        }
        if result.is_ok() {
            self.drain(&mut tasks).await;
            let _ = conn.close(200, "engine shutting down".into()).await;
        } else {
            // Running requests finish on their own; their acks may fail, and the redelivery is
            // then answered from the committed outcome.
            tasks.detach_all();
        }
        result
    }

    /// Handles one delivery and acks or requeues it; the permit bounds how many run at once.
    async fn settle(
        self: Arc<Self>,
        delivery: lapin::message::Delivery,
        source: Source,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        metrics::gauge!(provisio_shared::metrics::INFLIGHT).increment(1.0);
        let disposition = self
            .handle(
                &delivery.data,
                &delivery.properties,
                source,
                delivery.redelivered,
            )
            .await;
        let r = match disposition {
            Disposition::Ack => delivery.ack(BasicAckOptions::default()).await,
            Disposition::Requeue => {
                // Whatever made it undurable (the database, usually) will not be back in a
                // millisecond: do not spin the message through the broker, whose delivery
                // limit would dead-letter it.
                tokio::time::sleep(REQUEUE_DELAY).await;
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
            }
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot settle a delivery; the broker will redeliver it");
        }
        metrics::gauge!(provisio_shared::metrics::INFLIGHT).decrement(1.0);
        drop(permit);
    }

    /// Lets running requests finish within the grace period; the rest is left to redelivery
    /// and recovery.
    async fn drain(&self, tasks: &mut JoinSet<()>) {
        let grace = Duration::from_secs(self.cfg.engine.grace_seconds);
        tracing::info!(running = tasks.len(), ?grace, "draining");
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                abandoned = tasks.len(),
                "grace period over; leaving the rest to redelivery and recovery"
            );
            tasks.abort_all();
        }
    }
}
