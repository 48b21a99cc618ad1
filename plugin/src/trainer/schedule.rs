//! Learning-rate schedule: linear warm-up, cosine decay to a floor.

/// Cosine schedule with linear warm-up and a floor.
///
/// With `W = ceil(warmup_fraction * total_steps)` warm-up steps, the learning rate of 0-based
/// step `s` is
///
/// * `peak * (s + 1) / W` for `s < W` (the first step already moves),
/// * `peak * (floor + (1 - floor) * (1 + cos(pi * p)) / 2)` with
///   `p = min(1, (s - W) / (total_steps - W))` afterwards, so it equals `peak` at `s = W`,
///   reaches `floor * peak` at `s = total_steps` and stays there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSchedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Schedule length in steps.
    pub total_steps: u64,
    /// Warm-up steps `W`.
    pub warmup_steps: u64,
    /// Floor as a fraction of the peak.
    pub floor: f64,
}

impl CosineSchedule {
    /// The schedule for a peak, a length, a warm-up fraction and a floor fraction.
    pub fn new(peak: f64, total_steps: u64, warmup_fraction: f64, floor: f64) -> Self {
        let warmup_steps = (warmup_fraction * total_steps as f64).ceil() as u64;
        CosineSchedule {
            peak,
            total_steps,
            warmup_steps: warmup_steps.min(total_steps),
            floor,
        }
    }

    /// Learning rate of 0-based step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak * (self.floor + (1.0 - self.floor) * cosine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hand_computed_points() {
        // 100 steps, 5 % warm-up (5 steps), floor 0.1, peak 1.
        let s = CosineSchedule::new(1.0, 100, 0.05, 0.1);
        assert_eq!(s.warmup_steps, 5);
        assert!((s.lr(0) - 0.2).abs() < 1e-12);
        assert!((s.lr(4) - 1.0).abs() < 1e-12);
        assert!((s.lr(5) - 1.0).abs() < 1e-12);
        // Halfway through the decay (p = 0.5): floor + (1 - floor) / 2 = 0.55.
        assert!(
            (s.lr(5 + 95 / 2)
                - (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * 47.0 / 95.0).cos())))
            .abs()
                < 1e-12
        );
        assert!((s.lr(100) - 0.1).abs() < 1e-12);
        assert!((s.lr(10_000) - 0.1).abs() < 1e-12);
        // The spec's defaults: 5e-6 peak.
        let s = CosineSchedule::new(5e-6, 1000, 0.05, 0.1);
        assert_eq!(s.warmup_steps, 50);
        assert!((s.lr(49) - 5e-6).abs() < 1e-18);
        assert!((s.lr(525) - 5e-6 * 0.55).abs() < 1e-18);
    }

    #[test]
    fn no_warmup_starts_at_peak() {
        let s = CosineSchedule::new(2.0, 10, 0.0, 0.0);
        assert_eq!(s.lr(0), 2.0);
        assert!(s.lr(10).abs() < 1e-12);
    }

    proptest! {
        #[test]
        fn bounded_and_monotone_after_warmup(
            total in 1u64..2000, warm in 0.0f64..0.9, floor in 0.0f64..=1.0, peak in 1e-7f64..1.0
        ) {
            let s = CosineSchedule::new(peak, total, warm, floor);
            let mut prev = f64::INFINITY;
            for step in 0..total + 5 {
                let lr = s.lr(step);
                prop_assert!(lr > 0.0 || floor == 0.0);
                prop_assert!(lr <= peak * (1.0 + 1e-12));
                prop_assert!(lr >= peak * floor * (1.0 - 1e-12) || step < s.warmup_steps);
                if step >= s.warmup_steps {
                    prop_assert!(lr <= prev * (1.0 + 1e-12));
                    prev = lr;
                }
            }
        }
    }
}
