//! [`Model`]: a network with its variables and config; pads any input to the size the network
//! needs, adds the noise-level map, and runs at the chosen precision and memory format.

use crate::config::{ModelConfig, Net};
use crate::layers::{crop_to, pad_to_multiple};
use crate::perf::{Layout, Precision, to_channels_last};
use crate::{ModelError, Result};
use tch::{Device, Kind, Tensor, nn};

/// A built network: its `VarStore`, config and cost.
#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    vs: nn::VarStore,
    net: Box<dyn Net>,
    flops_per_pixel: f64,
    precision: Precision,
}

impl Model {
    /// Builds `config` with freshly initialised weights on `device` (seed with
    /// `tch::manual_seed` first for reproducible weights).
    pub fn new(config: &ModelConfig, device: Device) -> Result<Self> {
        let vs = nn::VarStore::new(device);
        let (net, flops) = config.build(&vs.root())?;
        Ok(Self {
            config: config.clone(),
            vs,
            net,
            flops_per_pixel: flops.0,
            precision: Precision::Fp32,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
    pub fn device(&self) -> Device {
        self.vs.device()
    }
    pub fn precision(&self) -> Precision {
        self.precision
    }
    /// Floating-point operations of one forward pass per input pixel (2 per multiply-add).
    pub fn flops_per_pixel(&self) -> f64 {
        self.flops_per_pixel
    }
    /// The widest feature map of the network (channels at full resolution), for memory estimates.
    pub fn widest_features(&self) -> i64 {
        match &self.config {
            ModelConfig::Autoencoder(c) => c.widths.first().copied().unwrap_or(64),
            ModelConfig::Unet(c) => 2 * c.base,
            ModelConfig::Ridnet(c) => 2 * c.features,
            ModelConfig::Dncnn(c) => c.features,
            ModelConfig::Ffdnet(c) => c.features / 4 + 1,
            ModelConfig::Drunet(c) => c.widths.first().copied().unwrap_or(64),
        }
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(Tensor::numel)
            .map(|n| n as i64)
            .sum()
    }

    /// Casts the weights to `precision` and lays 4-D weights out channels-last, the fast path
    /// of libtorch's CPU convolutions (bf16 pays off with AMX/AVX512-BF16; see [`crate::perf`]).
    pub fn set_precision(&mut self, precision: Precision) {
        match precision {
            Precision::Fp32 => self.vs.float(),
            Precision::Bf16 => self.vs.bfloat16(),
        }
        self.precision = precision;
        self.set_channels_last();
    }

    /// Lays 4-D weights out channels-last in place (values unchanged).
    pub fn set_channels_last(&mut self) {
        self.set_layout(Layout::ChannelsLast);
    }

    /// Lays 4-D weights out in `layout` in place (values unchanged).
    pub fn set_layout(&mut self, layout: Layout) {
        tch::no_grad(|| {
            for (_, mut var) in self.vs.variables() {
                if var.dim() == 4 {
                    let laid = layout.apply(&var);
                    var.set_data(&laid);
                }
            }
        });
    }

    /// Runs the network, keeping the autograd graph when `train` (the train crate's entry).
    ///
    /// # Shapes
    /// `noisy`: N x C x H x W, any H and W; `sigma`: N x 1 x H x W noise-level map on the
    /// [0, 1] scale, required when [`ModelConfig::noise_map`] and ignored otherwise.
    /// Returns N x C x H x W.
    pub fn forward_t(&self, noisy: &Tensor, sigma: Option<&Tensor>, train: bool) -> Tensor {
        let (h, w) = (noisy.size()[2], noisy.size()[3]);
        let input = match (self.config.noise_map(), sigma) {
            (true, Some(map)) => Tensor::cat(&[noisy, &map.to_kind(noisy.kind())], 1),
            (true, None) if self.config.estimates_level() => {
                let map = Tensor::full(
                    [noisy.size()[0], 1, h, w],
                    f64::from(crate::estimator::ESTIMATE_HERE),
                    (noisy.kind(), noisy.device()),
                );
                Tensor::cat(&[noisy, &map], 1)
            }
            (true, None) => panic!("{} takes a noise-level map: pass sigma", self.config.kind()),
            (false, _) => noisy.shallow_clone(),
        };
        let padded = pad_to_multiple(&input, self.config.multiple());
        crop_to(&self.net.forward_t(&padded, train), h, w)
    }

    /// The network body alone (no padding or noise-map handling), as TorchScript export traces it.
    ///
    /// # Shapes
    /// `x`: N x (C + m) x H x W with H, W multiples of [`ModelConfig::multiple`]; returns N x C x H x W.
    pub fn net_forward(&self, x: &Tensor) -> Tensor {
        self.net.forward_t(x, false)
    }

    /// Denoises a batch for inference: checks the input, runs without autograd at the model's
    /// precision in channels-last, and returns fp32 contiguous output. libtorch errors
    /// (out-of-memory included) come back as `Err`, never as a panic.
    ///
    /// # Shapes
    /// `noisy`: N x C x H x W in [0, 1] (noise may leave that range); `sigma`: N x 1 x H x W.
    pub fn denoise(&self, noisy: &Tensor, sigma: Option<&Tensor>) -> Result<Tensor> {
        let size = noisy.size();
        let channels = self.config.channels();
        if size.len() != 4 || size[1] != channels || size[2] == 0 || size[3] == 0 {
            return Err(ModelError::Input(format!(
                "expected N x {channels} x H x W, got {size:?} ({} model)",
                self.config.kind()
            )));
        }
        if self.config.noise_map() && !self.config.estimates_level() && sigma.is_none() {
            return Err(ModelError::Input(format!(
                "the {} model takes a noise level: give a sigma (or 'auto')",
                self.config.kind()
            )));
        }
        let device = self.device();
        let kind = self.precision.kind();
        guarded(|| {
            tch::no_grad(|| -> Result<Tensor> {
                let x = to_channels_last(&noisy.f_to_device(device)?.f_to_kind(kind)?);
                let map = sigma.map(|s| s.to_device(device).to_kind(kind));
                let out = self.forward_t(&x, map.as_ref(), false);
                Ok(out.f_to_kind(Kind::Float)?.f_contiguous()?)
            })
        })
    }

    /// The noise level a model with its own estimator reads from `noisy` (what blind use tells
    /// its body), on the `[0, 1]` scale; `None` for other models. Runs as [`Self::denoise`]
    /// does: no autograd, the model's precision, errors as `Err`.
    ///
    /// # Shapes
    /// `noisy`: N x C x H x W, any H and W. Returns N x 1 x ceil(H/k) x ceil(W/k), k being the
    /// estimator's resolution (FFDNet: 2).
    pub fn read_level(&self, noisy: &Tensor) -> Result<Option<Tensor>> {
        if !self.config.estimates_level() {
            return Ok(None);
        }
        let device = self.device();
        let kind = self.precision.kind();
        let (h, w) = (noisy.size()[2], noisy.size()[3]);
        guarded(|| {
            tch::no_grad(|| -> Result<Option<Tensor>> {
                let x = to_channels_last(&noisy.f_to_device(device)?.f_to_kind(kind)?);
                let padded = pad_to_multiple(&x, self.config.multiple());
                let Some(level) = self.net.read_level(&padded) else {
                    return Ok(None);
                };
                // The padded rows and columns are cut off at the level's own resolution.
                let k = padded.size()[2] / level.size()[2];
                let level = crop_to(&level, (h + k - 1) / k, (w + k - 1) / k);
                Ok(Some(level.f_to_kind(Kind::Float)?.f_contiguous()?))
            })
        })
    }
}

/// Runs `run`, turning a libtorch panic into an error. Plain tch ops panic on libtorch errors
/// (out-of-memory included): caught here, the edge, a caller can retry with a smaller tile.
fn guarded<T>(run: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown libtorch failure".to_owned());
            Err(ModelError::Torch(tch::TchError::Torch(message)))
        }
    }
}

/// A constant noise-level map: `sigma` on the 0-255 scale, as N x 1 x H x W on the [0, 1] scale.
pub fn sigma_map(n: i64, h: i64, w: i64, sigma: f64, device: Device) -> Tensor {
    Tensor::full([n, 1, h, w], sigma / 255.0, (Kind::Float, device))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelKind;

    fn small(kind: ModelKind, channels: i64) -> ModelConfig {
        let json = match kind {
            ModelKind::Autoencoder => r#"{"kind":"autoencoder","widths":[8,16]}"#,
            ModelKind::Unet => r#"{"kind":"unet","base":8,"levels":2}"#,
            ModelKind::Ridnet => r#"{"kind":"ridnet","features":16,"blocks":1,"reduction":1}"#,
            ModelKind::Dncnn => r#"{"kind":"dncnn","depth":4,"features":8}"#,
            ModelKind::Ffdnet => r#"{"kind":"ffdnet","depth":4,"features":8}"#,
            ModelKind::Drunet => r#"{"kind":"drunet","widths":[8,16,16],"blocks":1}"#,
        };
        let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
        v["channels"] = channels.into();
        serde_json::from_value(v).unwrap()
    }

    fn input(n: i64, c: i64, h: i64, w: i64) -> Tensor {
        Tensor::rand([n, c, h, w], (Kind::Float, Device::Cpu))
    }

    #[test]
    fn output_shape_equals_input_shape_for_odd_sizes_and_gray() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(0);
        for kind in ModelKind::ALL {
            for channels in [3, 1] {
                let cfg = small(kind, channels);
                let model = Model::new(&cfg, Device::Cpu).unwrap();
                let x = input(1, channels, 33, 47);
                let map = sigma_map(1, 33, 47, 25.0, Device::Cpu);
                let y = model.forward_t(&x, Some(&map), false);
                assert_eq!(
                    y.size(),
                    [1, channels, 33, 47],
                    "{kind} with {channels} channels"
                );
            }
        }
    }

