//! The weights a run trains, in mixed precision or not: the fp32 master that Adam updates and,
//! for bf16 training, a bf16 shadow copy that the forward and backward passes run on; and weights
//! copied between models by name.

use crate::Result;
use crate::TrainError;
use denoise_models::{Layout, Model, ModelConfig, Precision};
use std::collections::{BTreeMap, BTreeSet};
use tch::{Device, Tensor};

/// The master model and, for bf16 mixed precision, its shadow.
pub(crate) struct Weights {
    /// fp32: what Adam updates, checkpoints hold and the moving average follows.
    pub(crate) master: Model,
    /// bf16, where the step's passes run; its trainable weights are refreshed from the master
    /// before each step, and its batch-norm statistics go back to the master after it.
    pub(crate) shadow: Option<Model>,
    /// Weights that training leaves as they are ([`Weights::freeze`]).
    frozen: BTreeSet<String>,
}

impl Weights {
    /// The fp32 master and, for bf16 training, its bf16 shadow, weights in `layout`.
    pub(crate) fn new(
        config: &ModelConfig,
        device: Device,
        precision: Precision,
        layout: Layout,
    ) -> Result<Self> {
        let mut master = Model::new(config, device)?;
        master.set_layout(layout);
        let shadow = match precision {
            Precision::Fp32 => None,
            Precision::Bf16 => {
                let mut m = Model::new(config, device)?;
                m.set_precision(Precision::Bf16);
                m.set_layout(layout);
                Some(m)
            }
        };
        Ok(Self {
            master,
            shadow,
            frozen: BTreeSet::new(),
        })
    }

    /// Stops training the weights whose names are a prefix or start with `PREFIX.`: they take
    /// no gradient (which also saves the backward pass their weight gradients) and Adam never
    /// sees them. A prefix that names no weight, or one that leaves none to train, is refused.
    pub(crate) fn freeze(&mut self, prefixes: &[String]) -> Result<()> {
        if prefixes.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = self.master.var_store().variables().into_keys().collect();
        let matches = |name: &str, p: &str| {
            name == p || name.strip_prefix(p).is_some_and(|r| r.starts_with('.'))
        };
        for p in prefixes {
            if !names.iter().any(|n| matches(n, p)) {
                return Err(TrainError::Config(format!(
                    "freeze: no weight is named '{p}' or '{p}.*' in this model"
                )));
            }
        }
        let frozen: BTreeSet<String> = names
            .iter()
            .filter(|n| prefixes.iter().any(|p| matches(n, p)))
            .cloned()
            .collect();
        let learnt = trainable(&self.master);
        if learnt.keys().all(|n| frozen.contains(n)) {
            return Err(TrainError::Config(format!(
                "freeze: {} leaves no weight to train",
                prefixes.join(", ")
            )));
        }
        for model in std::iter::once(&self.master).chain(&self.shadow) {
            for (name, t) in model.var_store().variables() {
                if frozen.contains(&name) {
                    let _ = t.set_requires_grad(false);
                }
            }
        }
        self.frozen = frozen;
        Ok(())
    }

    /// The master's buffers (batch-norm running statistics): its variables that take no
    /// gradient, less the frozen weights, which no pass changes.
    pub(crate) fn statistics(&self) -> Vec<Tensor> {
        self.master
            .var_store()
            .variables()
            .into_iter()
            .filter(|(name, t)| !t.requires_grad() && !self.frozen.contains(name))
            .map(|(_, t)| t)
            .collect()
    }

    /// The model a step's passes run on: the shadow, its trainable weights refreshed from the
    /// master first, or the master itself.
    pub(crate) fn for_step(&self) -> &Model {
        match &self.shadow {
            Some(shadow) => {
                copy_vars(&self.master, shadow, true, &BTreeSet::new());
                shadow
            }
            None => &self.master,
        }
    }

    /// After an applied step: the batch-norm running statistics, updated in the shadow's
    /// forward pass, go to the master (frozen weights stay the master's: the shadow's are
    /// rounded to bf16).
    pub(crate) fn after_step(&self) {
        if let Some(shadow) = &self.shadow {
            copy_vars(shadow, &self.master, false, &self.frozen);
        }
    }

