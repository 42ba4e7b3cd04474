//! Where a request's time went, from the fleet's own histograms: scraped from every process
//! at the end of the run, so that a latency tail in the bench's figures can be traced to a
//! stage (the broker confirm, the log writer's queue, a commit, a provider call) instead of
//! guessed at.

use std::collections::BTreeMap;

use provisio_shared::metrics as m;
use serde::Serialize;

/// The histograms shown, in the order of a request's life, with what one sample is.
const SHOWN: &[(&str, &str)] = &[
    (m::PUBLISH_DURATION, "publish → confirm (queue manager)"),
    (m::REQUEST_DURATION, "request: submitted → final"),
    (
        m::REQUEST_RUN_DURATION,
        "request: delivery → final (engine)",
    ),
    (m::STEP_DURATION, "provider call, retries included"),
    (m::TXLOG_QUEUE_WAIT, "log record: wait for a commit slot"),
    (m::TXLOG_COMMIT_DURATION, "log commit (one batch)"),
    (m::TXLOG_BATCH_SIZE, "log records per commit"),
];

/// One histogram summed over every process and label set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Stage {
    pub(crate) metric: String,
    pub(crate) what: String,
    pub(crate) count: u64,
    /// `ms` for durations, empty for counts (batch sizes).
    pub(crate) unit: &'static str,
    /// Mean sample, in `unit`.
    pub(crate) mean: f64,
    /// The bucket bound at or below which 99 % of the samples fall (same unit as `mean`);
    /// `None` when they fall above the last bound.
    pub(crate) p99_at_most: Option<f64>,
}

/// Sums of one histogram: `_sum`, `_count` and the cumulative buckets by bound.
#[derive(Default)]
struct Sums {
    sum: f64,
    count: f64,
    buckets: BTreeMap<u64, (f64, f64)>,
}

/// The value of label `le` in a series' label set (`{a="b",le="0.5"}`).
fn le(labels: &str) -> Option<&str> {
    labels
        .trim_start_matches('{')
        .trim_end_matches('}')
        .split(',')
        .find_map(|kv| kv.strip_prefix("le="))
        .map(|v| v.trim_matches('"'))
}

/// Folds one process's `/metrics` text into `into`, for the histograms in [`SHOWN`].
fn fold(text: &str, into: &mut BTreeMap<&'static str, Sums>) {
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').map_or((series, ""), |(n, l)| (n, l));
        for (metric, _) in SHOWN {
            let Some(part) = name.strip_prefix(metric) else {
                continue;
            };
            let s = into.entry(metric).or_default();
            match part {
                "_sum" => s.sum += value,
                "_count" => s.count += value,
                "_bucket" => {
                    if let Some(bound) = le(labels).and_then(|b| b.parse::<f64>().ok()) {
                        // Keyed by the bound's bits: the bounds are the same in every
                        // process, and the bits of non-negative floats (+Inf included)
                        // sort as their values, so the map iterates in bound order.
                        let e = s.buckets.entry(bound.to_bits()).or_insert((bound, 0.0));
                        e.1 += value;
                    }
                }
                _ => {}
            }
        }
    }
}

