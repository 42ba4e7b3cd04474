use super::RatioSummary;

#[test]
fn median_spread_and_streak_of_an_odd_number_of_pairs() {
    let s = RatioSummary::of(&[0.95, 1.05, 1.01, 0.79, 1.02]).expect("summary");
    assert!((s.median - 1.01).abs() < 1e-9, "{s:?}");
    assert!(
        (s.min - 0.79).abs() < 1e-9 && (s.max - 1.05).abs() < 1e-9,
        "{s:?}"
    );
    assert_eq!(s.at_least_one, 3);
    // 1.05, 1.01 in a row, then 0.79 breaks it; 1.02 alone.
    assert_eq!(s.longest_streak_at_least_one, 2);
    assert_eq!(
        s.ratios,
        vec![0.95, 1.05, 1.01, 0.79, 1.02],
        "kept in run order"
    );
}

#[test]
fn median_of_an_even_number_is_the_middle_two_averaged() {
    let s = RatioSummary::of(&[1.2, 0.8, 1.0, 0.9]).expect("summary");
    assert!((s.median - 0.95).abs() < 1e-9, "{s:?}");
    assert_eq!(s.at_least_one, 2);
    assert_eq!(s.longest_streak_at_least_one, 1);
}

#[test]
fn exactly_one_counts_as_reached() {
    let s = RatioSummary::of(&[1.0, 1.0, 1.0]).expect("summary");
    assert_eq!((s.at_least_one, s.longest_streak_at_least_one), (3, 3));
}

#[test]
fn no_pairs_or_a_run_that_finished_nothing_gives_no_summary() {
    assert_eq!(RatioSummary::of(&[]), None);
    assert_eq!(RatioSummary::of(&[1.0, f64::NAN]), None);
    assert_eq!(RatioSummary::of(&[f64::INFINITY]), None);
}

#[test]
fn the_line_shows_every_ratio_and_the_median() {
    let line = RatioSummary::of(&[0.9, 1.1, 1.0]).expect("summary").line();
    assert!(line.contains("3 pairs: 0.90 / 1.10 / 1.00"), "{line}");
    assert!(line.contains("median 1.00"), "{line}");
    assert!(line.contains("≥ 1.0 in 2 (longest streak 2)"), "{line}");
}