    /// After the master's weights were set (from a checkpoint or a starting model): the
    /// shadow's batch-norm statistics start as the master's, not fresh, since steps refresh
    /// only its trainable weights.
    pub(crate) fn sync_shadow(&self) {
        if let Some(shadow) = &self.shadow {
            copy_vars(&self.master, shadow, false, &BTreeSet::new());
        }
    }
}

/// The trainable variables of `model`, by name (what Adam optimises).
pub(crate) fn trainable(model: &Model) -> BTreeMap<String, Tensor> {
    model
        .var_store()
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect()
}

/// Loads the `PREFIXNAME` tensors of `tensors` into `model`'s variables `NAME`; says which
/// tensor is missing or has the wrong shape.
pub(crate) fn restore(
    model: &Model,
    tensors: &BTreeMap<String, Tensor>,
    prefix: &str,
) -> std::result::Result<(), String> {
    tch::no_grad(|| {
        for (name, mut var) in model.var_store().variables() {
            let key = format!("{prefix}{name}");
            let src = tensors
                .get(&key)
                .ok_or_else(|| format!("missing tensor '{key}'"))?;
            if src.size() != var.size() {
                return Err(format!(
                    "tensor '{key}' has shape {:?}, the model needs {:?}",
                    src.size(),
                    var.size()
                ));
            }
            var.copy_(src);
        }
        Ok(())
    })
}

