//! A delivery's envelope: who sent it (the queue manager's signature, or the AMQP user RabbitMQ
//! validated), and the dead letter for one that cannot be run, with its reason in headers.

use super::{
    BasicProperties, Disposition, Duration, Engine, Envelope, Instant, Outgoing, PrincipalBy,
    PrincipalRef, header_str, long_str, signing,
};

impl Engine {
    pub(super) async fn authenticate(
        &self,
        env: &Envelope,
        body: &[u8],
        props: &BasicProperties,
    ) -> Result<PrincipalRef, String> {
        if let Some(sig) = header_str(props, signing::SIGNATURE_HEADER) {
            if !signing::verify(
                self.cfg.security.signing_key.expose().as_bytes(),
                body,
                &sig,
            ) {
                return Err("envelope signature does not verify".into());
            }
            return env
                .principal
                .clone()
                .ok_or_else(|| "signed envelope names no principal".to_owned());
        }
        // Direct AMQP producers: RabbitMQ has validated `user_id` against the connection.
        let Some(user) = props.user_id().as_ref().map(|u| u.as_str().to_owned()) else {
            return Err("neither a queue-manager signature nor an AMQP user_id".into());
        };
        if let Ok(cache) = self.amqp_users.lock()
            && let Some((p, at)) = cache.get(&user)
            && at.elapsed() < Duration::from_mins(1)
        {
            return Ok(p.clone());
        }
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| format!("database: {e}"))?;
        let p = provisio_shared::security::principal(&client, PrincipalBy::AmqpUser, &user)
            .await
            .map_err(|e| format!("database: {e}"))?
            .ok_or_else(|| format!("AMQP user `{user}` is not mapped to a principal"))?;
        if let Ok(mut cache) = self.amqp_users.lock() {
            cache.insert(user, (p.clone(), Instant::now()));
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
