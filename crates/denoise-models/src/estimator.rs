//! The level-estimation branch a denoiser can carry (as CBDNet's): a small conv stack that reads
//! the noise level from the image wherever the level map it is given is negative, so one network
//! serves blind use and a hand-set level. FFDNet and DRUNet both take one.

use crate::Result;
use crate::config::ensure;
use crate::layers::{ConvSpec, Flops, conv};
use serde::{Deserialize, Serialize};
use tch::{Tensor, nn, nn::Module};

/// The level-estimation branch: a plain conv stack on the half-resolution sub-images, a
/// softplus (levels are positive), and a box filter that smooths the map, since noise levels
/// change slowly across a photo while a small stack's reading is noisy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EstimatorConfig {
    /// Conv layers.
    pub depth: usize,
    /// Feature width.
    pub features: i64,
    /// Side of the smoothing box, in half-resolution pixels (1: none).
    pub smooth: i64,
    /// The stack runs on the half-resolution sub-images folded this many times further (2:
    /// quarter resolution, 48 channels for colour), its reading repeated back up: four times
    /// the view and a quarter of the cost per layer, so a deeper, wider stack that tells
    /// texture from noise costs what a small one did. Noise levels change slowly, so little is
    /// lost. 1: the half-resolution sub-images themselves.
    #[serde(skip_serializing_if = "is_one")]
    pub fold: i64,
    /// What the estimate is multiplied by before the body sees it: a shipped model's strength,
    /// chosen after training on real photos (the loss trains the estimate for its own noise).
    #[serde(skip_serializing_if = "is_one")]
    pub scale: f64,
}

fn is_one<T: PartialEq + From<u8>>(v: &T) -> bool {
    *v == T::from(1)
}

impl EstimatorConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        let e = self;
        ensure(e.depth >= 2, || {
            format!("estimator depth must be at least 2, got {}", e.depth)
        })?;
        ensure(e.features > 0, || {
            "estimator features must be positive".into()
        })?;
        ensure(e.smooth >= 1 && e.smooth % 2 == 1, || {
            format!(
                "estimator smooth must be an odd number >= 1, got {}",
                e.smooth
            )
        })?;
        ensure((1..=4).contains(&e.fold), || {
            format!("estimator fold must be 1 to 4, got {}", e.fold)
        })?;
        ensure(e.scale > 0.0 && e.scale.is_finite(), || {
            format!("estimator scale must be positive, got {}", e.scale)
        })?;
        Ok(())
    }

    /// The image rows a reading depends on beyond its own (each side), and the alignment of
    /// a strip's first row that keeps its sub-image and fold grids the whole image's: what
    /// reading an image in strips needs for the strips to read as one pass would.
    pub(crate) fn view(&self) -> (usize, usize) {
        let fold = self.fold.max(1) as usize;
        let align = 2 * fold;
        // In half-resolution rows: each conv reaches one folded row (`fold` rows), a fold cell
        // spans `fold - 1` more, and the box `smooth / 2`.
        let half = fold * self.depth + (fold - 1) + self.smooth.max(1) as usize / 2;
        ((2 * half).div_ceil(align) * align, align)
    }
}

impl Default for EstimatorConfig {
    fn default() -> Self {
        Self {
            depth: 4,
            features: 32,
            smooth: 9,
            fold: 1,
            scale: 1.0,
        }
    }
}

/// What a map holds where the model is to estimate the level itself (any negative value does).
pub const ESTIMATE_HERE: f32 = -1.0;

/// The estimator's first reading, before training (15 on the 0-255 scale): a level the
/// Gaussian-trained body handles well, so a fine-tune starts from sensible output.
pub(crate) const ESTIMATOR_START: f64 = 15.0 / 255.0;

#[derive(Debug)]
pub(crate) struct Estimator {
    convs: Vec<nn::Conv2D>,
    smooth: i64,
    fold: i64,
    scale: f64,
}