/// Copies `from`'s trainable variables (or, with `trainable` false, its buffers and frozen
/// weights) into `to`, except those named in `skip`.
fn copy_vars(from: &Model, to: &Model, trainable: bool, skip: &BTreeSet<String>) {
    let src = from.var_store().variables();
    tch::no_grad(|| {
        for (name, mut dst) in to.var_store().variables() {
            if dst.requires_grad() == trainable && !skip.contains(&name) {
                if let Some(s) = src.get(&name) {
                    dst.copy_(s);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shadow_is_bf16_and_takes_the_weights_one_way_and_the_statistics_the_other() {
        let _rng = crate::test_rng_lock();
        let cfg = crate::tiny_dncnn(true);
        let plain = Weights::new(&cfg, Device::Cpu, Precision::Fp32, Layout::Nchw).unwrap();
        assert!(plain.shadow.is_none());
        assert!(std::ptr::eq(plain.for_step(), &plain.master));
        let mixed = Weights::new(&cfg, Device::Cpu, Precision::Bf16, Layout::Nchw).unwrap();
        let shadow = mixed.shadow.as_ref().unwrap();
        assert_eq!(shadow.precision(), Precision::Bf16);
        let learnt = trainable(&mixed.master);
        tch::no_grad(|| {
            for (name, mut t) in mixed.master.var_store().variables() {
                let _ = t.fill_(if learnt.contains_key(&name) {
                    0.25
                } else {
                    0.5
                });
            }
        });
        let value = |m: &Model, trainable: bool| -> Vec<f64> {
            m.var_store()
                .variables()
                .into_values()
                .filter(|t| t.requires_grad() == trainable)
                .map(|t| t.mean(tch::Kind::Float).double_value(&[]))
                .collect()
        };
        assert!(std::ptr::eq(mixed.for_step(), shadow));
        assert!(value(shadow, true).iter().all(|&v| v == 0.25));
        assert!(value(shadow, false).iter().all(|&v| v != 0.5));
        mixed.sync_shadow();
        assert!(value(shadow, false).iter().all(|&v| v == 0.5));
        tch::no_grad(|| {
            for mut t in shadow.var_store().variables().into_values() {
                let _ = t.fill_(0.75);
            }
        });
        mixed.after_step();
        assert!(value(&mixed.master, false).iter().all(|&v| v == 0.75));
        assert!(value(&mixed.master, true).iter().all(|&v| v == 0.25));
    }

    #[test]
    fn frozen_weights_take_no_gradient_and_stay_the_masters_in_fp32() {
        let _rng = crate::test_rng_lock();
        let cfg = crate::tiny_dncnn(true);
        let mut mixed = Weights::new(&cfg, Device::Cpu, Precision::Bf16, Layout::Nchw).unwrap();
        let names: Vec<String> = trainable(&mixed.master).into_keys().collect();
        // The first layer's weights (`body.0.weight`, `body.0.bias`): `body.0` is a prefix.
        let first = names[0].rsplit_once('.').unwrap().0.to_string();
        let frozen: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with(&format!("{first}.")))
            .collect();
        assert!(
            !frozen.is_empty() && frozen.len() < names.len(),
            "{names:?}"
        );
        mixed.freeze(std::slice::from_ref(&first)).unwrap();
        let learnt = trainable(&mixed.master);
        assert_eq!(learnt.len(), names.len() - frozen.len());
        // Only batch-norm statistics count as buffers, not the frozen weights.
        let all = mixed.master.var_store().variables().len();
        assert_eq!(mixed.statistics().len(), all - names.len());
        assert!(frozen.iter().all(|n| !learnt.contains_key(*n)));
        // A value bf16 cannot hold: after a step the master must still hold it exactly.
        let exact = 1.0 + 1.0 / 1024.0;
        tch::no_grad(|| {
            for (name, mut t) in mixed.master.var_store().variables() {
                if frozen.contains(&&name) {
                    let _ = t.fill_(exact);
                }
            }
        });
        mixed.sync_shadow();
        let shadow = mixed.for_step();
        for (name, t) in shadow.var_store().variables() {
            if frozen.contains(&&name) {
                assert!(!t.requires_grad(), "{name}");
                assert_eq!(
                    t.flatten(0, -1).double_value(&[0]),
                    1.0,
                    "bf16 rounds {name}"
                );
            }
        }
        mixed.after_step();
        for (name, t) in mixed.master.var_store().variables() {
            if frozen.contains(&&name) {
                assert_eq!(t.flatten(0, -1).double_value(&[0]), exact, "{name}");
            }
        }
    }

    #[test]
    fn freezing_refuses_a_name_it_cannot_find_and_freezing_everything() {
        let _rng = crate::test_rng_lock();
        let cfg = crate::tiny_dncnn(false);
        let mut w = Weights::new(&cfg, Device::Cpu, Precision::Fp32, Layout::Nchw).unwrap();
        let err = w.freeze(&["nothing".into()]).unwrap_err().to_string();
        assert!(err.contains("no weight is named 'nothing'"), "{err}");
        let all: Vec<String> = trainable(&w.master).into_keys().collect();
        let err = w.freeze(&all).unwrap_err().to_string();
        assert!(err.contains("leaves no weight to train"), "{err}");
        // A prefix matches whole name parts only: `bod` is not `body`.
        let root = all[0].split('.').next().unwrap();
        let err = w.freeze(&[root[..root.len() - 1].to_string()]).unwrap_err();
        assert!(err.to_string().contains("no weight is named"), "{err}");
    }

    #[test]
    fn restore_names_a_missing_or_misshapen_tensor() {
        let _rng = crate::test_rng_lock();
        let cfg = crate::tiny_dncnn(false);
        let model = Model::new(&cfg, Device::Cpu).unwrap();
        let mut named: BTreeMap<String, Tensor> = model
            .var_store()
            .variables()
            .into_iter()
            .map(|(k, t)| (format!("model.{k}"), t.detach().copy()))
            .collect();
        restore(&model, &named, "model.").unwrap();
        let (first, _) = named.pop_first().unwrap();
        assert_eq!(
            restore(&model, &named, "model.").unwrap_err(),
            format!("missing tensor '{first}'")
        );
        named.insert(
            first.clone(),
            Tensor::zeros([2], (tch::Kind::Float, Device::Cpu)),
        );
        let err = restore(&model, &named, "model.").unwrap_err();
        assert!(
            err.starts_with(&format!("tensor '{first}' has shape [2], the model needs")),
            "{err}"
        );
    }
}
