//! RIDNet (Anwar & Barnes, "Real Image Denoising with Feature Attention", ICCV 2019), laid out as
//! the authors' code (github saeed-anwar/RIDNet, `TestCode/code/model/ridnet.py` and `ops.py`):
//! mean shift, head conv + ReLU, 4 EAM blocks, tail conv, global residual.

use crate::Result;
use crate::config::{Net, ensure};
use crate::layers::{ConvSpec, Flops, conv};
use serde::{Deserialize, Serialize};
use tch::{Tensor, nn, nn::Module};

/// The DIV2K RGB mean the authors' `MeanShift` subtracts (with `rgb_range` 1 for [0, 1] input).
const RGB_MEAN: [f64; 3] = [0.4488, 0.4371, 0.4040];
/// The gray equivalent (BT.601 luma of `RGB_MEAN`).
const GRAY_MEAN: f64 = 0.4391;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RidnetConfig {
    pub channels: i64,
    pub features: i64,
    /// Number of EAM blocks.
    pub blocks: usize,
    /// Channel reduction of the feature attention (64 -> 4 with 16).
    pub reduction: i64,
    /// The paper's figure 2 draws a skip around each EAM and one around the EAM stack; the
    /// authors' code has neither. `false` (default) is the code.
    pub paper_skips: bool,
    /// Take a noise-level map as an extra input channel.
    pub noise_map: bool,
}

impl Default for RidnetConfig {
    fn default() -> Self {
        Self {
            channels: 3,
            features: 64,
            blocks: 4,
            reduction: 16,
            paper_skips: false,
            noise_map: false,
        }
    }
}

impl RidnetConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        ensure(self.blocks >= 1, || {
            "ridnet needs at least one EAM block".into()
        })?;
        ensure(
            self.features > 0 && self.reduction > 0 && self.features % self.reduction == 0,
            || {
                format!(
                    "ridnet features ({}) must be a positive multiple of reduction ({})",
                    self.features, self.reduction
                )
            },
        )
    }
}

/// Enhancement attention module: merge-and-run, residual block, enhanced residual block,
/// feature attention.
#[derive(Debug)]
struct Eam {
    body1: [nn::Conv2D; 2],
    body2: [nn::Conv2D; 2],
    body3: nn::Conv2D,
    res: [nn::Conv2D; 2],
    eres: [nn::Conv2D; 3],
    ca: [nn::Conv2D; 2],
}

impl Eam {
    fn new(p: nn::Path<'_>, f: i64, reduction: i64, flops: &mut Flops) -> Self {
        let c = |path: nn::Path<'_>, cin, cout, k, d, flops: &mut Flops| {
            conv(path, ConvSpec::new(cin, cout, k).dilation(d), flops)
        };
        let r1 = &p / "r1";
        let body1 = [
            c(&r1 / "body1" / 0, f, f, 3, 1, flops),
            c(&r1 / "body1" / 2, f, f, 3, 2, flops),
        ];
        let body2 = [
            c(&r1 / "body2" / 0, f, f, 3, 3, flops),
            c(&r1 / "body2" / 2, f, f, 3, 4, flops),
        ];
        let body3 = c(&r1 / "body3" / 0, 2 * f, f, 3, 1, flops);
        let r2 = &p / "r2" / "body";
        let res = [c(&r2 / 0, f, f, 3, 1, flops), c(&r2 / 2, f, f, 3, 1, flops)];
        let r3 = &p / "r3" / "body";
        let eres = [
            c(&r3 / 0, f, f, 3, 1, flops),
            c(&r3 / 2, f, f, 3, 1, flops),
            c(&r3 / 4, f, f, 1, 1, flops),
        ];
        // The attention convs run on a 1x1 pooled map: their cost per pixel is negligible.
        let mut none = Flops::default();
        let ca = [
            c(&p / "ca" / "c1" / 0, f, f / reduction, 1, 1, &mut none),
            c(&p / "ca" / "c2" / 0, f / reduction, f, 1, 1, &mut none),
        ];
        Self {
            body1,
            body2,
            body3,
            res,
            eres,
            ca,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let b1 = self.body1[1]
            .forward(&self.body1[0].forward(x).relu_())
            .relu_();
        let b2 = self.body2[1]
            .forward(&self.body2[0].forward(x).relu_())
            .relu_();
        let r1 = self.body3.forward(&Tensor::cat(&[b1, b2], 1)).relu_() + x;
        let r2 = (self.res[1].forward(&self.res[0].forward(&r1).relu_()) + &r1).relu_();
        let e = self.eres[1]
            .forward(&self.eres[0].forward(&r2).relu_())
            .relu_();
        let r3 = (self.eres[2].forward(&e) + &r2).relu_();
        let pooled = r3.adaptive_avg_pool2d([1, 1]);
        let attention = self.ca[1]
            .forward(&self.ca[0].forward(&pooled).relu_())
            .sigmoid();
        r3 * attention
    }
}

#[derive(Debug)]
pub struct Ridnet {
    head: nn::Conv2D,
    blocks: Vec<Eam>,
    tail: nn::Conv2D,
    /// The mean shift, 1 x C x 1 x 1 (a constant, not a parameter).
    mean: Tensor,
    channels: i64,
    paper_skips: bool,
}

impl Ridnet {
    pub fn new(p: &nn::Path<'_>, cfg: &RidnetConfig, flops: &mut Flops) -> Self {
        let f = cfg.features;
        let cin = cfg.channels + i64::from(cfg.noise_map);
        let head = conv(p / "head" / 0, ConvSpec::new(cin, f, 3), flops);
        let blocks = (0..cfg.blocks)
            .map(|i| Eam::new(p / "blocks" / i, f, cfg.reduction, flops))
            .collect();
        let tail = conv(p / "tail", ConvSpec::new(f, cfg.channels, 3), flops);
        let mean = if cfg.channels == 3 {
            RGB_MEAN.to_vec()
        } else {
            vec![GRAY_MEAN]
        };
        let mean =
            Tensor::from_slice(&mean)
                .to_kind(tch::Kind::Float)
                .view([1, cfg.channels, 1, 1]);
        Self {
            head,
            blocks,
            tail,
            mean,
            channels: cfg.channels,
            paper_skips: cfg.paper_skips,
        }
    }
}

impl Net for Ridnet {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Tensor {
        let image = x.narrow(1, 0, self.channels);
        let mean = self.mean.to_device(x.device()).to_kind(x.kind());
        // The authors' sub_mean / add_mean are 1x1 convs with identity weights: a plain shift.
        let centred = &image - &mean;
        let input = if x.size()[1] > self.channels {
            Tensor::cat(&[&centred, &x.narrow(1, self.channels, 1)], 1)
        } else {
            centred
        };
        let head = self.head.forward(&input).relu_();
        let mut h = head.shallow_clone();
        for block in &self.blocks {
            h = if self.paper_skips {
                block.forward(&h) + &h
            } else {
                block.forward(&h)
            };
        }
        if self.paper_skips {
            h += &head;
        }
        self.tail.forward(&h) + mean + &image
    }
}
