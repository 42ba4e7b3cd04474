use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::StreamExt;

use super::*;

#[test]
fn cacertfile_is_read_and_taken_out_of_the_url() {
    let dir = std::env::temp_dir().join(format!("provisio-amqp-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let url = format!(
        "amqps://u:p@localhost:5671/%2f?heartbeat=5&cacertfile={}",
        ca.display()
    );
    let (rest, tls) = tls_config(&url).unwrap();
    assert_eq!(rest, "amqps://u:p@localhost:5671/%2f?heartbeat=5");
    assert_eq!(
        tls.cert_chain.as_deref(),
        Some("-----BEGIN CERTIFICATE-----\n")
    );
    let (plain, tls) = tls_config("amqp://localhost").unwrap();
    assert_eq!(plain, "amqp://localhost");
    assert!(tls.cert_chain.is_none());
    assert!(matches!(
        tls_config("amqps://localhost/?cacertfile=/no/such/ca.pem"),
        Err(AmqpError::Tls(_))
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Outcome notifications go out on a channel without confirms: on the confirming one,
/// lapin keeps the confirm of every publish nobody waits for (an engine grew by about
/// 1 KB per request). The messages still arrive. Against the test broker
/// (`PROVISIO_TEST_AMQP`, set by `ops/test`).
#[tokio::test]
async fn unconfirmed_publishes_go_on_a_channel_without_confirms_and_arrive() {
    let url = std::env::var("PROVISIO_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let topology = Topology::new(&AmqpConfig {
        prefix,
        ..AmqpConfig::default()
    });
    let publisher = Publisher::new(&url, topology.clone(), Duration::from_secs(10));
    publisher.ensure_connected().await.expect("connected");
    let live = publisher.channel().await.expect("channel");
    let queue = live
        .channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue");
    live.channel
        .queue_bind(
            queue.name().clone(),
            topology.results_exchange().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bound");
    for _ in 0..3 {
        publisher
            .publish_unconfirmed(Outgoing {
                exchange: &topology.results_exchange(),
                routing_key: "t.p.succeeded",
                body: b"{}",
                properties: BasicProperties::default(),
            })
            .await
            .expect("published");
    }
    assert!(live.channel.status().confirm() && !live.plain.status().confirm());
    let mut consumer = live
        .channel
        .basic_consume(
            queue.name().clone(),
            "check".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..lapin::options::BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consuming");
    for _ in 0..3 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await;
        assert!(matches!(delivery, Ok(Some(Ok(_)))), "{delivery:?}");
    }
    let _ = topology.delete(&live.channel).await;
}

/// Publishes queued behind a connection attempt to a broker that never answers fail with
/// that attempt, instead of each waiting out a connect timeout of its own.
#[tokio::test]
async fn a_silent_broker_costs_one_connect_timeout_not_one_per_publish() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    // Accepts connections and never says a word.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(sock);
        }
    });
    let publisher = Publisher::new(
        &format!("amqp://guest:guest@{addr}/%2f"),
        Topology::new(&AmqpConfig::default()),
        Duration::from_millis(300),
    );
    let publishes = (0..8).map(|_| {
        publisher.publish(Outgoing {
            exchange: "x",
            routing_key: "",
            body: b"{}",
            properties: BasicProperties::default(),
        })
    });
    let results = futures_util::future::join_all(publishes).await;
    silent.abort();
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(AmqpError::Unavailable(_)))),
        "{results:?}"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
}
