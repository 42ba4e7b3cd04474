//! Per-provider concurrency and rate limits (configuration `providers.limits.NAME`), enforced
//! per engine by wrapping the provider.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use provisio_shared::config::ProviderLimits;
use provisio_shared::metrics as m;
use provisio_shared::provider::{Call, Executed, Provider, ProviderError, Rollback};
use tokio::sync::{Mutex, Semaphore};

/// A token bucket refilled continuously at `rate` tokens per second, holding at most `rate`.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> Option<Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate)
            .min(self.rate.max(1.0));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

pub struct Limited {
    inner: Arc<dyn Provider>,
    concurrency: Option<Semaphore>,
    bucket: Option<Mutex<Bucket>>,
}

impl Limited {
    pub fn wrap(inner: Arc<dyn Provider>, limits: &ProviderLimits) -> Arc<dyn Provider> {
        if limits.concurrency == 0 && limits.rate_per_second <= 0.0 {
            return inner;
        }
        // Zero series of a limited provider, present before its first call.
        let name = inner.name().to_owned();
        metrics::counter!(m::PROVIDER_THROTTLED, "provider" => name.clone()).increment(0);
        let _ = metrics::histogram!(m::PROVIDER_WAIT, "provider" => name.clone());
        metrics::gauge!(m::PROVIDER_INFLIGHT, "provider" => name).set(0.0);
        Arc::new(Self {
            inner,
            concurrency: (limits.concurrency > 0).then(|| Semaphore::new(limits.concurrency)),
            bucket: (limits.rate_per_second > 0.0).then(|| {
                Mutex::new(Bucket {
                    rate: limits.rate_per_second,
                    tokens: limits.rate_per_second.max(1.0),
                    at: Instant::now(),
                })
            }),
        })
    }

    async fn admit(&self) {
        let name = self.inner.name().to_owned();
        let started = Instant::now();
        if let Some(bucket) = &self.bucket {
            loop {
                let wait = bucket.lock().await.take();
                match wait {
                    None => break,
                    Some(d) => {
                        metrics::counter!(m::PROVIDER_THROTTLED, "provider" => name.clone())
                            .increment(1);
                        tokio::time::sleep(d).await;
                    }
                }
            }
        }
        metrics::histogram!(m::PROVIDER_WAIT, "provider" => name)
            .record(started.elapsed().as_secs_f64());
    }
}

impl Provider for Limited {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn execute<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Executed, ProviderError>> {
        Box::pin(async move {
            let _permit = match &self.concurrency {
                Some(s) => Some(s.acquire().await.map_err(|_| {
                    ProviderError::retryable("unavailable", "provider is shutting down")
                })?),
                None => None,
            };
            self.admit().await;
            let gauge =
                metrics::gauge!(m::PROVIDER_INFLIGHT, "provider" => self.inner.name().to_owned());
            gauge.increment(1.0);
            let r = self.inner.execute(call).await;
            gauge.decrement(1.0);
            r
        })
    }
    fn rollback<'a>(&'a self, rb: &'a Rollback) -> BoxFuture<'a, Result<(), ProviderError>> {
        // Rollbacks are not throttled: undoing must not wait behind new work.
        self.inner.rollback(rb)
    }
    fn rollback_unknown<'a>(
        &'a self,
        rb: &'a Rollback,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        self.inner.rollback_unknown(rb)
    }
    fn supports_two_phase(&self) -> bool {
        self.inner.supports_two_phase()
    }
    fn prepare(&self, tx_id: uuid::Uuid) -> BoxFuture<'_, Result<(), ProviderError>> {
        self.inner.prepare(tx_id)
    }
    fn commit(&self, tx_id: uuid::Uuid) -> BoxFuture<'_, Result<(), ProviderError>> {
        self.inner.commit(tx_id)
    }
    fn abort(&self, tx_id: uuid::Uuid) -> BoxFuture<'_, Result<(), ProviderError>> {
        self.inner.abort(tx_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use provisio_shared::provider::Participation;
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
        fn execute<'a>(
            &'a self,
            _call: &'a Call,
        ) -> BoxFuture<'a, Result<Executed, ProviderError>> {
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
}
