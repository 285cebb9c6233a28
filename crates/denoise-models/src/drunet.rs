//! DRUNet (Zhang, Li, Zuo, Zhang, Van Gool & Timofte, "Plug-and-Play Image Restoration with Deep
//! Denoiser Prior", IEEE TPAMI 2021): a UNet whose every scale is a run of bias-free residual
//! blocks, with a noise-level map beside the image at the input. 2x2 strided convolutions go
//! down, 2x2 transposed convolutions come up, and each skip is added rather than concatenated,
//! so a scale costs only its blocks. The paper's widths (64-512, four blocks per scale, 32M
//! weights) are far beyond a CPU's training budget; widths and blocks are configurable. Like
//! FFDNet, it can carry a level-estimation branch ([`crate::estimator`]) for blind use.

use crate::Result;
use crate::config::{Net, ensure};
use crate::estimator::{Estimator, EstimatorConfig};
use crate::layers::{ConvSpec, Flops, conv};
use serde::{Deserialize, Serialize};
use tch::{Tensor, nn, nn::Module};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrunetConfig {
    pub channels: i64,
    /// Feature width at each scale, full resolution first; each further scale halves the
    /// resolution (the input is padded to a multiple of `2^(scales - 1)`).
    pub widths: Vec<i64>,
    /// Residual blocks (conv-ReLU-conv plus the identity) per scale on the way down, at the
    /// bottom, and per scale on the way up: one count for all, or a count for each.
    pub blocks: Blocks,
    /// Predict the noise and subtract it (the paper predicts the clean image; residual
    /// learning converges faster, which matters when training on a CPU).
    pub residual: bool,
    /// Take a noise-level map as an extra input channel (the paper does).
    pub noise_map: bool,
    /// A level-estimation branch reading the level where the given map is negative (it runs
    /// on the half-resolution sub-images, as FFDNet's does); needs `noise_map`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimator: Option<EstimatorConfig>,
}

impl Default for DrunetConfig {
    fn default() -> Self {
        Self {
            channels: 3,
            widths: vec![64, 128, 256, 512],
            blocks: Blocks::Uniform(4),
            residual: true,
            noise_map: true,
            estimator: None,
        }
    }
}

impl DrunetConfig {
    /// The gray twin of a colour config (what [`crate::gray::gray_from_colour`] builds), `None`
    /// for one that is not colour or takes no map. A level-estimation branch is left behind,
    /// as for FFDNet.
    pub fn gray_twin(&self) -> Option<Self> {
        (self.channels == 3 && self.noise_map).then(|| Self {
            channels: 1,
            estimator: None,
            ..self.clone()
        })
    }

    /// See [`crate::ModelConfig::prunes`].
    pub(crate) fn prunes(&self, from: &Self) -> bool {
        let same_otherwise = Self {
            blocks: from.blocks.clone(),
            ..self.clone()
        } == *from;
        // Valid configs of the same widths only: the counts are then there to compare.
        if !same_otherwise || self.validate().is_err() || from.validate().is_err() {
            return false;
        }
        let scales = self.widths.len() - 1;
        let (a, b) = (&self.blocks, &from.blocks);
        let fewer = (0..scales).all(|i| a.down(i) <= b.down(i) && a.up(i) <= b.up(i))
            && a.bottom() <= b.bottom();
        same_otherwise && fewer && a != b
    }

    pub(crate) fn validate(&self) -> Result<()> {
        ensure((1..=6).contains(&self.widths.len()), || {
            format!(
                "drunet needs 1 to 6 widths (one per scale), got {}",
                self.widths.len()
            )
        })?;
        ensure(self.widths.iter().all(|&w| w > 0), || {
            format!("drunet widths must be positive, got {:?}", self.widths)
        })?;
        self.blocks.validate(self.widths.len() - 1)?;
        if let Some(e) = &self.estimator {
            ensure(self.noise_map, || {
                "a drunet estimator needs noise_map = true: it fills in the map".into()
            })?;
            e.validate()?;
        }
        Ok(())
    }

    /// Input height and width must be multiples of this (2 at least with an estimator, which
    /// reads half-resolution sub-images).
    pub(crate) fn multiple(&self) -> i64 {
        let scales = 1 << (self.widths.len().max(1) - 1);
        if self.estimator.is_some() {
            scales.max(2)
        } else {
            scales
        }
    }
}