/// The stages of every `/metrics` text given (one per process).
pub(crate) fn summarise(texts: &[String]) -> Vec<Stage> {
    let mut sums = BTreeMap::new();
    for t in texts {
        fold(t, &mut sums);
    }
    SHOWN
        .iter()
        .filter_map(|(metric, what)| {
            let s = sums.get(metric)?;
            if s.count < 1.0 {
                return None;
            }
            // Durations are recorded in seconds and shown in milliseconds.
            let (scale, unit) = if metric.ends_with("_seconds") {
                (1000.0, "ms")
            } else {
                (1.0, "")
            };
            let p99_at_most = s
                .buckets
                .values()
                .find(|(_, cumulative)| *cumulative >= 0.99 * s.count)
                .map(|(bound, _)| *bound)
                .filter(|b| b.is_finite())
                .map(|b| b * scale);
            Some(Stage {
                metric: (*metric).to_owned(),
                what: (*what).to_owned(),
                unit,
                count: s.count as u64,
                mean: s.sum / s.count * scale,
                p99_at_most,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENGINE_1: &str = r#"# TYPE provisio_txlog_queue_wait_seconds histogram
provisio_txlog_queue_wait_seconds_bucket{le="0.001"} 90
provisio_txlog_queue_wait_seconds_bucket{le="0.005"} 99
provisio_txlog_queue_wait_seconds_bucket{le="+Inf"} 100
provisio_txlog_queue_wait_seconds_sum 0.2
provisio_txlog_queue_wait_seconds_count 100
provisio_txlog_batch_records_bucket{le="1"} 10
provisio_txlog_batch_records_bucket{le="+Inf"} 10
provisio_txlog_batch_records_sum 10
provisio_txlog_batch_records_count 10
provisio_step_duration_seconds_bucket{provider="test",le="0.01"} 0
provisio_step_duration_seconds_bucket{provider="test",le="+Inf"} 3
provisio_step_duration_seconds_sum{provider="test"} 3
provisio_step_duration_seconds_count{provider="test"} 3
provisio_requests_finished_total{status="succeeded"} 100
"#;

    const ENGINE_2: &str = r#"provisio_txlog_queue_wait_seconds_bucket{le="0.001"} 0
provisio_txlog_queue_wait_seconds_bucket{le="0.005"} 0
provisio_txlog_queue_wait_seconds_bucket{le="+Inf"} 100
provisio_txlog_queue_wait_seconds_sum 1.0
provisio_txlog_queue_wait_seconds_count 100
"#;

    fn stage<'a>(stages: &'a [Stage], metric: &str) -> &'a Stage {
        stages
            .iter()
            .find(|s| s.metric == metric)
            .unwrap_or_else(|| panic!("{metric} missing in {stages:?}"))
    }

    #[test]
    fn stages_sum_every_process_and_read_p99_from_the_buckets() {
        let one = summarise(&[ENGINE_1.to_owned()]);
        let wait = stage(&one, m::TXLOG_QUEUE_WAIT);
        assert_eq!(wait.count, 100);
        assert!((wait.mean - 2.0).abs() < 1e-9, "{wait:?}");
        assert_eq!(wait.p99_at_most, Some(5.0));
        // Batch sizes are counts, not durations: not scaled to milliseconds.
        let batch = stage(&one, m::TXLOG_BATCH_SIZE);
        assert_eq!(
            (batch.count, batch.mean, batch.p99_at_most),
            (10, 1.0, Some(1.0))
        );
        // Series with labels are summed too; all above the last bound: no p99 bound.
        let step = stage(&one, m::STEP_DURATION);
        assert_eq!((step.count, step.mean, step.p99_at_most), (3, 1000.0, None));

        // A second process's slow records move the mean and the p99 past every bound.
        let both = summarise(&[ENGINE_1.to_owned(), ENGINE_2.to_owned()]);
        let wait = stage(&both, m::TXLOG_QUEUE_WAIT);
        assert_eq!(wait.count, 200);
        assert!((wait.mean - 6.0).abs() < 1e-9, "{wait:?}");
        assert_eq!(wait.p99_at_most, None);
        // Histograms nobody recorded are left out, and counters are not histograms.
        assert!(both.iter().all(|s| s.metric != m::PUBLISH_DURATION));
        assert_eq!(both.len(), 3);
    }

    #[test]
    fn a_name_that_only_starts_like_a_shown_metric_is_not_folded_in() {
        let text = "provisio_request_duration_seconds_count 4\n\
                    provisio_request_duration_seconds_sum 4\n\
                    provisio_request_run_duration_seconds_count 2\n\
                    provisio_request_run_duration_seconds_sum 1\n";
        let stages = summarise(&[text.to_owned()]);
        assert_eq!(stage(&stages, m::REQUEST_DURATION).count, 4);
        assert_eq!(stage(&stages, m::REQUEST_RUN_DURATION).count, 2);
        let run = stage(&stages, m::REQUEST_RUN_DURATION);
        assert!((run.mean - 500.0).abs() < 1e-9, "{run:?}");
    }
}
