//! Learning-rate schedule: linear warm-up then cosine decay to a floor, with the exact
//! convention of transformers' `get_cosine_with_min_lr_schedule_with_warmup` (step `s` is
//! the number of optimizer steps already taken, so the first step uses `lr(0)`, which is 0
//! when there is a warm-up).

use serde::{Deserialize, Serialize};

use crate::error::{Result, ZayaError};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CosineSchedule {
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Floor as a fraction of `peak_lr` (0 decays to zero).
    pub min_lr_ratio: f64,
}

impl CosineSchedule {
    /// A constant learning rate.
    pub fn constant(lr: f64) -> Self {
        CosineSchedule {
            peak_lr: lr,
            warmup_steps: 0,
            total_steps: 0,
            min_lr_ratio: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let ok = self.peak_lr >= 0.0
            && self.peak_lr.is_finite()
            && (0.0..=1.0).contains(&self.min_lr_ratio)
            && (self.total_steps == 0 || self.warmup_steps <= self.total_steps);
        if ok {
            Ok(())
        } else {
            Err(ZayaError::Input(format!(
                "invalid schedule {self:?} (peak_lr >= 0, min_lr_ratio in [0, 1], \
                 warmup_steps <= total_steps)"
            )))
        }
    }

    /// Learning rate of the step taken after `step` steps.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * step as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak_lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let s = CosineSchedule {
            peak_lr: 1e-3,
            warmup_steps: 4,
            total_steps: 14,
            min_lr_ratio: 0.1,
        };
        s.validate().unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
        assert!(close(s.lr(0), 0.0));
        assert!(close(s.lr(1), 0.25e-3));
        assert!(close(s.lr(3), 0.75e-3));
        assert!(close(s.lr(4), 1e-3)); // peak at the end of the warm-up
                                       // halfway through the decay: floor + (1 − floor)/2
        assert!(close(s.lr(9), 1e-3 * (0.1 + 0.9 * 0.5)));
        // progress 0.2: cos(0.2π)
        let want = 1e-3 * (0.1 + 0.9 * 0.5 * (1.0 + (0.2 * std::f64::consts::PI).cos()));
        assert!(close(s.lr(6), want));
        assert!(close(s.lr(14), 1e-4));
        assert!(close(s.lr(1000), 1e-4)); // stays at the floor
        assert!(close(CosineSchedule::constant(3e-4).lr(77), 3e-4));
    }

    #[test]
    fn bad_settings_are_rejected() {
        let mut s = CosineSchedule::constant(1e-3);
        s.min_lr_ratio = 1.5;
        assert!(s.validate().is_err());
        let s = CosineSchedule {
            peak_lr: 1e-3,
            warmup_steps: 10,
            total_steps: 5,
            min_lr_ratio: 0.0,
        };
        assert!(s.validate().is_err());
    }
}