/// How many residual blocks each scale runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Blocks {
    /// The same count on the way down, at the bottom and on the way up.
    Uniform(usize),
    /// A count for each scale, so that a network can spend its arithmetic where it pays.
    PerScale(ScaleBlocks),
}

/// Block counts per scale. `down` and `up` both list the scales above the bottom from full
/// resolution down, so `down[i]` and `up[i]` run at the width `widths[i]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleBlocks {
    pub down: Vec<usize>,
    pub bottom: usize,
    pub up: Vec<usize>,
}

/// More blocks than this at one scale is a typo, not a network this crate can train.
const MAX_BLOCKS: usize = 16;

impl Blocks {
    pub(crate) fn down(&self, scale: usize) -> usize {
        match self {
            Self::Uniform(n) => *n,
            Self::PerScale(b) => b.down[scale],
        }
    }
    pub(crate) fn bottom(&self) -> usize {
        match self {
            Self::Uniform(n) => *n,
            Self::PerScale(b) => b.bottom,
        }
    }
    pub(crate) fn up(&self, scale: usize) -> usize {
        match self {
            Self::Uniform(n) => *n,
            Self::PerScale(b) => b.up[scale],
        }
    }

    fn validate(&self, above_bottom: usize) -> Result<()> {
        let counts: Vec<usize> = match self {
            Self::Uniform(n) => vec![*n],
            Self::PerScale(b) => {
                for (name, list) in [("down", &b.down), ("up", &b.up)] {
                    ensure(list.len() == above_bottom, || {
                        format!(
                            "drunet blocks.{name} needs a count for each of the {above_bottom} \
                             scales above the bottom, got {}",
                            list.len()
                        )
                    })?;
                }
                b.down
                    .iter()
                    .chain(&b.up)
                    .chain([&b.bottom])
                    .copied()
                    .collect()
            }
        };
        let most = counts.into_iter().max().unwrap_or(0);
        ensure(most <= MAX_BLOCKS, || {
            format!("drunet blocks must be at most {MAX_BLOCKS} per scale, got {most}")
        })
    }
}

/// The scale of a residual block's second conv at initialisation, relative to He's.
const RESIDUAL_START: f64 = 0.1;

#[derive(Debug)]
struct ResBlock(nn::Conv2D, nn::Conv2D);

impl ResBlock {
    fn new(p: nn::Path<'_>, w: i64, scale: f64, flops: &mut Flops) -> Self {
        let spec = ConvSpec::new(w, w, 3).bias(false).scale(scale);
        let (first, mut second) = (conv(&p / 0, spec, flops), conv(&p / 1, spec, flops));
        // Each block starts close to the identity: at full He scale every one of the dozens
        // of residual additions would double the signal's variance, and the first loss
        // would be in the millions.
        tch::no_grad(|| {
            let _ = second.ws.g_mul_scalar_(RESIDUAL_START);
        });
        Self(first, second)
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        x + self.1.forward(&self.0.forward(x).relu_())
    }
}

/// He's initialisation assumes a ReLU follows and doubles the variance to make up for it; the
/// resampling convs have none, so six of them would grow the signal eight-fold.
fn linear_gain(ws: &mut Tensor) {
    tch::no_grad(|| {
        let _ = ws.g_mul_scalar_(std::f64::consts::FRAC_1_SQRT_2);
    });
}

fn run(blocks: &[ResBlock], x: Tensor) -> Tensor {
    blocks.iter().fold(x, |h, b| b.forward(&h))
}

fn res_blocks(p: nn::Path<'_>, n: usize, w: i64, scale: f64, flops: &mut Flops) -> Vec<ResBlock> {
    (0..n)
        .map(|i| ResBlock::new(&p / i, w, scale, flops))
        .collect()
}

/// One scale of the way down: its blocks, then a 2x2 stride-2 conv to the next width.
#[derive(Debug)]
struct Down {
    blocks: Vec<ResBlock>,
    conv: nn::Conv2D,
}

/// One scale of the way up: a 2x2 stride-2 transposed conv from the width below, then blocks.
#[derive(Debug)]
struct Up {
    conv: nn::ConvTranspose2D,
    blocks: Vec<ResBlock>,
}

#[derive(Debug)]
pub struct Drunet {
    head: nn::Conv2D,
    down: Vec<Down>,
    bottom: Vec<ResBlock>,
    /// Deepest scale first.
    up: Vec<Up>,
    tail: nn::Conv2D,
    channels: i64,
    residual: bool,
    estimator: Option<Estimator>,
}

