//! Samples the depth of every request lane and of the dead-letter queue into
//! `provisio_queue_depth_messages{lane}`. Only queue managers sample: the depth is the
//! broker's, the same whoever asks, and one kind of process reporting it keeps dashboards from
//! adding up copies (every replica reports the same value: aggregate with `max by (lane)`).

use std::time::Duration;

use provisio_shared::amqp::Publisher;
use provisio_shared::domain::Priority;
use provisio_shared::metrics::{DEAD_LANE, QUEUE_DEPTH};
use tokio_util::sync::CancellationToken;

/// The queues sampled, by `lane` label.
pub fn queues(publisher: &Publisher) -> Vec<(&'static str, String)> {
    let t = publisher.topology();
    let mut v: Vec<(&'static str, String)> = Priority::ALL
        .iter()
        .map(|p| (p.as_str(), t.lane_queue(*p)))
        .collect();
    v.push(("trusted", t.trusted_queue()));
    v.push((DEAD_LANE, t.dead_queue()));
    v
}

/// Samples every `every` until `stop`. A queue that cannot be read keeps its last value (the
/// broker gauge says why), rather than reading as an empty queue.
pub async fn run(publisher: Publisher, every: Duration, stop: CancellationToken) {
    let queues = queues(&publisher);
    loop {
        for (lane, queue) in &queues {
            match publisher.queue_depth(queue).await {
                Ok(n) => metrics::gauge!(QUEUE_DEPTH, "lane" => *lane).set(f64::from(n)),
                Err(e) => tracing::debug!(queue, error = %e, "cannot sample the queue depth"),
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
