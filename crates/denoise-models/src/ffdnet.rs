//! FFDNet (Zhang, Zuo & Zhang, "FFDNet: Toward a Fast and Flexible Solution for CNN-Based Image
//! Denoising", IEEE TIP 2018): the image is split into four half-resolution sub-images
//! (pixel-unshuffle), stacked with a noise-level map, denoised by a plain conv stack and
//! reassembled (pixel-shuffle). Working at a quarter of the pixels makes it several times
//! cheaper per pixel than DnCNN at similar quality, and the map lets one model serve every sigma.

use crate::Result;
use crate::config::{Net, ensure};
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
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        ensure(self.depth >= 3, || {
            format!("ffdnet depth must be at least 3, got {}", self.depth)
        })?;
        ensure(self.features > 0, || {
            "ffdnet features must be positive".into()
        })
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
        Self {
            layers,
            last,
            channels: c,
            residual: cfg.residual,
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
}
