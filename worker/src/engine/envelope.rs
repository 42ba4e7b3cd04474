//! A delivery's envelope: who sent it (the queue manager's signature, or the AMQP user RabbitMQ
//! validated) and what that principal may do now, and the dead letter for one that cannot be
//! run, with its reason in headers.

use super::{
    BasicProperties, Disposition, Duration, Engine, Envelope, Instant, Outgoing, PrincipalBy,
    PrincipalRef, header_str, long_str, signing,
};

/// How a delivery names its principal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Who {
    /// Signed by the queue manager: the principal it authenticated.
    Id(uuid::Uuid),
    /// Published directly: the RabbitMQ user.
    AmqpUser(String),
}

/// How long a principal read from the database stands for its current permissions. Every
/// delivery runs with the permissions its principal has now (give or take this), not with
/// those it was submitted with: a scheduled, retried or resumed request, or one that waited
/// long in a queue, is refused once its principal lost the permission or was disabled.
const PRINCIPAL_TTL: Duration = Duration::from_secs(2);

/// Why a delivery is not run.
pub(super) enum Refused {
    /// Dead-lettered with this reason (one of `DEAD_LETTER_REASONS`) and detail.
    Dead(&'static str, String),
    /// The database cannot say who the principal is now: the delivery goes back to the queue.
    Unavailable(String),
}

impl Engine {
    /// Who sent the delivery (the queue manager's signature, or the AMQP user RabbitMQ
    /// validated), with the principal's current permissions.
    pub(super) async fn authenticate(
        &self,
        env: &Envelope,
        body: &[u8],
        props: &BasicProperties,
    ) -> Result<PrincipalRef, Refused> {
        let unauthenticated = |why: &str| Refused::Dead("unauthenticated", why.to_owned());
        if let Some(sig) = header_str(props, signing::SIGNATURE_HEADER) {
            if !signing::verify(
                self.cfg.security.signing_key.expose().as_bytes(),
                body,
                &sig,
            ) {
                return Err(unauthenticated("envelope signature does not verify"));
            }
            let submitted = env
                .principal
                .as_ref()
                .ok_or_else(|| unauthenticated("signed envelope names no principal"))?;
            return self.current(Who::Id(submitted.id)).await?.ok_or_else(|| {
                Refused::Dead(
                    "forbidden",
                    format!("principal `{}` is disabled or gone", submitted.name),
                )
            });
        }
        // Direct AMQP producers: RabbitMQ has validated `user_id` against the connection.
        let Some(user) = props.user_id().as_ref().map(|u| u.as_str().to_owned()) else {
            return Err(unauthenticated(
                "neither a queue-manager signature nor an AMQP user_id",
            ));
        };
        self.current(Who::AmqpUser(user.clone()))
            .await?
            .ok_or_else(|| {
                unauthenticated(&format!(
                    "AMQP user `{user}` is not mapped to an enabled principal"
                ))
            })
    }

    /// The enabled principal now, from a cache of [`PRINCIPAL_TTL`]; `None`: none (or disabled).
    async fn current(&self, who: Who) -> Result<Option<PrincipalRef>, Refused> {
        if let Ok(cache) = self.principals.lock()
            && let Some((p, at)) = cache.get(&who)
            && at.elapsed() < PRINCIPAL_TTL
        {
            return Ok(p.clone());
        }
        let unavailable =
            |e: &dyn std::fmt::Display| Refused::Unavailable(format!("database: {e}"));
        let client = self.pool.get().await.map_err(|e| unavailable(&e))?;
        let p = match &who {
            Who::Id(id) => provisio_shared::security::principal_by_id(&client, *id).await,
            Who::AmqpUser(user) => {
                provisio_shared::security::principal(&client, PrincipalBy::AmqpUser, user).await
            }
        }
        .map_err(|e| unavailable(&e))?;
        if let Ok(mut cache) = self.principals.lock() {
            cache.retain(|_, (_, at)| at.elapsed() < PRINCIPAL_TTL);
            cache.insert(who, (p.clone(), Instant::now()));
        }
        Ok(p)
    }

    pub(super) async fn dead_letter(
        &self,
        body: &[u8],
        props: &BasicProperties,
        reason: &str,
        detail: &str,
    ) -> Disposition {
        tracing::warn!(reason, detail, "dead-lettering a message");
        // Keep the producer's headers (the queue manager's signature among them), so that an
        // operator can replay the message as it was.
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert("x-provisio-reason".into(), long_str(reason));
        headers.insert("x-provisio-error".into(), long_str(detail));
        headers.insert("x-provisio-engine".into(), long_str(&self.engine_id));
        let mut out = BasicProperties::default().with_headers(headers);
        if let Some(id) = props.message_id() {
            out = out.with_message_id(id.clone());
        }
        let exchange = self.topology.dead_exchange();
        match self
            .publisher
            .publish(Outgoing {
                exchange: &exchange,
                routing_key: "",
                body,
                properties: out,
            })
            .await
        {
            Ok(()) => {
                metrics::counter!(provisio_shared::metrics::DEAD_LETTERS, "reason" => reason.to_owned()).increment(1);
                Disposition::Ack
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot dead-letter; requeueing");
                Disposition::Requeue
            }
        }
    }
}