    #[test]
    fn gradients_reach_every_parameter() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(1);
        for kind in ModelKind::ALL {
            let model = Model::new(&small(kind, 3), Device::Cpu).unwrap();
            let x = input(2, 3, 16, 16);
            let map = sigma_map(2, 16, 16, 25.0, Device::Cpu);
            let loss = model
                .forward_t(&x, Some(&map), true)
                .square()
                .mean(Kind::Float);
            loss.backward();
            for (name, var) in model.var_store().variables() {
                if !var.requires_grad() {
                    continue;
                }
                let grad = var.grad();
                assert!(grad.defined(), "{kind}: no gradient for {name}");
                let norm = grad.abs().sum(Kind::Float).double_value(&[]);
                assert!(norm > 0.0, "{kind}: zero gradient for {name}");
            }
        }
    }

    #[test]
    fn forward_is_deterministic_for_a_seed() {
        let _rng = crate::test_rng_lock();
        let run = || {
            tch::manual_seed(7);
            let model = Model::new(&small(ModelKind::Ridnet, 3), Device::Cpu).unwrap();
            tch::manual_seed(8);
            model.denoise(&input(1, 3, 20, 21), None).unwrap()
        };
        assert!(run().equal(&run()));
    }

    #[test]
    fn bf16_agrees_with_fp32() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(3);
        let mut model = Model::new(&small(ModelKind::Dncnn, 3), Device::Cpu).unwrap();
        let x = input(1, 3, 32, 32);
        let fp32 = model.denoise(&x, None).unwrap();
        model.set_precision(Precision::Bf16);
        let bf16 = model.denoise(&x, None).unwrap();
        let diff = (&fp32 - &bf16).abs().max().double_value(&[]);
        // bf16 keeps 8 mantissa bits (relative error 2^-9 per op); over a few layers on [0, 1]
        // data the outputs stay within 2e-2 of fp32.
        assert!(diff < 2e-2, "max |fp32 - bf16| = {diff}");
        model.set_precision(Precision::Fp32);
        let back = model.denoise(&x, None).unwrap();
        assert!((&fp32 - &back).abs().max().double_value(&[]) < 2e-2);
    }

    #[test]
    fn denoise_checks_its_input() {
        let _rng = crate::test_rng_lock();
        let model = Model::new(&small(ModelKind::Ffdnet, 3), Device::Cpu).unwrap();
        let err = model
            .denoise(&input(1, 1, 8, 8), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected N x 3 x H x W"), "{err}");
        let err = model
            .denoise(&input(1, 3, 8, 8), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("noise level"), "{err}");
    }

    #[test]
    fn reference_parameter_counts() {
        let _rng = crate::test_rng_lock();
        // Counts printed by shared/reference/models.py (PyTorch) for the same architectures;
        // RIDNet's 1,499,347 excludes the 24 mean-shift parameters, fixed constants here.
        let count = |cfg: ModelConfig| Model::new(&cfg, Device::Cpu).unwrap().num_params();
        assert_eq!(count(ModelKind::Ridnet.default_config(3)), 1_499_347);
        assert_eq!(count(ModelKind::Unet.default_config(3)), 31_031_875);
        assert_eq!(count(ModelKind::Autoencoder.default_config(3)), 741_379);
        assert_eq!(count(ModelKind::Dncnn.default_config(3)), 558_400);
    }
}
