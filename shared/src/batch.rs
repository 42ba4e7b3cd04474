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
    if concurrency <= 1 {
        // One batch at a time, handled by this task itself: a task spawned per batch copied
        // the handler's future into a new task each time, which under light load (a batch per
        // item) was about 5 % of an engine's instructions (docs/decisions.md, stop 21).
        while let Some(first) = rx.recv().await {
            handle(take_waiting(&mut rx, first, max)).await;
        }
        return;
    }
    let permits = Arc::new(Semaphore::new(concurrency));
    loop {
        // A free slot first, so that items accumulate while every slot is busy.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let work = handle(take_waiting(&mut rx, first, max));
        tokio::spawn(async move {
            work.await;
            drop(permit);
        });
    }
}

/// `first` and whatever else is waiting, at most `max` items in all.
fn take_waiting<J>(rx: &mut mpsc::Receiver<J>, first: J, max: usize) -> Vec<J> {
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(j) => batch.push(j),
            Err(_) => break,
        }
    }
    batch
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod tests;