impl Drunet {
    pub fn new(p: &nn::Path<'_>, cfg: &DrunetConfig, flops: &mut Flops) -> Self {
        let w = &cfg.widths;
        let cin = cfg.channels + i64::from(cfg.noise_map);
        let head = conv(p / "head", ConvSpec::new(cin, w[0], 3).bias(false), flops);
        let strided = nn::ConvConfig {
            stride: 2,
            bias: false,
            ..Default::default()
        };
        let transposed = nn::ConvTransposeConfig {
            stride: 2,
            bias: false,
            ..Default::default()
        };
        let mut scale = 1.0;
        let mut down = Vec::new();
        for (i, pair) in w.windows(2).enumerate() {
            let pd = p / "down" / i;
            let n = cfg.blocks.down(i);
            let blocks = res_blocks(&pd / "blocks", n, pair[0], scale, flops);
            scale /= 4.0;
            // A 2x2 kernel per output pixel, counted at the output's resolution.
            flops.0 += 2.0 * (pair[0] * pair[1] * 4) as f64 * scale;
            let mut conv = nn::conv2d(&pd / "conv", pair[0], pair[1], 2, strided);
            linear_gain(&mut conv.ws);
            down.push(Down { blocks, conv });
        }
        let deepest = *w.last().expect("validated: at least one width");
        let bottom = res_blocks(p / "bottom", cfg.blocks.bottom(), deepest, scale, flops);
        let mut up = Vec::new();
        for (i, pair) in w.windows(2).rev().enumerate() {
            let pu = p / "up" / i;
            // Each input pixel spreads a 2x2 kernel, counted at the input's resolution.
            flops.0 += 2.0 * (pair[0] * pair[1] * 4) as f64 * scale;
            let mut conv = nn::conv_transpose2d(&pu / "conv", pair[1], pair[0], 2, transposed);
            linear_gain(&mut conv.ws);
            scale *= 4.0;
            // `up` is built deepest first; its counts are listed full resolution first.
            let n = cfg.blocks.up(w.len() - 2 - i);
            let blocks = res_blocks(&pu / "blocks", n, pair[0], scale, flops);
            up.push(Up { conv, blocks });
        }
        let mut tail = conv(
            p / "tail",
            ConvSpec::new(w[0], cfg.channels, 3).bias(false),
            flops,
        );
        // The skips add up every scale's features, so the tail starts small too: a fresh
        // network then returns about its input, not noise of several times its range.
        tch::no_grad(|| {
            let _ = tail.ws.g_mul_scalar_(RESIDUAL_START);
        });
        let estimator = cfg
            .estimator
            .as_ref()
            .map(|e| Estimator::new(&(p / "estimator"), 4 * cfg.channels, e, flops));
        Self {
            head,
            down,
            bottom,
            up,
            tail,
            channels: cfg.channels,
            residual: cfg.residual,
            estimator,
        }
    }
}

impl Net for Drunet {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Tensor {
        let filled;
        let x = match &self.estimator {
            Some(e) => {
                let image = x.narrow(1, 0, self.channels);
                let map = x.narrow(1, self.channels, 1);
                let (h, w) = (x.size()[2], x.size()[3]);
                // The reading is at half resolution; each value covers its 2x2 block.
                let read =
                    e.forward(&image.pixel_unshuffle(2))
                        .upsample_nearest2d([h, w], None, None);
                let map = map.where_self(&map.ge(0.0), &read.to_kind(map.kind()));
                filled = Tensor::cat(&[&image, &map], 1);
                &filled
            }
            None => x,
        };
        let first = self.head.forward(x);
        let mut skips = Vec::with_capacity(self.down.len());
        let mut h = first.shallow_clone();
        for d in &self.down {
            h = d.conv.forward(&run(&d.blocks, h));
            skips.push(h.shallow_clone());
        }
        h = run(&self.bottom, h);
        for (u, skip) in self.up.iter().zip(skips.iter().rev()) {
            h = run(&u.blocks, u.conv.forward(&(h + skip)));
        }
        let out = self.tail.forward(&(h + first));
        if self.residual {
            x.narrow(1, 0, self.channels) - out
        } else {
            out
        }
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
    use crate::model::sigma_map;
    use crate::{Model, ModelConfig};
    use tch::{Device, Kind};

