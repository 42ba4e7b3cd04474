//! RabbitMQ: the topology every process declares at start-up, and a publisher with confirms
//! that reconnects on its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use crate::config::AmqpConfig;
use crate::domain::Priority;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker TLS: {0}")]
    Tls(String),
    #[error("broker did not confirm within {0:?}")]
    ConfirmTimeout(Duration),
    /// The message was handed to the broker, then the connection failed before its confirm:
    /// it may or may not be queued.
    #[error("broker connection failed before the confirm (the message may be queued): {0}")]
    InDoubt(#[source] lapin::Error),
    #[error("broker refused the message (nack)")]
    Nacked,
    #[error("message was unroutable: {0}")]
    Unroutable(String),
    #[error(transparent)]
    Lapin(#[from] lapin::Error),
}

impl AmqpError {
    /// Whether a failed publish may nevertheless have queued the message: it was sent, and
    /// no answer came. Every other error means the broker does not have it.
    pub fn may_have_been_published(&self) -> bool {
        matches!(self, Self::InDoubt(_) | Self::ConfirmTimeout(_))
    }
}

/// Every exchange and queue name, derived from the prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    delivery_limit: u32,
    dead_archive_max_length: u32,
}

impl Topology {
    pub fn new(cfg: &AmqpConfig) -> Self {
        Self {
            prefix: cfg.prefix.clone(),
            delivery_limit: cfg.delivery_limit,
            dead_archive_max_length: cfg.dead_archive_max_length,
        }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// Direct exchange; the routing key is the lane (`high`, `normal`, `low`).
    pub fn requests_exchange(&self) -> String {
        format!("{}.requests", self.prefix)
    }
    pub fn lane_queue(&self, lane: Priority) -> String {
        format!("{}.requests.{}", self.prefix, lane.as_str())
    }
    pub fn trusted_exchange(&self) -> String {
        format!("{}.trusted", self.prefix)
    }
    pub fn trusted_queue(&self) -> String {
        format!("{}.trusted", self.prefix)
    }
    /// Fanout exchange of dead letters.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    /// The broker's raw archive of dead letters, bounded by `amqp.dead_archive_max_length`
    /// (oldest dropped first); nobody consumes it.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    /// A second queue on the dead-letter exchange, consumed by the auditors: they give each
    /// dead request its final status and record the letter in `dead_letters`, which is what
    /// operators list, requeue and discard.
    pub fn dead_status_queue(&self) -> String {
        format!("{}.dead.status", self.prefix)
    }
    /// Topic exchange of outcomes, routing key `namespace.procedure.status`.
    pub fn results_exchange(&self) -> String {
        format!("{}.results", self.prefix)
    }

    /// Declares everything; idempotent, so every process does it at start-up and after
    /// reconnecting.
    pub async fn declare(&self, ch: &Channel) -> Result<(), AmqpError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for (name, kind) in [
            (self.requests_exchange(), ExchangeKind::Direct),
            (self.trusted_exchange(), ExchangeKind::Fanout),
            (self.dead_exchange(), ExchangeKind::Fanout),
            (self.results_exchange(), ExchangeKind::Topic),
        ] {
            ch.exchange_declare(name.into(), kind, durable, FieldTable::default())
                .await?;
        }
        let qopts = QueueDeclareOptions::durable();
        let mut dead_args = FieldTable::default();
        dead_args.insert("x-queue-type".into(), long_str("quorum"));
        // No dead-letter exchange on these: a dead letter is never dead-lettered again
        // (that would loop through the fanout).
        let mut archive_args = dead_args.clone();
        archive_args.insert(
            "x-max-length".into(),
            AMQPValue::LongUInt(self.dead_archive_max_length),
        );
        archive_args.insert("x-overflow".into(), long_str("drop-head"));
        for (q, args) in [
            (self.dead_queue(), archive_args),
            (self.dead_status_queue(), dead_args),
        ] {
            ch.queue_declare(q.clone().into(), qopts, args).await?;
            ch.queue_bind(
                q.into(),
                self.dead_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        let work_args = self.work_queue_args();
        for lane in Priority::ALL {
            let q = self.lane_queue(*lane);
            ch.queue_declare(q.clone().into(), qopts, work_args.clone())
                .await?;
            ch.queue_bind(
                q.into(),
                self.requests_exchange().into(),
                lane.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        ch.queue_declare(self.trusted_queue().into(), qopts, work_args)
            .await?;
        ch.queue_bind(
            self.trusted_queue().into(),
            self.trusted_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        Ok(())
    }

    fn work_queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long_str("quorum"));
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongUInt(self.delivery_limit),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            long_str(&self.dead_exchange()),
        );
        args
    }

    /// Deletes every queue and exchange of this prefix (tests clean up after themselves).
    pub async fn delete(&self, ch: &Channel) -> Result<(), AmqpError> {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        let mut queues = vec![
            self.dead_queue(),
            self.dead_status_queue(),
            self.trusted_queue(),
        ];
        queues.extend(Priority::ALL.iter().map(|l| self.lane_queue(*l)));
        for q in queues {
            ch.queue_delete(q.into(), QueueDeleteOptions::default())
                .await?;
        }
        for e in [
            self.requests_exchange(),
            self.trusted_exchange(),
            self.dead_exchange(),
            self.results_exchange(),
        ] {
            ch.exchange_delete(e.into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

pub fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Reads a string header, whichever AMQP string type the producer used.
pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    let headers = props.headers().as_ref()?;
    let v = headers.inner().get(&ShortString::from(name))?;
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Opens a connection with a bounded wait, so that "broker down" is an error in seconds.
///
/// `amqps://` URLs verify the broker's certificate and name against the system's roots plus
/// the PEM file named by the URL's `cacertfile` parameter (the name RabbitMQ's own URI
/// specification uses), which is how a private CA is trusted.
pub async fn connect(url: &str, timeout: Duration) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default()
        .with_connection_name(format!("provisio-{}", std::process::id()).into());
    let (url, tls) = tls_config(url)?;
    let runtime = lapin::runtime::default_runtime()?;
    let attempt = Connection::connect_with_config(&url, props, tls, runtime);
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(AmqpError::Unavailable(e.to_string())),
        Err(_) => Err(AmqpError::Unavailable(format!(
            "no connection within {timeout:?}"
        ))),
    }
}

/// Takes `cacertfile` out of the URL and reads it.
fn tls_config(url: &str) -> Result<(String, lapin::tcp::OwnedTLSConfig), AmqpError> {
    let mut tls = lapin::tcp::OwnedTLSConfig::default();
    let (url, taken) = crate::tls::take_query_params(url, &["cacertfile"]);
    if let Some(path) = taken.get("cacertfile") {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| AmqpError::Tls(format!("cacertfile {path}: {e}")))?;
        tls.cert_chain = Some(pem);
    }
    Ok((url, tls))
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub properties: BasicProperties,
}

struct Live {
    conn: Connection,
    /// In confirm mode: every publish on it is awaited.
    channel: Channel,
    /// Not in confirm mode, for publishes nobody waits on. On a confirming channel lapin
    /// keeps each dropped confirm until someone calls `wait_for_confirms`: one kept promise
    /// per outcome published, for the life of the connection.
    plain: Channel,
}

impl Live {
    /// The connection and both channels are open (no I/O).
    fn usable(&self) -> bool {
        self.conn.status().connected()
            && self.channel.status().connected()
            && self.plain.status().connected()
    }
}

/// A publisher with confirms, shared by all tasks of a process.
///
/// Many publishes are in flight on the one channel at once (pipelining); each caller waits
/// only for the confirm of its own message. A broken connection is replaced on the next
/// publish; until then callers get [`AmqpError::Unavailable`] quickly.
#[derive(Clone)]
pub struct Publisher {
    url: Arc<String>,
    topology: Topology,
    confirm_timeout: Duration,
    live: Arc<Mutex<Option<Arc<Live>>>>,
    /// The last failed connection attempt. Callers queue on `live` while one of them
    /// connects; without this, each would then make its own attempt in turn, and with a
    /// broker that does not answer at all (host down, network partition) a batch of N
    /// publishes would take N connect timeouts to fail.
    last_failure: Arc<std::sync::Mutex<Option<(Instant, String)>>>,
}

/// After a failed connection attempt, publishes fail at once for this long.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

impl Publisher {
    pub fn new(url: &str, topology: Topology, confirm_timeout: Duration) -> Self {
        Self {
            url: Arc::new(url.to_owned()),
            topology,
            confirm_timeout,
            live: Arc::new(Mutex::new(None)),
            last_failure: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Connects now (declaring the topology) instead of on first publish.
    pub async fn ensure_connected(&self) -> Result<(), AmqpError> {
        self.channel().await.map(|_| ())
    }

    /// Whether the last known connection is up (no I/O).
    pub async fn is_connected(&self) -> bool {
        self.live.lock().await.as_ref().is_some_and(|l| l.usable())
    }

    async fn channel(&self) -> Result<Arc<Live>, AmqpError> {
        let mut guard = self.live.lock().await;
        if let Some(live) = guard.as_ref()
            && live.usable()
        {
            return Ok(live.clone());
        }
        *guard = None;
        if let Ok(last) = self.last_failure.lock()
            && let Some((at, error)) = last.as_ref()
            && at.elapsed() < RECONNECT_PAUSE
        {
            return Err(AmqpError::Unavailable(error.clone()));
        }
        let attempt = async {
            let conn = connect(&self.url, self.confirm_timeout).await?;
            let channel = conn.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            self.topology.declare(&channel).await?;
            let plain = conn.create_channel().await?;
            Ok::<_, AmqpError>(Live {
                conn,
                channel,
                plain,
            })
        };
        let result = attempt.await;
        if let Ok(mut last) = self.last_failure.lock() {
            *last = result
                .as_ref()
                .err()
                .map(|e| (Instant::now(), e.to_string()));
        }
        let live = Arc::new(result?);
        *guard = Some(live.clone());
        Ok(live)
    }

    async fn forget(&self, broken: &Arc<Live>) {
        let mut guard = self.live.lock().await;
        if guard.as_ref().is_some_and(|l| Arc::ptr_eq(l, broken)) {
            *guard = None;
        }
    }

    /// Publishes persistently and waits for the broker's confirm. `mandatory`, so that a
    /// message no queue would receive is an error rather than silently dropped.
    pub async fn publish(&self, msg: Outgoing<'_>) -> Result<(), AmqpError> {
        let live = self.channel().await?;
        let result = self.publish_on(&live, msg).await;
        if matches!(
            result,
            Err(AmqpError::Lapin(_)
                | AmqpError::InDoubt(_)
                | AmqpError::ConfirmTimeout(_)
                | AmqpError::Unavailable(_))
        ) {
            self.forget(&live).await;
        }
        result
    }

    async fn publish_on(&self, live: &Live, msg: Outgoing<'_>) -> Result<(), AmqpError> {
        let confirm = live
            .channel
            .basic_publish(
                msg.exchange.into(),
                msg.routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                msg.body,
                msg.properties.with_delivery_mode(2),
            )
            .await?;
        // `basic_publish` returned once the frames were written: from here on, a failure
        // leaves the message's fate unknown.
        let confirmation = tokio::time::timeout(self.confirm_timeout, confirm)
            .await
            .map_err(|_| AmqpError::ConfirmTimeout(self.confirm_timeout))?
            .map_err(AmqpError::InDoubt)?;
        if confirmation.is_nack() {
            return Err(AmqpError::Nacked);
        }
        if let Some(returned) = confirmation.take_message() {
            return Err(AmqpError::Unroutable(returned.reply_text.to_string()));
        }
        Ok(())
    }

    /// Publishes without waiting for a confirm (outcome notifications: the record in
    /// PostgreSQL is the truth, the message is a courtesy).
    pub async fn publish_unconfirmed(&self, msg: Outgoing<'_>) -> Result<(), AmqpError> {
        let live = self.channel().await?;
        let r = live
            .plain
            .basic_publish(
                msg.exchange.into(),
                msg.routing_key.into(),
                BasicPublishOptions::default(),
                msg.body,
                msg.properties,
            )
            .await;
        if let Err(e) = r {
            self.forget(&live).await;
            return Err(e.into());
        }
        Ok(())
    }

    /// Ready messages in a queue (passive declare), for queue-depth metrics and tests.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, AmqpError> {
        let live = self.channel().await?;
        // A passive declare on a missing queue closes the channel; use a throwaway one.
        let ch = live.conn.create_channel().await?;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = ch.close(200, "done".into()).await;
        Ok(q?.message_count())
    }
}

#[cfg(test)]
#[path = "amqp_tests.rs"]
mod tests;
