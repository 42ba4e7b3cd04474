//! One back-off for every long-lived session that must come back after its server went away:
//! the engine's and the dead-letter consumer's broker sessions, the auditor's leadership
//! session, the queue manager's outcome follower and the namespace listener.
//!
//! Why one: each of them used to carry its own loop, and they disagreed on the little things
//! that matter in an outage — whether a stop request interrupts the pause, whether a session
//! that ran fine for an hour starts the next outage from the shortest pause, and how far the
//! pause grows. Here those rules are written once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Exponential back-off between reconnect attempts, reset by a session that got going.
#[derive(Debug, Clone)]
pub struct Reconnect {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Reconnect {
    /// Pauses start at `min` and double up to `max`.
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The broker sessions' back-off: 200 ms doubling to 5 s.
    pub const fn broker() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(5))
    }

    /// A session got as far as serving: the next outage starts again from the shortest pause,
    /// so that one bad hour yesterday does not slow today's reconnect.
    pub fn healthy(&mut self) {
        self.next = self.min;
    }

    /// For sessions with no clear "serving" moment: one that lasted longer than the longest
    /// pause counts as healthy.
    pub fn lasted(&mut self, session: Duration) {
        if session > self.max {
            self.healthy();
        }
    }

    /// The pause the next [`Reconnect::pause`] will take (for logs).
    pub fn next_delay(&self) -> Duration {
        self.next
    }

    /// Waits the current pause and grows the next one. Returns `false` when `stop` fired
    /// first: the caller ends instead of reconnecting.
    pub async fn pause(&mut self, stop: &CancellationToken) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pauses_double_up_to_the_maximum_and_reset_when_healthy() {
        let stop = CancellationToken::new();
        let mut r = Reconnect::new(Duration::from_millis(100), Duration::from_millis(350));
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(r.next_delay());
            assert!(r.pause(&stop).await);
        }
        assert_eq!(
            seen,
            [100, 200, 350, 350].map(Duration::from_millis).to_vec()
        );
        r.lasted(Duration::from_millis(300));
        assert_eq!(
            r.next_delay(),
            Duration::from_millis(350),
            "a short session is no sign"
        );
        r.lasted(Duration::from_millis(400));
        assert_eq!(r.next_delay(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_the_pause() {
        let stop = CancellationToken::new();
        stop.cancel();
        let mut r = Reconnect::new(Duration::from_mins(90), Duration::from_mins(90));
        assert!(!r.pause(&stop).await);
    }
}
