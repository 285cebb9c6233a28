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
///
/// The moments of all parameters live in two flat buffers, one parameter after another in name
/// order, so that an update is a handful of kernels over every weight at once rather than a
/// dozen per parameter: for FFDNet's 26 parameters that was some 400 kernels a step, a quarter
/// of a step's time on a fast GPU, which waits on each launch.
#[derive(Debug)]
pub struct Adam {
    pub config: OptimizerConfig,
    params: Vec<Param>,
    m: Tensor,
    v: Tensor,
    pub step: u64,
}

/// A parameter and its place in [`Adam`]'s flat moment buffers.
#[derive(Debug)]
struct Param {
    name: String,
    tensor: Tensor,
    offset: i64,
    numel: i64,
}

impl Adam {
    /// Optimises `params` (trainable variables by name, e.g. from `VarStore::variables`).
    pub fn new(config: OptimizerConfig, params: BTreeMap<String, Tensor>) -> Self {
        let device = params
            .values()
            .next()
            .map_or(tch::Device::Cpu, Tensor::device);
        let mut offset = 0;
        let params: Vec<Param> = params
            .into_iter()
            .map(|(name, tensor)| {
                let numel = tensor.numel() as i64;
                offset += numel;
                Param {
                    name,
                    tensor,
                    offset: offset - numel,
                    numel,
                }
            })
            .collect();
        let zeros = || Tensor::zeros([offset], (Kind::Float, device));
        Self {
            config,
            params,
            m: zeros(),
            v: zeros(),
            step: 0,
        }
    }