    #[test]
    fn the_papers_widths_give_the_papers_weight_count() {
        let _rng = crate::test_rng_lock();
        // DRUNet as published (64-512, four blocks per scale, colour, bias-free, with the
        // level map): the paper gives 32.64M weights; this is the exact count of that layout.
        let cfg = ModelConfig::Drunet(DrunetConfig::default());
        let model = Model::new(&cfg, Device::Cpu).unwrap();
        assert_eq!(model.num_params(), 32_640_960);
    }

    #[test]
    fn flops_count_every_scale_at_its_resolution() {
        let _rng = crate::test_rng_lock();
        let cfg = DrunetConfig {
            widths: vec![8, 16],
            blocks: Blocks::Uniform(1),
            ..Default::default()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let mut flops = Flops::default();
        let _ = Drunet::new(&vs.root(), &cfg, &mut flops);
        let mac = |cin: f64, cout: f64, k: f64, scale: f64| 2.0 * cin * cout * k * k * scale;
        let expected = mac(4.0, 8.0, 3.0, 1.0) // head
            + 2.0 * mac(8.0, 8.0, 3.0, 1.0) // down block
            + mac(8.0, 16.0, 2.0, 0.25) // strided conv
            + 2.0 * mac(16.0, 16.0, 3.0, 0.25) // bottom block
            + mac(16.0, 8.0, 2.0, 0.25) // transposed conv
            + 2.0 * mac(8.0, 8.0, 3.0, 1.0) // up block
            + mac(8.0, 3.0, 3.0, 1.0); // tail
        assert_eq!(flops.0, expected);
    }

    #[test]
    fn a_zero_network_returns_its_input_and_sizes_pad_to_the_deepest_scale() {
        let _rng = crate::test_rng_lock();
        let cfg = ModelConfig::Drunet(DrunetConfig {
            widths: vec![4, 8, 8],
            blocks: Blocks::Uniform(1),
            ..Default::default()
        });
        assert_eq!(cfg.multiple(), 4);
        let model = Model::new(&cfg, Device::Cpu).unwrap();
        tch::no_grad(|| {
            for (_, mut v) in model.var_store().variables() {
                let _ = v.zero_();
            }
        });
        let x = Tensor::rand([1, 3, 13, 10], (Kind::Float, Device::Cpu));
        let map = sigma_map(1, 13, 10, 25.0, Device::Cpu);
        let y = model.forward_t(&x, Some(&map), false);
        assert!(
            y.equal(&x),
            "residual output with zero weights must be the input"
        );
    }

    #[test]
    fn a_fresh_network_changes_its_input_by_a_modest_amount() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(0);
        let cfg = ModelConfig::Drunet(DrunetConfig {
            widths: vec![16, 32, 64, 128],
            blocks: Blocks::Uniform(2),
            ..Default::default()
        });
        let model = Model::new(&cfg, Device::Cpu).unwrap();
        let x = Tensor::rand([1, 3, 64, 64], (Kind::Float, Device::Cpu));
        let map = sigma_map(1, 64, 64, 25.0, Device::Cpu);
        let y = tch::no_grad(|| model.forward_t(&x, Some(&map), false));
        let rms = (y - &x).square().mean(Kind::Float).sqrt().double_value(&[]);
        // With He's scale throughout, this was in the thousands; FFDNet starts near 0.26.
        assert!(rms < 0.5, "rms change {rms}");
    }

    #[test]
    fn an_estimator_reads_the_level_only_where_none_is_given() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(4);
        let cfg: ModelConfig = serde_json::from_str(
            r#"{"kind":"drunet","widths":[8,16],"blocks":1,"estimator":{"depth":3,"features":4}}"#,
        )
        .unwrap();
        assert!(cfg.estimates_level());
        assert_eq!(cfg.multiple(), 2);
        let model = Model::new(&cfg, Device::Cpu).unwrap();
        // Trained-looking weights, so that the level steers the output.
        tch::no_grad(|| {
            for (name, mut v) in model.var_store().variables() {
                if !name.starts_with("estimator.") {
                    v.copy_(&(v.randn_like() * 0.1));
                }
            }
        });
        let x = Tensor::rand([1, 3, 18, 22], (Kind::Float, Device::Cpu));
        crate::estimator::assert_reads_only_where_none_given(&model, &x);
        let read = model.read_level(&x).unwrap().expect("it has an estimator");
        assert_eq!(read.size(), [1, 1, 9, 11]);
        assert!((read - ESTIMATOR_START).abs().max().double_value(&[]) < 1e-6);
        // The branch's weights sit apart from the body's, so training can freeze the body.
        let names: Vec<String> = model.var_store().variables().into_keys().collect();
        assert!(names.iter().any(|n| n == "estimator.0.weight"));
        assert!(names.iter().all(|n| {
            n.starts_with("estimator.")
                || ["head.", "down.", "bottom.", "up.", "tail."]
                    .iter()
                    .any(|p| n.starts_with(p))
        }));
        assert_eq!(cfg.without_estimator().estimator(), None);
    }

