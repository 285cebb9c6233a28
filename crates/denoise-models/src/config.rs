//! [`ModelKind`] (a model's name) and [`ModelConfig`] (its serde config, saved beside the
//! weights), and the [`Net`] trait every network implements.

use crate::layers::Flops;
use crate::{ModelError, Result};
use serde::{Deserialize, Serialize};
use tch::{Tensor, nn};

pub use crate::autoencoder::AutoencoderConfig;
pub use crate::dncnn::DncnnConfig;
pub use crate::drunet::DrunetConfig;
pub use crate::ffdnet::FfdnetConfig;
pub use crate::ridnet::RidnetConfig;
pub use crate::unet::UnetConfig;

/// A network body. [`crate::Model`] pads inputs to [`ModelConfig::multiple`], concatenates the
/// noise-level map when the config asks for one, and crops the output back.
pub trait Net: std::fmt::Debug + Send {
    /// # Shapes
    /// `x`: N x (C + m) x H x W, where C is the image channels, m is 1 with a noise-level map
    /// (its last channel) and 0 without, and H, W are multiples of [`ModelConfig::multiple`].
    /// Returns the denoised image, N x C x H x W.
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor;

    /// The noise level a network with its own estimator reads from the image, on the `[0, 1]`
    /// scale, as its body is told it; `None` for a network without one.
    ///
    /// # Shapes
    /// `x`: N x C x H x W, the image alone, H and W multiples of [`ModelConfig::multiple`].
    /// Returns N x 1 x H/k x W/k at the estimator's resolution (FFDNet: k = 2).
    fn read_level(&self, _x: &Tensor) -> Option<Tensor> {
        None
    }
}

/// The model families, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Autoencoder,
    Unet,
    Ridnet,
    Dncnn,
    Ffdnet,
    Drunet,
}

impl ModelKind {
    pub const ALL: [ModelKind; 6] = [
        ModelKind::Autoencoder,
        ModelKind::Unet,
        ModelKind::Ridnet,
        ModelKind::Dncnn,
        ModelKind::Ffdnet,
        ModelKind::Drunet,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Autoencoder => "autoencoder",
            ModelKind::Unet => "unet",
            ModelKind::Ridnet => "ridnet",
            ModelKind::Dncnn => "dncnn",
            ModelKind::Ffdnet => "ffdnet",
            ModelKind::Drunet => "drunet",
        }
    }

    /// The default (paper / reference) config of this kind for `channels` (1 or 3).
    pub fn default_config(self, channels: i64) -> ModelConfig {
        match self {
            ModelKind::Autoencoder => ModelConfig::Autoencoder(AutoencoderConfig {
                channels,
                ..Default::default()
            }),
            ModelKind::Unet => ModelConfig::Unet(UnetConfig {
                channels,
                ..Default::default()
            }),
            ModelKind::Ridnet => ModelConfig::Ridnet(RidnetConfig {
                channels,
                ..Default::default()
            }),
            ModelKind::Dncnn => ModelConfig::Dncnn(DncnnConfig {
                channels,
                ..Default::default()
            }),
            ModelKind::Ffdnet => ModelConfig::Ffdnet(FfdnetConfig::for_channels(channels)),
            ModelKind::Drunet => ModelConfig::Drunet(DrunetConfig {
                channels,
                ..Default::default()
            }),
        }
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ModelKind {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        match lower.as_str() {
            "ae" | "autoencoder" => Ok(ModelKind::Autoencoder),
            "unet" | "u-net" => Ok(ModelKind::Unet),
            "ridnet" => Ok(ModelKind::Ridnet),
            "dncnn" => Ok(ModelKind::Dncnn),
            "ffdnet" => Ok(ModelKind::Ffdnet),
            "drunet" => Ok(ModelKind::Drunet),
            _ => Err(ModelError::UnknownKind {
                name: s.to_owned(),
                known: ModelKind::ALL.map(ModelKind::name).join(", "),
            }),
        }
    }
}

/// A model's full architecture config, tagged by kind: `{"kind": "ridnet", ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelConfig {
    Autoencoder(AutoencoderConfig),
    Unet(UnetConfig),
    Ridnet(RidnetConfig),
    Dncnn(DncnnConfig),
    Ffdnet(FfdnetConfig),
    Drunet(DrunetConfig),
}

