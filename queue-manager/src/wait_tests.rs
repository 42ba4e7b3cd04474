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
