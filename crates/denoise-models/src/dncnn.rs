//! DnCNN (Zhang, Zuo, Chen, Meng & Zhang, "Beyond a Gaussian Denoiser: Residual Learning of Deep
//! CNN for Image Denoising", IEEE TIP 2017): conv+ReLU, (depth-2) x (conv+BN+ReLU), conv,
//! predicting the noise (output = input - net).

use crate::Result;
use crate::config::{Net, ensure};
use crate::layers::{ConvSpec, Flops, conv};
use serde::{Deserialize, Serialize};
use tch::{Tensor, nn, nn::Module, nn::ModuleT};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DncnnConfig {
    pub channels: i64,
    /// Number of conv layers (17 for DnCNN-S, 20 for the blind DnCNN-B).
    pub depth: usize,
    pub features: i64,
    /// Batch normalisation in the middle layers (as the paper; eps 1e-4, momentum 0.05 in
    /// libtorch's convention = 0.95 in Keras's / MatConvNet's).
    pub batch_norm: bool,
    /// Take a noise-level map as an extra input channel.
    pub noise_map: bool,
}

impl Default for DncnnConfig {
    fn default() -> Self {
        Self {
            channels: 3,
            depth: 17,
            features: 64,
            batch_norm: true,
            noise_map: false,
        }
    }
}

impl DncnnConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        ensure(self.depth >= 3, || {
            format!("dncnn depth must be at least 3, got {}", self.depth)
        })?;
        ensure(self.features > 0, || {
            "dncnn features must be positive".into()
        })
    }
}

#[derive(Debug)]
struct Middle {
    conv: nn::Conv2D,
    bn: Option<nn::BatchNorm>,
}

#[derive(Debug)]
pub struct Dncnn {
    first: nn::Conv2D,
    middle: Vec<Middle>,
    last: nn::Conv2D,
    channels: i64,
}

impl Dncnn {
    pub fn new(p: &nn::Path<'_>, cfg: &DncnnConfig, flops: &mut Flops) -> Self {
        let f = cfg.features;
        let cin = cfg.channels + i64::from(cfg.noise_map);
        let first = conv(p / "body" / 0, ConvSpec::new(cin, f, 3), flops);
        let bn_cfg = nn::BatchNormConfig {
            eps: 1e-4,
            momentum: 0.05,
            ..Default::default()
        };
        let middle = (0..cfg.depth - 2)
            .map(|i| {
                let idx = 2 + 3 * i;
                Middle {
                    conv: conv(
                        p / "body" / idx,
                        ConvSpec::new(f, f, 3).bias(!cfg.batch_norm),
                        flops,
                    ),
                    bn: cfg
                        .batch_norm
                        .then(|| nn::batch_norm2d(p / "body" / (idx + 1), f, bn_cfg)),
                }
            })
            .collect();
        let idx = 2 + 3 * (cfg.depth - 2);
        let last = conv(
            p / "body" / idx,
            ConvSpec::new(f, cfg.channels, 3).bias(false),
            flops,
        );
        Self {
            first,
            middle,
            last,
            channels: cfg.channels,
        }
    }
}

impl Net for Dncnn {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = self.first.forward(x).relu_();
        for m in &self.middle {
            h = m.conv.forward(&h);
            if let Some(bn) = &m.bn {
                h = bn.forward_t(&h, train);
            }
            h = h.relu_();
        }
        x.narrow(1, 0, self.channels) - self.last.forward(&h)
    }
}
