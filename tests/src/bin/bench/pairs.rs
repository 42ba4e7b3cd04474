//! `--pairs N`: the ratio as a distribution, not as one draw.
//!
//! On a small shared machine the reference's own throughput moves by ±15 % from one run to
//! the next (docs/decisions.md, stop 24), more than most changes to the fleet. One pair of runs
//! therefore says little, and "three in a row" mostly measures luck. Interleaved pairs (fleet,
//! reference, fleet, reference, …) expose both sides to the same drift, and the median with
//! its spread is a figure that two sessions can compare.

use serde::Serialize;

/// What N interleaved pairs gave.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct RatioSummary {
    /// Each pair's ratio, in the order they ran.
    pub ratios: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Pairs whose ratio was 1.0 or more.
    pub at_least_one: usize,
    /// The longest run of consecutive pairs at 1.0 or more.
    pub longest_streak_at_least_one: usize,
}

impl RatioSummary {
    /// `None` for no pairs, or when a ratio is not a finite number (a run finished nothing).
    pub(crate) fn of(ratios: &[f64]) -> Option<Self> {
        if ratios.is_empty() || ratios.iter().any(|r| !r.is_finite()) {
            return None;
        }
        let mut sorted = ratios.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            f64::midpoint(sorted[n / 2 - 1], sorted[n / 2])
        };
        let (mut reached, mut streak, mut longest) = (0, 0, 0);
        for r in ratios {
            if *r >= 1.0 {
                reached += 1;
                streak += 1;
            } else {
                streak = 0;
            }
            longest = longest.max(streak);
        }
        Some(Self {
            ratios: ratios.to_vec(),
            median,
            min: sorted[0],
            max: sorted[n - 1],
            at_least_one: reached,
            longest_streak_at_least_one: longest,
        })
    }

    pub(crate) fn line(&self) -> String {
        let each = self
            .ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" / ");
        format!(
            "ratios     {} pairs: {each}   median {:.2}   min {:.2}   max {:.2}   ≥ 1.0 in {} (longest streak {})",
            self.ratios.len(),
            self.median,
            self.min,
            self.max,
            self.at_least_one,
            self.longest_streak_at_least_one
        )
    }
}

#[cfg(test)]
#[path = "pairs_tests.rs"]
mod tests;
