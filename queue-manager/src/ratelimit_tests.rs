use super::*;

fn limits(per_second: f64, burst: u32) -> RateLimits {
    RateLimits::new(&RateLimitConfig {
        per_principal_per_second: per_second,
        burst,
    })
    .expect("on")
}

#[test]
fn off_unless_configured() {
    assert!(RateLimits::new(&RateLimitConfig::default()).is_none());
}

#[test]
fn each_principal_has_its_own_bucket() {
    let l = limits(0.01, 2);
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    assert!(l.check(a, 1).is_ok());
    assert!(l.check(a, 1).is_ok());
    let Err(ApiError::RateLimited { retry_after, .. }) = l.check(a, 1) else {
        panic!("the third is over the burst");
    };
    // One allowance back every 100 s.
    assert!(retry_after > Duration::from_secs(90), "{retry_after:?}");
    assert!(l.check(b, 2).is_ok(), "another principal is unaffected");
}

#[test]
fn batches_take_one_allowance_per_element_all_or_nothing() {
    let l = limits(0.01, 3);
    let a = uuid::Uuid::new_v4();
    assert!(l.check(a, 0).is_ok(), "an empty batch costs nothing");
    assert!(l.check(a, 2).is_ok());
    assert!(matches!(l.check(a, 2), Err(ApiError::RateLimited { .. })));
    assert!(l.check(a, 1).is_ok(), "the refused batch took nothing");
    assert!(matches!(l.check(a, 4), Err(ApiError::Malformed(_))));
}

#[test]
fn retry_after_rounds_up() {
    assert_eq!(retry_after_secs(Duration::ZERO), 1);
    assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
    assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
}
