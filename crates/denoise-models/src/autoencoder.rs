//! Convolutional autoencoder, as in Siddiqui's Keras article this project started from (a "conv
//! autoencoder": 3x3 conv + ReLU with 2x2 max-pooling per level, nearest upsampling + 3x3 conv
//! back, sigmoid output); layer sizes follow the PyTorch reference models (64-128-256).

use crate::Result;
use crate::config::{Net, ensure};
use crate::layers::{ConvSpec, Flops, conv, upsample2};
use serde::{Deserialize, Serialize};
use tch::{Tensor, nn, nn::Module};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoencoderConfig {
    pub channels: i64,
    /// Encoder widths, one per level (each level halves the resolution).
    pub widths: Vec<i64>,
    /// Take a noise-level map as an extra input channel.
    pub noise_map: bool,
}

impl Default for AutoencoderConfig {
    fn default() -> Self {
        Self {
            channels: 3,
            widths: vec![64, 128, 256],
            noise_map: false,
        }
    }
}

impl AutoencoderConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        ensure(!self.widths.is_empty() && self.widths.len() <= 6, || {
            format!("autoencoder needs 1 to 6 levels, got {}", self.widths.len())
        })?;
        ensure(self.widths.iter().all(|&w| w > 0), || {
            "autoencoder widths must be positive".into()
        })
    }
}

#[derive(Debug)]
pub struct Autoencoder {
    encoder: Vec<nn::Conv2D>,
    decoder: Vec<nn::Conv2D>,
}

impl Autoencoder {
    pub fn new(p: &nn::Path<'_>, cfg: &AutoencoderConfig, flops: &mut Flops) -> Self {
        let mut cin = cfg.channels + i64::from(cfg.noise_map);
        let mut scale = 1.0;
        let mut encoder = Vec::new();
        for (i, &w) in cfg.widths.iter().enumerate() {
            encoder.push(conv(
                p / "encoder" / i,
                ConvSpec::new(cin, w, 3).scale(scale),
                flops,
            ));
            cin = w;
            scale /= 4.0;
        }
        // The decoder mirrors the encoder: widths reversed without the deepest, then the image.
        let outs = cfg
            .widths
            .iter()
            .rev()
            .skip(1)
            .copied()
            .chain([cfg.channels]);
        let mut decoder = Vec::new();
        for (i, w) in outs.enumerate() {
            scale *= 4.0;
            decoder.push(conv(
                p / "decoder" / i,
                ConvSpec::new(cin, w, 3).scale(scale),
                flops,
            ));
            cin = w;
        }
        Self { encoder, decoder }
    }
}

impl Net for Autoencoder {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Tensor {
        let mut h = x.shallow_clone();
        for c in &self.encoder {
            h = c
                .forward(&h)
                .relu_()
                .max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
        }
        let last = self.decoder.len() - 1;
        for (i, c) in self.decoder.iter().enumerate() {
            h = c.forward(&upsample2(&h));
            h = if i == last { h.sigmoid() } else { h.relu_() };
        }
        h
    }
}