impl Estimator {
    pub(crate) fn new(
        p: &nn::Path<'_>,
        cin: i64,
        cfg: &EstimatorConfig,
        flops: &mut Flops,
    ) -> Self {
        // Pixels per full-resolution pixel where the stack runs.
        let area = 0.25 / (cfg.fold * cfg.fold) as f64;
        let cin = cin * cfg.fold * cfg.fold;
        let mut convs = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let (a, b) = (
                if i == 0 { cin } else { cfg.features },
                if i + 1 == cfg.depth { 1 } else { cfg.features },
            );
            convs.push(conv(p / i, ConvSpec::new(a, b, 3).scale(area), flops));
        }
        let last = convs.last_mut().expect("depth >= 2");
        tch::no_grad(|| {
            let _ = last.ws.zero_();
            if let Some(bs) = &mut last.bs {
                // softplus(b) = start.
                let _ = bs.fill_(ESTIMATOR_START.exp_m1().ln());
            }
        });
        Self {
            convs,
            smooth: cfg.smooth,
            fold: cfg.fold,
            scale: cfg.scale,
        }
    }

    /// N x 1 x h x w levels ([0, 1] scale) from the N x 4C x h x w sub-images.
    pub(crate) fn forward(&self, sub: &Tensor) -> Tensor {
        let (rows, cols) = (sub.size()[2], sub.size()[3]);
        let f = self.fold;
        let mut h = if f == 1 {
            sub.shallow_clone()
        } else {
            // Edge-replicated up to a multiple of the fold; the extra rows are cut off below.
            let (pr, pc) = ((f - rows % f) % f, (f - cols % f) % f);
            sub.pad([0, pc, 0, pr], "replicate", None)
                .pixel_unshuffle(f)
        };
        let last = self.convs.len() - 1;
        for (i, c) in self.convs.iter().enumerate() {
            h = c.forward(&h);
            if i < last {
                h = h.relu_();
            }
        }
        let level = h.softplus();
        let level = if f == 1 {
            level
        } else {
            let (r, c) = (level.size()[2], level.size()[3]);
            level
                .upsample_nearest2d([r * f, c * f], None, None)
                .narrow(2, 0, rows)
                .narrow(3, 0, cols)
        };
        let level = if self.scale == 1.0 {
            level
        } else {
            level * self.scale
        };
        if self.smooth > 1 {
            let k = self.smooth;
            level.avg_pool2d([k, k], [1, 1], [k / 2, k / 2], false, false, None::<i64>)
        } else {
            level
        }
    }
}

/// Checks that a fresh `model` with an estimator reads the level only where none is given:
/// blind use, the `ESTIMATE_HERE` sentinel and the estimator's starting level all give one
/// output, and another given level steers it elsewhere. `x`: 1 x 3 x H x W.
#[cfg(test)]
pub(crate) fn assert_reads_only_where_none_given(model: &crate::Model, x: &Tensor) {
    let (h, w) = (x.size()[2], x.size()[3]);
    let map = |v: f64| Tensor::full([1, 1, h, w], v, (tch::Kind::Float, tch::Device::Cpu));
    let blind = model.denoise(x, None).unwrap();
    let sentinel = model
        .denoise(x, Some(&map(f64::from(ESTIMATE_HERE))))
        .unwrap();
    let start = model.denoise(x, Some(&map(ESTIMATOR_START))).unwrap();
    let other = model.denoise(x, Some(&map(40.0 / 255.0))).unwrap();
    let gap = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    assert!(gap(&blind, &sentinel) < 1e-6);
    // Untrained, the estimator reads its starting level everywhere.
    assert!(gap(&blind, &start) < 1e-5, "{}", gap(&blind, &start));
    assert!(gap(&blind, &other) > 1e-4, "{}", gap(&blind, &other));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn a_folded_estimator_reads_one_level_per_block_on_any_size_for_less_work() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(6);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = |fold| EstimatorConfig {
            depth: 3,
            features: 4,
            smooth: 1,
            fold,
            scale: 1.0,
        };
        let (mut plain, mut folded) = (Flops::default(), Flops::default());
        let _ = Estimator::new(&(vs.root() / "plain"), 12, &cfg(1), &mut plain);
        let mut e = Estimator::new(&(vs.root() / "folded"), 12, &cfg(2), &mut folded);
        assert!(folded.0 < plain.0, "{} vs {}", folded.0, plain.0);
        // Trained weights, not the starting constant: the reading varies over the picture.
        tch::no_grad(|| {
            let last = e.convs.last_mut().unwrap();
            last.ws.copy_(&(last.ws.randn_like() * 0.5));
        });
        for (rows, cols) in [(10, 12), (9, 11)] {
            let sub = Tensor::rand([1, 12, rows, cols], (tch::Kind::Float, Device::Cpu));
            let level = e.forward(&sub);
            assert_eq!(level.size(), [1, 1, rows, cols]);
            let block = level.narrow(2, 2, 2).narrow(3, 4, 2);
            let spread = (&block - block.mean(tch::Kind::Float)).abs().max();
            assert!(spread.double_value(&[]) < 1e-6);
            let all = (&level - level.mean(tch::Kind::Float)).abs().max();
            assert!(all.double_value(&[]) > 1e-4);
        }
    }
}
