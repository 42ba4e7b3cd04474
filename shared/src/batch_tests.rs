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
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
}

/// With one slot the batches run on the collector's own task, one after the other: no task
/// per batch, and every batch handled when `run` returns.
#[tokio::test]
async fn one_slot_handles_batches_on_its_own_task() {
    let (tx, rx) = mpsc::channel(100);
    for i in 0..5 {
        tx.send(i).await.expect("send");
    }
    drop(tx);
    let tasks = Arc::new(Mutex::new(Vec::new()));
    let t = tasks.clone();
    let collector = tokio::spawn(async move {
        run(rx, 2, 1, move |_b: Vec<i32>| {
            let t = t.clone();
            async move { t.lock().expect("lock").push(tokio::task::try_id()) }
        })
        .await;
        tokio::task::id()
    });
    let collector = collector.await.expect("collector");
    let tasks = tasks.lock().expect("lock").clone();
    assert_eq!(tasks, vec![Some(collector); 3]);
}

/// Several slots: batches overlap, each on a task of its own.
#[tokio::test]
async fn several_slots_let_batches_overlap() {
    let (tx, rx) = mpsc::channel(100);
    let (release, released) = tokio::sync::watch::channel(false);
    let started = Arc::new(tokio::sync::Semaphore::new(0));
    let s = started.clone();
    let collector = tokio::spawn(run(rx, 1, 2, move |_b: Vec<i32>| {
        let (s, mut released) = (s.clone(), released.clone());
        async move {
            s.add_permits(1);
            // Held until both batches have started: only possible if they overlap.
            let _ = released.wait_for(|r| *r).await;
        }
    }));
    tx.send(1).await.expect("send");
    tx.send(2).await.expect("send");
    let both = started.acquire_many(2).await.expect("both batches started");
    drop(both);
    release.send(true).expect("release");
    drop(tx);
    collector.await.expect("collector");
}
