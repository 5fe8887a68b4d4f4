//! What the load generators (`tessera bench`, and the etcd load of `tessera bench compare`)
//! count: a latency histogram of fixed memory, whatever the number of samples, and the
//! outcomes of a run's requests.

/// Latency histogram in microseconds, log-linear like HDR histograms: exact below 128 µs,
/// then 64 buckets per power of two (relative error under 1.6%), up to 2^32 µs.
pub struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
}

/// Values below this are counted exactly.
const EXACT_BELOW: u64 = 128;
/// Buckets per power of two above [`EXACT_BELOW`].
const BUCKETS_PER_OCTAVE: u64 = 64;
/// Largest recordable value; larger ones count as this.
const LATENCY_MAX_US: u64 = (1 << 32) - 1;

impl LatencyHistogram {
    pub fn new() -> LatencyHistogram {
        LatencyHistogram {
            counts: vec![0; Self::index(LATENCY_MAX_US) + 1],
            total: 0,
        }
    }

    fn index(value: u64) -> usize {
        if value < EXACT_BELOW {
            return value as usize;
        }
        let magnitude = 63 - u64::from(value.leading_zeros()); // floor(log2 value) >= 7
        let shift = magnitude - 6;
        let top = value >> shift; // in [64, 128)
        (EXACT_BELOW + (magnitude - 7) * BUCKETS_PER_OCTAVE + (top - BUCKETS_PER_OCTAVE)) as usize
    }

    /// The highest value that falls in bucket `index`.
    fn highest_in(index: usize) -> u64 {
        let index = index as u64;
        if index < EXACT_BELOW {
            return index;
        }
        let octave = (index - EXACT_BELOW) / BUCKETS_PER_OCTAVE;
        let top = BUCKETS_PER_OCTAVE + (index - EXACT_BELOW) % BUCKETS_PER_OCTAVE;
        let shift = octave + 1;
        ((top + 1) << shift) - 1
    }

    pub fn record(&mut self, value_us: u64) {
        self.counts[Self::index(value_us.min(LATENCY_MAX_US))] += 1;
        self.total += 1;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The smallest bucket bound at or below which `quantile` of the values lie.
    pub fn quantile(&self, quantile: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((quantile * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Self::highest_in(index);
            }
        }
        LATENCY_MAX_US
    }
}

/// The outcomes of one run's requests: latencies of those that succeeded inside the measured
/// window, and failures.
pub struct Outcomes {
    pub latency: LatencyHistogram,
    /// Failures inside the measured window.
    pub errors: u64,
    /// The latest failure, measured or not (a warm-up failure explains an empty run too).
    pub last_error: Option<String>,
}

impl Outcomes {
    pub fn new() -> Outcomes {
        Outcomes {
            latency: LatencyHistogram::new(),
            errors: 0,
            last_error: None,
        }
    }

    /// Counts a request that completed inside the measured window or not (`measured`); a
    /// success carries its latency in µs.
    pub fn record(&mut self, outcome: Result<u64, String>, measured: bool) {
        match outcome {
            Ok(latency_us) if measured => self.latency.record(latency_us),
            Ok(_) => {}
            Err(error) => {
                self.errors += u64::from(measured);
                self.last_error = Some(error);
            }
        }
    }

    /// The number of measured successes, or an error naming the last failure when there is
    /// none. `span` says over what time nothing succeeded.
    pub fn successes(&self, span: &str) -> anyhow::Result<u64> {
        let successes = self.latency.count();
        if successes == 0 {
            anyhow::bail!(
                "no request completed in {span}{}",
                self.last_error
                    .as_ref()
                    .map(|error| format!(" (last error: {error})"))
                    .unwrap_or_default()
            );
        }
        Ok(successes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_exact_when_small_and_within_two_percent_above() {
        let mut histogram = LatencyHistogram::new();
        assert_eq!(histogram.quantile(0.5), 0);
        for value in 1..=100 {
            histogram.record(value);
        }
        assert_eq!(histogram.count(), 100);
        assert_eq!(histogram.quantile(0.5), 50);
        assert_eq!(histogram.quantile(0.99), 99);
        assert_eq!(histogram.quantile(1.0), 100);
        for value in [128, 1_000, 12_345, 999_999, 60_000_000, LATENCY_MAX_US] {
            let bound = LatencyHistogram::highest_in(LatencyHistogram::index(value));
            assert!(
                bound >= value && (bound - value) as f64 <= value as f64 * 0.016,
                "{value} -> {bound}"
            );
        }
        // Bucket bounds increase strictly, so quantiles are monotonic.
        let bounds: Vec<u64> = (0..histogram.counts.len())
            .map(LatencyHistogram::highest_in)
            .collect();
        assert!(bounds.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(*bounds.last().unwrap(), LATENCY_MAX_US);
        histogram.record(u64::MAX);
        assert_eq!(histogram.quantile(1.0), LATENCY_MAX_US);
    }

    #[test]
    fn outcomes_count_only_the_measured_window_and_keep_the_last_error() {
        let mut outcomes = Outcomes::new();
        outcomes.record(Err("warm-up refused".into()), false);
        outcomes.record(Ok(5), false);
        let error = outcomes.successes("1s").unwrap_err().to_string();
        assert_eq!(
            error,
            "no request completed in 1s (last error: warm-up refused)"
        );
        outcomes.record(Ok(7), true);
        outcomes.record(Err("timed out".into()), true);
        assert_eq!(outcomes.successes("1s").unwrap(), 1);
        assert_eq!(outcomes.latency.quantile(1.0), 7);
        assert_eq!(outcomes.errors, 1);
        assert_eq!(outcomes.last_error.as_deref(), Some("timed out"));
    }
}
