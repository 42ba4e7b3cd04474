//! Group commit's common shape: take whatever is waiting (at least one item, at most `max`),
//! hand it to a handler as one batch, with at most `concurrency` batches in flight. Items
//! keep arriving while batches are busy, so the next batch is as large as the load makes it;
//! under light load a batch is a single item and nobody waits for a timer.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

/// Runs until every sender of `rx` is gone.
pub async fn run<J, F, Fut>(mut rx: mpsc::Receiver<J>, max: usize, concurrency: usize, handle: F)
where
    J: Send + 'static,
    F: Fn(Vec<J>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    loop {
        // A free slot first, so that items accumulate while every slot is busy.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let work = handle(batch);
        tokio::spawn(async move {
            work.await;
            drop(permit);
        });
    }
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod tests;
