//! The moving average of the master weights (`ema_decay`): what validation scores and the run
//! ships, steadier than the last step's weights. Checkpoints keep it under [`PREFIX`].

use crate::Result;
use crate::weights;
use denoise_models::{Layout, Model, ModelConfig};
use std::collections::BTreeMap;
use tch::{Device, Tensor};

/// The checkpoint's prefix for the average's tensors (the master's is `model.`).
pub(crate) const PREFIX: &str = "ema.";

/// An fp32 model whose weights are a moving average of the master's.
pub(crate) struct MovingAverage {
    pub(crate) model: Model,
    decay: f64,
}

impl MovingAverage {
    /// A model of `config` in `layout` to hold the average with `decay` (see [`decay_at`]);
    /// [`MovingAverage::reset_to`] or [`MovingAverage::restore`] gives it its first weights.
    pub(crate) fn new(
        config: &ModelConfig,
        device: Device,
        layout: Layout,
        decay: f64,
    ) -> Result<Self> {
        let mut model = Model::new(config, device)?;
        model.set_layout(layout);
        Ok(Self { model, decay })
    }

    /// Folds in the master's weights after optimizer step `t`.
    pub(crate) fn update(&self, master: &Model, t: u64) {
        blend(master, &self.model, decay_at(self.decay, t));
    }

    /// Starts the average over from the master's weights.
    pub(crate) fn reset_to(&self, master: &Model) {
        blend(master, &self.model, 0.0);
    }

    /// The average's tensors as a checkpoint names them.
    pub(crate) fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.model
            .var_store()
            .variables()
            .into_iter()
            .map(|(k, t)| (format!("{PREFIX}{k}"), t))
            .collect()
    }

    /// Restores the average from a checkpoint's tensors; false when the checkpoint has none
    /// (written without the average, or before it was turned on).
    pub(crate) fn restore(
        &self,
        tensors: &BTreeMap<String, Tensor>,
    ) -> std::result::Result<bool, String> {
        if !tensors.keys().any(|k| k.starts_with(PREFIX)) {
            return Ok(false);
        }
        weights::restore(&self.model, tensors, PREFIX)?;
        Ok(true)
    }
}

/// The decay of the moving average after optimizer step `t`: `decay`, lowered in the first
/// steps so that the random initialisation is forgotten quickly.
pub(crate) fn decay_at(decay: f64, t: u64) -> f64 {
    decay.min((1 + t) as f64 / (10 + t) as f64)
}

/// `ema = decay * ema + (1 - decay) * master` for the trainable weights; buffers (batch-norm
/// running statistics) are copied as they are.
fn blend(master: &Model, ema: &Model, decay: f64) {
    let src = master.var_store().variables();
    tch::no_grad(|| {
        for (name, mut dst) in ema.var_store().variables() {
            let Some(s) = src.get(&name) else { continue };
            if s.requires_grad() && decay > 0.0 {
                let _ = dst.lerp_(s, 1.0 - decay);
            } else {
                dst.copy_(s);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(model: &Model) -> BTreeMap<String, Tensor> {
        model
            .var_store()
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.detach().copy()))
            .collect()
    }

    #[test]
    fn the_moving_average_follows_its_formula() {
        let _rng = crate::test_rng_lock();
        let cfg = crate::tiny_dncnn(true);
        let master = Model::new(&cfg, Device::Cpu).unwrap();
        let ema = MovingAverage::new(&cfg, Device::Cpu, Layout::Nchw, 0.999).unwrap();
        let learnt = weights::trainable(&master);
        tch::no_grad(|| {
            for (name, mut t) in master.var_store().variables() {
                if !learnt.contains_key(&name) {
                    // Fresh statistics are equal in both models: make the master's differ.
                    let _ = t.fill_(0.5);
                }
            }
        });
        let (w, e) = (weights(&master), weights(&ema.model));
        // Optimizer step 2: the decay is (1 + 2) / (10 + 2) = 0.25, under the configured 0.999.
        ema.update(&master, 2);
        let mut buffers = 0;
        for (name, got) in weights(&ema.model) {
            let want = if learnt.contains_key(&name) {
                &e[&name] * 0.25 + &w[&name] * 0.75
            } else {
                buffers += 1;
                w[&name].copy()
            };
            let diff = (got - want).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{name} differs by {diff}");
        }
        assert!(buffers > 0, "batch-norm statistics are copied");
        ema.reset_to(&master);
        for (name, t) in weights(&ema.model) {
            assert!(t.equal(&w[&name]), "a reset copies {name}");
        }
        assert_eq!(decay_at(0.999, 0), 0.1);
        assert_eq!(decay_at(0.999, 90), 0.91);
        assert_eq!(decay_at(0.999, 1_000_000), 0.999);
    }

    #[test]
    fn the_average_round_trips_through_checkpoint_names() {
        let _rng = crate::test_rng_lock();
        let cfg = crate::tiny_dncnn(false);
        let ema = MovingAverage::new(&cfg, Device::Cpu, Layout::Nchw, 0.9).unwrap();
        let saved: BTreeMap<String, Tensor> = ema
            .named_tensors()
            .into_iter()
            .map(|(k, t)| (k, t.detach().copy()))
            .collect();
        assert!(saved.keys().all(|k| k.starts_with("ema.")), "{saved:?}");
        let other = MovingAverage::new(&cfg, Device::Cpu, Layout::Nchw, 0.9).unwrap();
        assert_eq!(other.restore(&saved), Ok(true));
        for (name, t) in weights(&other.model) {
            assert!(t.equal(&saved[&format!("ema.{name}")]), "{name}");
        }
        let without: BTreeMap<String, Tensor> = BTreeMap::new();
        assert_eq!(other.restore(&without), Ok(false));
    }
}
