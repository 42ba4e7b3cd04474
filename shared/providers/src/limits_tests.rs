use super::*;
use provisio_provider::Participation;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts how many calls are inside it at once.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Provider for Gauge {
    fn name(&self) -> &'static str {
        "gauge"
    }
    fn execute<'a>(&'a self, _call: &'a Call) -> BoxFuture<'a, Result<Executed, ProviderError>> {
        Box::pin(async move {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(n, Ordering::SeqCst);
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(Executed {
                output: serde_json::Value::Null,
                rollback: None,
            })
        })
    }
}

fn call() -> Call {
    Call {
        tx_id: uuid::Uuid::now_v7(),
        idempotency_key: "k".into(),
        step_path: "0".into(),
        action: "a".into(),
        input: serde_json::Value::Null,
        caller: None,
        credentials: None,
        participation: Participation::Compensating,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_limit_bounds_calls_in_flight() {
    let inner = Arc::new(Gauge::default());
    let limited = Limited::wrap(
        inner.clone(),
        &ProviderLimits {
            concurrency: 3,
            rate_per_second: 0.0,
        },
    );
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let p = limited.clone();
            tokio::spawn(async move { p.execute(&call()).await })
        })
        .collect();
    for c in calls {
        assert!(c.await.expect("joins").is_ok());
    }
    assert_eq!(inner.max.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn no_limits_means_the_provider_itself() {
    let inner: Arc<dyn Provider> = Arc::new(Gauge::default());
    let same = Limited::wrap(inner.clone(), &ProviderLimits::default());
    assert!(Arc::ptr_eq(&inner, &same));
}

#[test]
fn bucket_allows_its_rate_then_makes_callers_wait() {
    let mut b = Bucket {
        rate: 2.0,
        tokens: 2.0,
        at: Instant::now(),
    };
    assert!(b.take().is_none());
    assert!(b.take().is_none());
    let wait = b.take().expect("must wait");
    assert!(wait <= Duration::from_millis(500), "{wait:?}");
}
