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
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn batches_what_is_waiting_and_keeps_order_with_one_slot() {
        let (tx, rx) = mpsc::channel(100);
        for i in 0..10 {
            tx.send(i).await.expect("send");
        }
        drop(tx);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        run(rx, 4, 1, move |b: Vec<i32>| {
            let s = s.clone();
            async move { s.lock().expect("lock").push(b) }
        })
        .await;
        // Let the last spawned batch finish.
        tokio::task::yield_now().await;
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
    }
}
