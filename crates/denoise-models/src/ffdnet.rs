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
    /// A level-estimation branch (as CBDNet's): where the given map is negative the model reads
    /// the level from the image itself, so one network serves blind use and a hand-set level.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimator: Option<EstimatorConfig>,
}

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
const ESTIMATOR_START: f64 = 15.0 / 255.0;

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

    /// The gray twin of a colour config (what [`gray_from_colour`] builds), `None` for one that
    /// is not colour.
    pub fn gray_twin(&self) -> Option<Self> {
        (self.channels == 3 && self.estimator.is_none()).then(|| Self {
            channels: 1,
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
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Estimator {
    convs: Vec<nn::Conv2D>,
    smooth: i64,
    fold: i64,
    scale: f64,
}

impl Estimator {
    fn new(p: &nn::Path<'_>, cin: i64, cfg: &EstimatorConfig, flops: &mut Flops) -> Self {
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
    fn forward(&self, sub: &Tensor) -> Tensor {
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

/// A gray FFDNet that computes what `colour` computes on a gray picture repeated into RGB with
/// its noise level times sqrt(3) (see `tile::conversion_noise_gain`), its three outputs turned
/// back to gray with BT.601 luma weights: a starting point for training a gray model from a
/// colour one.
///
/// The first layer sums the weights of the three channels' sub-images and scales the map's by
/// sqrt(3); the last combines the channels' outputs (and biases) with the luma weights, which
/// sum to 1, so the residual `sub - out` passes through. The middle layers are copied.
pub fn gray_from_colour(colour: &crate::Model) -> Result<crate::Model> {
    let crate::ModelConfig::Ffdnet(cfg) = colour.config() else {
        return Err(crate::ModelError::Config(format!(
            "only an ffdnet turns into a gray model, not a {}",
            colour.config().kind()
        )));
    };
    let gray_cfg = cfg.gray_twin().ok_or_else(|| {
        crate::ModelError::Config(format!(
            "a gray model comes from a colour one, not from {} channel(s)",
            cfg.channels
        ))
    })?;
    let gray = crate::Model::new(&crate::ModelConfig::Ffdnet(gray_cfg), colour.device())?;
    let src = colour.var_store().variables();
    let last = format!("body.{}.", cfg.depth - 1);
    let luma = denoise_data::image::LUMA.map(f64::from);
    tch::no_grad(|| -> Result<()> {
        for (name, mut dst) in gray.var_store().variables() {
            let s = src.get(&name).ok_or_else(|| {
                crate::ModelError::Config(format!("the colour model has no '{name}'"))
            })?;
            let value = if name == "body.0.weight" {
                // Inputs: 4 sub-images per channel (R, G, B), then the map.
                let sum = s.f_narrow(1, 0, 4)? + s.f_narrow(1, 4, 4)? + s.f_narrow(1, 8, 4)?;
                let map = s.f_narrow(1, 12, 1)? * 3f64.sqrt();
                Tensor::f_cat(&[sum, map], 1)?
            } else if name.starts_with(&last) {
                // Outputs (weight rows or biases): 4 sub-images per channel.
                let mut acc = s.f_narrow(0, 0, 4)? * luma[0];
                for (c, w) in luma.iter().enumerate().skip(1) {
                    acc += s.f_narrow(0, 4 * c as i64, 4)? * *w;
                }
                acc
            } else {
                s.shallow_clone()
            };
            dst.f_copy_(&value)?;
        }
        Ok(())
    })?;
    Ok(gray)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denoiser::denoise_image;
    use crate::level::NoiseLevel;
    use crate::tile::TileConfig;
    use denoise_data::Image;
    use tch::Device;

    #[test]
    fn a_gray_model_from_a_colour_one_computes_what_the_colour_one_does_on_gray() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(3);
        let cfg: crate::ModelConfig =
            serde_json::from_str(r#"{"kind":"ffdnet","depth":4,"features":8}"#).unwrap();
        let colour = crate::Model::new(&cfg, Device::Cpu).unwrap();
        let gray = gray_from_colour(&colour).unwrap();
        assert_eq!(gray.config().channels(), 1);
        let img = Image::from_fn(1, 18, 22, |_, y, x| ((3 * y + 5 * x) % 11) as f32 / 11.0);
        let whole = TileConfig {
            tile: 0,
            overlap: 0,
            ensemble: 1,
        };
        let run = |m: &crate::Model| {
            denoise_image(m, &img, NoiseLevel::Uniform(20.0), whole, &mut |_, _| {})
                .unwrap()
                .0
        };
        let (a, b) = (run(&colour), run(&gray));
        let gap = a
            .data()
            .iter()
            .zip(b.data())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(gap < 1e-5, "{gap}");
        assert!(gray_from_colour(&gray).is_err(), "already gray");
    }

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
        let map = |v: f64| Tensor::full([1, 1, 20, 24], v, (tch::Kind::Float, Device::Cpu));
        let blind = model.denoise(&x, None).unwrap();
        let sentinel = model
            .denoise(&x, Some(&map(f64::from(ESTIMATE_HERE))))
            .unwrap();
        let start = model.denoise(&x, Some(&map(ESTIMATOR_START))).unwrap();
        let other = model.denoise(&x, Some(&map(40.0 / 255.0))).unwrap();
        let gap = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(gap(&blind, &sentinel) < 1e-6);
        // Untrained, the estimator reads its starting level everywhere.
        assert!(gap(&blind, &start) < 1e-5, "{}", gap(&blind, &start));
        assert!(gap(&blind, &other) > 1e-4);
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
        let doubled = model
            .denoise(&x, Some(&map(2.0 * ESTIMATOR_START)))
            .unwrap();
        assert!(gap(&twice.denoise(&x, None).unwrap(), &doubled) < 1e-5);
        // Without an estimator a model serialises as before (no `estimator` key).
        let plain = serde_json::to_string(&FfdnetConfig::default()).unwrap();
        assert!(!plain.contains("estimator"), "{plain}");
    }
}
