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
