use super::*;

#[tokio::test]
async fn wakes_registered_waiters_and_forgets_abandoned_ones() {
    let w = Arc::new(Waiters::default());
    let mut a = w.register("r1");
    let mut b = w.register("r1");
    w.wake("r1");
    assert!((&mut a.woken).await.is_ok());
    assert!((&mut b.woken).await.is_ok());
    let c = w.register("r2");
    drop(c);
    assert!(
        w.map.lock().expect("lock").is_empty(),
        "an abandoned wait leaves nothing behind"
    );
}

/// The follower receives outcomes only while someone waits (here with no linger): an
/// outcome published while nobody waits never reaches the queue manager, one published
/// after a waiter's `followed` does. Against the test broker (`PROVISIO_TEST_AMQP`).
#[tokio::test]
async fn outcomes_reach_the_follower_only_while_someone_waits() {
    use lapin::BasicProperties;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use provisio_shared::config::AmqpConfig;

    let url = std::env::var("PROVISIO_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let topology = Topology::new(&AmqpConfig {
        prefix,
        ..AmqpConfig::default()
    });
    let conn = connect(&url, Duration::from_secs(10))
        .await
        .expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    topology.declare(&ch).await.expect("topology");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    // Confirmed: the broker has routed it (or found nowhere to route it) before this returns.
    let publish = |id: &'static str| {
        let (ch, exchange) = (ch.clone(), topology.results_exchange());
        async move {
            ch.basic_publish(
                exchange.into(),
                "demo.hello.succeeded".into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default().with_message_id(id.into()),
            )
            .await
            .expect("published")
            .await
            .expect("confirmed");
        }
    };
    let within = Duration::from_secs(30);
    let w = Arc::new(Waiters::with_linger(Duration::ZERO));
    w.follow(url.clone(), topology.clone());

    // A first waiter: the follower connects and binds, and its outcome arrives.
    let mut first = w.register("first");
    first.followed(within).await;
    assert!(*w.bound.borrow(), "bound while someone waits");
    publish("first").await;
    tokio::time::timeout(within, &mut first.woken)
        .await
        .expect("woken in time")
        .expect("woken");
    // It leaves: with no linger the follower unbinds at once.
    drop(first);
    let mut released = w.released.subscribe();
    tokio::time::timeout(within, released.wait_for(|n| *n >= 1))
        .await
        .expect("unbound in time")
        .expect("follower alive");
    assert!(!*w.bound.borrow());

    // Nobody waits: this outcome goes nowhere. Bound for good (as before), the follower
    // would receive it ahead of the next one on its queue.
    publish("unwatched").await;
    let mut second = w.register("second");
    second.followed(within).await;
    publish("second").await;
    tokio::time::timeout(within, &mut second.woken)
        .await
        .expect("woken in time")
        .expect("woken");
    assert_eq!(
        w.received.load(Ordering::Relaxed),
        2,
        "only the outcomes published while someone waited reached the follower"
    );
    let _ = topology.delete(&ch).await;
    let _ = conn.close(200, "done".into()).await;
}