    /// One update with the gradients in `grads` (by parameter name, any float kind) at rate `lr`.
    /// A parameter without a gradient is left alone, its moments too. Returns the global
    /// gradient norm before clipping as a 0-dim fp32 tensor on the gradients' device (on the
    /// CPU, and 0, when there are none). Nothing here reads a value back to the host, so on a GPU
    /// the update is queued without waiting for the device.
    pub fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64) -> Tensor {
        let c = self.config.clone();
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        tch::no_grad(|| {
            // Runs of consecutive parameters that have a gradient (one run, all of them, in a
            // training step), each with its gradients flattened into one tensor.
            let mut runs: Vec<(std::ops::Range<usize>, Vec<Tensor>)> = Vec::new();
            for (i, p) in self.params.iter().enumerate() {
                let Some(g) = grads.get(&p.name) else {
                    continue;
                };
                let g = g.to_kind(Kind::Float).reshape([-1]);
                match runs.last_mut() {
                    Some((range, gs)) if range.end == i => {
                        range.end = i + 1;
                        gs.push(g);
                    }
                    _ => runs.push((i..i + 1, vec![g])),
                }
            }
            let runs: Vec<(std::ops::Range<usize>, Tensor)> = runs
                .into_iter()
                .map(|(range, gs)| (range, Tensor::cat(&gs, 0)))
                .collect();
            let norm = if runs.is_empty() {
                Tensor::zeros([], (Kind::Float, tch::Device::Cpu))
            } else {
                let squares: Vec<Tensor> = runs
                    .iter()
                    .map(|(_, g)| g.square().sum(Kind::Float))
                    .collect();
                Tensor::stack(&squares, 0).sum(Kind::Float).sqrt()
            };
            // min(1, max_norm / norm): the gradients are scaled down only when the norm exceeds
            // the limit.
            let clip = (c.clip_grad_norm > 0.0)
                .then(|| ((&norm + 1e-12).reciprocal() * c.clip_grad_norm).clamp_max(1.0));
            for (range, g) in runs {
                let params = &mut self.params[range];
                let (start, end) = (params[0].offset, params[params.len() - 1].offset);
                let len = end + params[params.len() - 1].numel - start;
                let mut g = match &clip {
                    Some(factor) => g * factor,
                    None => g,
                };
                if c.weight_decay > 0.0 {
                    match c.kind {
                        OptimizerKind::Adam => {
                            let flat: Vec<Tensor> =
                                params.iter().map(|p| p.tensor.reshape([-1])).collect();
                            g = &g + Tensor::cat(&flat, 0) * c.weight_decay;
                        }
                        OptimizerKind::Adamw => {
                            for p in params.iter_mut() {
                                let _ = p.tensor.g_mul_scalar_(1.0 - lr * c.weight_decay);
                            }
                        }
                    }
                }
                let mut m = self.m.narrow(0, start, len);
                let _ = m.g_mul_scalar_(c.beta1);
                let _ = m.g_add_(&(&g * (1.0 - c.beta1)));
                let mut v = self.v.narrow(0, start, len);
                let _ = v.g_mul_scalar_(c.beta2);
                let _ = v.g_add_(&(g.square() * (1.0 - c.beta2)));
                let denom = (&v / bc2).sqrt() + c.eps;
                let update = &m / denom * (lr / bc1);
                for p in params.iter_mut() {
                    let step = update
                        .narrow(0, p.offset - start, p.numel)
                        .view(p.tensor.size().as_slice());
                    let _ = p.tensor.g_sub_(&step);
                }
            }
            norm
        })
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`, each of its parameter's shape) for a
    /// checkpoint; views of the optimizer's buffers.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        [("m", &self.m), ("v", &self.v)]
            .into_iter()
            .flat_map(|(prefix, flat)| {
                self.params.iter().map(move |p| {
                    let t = flat
                        .narrow(0, p.offset, p.numel)
                        .view(p.tensor.size().as_slice());
                    (format!("{prefix}.{}", p.name), t)
                })
            })
            .collect()
    }

    /// Restores the moments saved by [`Adam::state`]; every parameter's moments must be there.
    pub fn load_state(
        &mut self,
        state: &BTreeMap<String, Tensor>,
        step: u64,
    ) -> Result<(), String> {
        tch::no_grad(|| {
            for (key, mut t) in self.state() {
                let src = state
                    .get(&key)
                    .ok_or_else(|| format!("missing optimizer state '{key}'"))?;
                if src.size() != t.size() {
                    return Err(format!("optimizer state '{key}' has the wrong shape"));
                }
                t.copy_(src);
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

    /// Adam written out per number in f64, as the reference for the flat-buffer update.
    #[allow(clippy::too_many_arguments)]
    fn reference_step(
        c: &OptimizerConfig,
        t: i32,
        lr: f64,
        params: &mut [Vec<f64>],
        m: &mut [Vec<f64>],
        v: &mut [Vec<f64>],
        grads: &[Option<Vec<f64>>],
    ) {
        let norm = grads
            .iter()
            .flatten()
            .flatten()
            .map(|g| g * g)
            .sum::<f64>()
            .sqrt();
        let clip = if c.clip_grad_norm > 0.0 {
            (c.clip_grad_norm / (norm + 1e-12)).min(1.0)
        } else {
            1.0
        };
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            for j in 0..g.len() {
                let mut gj = g[j] * clip;
                match c.kind {
                    OptimizerKind::Adam => gj += params[i][j] * c.weight_decay,
                    OptimizerKind::Adamw => params[i][j] *= 1.0 - lr * c.weight_decay,
                }
                m[i][j] = c.beta1 * m[i][j] + (1.0 - c.beta1) * gj;
                v[i][j] = c.beta2 * v[i][j] + (1.0 - c.beta2) * gj * gj;
                let m_hat = m[i][j] / (1.0 - c.beta1.powi(t));
                let denom = (v[i][j] / (1.0 - c.beta2.powi(t))).sqrt() + c.eps;
                params[i][j] -= lr * m_hat / denom;
            }
        }
    }

    #[test]
    fn the_flat_update_matches_adam_written_out_per_number() {
        let shapes: [&[i64]; 3] = [&[2, 3], &[4], &[2, 2, 2, 1]];
        let names = ["a", "b", "c"];
        let values = |seed: usize, n: usize| -> Vec<f64> {
            (0..n)
                .map(|j| (((seed * 31 + j * 17) % 13) as f64 - 6.0) * 0.15)
                .collect()
        };
        for kind in [OptimizerKind::Adam, OptimizerKind::Adamw] {
            let config = OptimizerConfig {
                kind,
                weight_decay: 0.05,
                clip_grad_norm: 1.5,
                ..Default::default()
            };
            let mut want: Vec<Vec<f64>> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| values(i, s.iter().product::<i64>() as usize))
                .collect();
            let tensor = |v: &[f64], shape: &[i64]| {
                let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                Tensor::from_slice(&f).view(shape)
            };
            // One parameter laid out channels-last, as on the CPU and CUDA training paths.
            let params: Vec<Tensor> = (0..3)
                .map(|i| {
                    let t = tensor(&want[i], shapes[i]);
                    if shapes[i].len() == 4 {
                        t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
                    } else {
                        t
                    }
                })
                .collect();
            assert!(!params[2].is_contiguous(), "a channels-last parameter");
            let mut adam = Adam::new(
                config.clone(),
                names
                    .iter()
                    .zip(&params)
                    .map(|(n, p)| (n.to_string(), p.shallow_clone()))
                    .collect(),
            );
            let mut m: Vec<Vec<f64>> = want.iter().map(|p| vec![0.0; p.len()]).collect();
            let mut v = m.clone();
            // "b" gets no gradient in the second step: two runs of parameters then.
            for step in 1..=4 {
                let grads: Vec<Option<Vec<f64>>> = (0..3)
                    .map(|i| (step != 2 || i != 1).then(|| values(step * 7 + i, want[i].len())))
                    .collect();
                let lr = 0.01 * step as f64;
                reference_step(&config, step as i32, lr, &mut want, &mut m, &mut v, &grads);
                let by_name: BTreeMap<String, Tensor> = grads
                    .iter()
                    .enumerate()
                    .filter_map(|(i, g)| {
                        g.as_ref()
                            .map(|g| (names[i].to_owned(), tensor(g, shapes[i])))
                    })
                    .collect();
                let _ = adam.step(&by_name, lr);
                for (i, p) in params.iter().enumerate() {
                    let got: Vec<f32> = Vec::try_from(&p.reshape([-1])).unwrap();
                    for (g, w) in got.iter().zip(&want[i]) {
                        assert!(
                            (f64::from(*g) - w).abs() < 1e-6,
                            "{kind:?} step {step} {}: {got:?} vs {:?}",
                            names[i],
                            want[i]
                        );
                    }
                }
            }
            // The moments are exported per parameter, in its shape.
            let state = adam.state();
            assert_eq!(state[2].0, "m.c");
            assert_eq!(state[2].1.size(), vec![2, 2, 2, 1]);
            let m_c: Vec<f32> = Vec::try_from(&state[2].1.reshape([-1])).unwrap();
            for (g, w) in m_c.iter().zip(&m[2]) {
                assert!((f64::from(*g) - w).abs() < 1e-6, "{m_c:?} vs {:?}", m[2]);
            }
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