    #[test]
    fn a_scale_without_blocks_computes_what_zeroed_blocks_do() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(7);
        let full = ModelConfig::Drunet(DrunetConfig {
            widths: vec![4, 8, 8],
            blocks: Blocks::Uniform(2),
            ..Default::default()
        });
        let cfg: ModelConfig = serde_json::from_str(
            r#"{"kind":"drunet","widths":[4,8,8],"blocks":{"down":[2,1],"bottom":0,"up":[2,0]}}"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        let (a, b) = (
            Model::new(&full, Device::Cpu).unwrap(),
            Model::new(&cfg, Device::Cpu).unwrap(),
        );
        let kept = b.var_store().variables();
        let gone = [
            "down.1.blocks.1.1.weight",
            "bottom.0.1.weight",
            "bottom.1.1.weight",
            "up.0.blocks.0.1.weight",
            "up.0.blocks.1.1.weight",
        ];
        tch::no_grad(|| {
            for (name, mut v) in a.var_store().variables() {
                v.copy_(&(v.randn_like() * 0.1));
                match kept.get(&name) {
                    Some(k) => {
                        let mut k = k.shallow_clone();
                        k.copy_(&v);
                    }
                    // A block whose second conv is zero passes its input through.
                    None if name.ends_with(".1.weight") => {
                        assert!(gone.contains(&name.as_str()), "{name}");
                        let _ = v.zero_();
                    }
                    None => {}
                }
            }
        });
        // Five second convs and their five first convs are not built; `up` is deepest first.
        assert_eq!(a.var_store().variables().len() - kept.len(), 10);
        assert!(kept.contains_key("up.1.blocks.1.0.weight"));
        let x = Tensor::rand([1, 3, 8, 12], (Kind::Float, Device::Cpu));
        let map = sigma_map(1, 8, 12, 25.0, Device::Cpu);
        let (ya, yb) = tch::no_grad(|| {
            (
                a.forward_t(&x, Some(&map), false),
                b.forward_t(&x, Some(&map), false),
            )
        });
        assert!(!ya.allclose(&x, 1e-3, 1e-3, false), "the weights must act");
        assert!(ya.allclose(&yb, 1e-6, 1e-6, false));
        // A uniform count round-trips as a number, per-scale counts as a table.
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(
            json.contains(r#""blocks":{"down":[2,1],"bottom":0,"up":[2,0]}"#),
            "{json}"
        );
        assert!(
            serde_json::to_string(&full)
                .unwrap()
                .contains(r#""blocks":2"#)
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        for (json, message) in [
            (r#"{"kind":"drunet","widths":[]}"#, "1 to 6 widths"),
            (r#"{"kind":"drunet","widths":[8,0]}"#, "must be positive"),
            (r#"{"kind":"drunet","blocks":17}"#, "at most 16"),
            (
                r#"{"kind":"drunet","widths":[8,16],"blocks":{"down":[1],"bottom":17,"up":[1]}}"#,
                "at most 16",
            ),
            (
                r#"{"kind":"drunet","widths":[8,16,32],"blocks":{"down":[1],"bottom":1,"up":[1,1]}}"#,
                "blocks.down needs a count for each of the 2",
            ),
            (
                r#"{"kind":"drunet","noise_map":false,"estimator":{}}"#,
                "needs noise_map",
            ),
            (
                r#"{"kind":"drunet","estimator":{"smooth":4}}"#,
                "smooth must be an odd",
            ),
        ] {
            let cfg: ModelConfig = serde_json::from_str(json).unwrap();
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(message), "{json}: {err}");
        }
    }
}
