//! UNet (Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
//! Segmentation", MICCAI 2015) with padded convolutions so the output keeps the input's size;
//! defaults follow `shared/reference/models.py` (4 levels, 64-512, transposed-conv up path,
//! predicting the noise).

use crate::Result;
use crate::config::{Net, ensure};
use crate::layers::{ConvSpec, Flops, conv, upsample2};
use serde::{Deserialize, Serialize};
use tch::{Tensor, nn, nn::Module};

/// How the decoder doubles the resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpMode {
    /// 2x2 transposed convolution, stride 2 (the paper's "up-convolution").
    Transposed,
    /// Nearest-neighbour upsampling then a 3x3 conv (no checkerboard artefacts).
    Upsample,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnetConfig {
    pub channels: i64,
    /// Width of the first level; each level doubles it.
    pub base: i64,
    /// Number of 2x down-sampling levels (the input is padded to a multiple of 2^levels).
    pub levels: u32,
    pub up: UpMode,
    /// Predict the noise and subtract it (output = input - net), instead of the clean image.
    pub residual: bool,
    /// Take a noise-level map as an extra input channel.
    pub noise_map: bool,
}

impl Default for UnetConfig {
    fn default() -> Self {
        Self {
            channels: 3,
            base: 64,
            levels: 4,
            up: UpMode::Transposed,
            residual: true,
            noise_map: false,
        }
    }
}

impl UnetConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        ensure((1..=6).contains(&self.levels), || {
            format!("unet levels must be 1 to 6, got {}", self.levels)
        })?;
        ensure(self.base > 0, || {
            format!("unet base width must be positive, got {}", self.base)
        })
    }
}

#[derive(Debug)]
struct DoubleConv(nn::Conv2D, nn::Conv2D);

impl DoubleConv {
    fn new(p: nn::Path<'_>, cin: i64, cout: i64, scale: f64, flops: &mut Flops) -> Self {
        Self(
            conv(&p / 0, ConvSpec::new(cin, cout, 3).scale(scale), flops),
            conv(&p / 2, ConvSpec::new(cout, cout, 3).scale(scale), flops),
        )
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        self.1.forward(&self.0.forward(x).relu_()).relu_()
    }
}

#[derive(Debug)]
enum Up {
    Transposed(nn::ConvTranspose2D),
    Upsample(nn::Conv2D),
}

#[derive(Debug)]
pub struct Unet {
    down: Vec<DoubleConv>,
    bottleneck: DoubleConv,
    up: Vec<Up>,
    dec: Vec<DoubleConv>,
    out: nn::Conv2D,
    channels: i64,
    residual: bool,
}

impl Unet {
    pub fn new(p: &nn::Path<'_>, cfg: &UnetConfig, flops: &mut Flops) -> Self {
        let widths: Vec<i64> = (0..cfg.levels).map(|i| cfg.base << i).collect();
        let mut cin = cfg.channels + i64::from(cfg.noise_map);
        let mut scale = 1.0;
        let mut down = Vec::new();
        for (i, &w) in widths.iter().enumerate() {
            down.push(DoubleConv::new(p / "down" / i, cin, w, scale, flops));
            cin = w;
            scale /= 4.0;
        }
        let bottleneck = DoubleConv::new(p / "bottleneck", cin, 2 * cin, scale, flops);
        let (mut up, mut dec) = (Vec::new(), Vec::new());
        for (i, &w) in widths.iter().rev().enumerate() {
            let pu = p / "up" / i;
            up.push(match cfg.up {
                UpMode::Transposed => {
                    // Counted at the input resolution of the layer: 2x2 kernel, stride 2.
                    flops.0 += 2.0 * (2 * w * w * 4) as f64 * scale;
                    let tc = nn::ConvTransposeConfig {
                        stride: 2,
                        ..Default::default()
                    };
                    Up::Transposed(nn::conv_transpose2d(pu, 2 * w, w, 2, tc))
                }
                UpMode::Upsample => Up::Upsample(conv(
                    pu,
                    ConvSpec::new(2 * w, w, 3).scale(scale * 4.0),
                    flops,
                )),
            });
            scale *= 4.0;
            dec.push(DoubleConv::new(p / "dec" / i, 2 * w, w, scale, flops));
        }
        let out = conv(p / "out", ConvSpec::new(cfg.base, cfg.channels, 1), flops);
        Self {
            down,
            bottleneck,
            up,
            dec,
            out,
            channels: cfg.channels,
            residual: cfg.residual,
        }
    }
}

impl Net for Unet {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Tensor {
        let mut skips = Vec::with_capacity(self.down.len());
        let mut h = x.shallow_clone();
        for block in &self.down {
            h = block.forward(&h);
            skips.push(h.shallow_clone());
            h = h.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
        }
        h = self.bottleneck.forward(&h);
        for ((up, dec), skip) in self.up.iter().zip(&self.dec).zip(skips.iter().rev()) {
            let upsampled = match up {
                Up::Transposed(t) => t.forward(&h),
                Up::Upsample(c) => c.forward(&upsample2(&h)),
            };
            h = dec.forward(&Tensor::cat(&[skip, &upsampled], 1));
        }
        let out = self.out.forward(&h);
        if self.residual {
            x.narrow(1, 0, self.channels) - out
        } else {
            out
        }
    }
}
