//! FFDNet (Zhang, Zuo & Zhang, "FFDNet: Toward a Fast and Flexible Solution for CNN-Based Image
//! Denoising", IEEE TIP 2018): the image is split into four half-resolution sub-images
//! (pixel-unshuffle), stacked with a noise-level map, denoised by a plain conv stack and
//! reassembled (pixel-shuffle). Working at a quarter of the pixels makes it several times
//! cheaper per pixel than DnCNN at similar quality, and the map lets one model serve every sigma.

use crate::Result;
use crate::config::{Net, ensure};
use crate::estimator::{Estimator, EstimatorConfig};
use crate::layers::{ConvSpec, Flops, conv};
use serde::{Deserialize, Serialize};
use tch::{Tensor, nn, nn::Module, nn::ModuleT};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FfdnetConfig {
    pub channels: i64,
    /// Conv layers (paper: 15 gray, 12 colour).
    pub depth: usize,
    /// Feature width (paper: 64 gray, 96 colour).
    pub features: i64,
    /// Batch normalisation in the middle layers (the paper has it; off by default here: Adam
    /// trains the BN-free stack well and inference stays one conv per layer).
    pub batch_norm: bool,
    /// Predict the noise of the sub-images and subtract it (the paper predicts the clean image;
    /// residual learning converges faster, which matters when training on a CPU).
    pub residual: bool,
    /// A level-estimation branch (as CBDNet's): where the given map is negative the model reads
    /// the level from the image itself, so one network serves blind use and a hand-set level.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimator: Option<EstimatorConfig>,
}

impl Default for FfdnetConfig {
    fn default() -> Self {
        Self::for_channels(3)
    }
}

impl FfdnetConfig {
    /// The paper's sizes for gray (1) or colour (3).
    pub fn for_channels(channels: i64) -> Self {
        let (depth, features) = if channels == 1 { (15, 64) } else { (12, 96) };
        Self {
            channels,
            depth,
            features,
            batch_norm: false,
            residual: true,
            estimator: None,
        }
    }

    /// The gray twin of a colour config (what [`crate::gray::gray_from_colour`] builds), `None`
    /// for one that is not colour. A level-estimation branch is left behind: it learnt colour
    /// noise, so a gray model starts from the body alone.
    pub fn gray_twin(&self) -> Option<Self> {
        (self.channels == 3).then(|| Self {
            channels: 1,
            estimator: None,
            ..self.clone()
        })
    }

    pub(crate) fn validate(&self) -> Result<()> {
        ensure(self.depth >= 3, || {
            format!("ffdnet depth must be at least 3, got {}", self.depth)
        })?;
        ensure(self.features > 0, || {
            "ffdnet features must be positive".into()
        })?;
        if let Some(e) = &self.estimator {
            e.validate()?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Layer {
    conv: nn::Conv2D,
    bn: Option<nn::BatchNorm>,
}

#[derive(Debug)]
pub struct Ffdnet {
    layers: Vec<Layer>,
    last: nn::Conv2D,
    channels: i64,
    residual: bool,
    estimator: Option<Estimator>,
}

impl Ffdnet {
    pub fn new(p: &nn::Path<'_>, cfg: &FfdnetConfig, flops: &mut Flops) -> Self {
        let (c, f) = (cfg.channels, cfg.features);
        let quarter = 0.25;
        let bn_cfg = nn::BatchNormConfig {
            eps: 1e-4,
            momentum: 0.05,
            ..Default::default()
        };
        let mut layers = vec![Layer {
            conv: conv(
                p / "body" / 0,
                ConvSpec::new(4 * c + 1, f, 3).scale(quarter),
                flops,
            ),
            bn: None,
        }];
        for i in 1..cfg.depth - 1 {
            let spec = ConvSpec::new(f, f, 3).bias(!cfg.batch_norm).scale(quarter);
            layers.push(Layer {
                conv: conv(p / "body" / i / "conv", spec, flops),
                bn: cfg
                    .batch_norm
                    .then(|| nn::batch_norm2d(p / "body" / i / "bn", f, bn_cfg)),
            });
        }
        let last = conv(
            p / "body" / (cfg.depth - 1),
            ConvSpec::new(f, 4 * c, 3).scale(quarter),
            flops,
        );
        let estimator = cfg
            .estimator
            .as_ref()
            .map(|e| Estimator::new(&(p / "estimator"), 4 * c, e, flops));
        Self {
            layers,
            last,
            channels: c,
            residual: cfg.residual,
            estimator,
        }
    }
}

impl Net for Ffdnet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let image = x.narrow(1, 0, self.channels);
        let sub = image.pixel_unshuffle(2);
        // The map is constant within each 2x2 block in practice; average it to half resolution.
        let map = x.narrow(1, self.channels, 1).avg_pool2d(
            [2, 2],
            [2, 2],
            [0, 0],
            false,
            true,
            None::<i64>,
        );
        let map = match &self.estimator {
            Some(e) => map.where_self(&map.ge(0.0), &e.forward(&sub)),
            None => map,
        };
        let mut h = Tensor::cat(&[&sub, &map], 1);
        for layer in &self.layers {
            h = layer.conv.forward(&h);
            if let Some(bn) = &layer.bn {
                h = bn.forward_t(&h, train);
            }
            h = h.relu_();
        }
        let out = self.last.forward(&h);
        let out = if self.residual { sub - out } else { out };
        out.pixel_shuffle(2)
    }

    fn read_level(&self, x: &Tensor) -> Option<Tensor> {
        let e = self.estimator.as_ref()?;
        Some(e.forward(&x.pixel_unshuffle(2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimator::ESTIMATOR_START;
    use tch::Device;

    #[test]
    fn an_estimator_reads_the_level_only_where_none_is_given() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(5);
        let cfg: crate::ModelConfig = serde_json::from_str(
            r#"{"kind":"ffdnet","depth":4,"features":8,"estimator":{"depth":3,"features":4}}"#,
        )
        .unwrap();
        assert!(cfg.estimates_level());
        let model = crate::Model::new(&cfg, Device::Cpu).unwrap();
        let x = Tensor::rand([1, 3, 20, 24], (tch::Kind::Float, Device::Cpu));
        crate::estimator::assert_reads_only_where_none_given(&model, &x);
        // The estimator's weights are named under `estimator.`, apart from the body's.
        let names: Vec<String> = model.var_store().variables().into_keys().collect();
        assert!(names.iter().any(|n| n == "estimator.0.weight"));
        assert!(names.iter().any(|n| n == "body.0.weight"));
        // A scale multiplies the estimate: twice the starting level steers like a given one.
        let mut scaled = cfg.clone();
        if let crate::ModelConfig::Ffdnet(c) = &mut scaled {
            c.estimator.as_mut().unwrap().scale = 2.0;
        }
        assert!(
            serde_json::to_string(&scaled)
                .unwrap()
                .contains("\"scale\":2.0")
        );
        let mut twice = crate::Model::new(&scaled, Device::Cpu).unwrap();
        twice.var_store_mut().copy(model.var_store()).unwrap();
        let map = Tensor::full(
            [1, 1, 20, 24],
            2.0 * ESTIMATOR_START,
            (tch::Kind::Float, Device::Cpu),
        );
        let doubled = model.denoise(&x, Some(&map)).unwrap();
        let gap = (twice.denoise(&x, None).unwrap() - doubled).abs().max();
        assert!(gap.double_value(&[]) < 1e-5);
        // Without an estimator a model serialises as before (no `estimator` key).
        let plain = serde_json::to_string(&FfdnetConfig::default()).unwrap();
        assert!(!plain.contains("estimator"), "{plain}");
    }
}