impl ModelConfig {
    pub fn kind(&self) -> ModelKind {
        match self {
            ModelConfig::Autoencoder(_) => ModelKind::Autoencoder,
            ModelConfig::Unet(_) => ModelKind::Unet,
            ModelConfig::Ridnet(_) => ModelKind::Ridnet,
            ModelConfig::Dncnn(_) => ModelKind::Dncnn,
            ModelConfig::Ffdnet(_) => ModelKind::Ffdnet,
            ModelConfig::Drunet(_) => ModelKind::Drunet,
        }
    }

    /// The gray twin of a colour FFDNet or DRUNet (what [`crate::gray::gray_from_colour`]
    /// builds); `None` for any other model.
    pub fn gray_twin(&self) -> Option<ModelConfig> {
        match self {
            ModelConfig::Ffdnet(c) => c.gray_twin().map(ModelConfig::Ffdnet),
            ModelConfig::Drunet(c) => c.gray_twin().map(ModelConfig::Drunet),
            _ => None,
        }
    }

    /// Image channels (1 gray, 3 RGB).
    pub fn channels(&self) -> i64 {
        match self {
            ModelConfig::Autoencoder(c) => c.channels,
            ModelConfig::Unet(c) => c.channels,
            ModelConfig::Ridnet(c) => c.channels,
            ModelConfig::Dncnn(c) => c.channels,
            ModelConfig::Ffdnet(c) => c.channels,
            ModelConfig::Drunet(c) => c.channels,
        }
    }

    /// Whether the model takes a noise-level map (FFDNet-style) as an extra input channel.
    pub fn noise_map(&self) -> bool {
        match self {
            ModelConfig::Autoencoder(c) => c.noise_map,
            ModelConfig::Unet(c) => c.noise_map,
            ModelConfig::Ridnet(c) => c.noise_map,
            ModelConfig::Dncnn(c) => c.noise_map,
            ModelConfig::Ffdnet(_) => true,
            ModelConfig::Drunet(c) => c.noise_map,
        }
    }

    /// The model's level-estimation branch, if it has one (FFDNet and DRUNet can).
    pub fn estimator(&self) -> Option<&crate::estimator::EstimatorConfig> {
        match self {
            ModelConfig::Ffdnet(c) => c.estimator.as_ref(),
            ModelConfig::Drunet(c) => c.estimator.as_ref(),
            _ => None,
        }
    }

    /// Whether the model reads the noise level itself where it is not given one (a model with
    /// an estimator): blind use passes no map, or [`crate::estimator::ESTIMATE_HERE`].
    pub fn estimates_level(&self) -> bool {
        self.estimator().is_some()
    }

    /// Whether this is `from` with some of its DRUNet residual blocks left out (fewer at one
    /// scale or more, everything else the same), so that it can start from `from`'s weights:
    /// each scale keeps its first blocks, and the output changes only by what the others did.
    pub fn prunes(&self, from: &ModelConfig) -> bool {
        match (self, from) {
            (ModelConfig::Drunet(a), ModelConfig::Drunet(b)) => a.prunes(b),
            _ => false,
        }
    }

