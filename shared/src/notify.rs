//! Following a PostgreSQL notification channel (`LISTEN`) for a cache that must not serve stale
//! data for long: the follower is told when it listens (again), so that it can drop whatever
//! it cached while notifications could have been missed, and when the session is gone, so that
//! it can stop trusting its cache until the next `connected`.

use std::sync::Weak;

use futures_util::StreamExt;

use crate::config::Secret;

/// A cache fed by a channel.
pub trait Follower: Send + Sync + 'static {
    /// Listening (again): anything cached before may have missed a notification.
    fn connected(&self);
    /// One notification, with its payload.
    fn notified(&self, payload: &str);
    /// The session is gone; notifications are missed until the next [`Follower::connected`].
    fn disconnected(&self);
}

/// Follows `channel` for as long as the follower lives, reconnecting with the broker
/// sessions' back-off ([`crate::reconnect::Reconnect::broker`]).
pub fn follow<F: Follower>(follower: Weak<F>, url: &Secret, channel: &'static str) {
    let url = url.clone();
    tokio::spawn(async move {
        // Ends when the follower is dropped, never by a stop of its own.
        let never = tokio_util::sync::CancellationToken::new();
        let mut reconnect = crate::reconnect::Reconnect::broker();
        loop {
            let Some(f) = follower.upgrade() else { return };
            let started = std::time::Instant::now();
            if let Err(e) = listen_once(f.as_ref(), &url, channel).await {
                tracing::debug!(error = %e, channel, "notification listener stopped; reconnecting");
            }
            f.disconnected();
            drop(f);
            reconnect.lasted(started.elapsed());
            reconnect.pause(&never).await;
        }
    });
}

async fn listen_once<F: Follower>(
    follower: &F,
    url: &Secret,
    channel: &'static str,
) -> Result<(), crate::db::DbError> {
    let target = crate::db::PgTarget::parse(url)?;
    let (client, mut conn) = target.connect().await?;
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if tx.send(Some(n.payload().to_owned())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    client.batch_execute(&format!("LISTEN {channel}")).await?;
    follower.connected();
    while let Some(Some(payload)) = rx.recv().await {
        follower.notified(&payload);
    }
    pump.abort();
    Ok(())
}
