//! Adam and AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019) with learning-rate schedules.
//! Written here rather than using `tch::nn::Optimizer` because libtorch's C++ optimizer state
//! (the moments) cannot be read or restored through tch: a checkpoint could not resume exactly.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam,
    /// Adam with decoupled weight decay.
    Adamw,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// L2 penalty added to the gradient (Adam) or decoupled decay (AdamW).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub clip_grad_norm: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Adam,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            clip_grad_norm: 0.0,
        }
    }
}

/// Learning rate over steps: linear warm-up, then constant, step decay or cosine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    /// Step decay: multiply by `gamma` every `step_size` steps.
    pub step_size: u64,
    pub gamma: f64,
    /// Cosine: the floor, as a fraction of the base rate.
    pub min_factor: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Step,
    Cosine,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Cosine,
            warmup_steps: 0,
            step_size: 0,
            gamma: 0.5,
            min_factor: 0.01,
        }
    }
}

impl Schedule {
    /// The factor applied to the base rate at `step` (0-based) of `total`.
    pub fn factor(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Step if self.step_size > 0 => {
                self.gamma.powi((step / self.step_size) as i32)
            }
            ScheduleKind::Step => 1.0,
            ScheduleKind::Cosine => {
                let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
                let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
                self.min_factor
                    + (1.0 - self.min_factor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// Adam/AdamW over named fp32 parameters. State: first and second moments per parameter and
/// the step count, all exportable for checkpoints.
#[derive(Debug)]
pub struct Adam {
    pub config: OptimizerConfig,
    params: BTreeMap<String, Tensor>,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
    pub step: u64,
}

impl Adam {
    /// Optimises `params` (trainable variables by name, e.g. from `VarStore::variables`).
    pub fn new(config: OptimizerConfig, params: BTreeMap<String, Tensor>) -> Self {
        let zeros = |t: &Tensor| t.zeros_like().set_requires_grad(false);
        let m = params.iter().map(|(k, t)| (k.clone(), zeros(t))).collect();
        let v = params.iter().map(|(k, t)| (k.clone(), zeros(t))).collect();
        Self {
            config,
            params,
            m,
            v,
            step: 0,
        }
    }

    /// One update with the gradients in `grads` (by parameter name, any float kind) at rate `lr`.
    /// Returns the global gradient norm before clipping as a 0-dim fp32 tensor on the gradients'
    /// device (on the CPU, and 0, when there are none). Nothing here reads a value back to the
    /// host, so on a GPU the update is queued without waiting for the device.
    pub fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64) -> Tensor {
        let c = self.config.clone();
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        tch::no_grad(|| {
            let grads: BTreeMap<&String, Tensor> = grads
                .iter()
                .map(|(k, g)| (k, g.to_kind(Kind::Float)))
                .collect();
            let squares: Vec<Tensor> = grads
                .values()
                .map(|g| g.square().sum(Kind::Float))
                .collect();
            let norm = if squares.is_empty() {
                Tensor::zeros([], (Kind::Float, tch::Device::Cpu))
            } else {
                Tensor::stack(&squares, 0).sum(Kind::Float).sqrt()
            };
            // min(1, max_norm / norm): the gradients are scaled down only when the norm exceeds
            // the limit.
            let clip = (c.clip_grad_norm > 0.0)
                .then(|| ((&norm + 1e-12).reciprocal() * c.clip_grad_norm).clamp_max(1.0));
            for (name, p) in self.params.iter_mut() {
                let Some(g) = grads.get(name) else { continue };
                let mut g = match &clip {
                    Some(factor) => g * factor,
                    None => g.shallow_clone(),
                };
                if c.weight_decay > 0.0 {
                    match c.kind {
                        // Not `+=`: unclipped, `g` shares the caller's gradient storage.
                        OptimizerKind::Adam => g = &g + &*p * c.weight_decay,
                        OptimizerKind::Adamw => {
                            let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                        }
                    }
                }
                let m = self.m.get_mut(name).expect("moment for every param");
                let _ = m.g_mul_scalar_(c.beta1);
                let _ = m.g_add_(&(&g * (1.0 - c.beta1)));
                let v = self.v.get_mut(name).expect("moment for every param");
                let _ = v.g_mul_scalar_(c.beta2);
                let _ = v.g_add_(&(g.square() * (1.0 - c.beta2)));
                let denom = (&*v / bc2).sqrt() + c.eps;
                let update = &*m / denom * (lr / bc1);
                let _ = p.g_sub_(&update);
            }
            norm
        })
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let m = self
            .m
            .iter()
            .map(|(k, t)| (format!("m.{k}"), t.shallow_clone()));
        let v = self
            .v
            .iter()
            .map(|(k, t)| (format!("v.{k}"), t.shallow_clone()));
        m.chain(v).collect()
    }

    /// Restores the moments saved by [`Adam::state`]; every parameter's moments must be there.
    pub fn load_state(
        &mut self,
        state: &BTreeMap<String, Tensor>,
        step: u64,
    ) -> Result<(), String> {
        tch::no_grad(|| {
            for (prefix, moments) in [("m", &mut self.m), ("v", &mut self.v)] {
                for (name, t) in moments.iter_mut() {
                    let key = format!("{prefix}.{name}");
                    let src = state
                        .get(&key)
                        .ok_or_else(|| format!("missing optimizer state '{key}'"))?;
                    if src.size() != t.size() {
                        return Err(format!("optimizer state '{key}' has the wrong shape"));
                    }
                    t.copy_(src);
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn adam_minimises_a_quadratic_and_matches_the_formula() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut adam = Adam::new(
            OptimizerConfig {
                lr: 0.1,
                ..Default::default()
            },
            BTreeMap::from([("p".to_owned(), p.shallow_clone())]),
        );
        // First Adam step moves each coordinate by lr * sign(g) (m_hat / sqrt(v_hat) = g / |g|).
        let grads = BTreeMap::from([("p".to_owned(), Tensor::from_slice(&[2.0f32, -4.0]))]);
        let _ = adam.step(&grads, 0.1);
        let after: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
        assert!(
            (after[0] - 0.9).abs() < 1e-6 && (after[1] + 1.9).abs() < 1e-6,
            "{after:?}"
        );
        for _ in 0..500 {
            let g = BTreeMap::from([("p".to_owned(), p.detach() * 2.0)]);
            let _ = adam.step(&g, 0.05);
        }
        let norm = p.detach().abs().max().double_value(&[]);
        assert!(norm < 0.05, "|p| = {norm}");
        let _ = Device::Cpu;
    }

    #[test]
    fn clipping_scales_the_gradient_to_the_limit_and_reports_the_norm_before() {
        let moment_after_one_step = |clip_grad_norm: f64, g: [f32; 2]| {
            let mut adam = Adam::new(
                OptimizerConfig {
                    clip_grad_norm,
                    ..Default::default()
                },
                BTreeMap::from([("p".to_owned(), Tensor::from_slice(&[0.0f32, 0.0]))]),
            );
            let norm = adam.step(
                &BTreeMap::from([("p".to_owned(), Tensor::from_slice(&g))]),
                1e-3,
            );
            let m: Vec<f32> = Vec::try_from(&adam.state()[0].1).unwrap();
            (norm.double_value(&[]), m)
        };
        // |(3, 4)| = 5 is clipped to 1: the first moment is (1 - beta1) * (0.6, 0.8).
        let (norm, m) = moment_after_one_step(1.0, [3.0, 4.0]);
        assert!((norm - 5.0).abs() < 1e-6, "{norm}");
        assert!(
            (m[0] - 0.06).abs() < 1e-7 && (m[1] - 0.08).abs() < 1e-7,
            "{m:?}"
        );
        // Under the limit, or with clipping off, the gradient is used as it is.
        for clip in [10.0, 0.0] {
            let (norm, m) = moment_after_one_step(clip, [3.0, 4.0]);
            assert!((norm - 5.0).abs() < 1e-6, "{norm}");
            assert!(
                (m[0] - 0.3).abs() < 1e-7 && (m[1] - 0.4).abs() < 1e-7,
                "{m:?}"
            );
        }
    }

    #[test]
    fn state_round_trips() {
        let p = Tensor::from_slice(&[1.0f32, 2.0]);
        let mut a = Adam::new(
            OptimizerConfig::default(),
            BTreeMap::from([("p".to_owned(), p.copy())]),
        );
        let _ = a.step(
            &BTreeMap::from([("p".to_owned(), Tensor::from_slice(&[0.5f32, -1.0]))]),
            1e-3,
        );
        let state: BTreeMap<String, Tensor> =
            a.state().into_iter().map(|(k, t)| (k, t.copy())).collect();
        let mut b = Adam::new(
            OptimizerConfig::default(),
            BTreeMap::from([("p".to_owned(), p.copy())]),
        );
        b.load_state(&state, a.step).unwrap();
        assert_eq!(b.step, 1);
        for ((_, x), (_, y)) in a.state().iter().zip(b.state().iter()) {
            assert!(x.equal(y));
        }
        assert!(b.load_state(&BTreeMap::new(), 1).is_err());
    }

    #[test]
    fn schedules() {
        let cos = Schedule {
            warmup_steps: 10,
            ..Default::default()
        };
        assert!((cos.factor(0, 110) - 0.1).abs() < 1e-12);
        assert!((cos.factor(10, 110) - 1.0).abs() < 1e-12);
        assert!((cos.factor(110, 110) - 0.01).abs() < 1e-12);
        let step = Schedule {
            kind: ScheduleKind::Step,
            step_size: 100,
            gamma: 0.5,
            ..Default::default()
        };
        assert_eq!(step.factor(250, 1000), 0.25);
    }
}