    /// Why a model of `white` cannot be this one's white-noise model
    /// ([`crate::Denoiser::with_white_noise_model`]); `None` when it can.
    pub fn white_noise_pair_problem(&self, white: &ModelConfig) -> Option<&'static str> {
        if !self.estimates_level() {
            Some("only a model that reads the noise level itself takes a white-noise model")
        } else if !white.noise_map() || white.estimates_level() {
            Some(
                "a white-noise model is given the classical level: it must take one, and not read its own",
            )
        } else if self.channels() != white.channels() {
            Some("a model and its white-noise model must denoise the same channels")
        } else {
            None
        }
    }

    /// The same model without its level-estimation branch (itself when it has none).
    pub fn without_estimator(&self) -> ModelConfig {
        match self {
            ModelConfig::Ffdnet(c) => ModelConfig::Ffdnet(FfdnetConfig {
                estimator: None,
                ..c.clone()
            }),
            ModelConfig::Drunet(c) => ModelConfig::Drunet(DrunetConfig {
                estimator: None,
                ..c.clone()
            }),
            other => other.clone(),
        }
    }

    /// For a model with its own level estimator, the rows of context and the alignment its
    /// reading needs when an image is read in strips ([`crate::estimator::EstimatorConfig`]).
    pub(crate) fn estimator_view(&self) -> Option<(usize, usize)> {
        self.estimator().map(|e| e.view())
    }

    /// Input height and width must be multiples of this (the model pads to it).
    pub fn multiple(&self) -> i64 {
        match self {
            ModelConfig::Autoencoder(c) => 1 << c.widths.len(),
            ModelConfig::Unet(c) => 1 << c.levels,
            ModelConfig::Ridnet(_) | ModelConfig::Dncnn(_) => 1,
            ModelConfig::Ffdnet(_) => 2,
            ModelConfig::Drunet(c) => c.multiple(),
        }
    }

    /// Checks the numbers before anything is built.
    pub fn validate(&self) -> Result<()> {
        let channels = self.channels();
        if channels != 1 && channels != 3 {
            return Err(ModelError::Config(format!(
                "channels must be 1 or 3, got {channels}"
            )));
        }
        match self {
            ModelConfig::Autoencoder(c) => c.validate(),
            ModelConfig::Unet(c) => c.validate(),
            ModelConfig::Ridnet(c) => c.validate(),
            ModelConfig::Dncnn(c) => c.validate(),
            ModelConfig::Ffdnet(c) => c.validate(),
            ModelConfig::Drunet(c) => c.validate(),
        }
    }

    /// Builds the network's variables under `p`, returning it and its FLOPs per input pixel.
    pub(crate) fn build(&self, p: &nn::Path<'_>) -> Result<(Box<dyn Net>, Flops)> {
        self.validate()?;
        let mut flops = Flops::default();
        let net: Box<dyn Net> = match self {
            ModelConfig::Autoencoder(c) => {
                Box::new(crate::autoencoder::Autoencoder::new(p, c, &mut flops))
            }
            ModelConfig::Unet(c) => Box::new(crate::unet::Unet::new(p, c, &mut flops)),
            ModelConfig::Ridnet(c) => Box::new(crate::ridnet::Ridnet::new(p, c, &mut flops)),
            ModelConfig::Dncnn(c) => Box::new(crate::dncnn::Dncnn::new(p, c, &mut flops)),
            ModelConfig::Ffdnet(c) => Box::new(crate::ffdnet::Ffdnet::new(p, c, &mut flops)),
            ModelConfig::Drunet(c) => Box::new(crate::drunet::Drunet::new(p, c, &mut flops)),
        };
        Ok((net, flops))
    }
}

/// Fails with a config error unless `ok`.
pub(crate) fn ensure(ok: bool, message: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(ModelError::Config(message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_print() {
        for kind in ModelKind::ALL {
            assert_eq!(kind.name().parse::<ModelKind>().unwrap(), kind);
        }
        assert_eq!("AE".parse::<ModelKind>().unwrap(), ModelKind::Autoencoder);
        let err = "resnet".parse::<ModelKind>().unwrap_err().to_string();
        assert!(
            err.contains("unknown model 'resnet'") && err.contains("ridnet"),
            "{err}"
        );
    }

    #[test]
    fn config_json_is_tagged_and_round_trips() {
        for kind in ModelKind::ALL {
            let cfg = kind.default_config(3);
            let json = serde_json::to_string(&cfg).unwrap();
            assert!(
                json.contains(&format!("\"kind\":\"{}\"", kind.name())),
                "{json}"
            );
            assert_eq!(serde_json::from_str::<ModelConfig>(&json).unwrap(), cfg);
        }
        let partial: ModelConfig = serde_json::from_str(r#"{"kind":"unet","levels":2}"#).unwrap();
        assert_eq!(partial.multiple(), 4);
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(ModelKind::Ridnet.default_config(2).validate().is_err());
        let cfg: ModelConfig = serde_json::from_str(r#"{"kind":"unet","levels":0}"#).unwrap();
        assert!(cfg.validate().is_err());
    }
}
