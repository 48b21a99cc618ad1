//! Adam (with optional decoupled weight decay) over candle variables, and global
//! gradient-norm clipping.

use candle_core::{Result, Tensor, Var};

/// Adam as in PyTorch's `AdamW` (bias-corrected moments, decoupled weight decay):
///
/// ```text
/// theta <- theta * (1 - lr * weight_decay)
/// m <- beta1 m + (1 - beta1) g          v <- beta2 v + (1 - beta2) g^2
/// theta <- theta - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
/// ```
///
/// With `weight_decay = 0` (the spec's default) it is plain Adam. Each variable may scale the
/// step's learning rate by its own factor ([`Adam::with_lr_scales`], 1 by default): LoRA+ gives
/// the B matrices a larger one.
#[derive(Debug)]
pub struct Adam {
    vars: Vec<Var>,
    lr_scales: Vec<f64>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl Adam {
    /// Zero moments for `vars`.
    pub fn new(
        vars: Vec<Var>,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Adam {
            lr_scales: vec![1.0; vars.len()],
            vars,
            m,
            v,
            t: 0,
            beta1,
            beta2,
            eps,
            weight_decay,
        })
    }

    /// Multiplies the learning rate of `vars[i]` by `scales[i]` in every later step. Fails when
    /// the count differs from the variables' or a factor is not positive and finite.
    pub fn with_lr_scales(mut self, scales: Vec<f64>) -> Result<Self> {
        if scales.len() != self.vars.len() {
            candle_core::bail!(
                "adam: {} learning-rate scales for {} variables",
                scales.len(),
                self.vars.len()
            );
        }
        if let Some(bad) = scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            candle_core::bail!("adam: learning-rate scale {bad} must be positive and finite");
        }
        self.lr_scales = scales;
        Ok(self)
    }

    /// Number of optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// The variables, in the order gradients are expected.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// First and second moments, in variable order.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Restores moments saved from an optimizer over the same variables, and its step count.
    /// Fails, changing nothing, when a count or a shape differs.
    pub fn restore(&mut self, m: Vec<Tensor>, v: Vec<Tensor>, steps: u64) -> Result<()> {
        if m.len() != self.vars.len() || v.len() != self.vars.len() {
            candle_core::bail!(
                "adam: {} + {} moments for {} variables",
                m.len(),
                v.len(),
                self.vars.len()
            );
        }
        for (i, var) in self.vars.iter().enumerate() {
            for t in [&m[i], &v[i]] {
                if t.dims() != var.dims() {
                    candle_core::bail!(
                        "adam: moment {i} has shape {:?}, its variable {:?}",
                        t.dims(),
                        var.dims()
                    );
                }
            }
        }
        let to = |t: Vec<Tensor>| {
            t.into_iter()
                .zip(&self.vars)
                .map(|(t, var)| t.to_device(var.device())?.to_dtype(var.dtype()))
                .collect::<Result<Vec<_>>>()
        };
        let (m, v) = (to(m)?, to(v)?);
        self.m = m;
        self.v = v;
        self.t = steps;
        Ok(())
    }

    /// One update with `grads[i]` the gradient of `vars[i]` (already clipped) and learning rate
    /// `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            candle_core::bail!(
                "adam: {} gradients for {} variables",
                grads.len(),
                self.vars.len()
            );
        }
        self.t += 1;
        let t = i32::try_from(self.t).unwrap_or(i32::MAX);
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        let slots = self.m.iter_mut().zip(self.v.iter_mut());
        let vars = self.vars.iter().zip(&self.lr_scales);
        for (((var, scale), g), (m_slot, v_slot)) in vars.zip(grads).zip(slots) {
            let lr = lr * scale;
            let m = ((&*m_slot * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((&*v_slot * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let update = m_hat.div(&(v_hat.sqrt()? + self.eps)?)?;
            let theta = var.as_tensor();
            let theta = if self.weight_decay > 0.0 {
                (theta * (1.0 - lr * self.weight_decay))?
            } else {
                theta.clone()
            };
            var.set(&(theta - (update * lr)?)?)?;
            *m_slot = m;
            *v_slot = v;
        }
        Ok(())
    }
}

/// The L2 norm over every element of every gradient.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0.0f64;
    for g in grads {
        sum += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// The factor gradients are multiplied by so their global norm is at most `max_norm`
/// (PyTorch's `clip_grad_norm_`: `max_norm / (norm + 1e-6)` when `norm > max_norm`, else 1).
/// `max_norm = 0` disables clipping.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f64]) -> Var {
        Var::from_vec(v.to_vec(), v.len(), &Device::Cpu).unwrap()
    }
    fn vals(v: &Var) -> Vec<f64> {
        v.as_tensor().to_vec1().unwrap()
    }

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        // After one step m_hat = g and v_hat = g^2, so the update is g / (|g| + eps).
        let x = var(&[1.0, -2.0, 0.5]);
        let mut adam = Adam::new(vec![x.clone()], 0.9, 0.95, 1e-8, 0.0).unwrap();
        let g = Tensor::new(&[0.3f64, -4.0, 0.0], &Device::Cpu).unwrap();
        adam.step(&[g], 0.01).unwrap();
        let got = vals(&x);
        let expect = [
            1.0 - 0.01 * 0.3 / (0.3 + 1e-8),
            -2.0 + 0.01 * 4.0 / (4.0 + 1e-8),
            0.5,
        ];
        for (a, b) in got.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        assert_eq!(adam.steps(), 1);
    }

    #[test]
    fn two_steps_match_a_scalar_reference() {
        let (b1, b2, eps, lr, wd) = (0.9f64, 0.95f64, 1e-8, 0.1, 0.01);
        let x = var(&[0.7]);
        let mut adam = Adam::new(vec![x.clone()], b1, b2, eps, wd).unwrap();
        let (mut theta, mut m, mut v) = (0.7f64, 0.0f64, 0.0f64);
        for (t, g) in [(1, 0.5f64), (2, -0.25f64)] {
            adam.step(&[Tensor::new(&[g], &Device::Cpu).unwrap()], lr)
                .unwrap();
            theta *= 1.0 - lr * wd;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let mh = m / (1.0 - b1.powi(t));
            let vh = v / (1.0 - b2.powi(t));
            theta -= lr * mh / (vh.sqrt() + eps);
        }
        assert!((vals(&x)[0] - theta).abs() < 1e-12);
    }

    #[test]
    fn a_scaled_variable_steps_as_if_its_learning_rate_were_scaled() {
        let (a, b) = (var(&[0.7, -0.2]), var(&[0.7, -0.2]));
        let (c, d) = (var(&[0.7, -0.2]), var(&[0.7, -0.2]));
        let mut scaled = Adam::new(vec![a.clone(), b.clone()], 0.9, 0.95, 1e-8, 0.01)
            .unwrap()
            .with_lr_scales(vec![1.0, 16.0])
            .unwrap();
        let mut plain_a = Adam::new(vec![c.clone()], 0.9, 0.95, 1e-8, 0.01).unwrap();
        let mut plain_b = Adam::new(vec![d.clone()], 0.9, 0.95, 1e-8, 0.01).unwrap();
        for g in [[0.5f64, -1.0], [-0.25, 2.0], [0.1, 0.1]] {
            let g = Tensor::new(&g, &Device::Cpu).unwrap();
            scaled.step(&[g.clone(), g.clone()], 0.01).unwrap();
            plain_a.step(std::slice::from_ref(&g), 0.01).unwrap();
            plain_b.step(&[g], 0.16).unwrap();
        }
        assert_eq!(vals(&a), vals(&c));
        assert_eq!(vals(&b), vals(&d));
        assert_ne!(vals(&a), vals(&b));
    }

    #[test]
    fn bad_learning_rate_scales_are_an_error() {
        let adam = || Adam::new(vec![var(&[1.0]), var(&[2.0])], 0.9, 0.95, 1e-8, 0.0).unwrap();
        let err = adam().with_lr_scales(vec![1.0]).unwrap_err().to_string();
        assert!(
            err.contains("1 learning-rate scales for 2 variables"),
            "{err}"
        );
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = adam()
                .with_lr_scales(vec![1.0, bad])
                .unwrap_err()
                .to_string();
            assert!(err.contains("must be positive and finite"), "{err}");
        }
    }

    #[test]
    fn norm_and_clip() {
        let a = Tensor::new(&[3.0f64, 0.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[4.0f64]], &Device::Cpu).unwrap();
        let n = global_norm(&[a, b]).unwrap();
        assert!((n - 5.0).abs() < 1e-12);
        assert!((clip_factor(5.0, 1.0) - 1.0 / (5.0 + 1e-6)).abs() < 1e-15);
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert_eq!(clip_factor(50.0, 0.0), 1.0);
    }

    #[test]
    fn mismatched_gradients_are_an_error() {
        let mut adam = Adam::new(vec![var(&[1.0])], 0.9, 0.95, 1e-8, 0.0).unwrap();
        assert!(adam.step(&[], 0.1).is_err());
    }
}
