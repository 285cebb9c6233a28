//! The noise-level policy: what level a model that takes one is told for an image (given,
//! estimated from the image, or a per-pixel map), scaled for a gray <-> colour conversion, and
//! what is reported of it.

use crate::ModelConfig;
use denoise_data::Image;
use denoise_data::estimate::{self, NoiseEstimate};

/// The noise level given to a model that takes a noise-level map (others ignore it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NoiseLevel<'a> {
    /// Estimate the level from the image (`denoise_data::estimate::estimate_noise`): blind use.
    /// A colour image whose noise reads as independent across channels gets a map that follows
    /// its brightness; others one level.
    Estimate,
    /// A uniform level on the 0-255 scale.
    Uniform(f32),
    /// A per-pixel map of standard deviations on the `[0, 1]` scale, `h x w`.
    Map(&'a [f32]),
}

/// The noise level a model that takes one was given, when it was not given a map (0-255 scale).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LevelUsed {
    /// The level given or estimated; for a map estimated from brightness, its root mean square
    /// over the pixels.
    pub sigma: f32,
    /// The least and the greatest level of a map estimated from brightness; `None` for one
    /// level.
    pub range: Option<(f32, f32)>,
    /// Estimated for noise the colour channels share (`NoiseEstimate::Shared`): Immerkær's
    /// filter, which also reads texture, so the level is least sure.
    pub shared: bool,
}

impl LevelUsed {
    pub(crate) fn uniform(sigma: f32) -> Self {
        Self {
            sigma,
            range: None,
            shared: false,
        }
    }

    /// The summary of a map on the [0, 1] scale.
    fn of_map(map: &[f32]) -> Self {
        let mean_square = map
            .iter()
            .map(|&s| f64::from(s) * f64::from(s))
            .sum::<f64>()
            / map.len().max(1) as f64;
        let (lo, hi) = map.iter().fold((f32::INFINITY, 0.0f32), |(lo, hi), &s| {
            (lo.min(s), hi.max(s))
        });
        Self {
            sigma: (mean_square.sqrt() * 255.0) as f32,
            range: Some((lo.min(hi) * 255.0, hi * 255.0)),
            shared: false,
        }
    }
}

impl std::fmt::Display for LevelUsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1}", self.sigma)?;
        if let Some((lo, hi)) = self.range {
            write!(f, " (from {lo:.1} to {hi:.1} with brightness)")?;
        }
        Ok(())
    }
}

/// The map a model of `config` is given for `image` (on the `[0, 1]` scale, `h x w`, as the
/// model sees the image once converted to its channels; `None` for a model that takes no level
/// or reads it itself), and the level used, when the model was not given a map.
///
/// Noise levels, given or estimated, are the image's own (per channel, as it comes in). The map
/// is that level times [`conversion_noise_gain`] when the image is converted: a colour model
/// shown a gray image sees the same noise in all three channels, which it reads as it would
/// independent noise sqrt(3) times stronger.
pub fn model_map(
    config: &ModelConfig,
    image: &Image,
    level: NoiseLevel<'_>,
) -> (Option<Vec<f32>>, Option<LevelUsed>) {
    let c = config.channels() as usize;
    let (_, h, w) = image.shape();
    // A gray picture stored as RGB (a scan, a black-and-white photo) has its noise in every
    // channel alike, as a gray image shown to a colour model: read it as gray.
    // Only a model given a noise level needs to know (the scan is the image's size).
    let gray_rgb =
        config.noise_map() && image.channels() == 3 && c == 3 && image.is_gray_within(GRAY_SPREAD);
    let gain = if gray_rgb {
        conversion_noise_gain(1, 3)
    } else {
        conversion_noise_gain(image.channels(), c)
    };
    match (config.noise_map(), level) {
        (false, _) => (None, None),
        (true, NoiseLevel::Map(map)) => (Some(map.iter().map(|s| s * gain).collect()), None),
        (true, NoiseLevel::Uniform(s)) => (
            Some(vec![s / 255.0 * gain; h * w]),
            Some(LevelUsed::uniform(s)),
        ),
        // The model reads the level itself where it is given no map.
        (true, NoiseLevel::Estimate) if config.estimates_level() => (None, None),
        (true, NoiseLevel::Estimate) => {
            // A colour picture shown to a gray model gets 0.669 times the estimate; for noise
            // the channels share (`NoiseEstimate::Shared`, already 1.4 times the filter) that
            // is about the filter's level, which is what fully shared noise keeps in gray.
            let estimate = if gray_rgb {
                NoiseEstimate::Uniform(estimate::estimate_sigma(&image.to_gray()))
            } else {
                estimate::estimate_noise(image)
            };
            match estimate {
                NoiseEstimate::Uniform(s) => (
                    Some(vec![s / 255.0 * gain; h * w]),
                    Some(LevelUsed::uniform(s)),
                ),
                NoiseEstimate::Shared(s) => (
                    Some(vec![s / 255.0 * gain; h * w]),
                    Some(LevelUsed {
                        shared: true,
                        ..LevelUsed::uniform(s)
                    }),
                ),
                NoiseEstimate::Brightness(nlf) => {
                    let mut map = nlf.map(image);
                    let used = LevelUsed::of_map(&map);
                    map.iter_mut().for_each(|s| *s *= gain);
                    (Some(map), Some(used))
                }
            }
        }
    }
}

/// An RGB image whose channels differ by at most this much anywhere (two 8-bit levels: what
/// JPEG's chroma rounding leaves of a gray picture) is taken to be gray for its noise level.
pub const GRAY_SPREAD: f32 = 2.0 / 255.0;

/// What a noise level of an image with `from` channels becomes, for a model trained on
/// independent Gaussian noise in each of its `to` channels, once the image is converted
/// ([`Image::to_channels`]).
///
/// - Gray to colour (the plane repeated): the noise is the same in every channel, so its
///   luminance part is as strong as independent noise sqrt(3) times larger would give, and the
///   model must be told that level (on gray test images sqrt(3) beat 1, 1.2, 1.5 and 2 times
///   the level, bar a near tie at sigma 50).
/// - Colour to gray (0.299 R + 0.587 G + 0.114 B): independent channel noise of std s becomes
///   s times the norm of those weights, 0.669.
/// - Otherwise 1.
pub fn conversion_noise_gain(from: usize, to: usize) -> f32 {
    match (from, to) {
        (1, 3) => 3f32.sqrt(),
        (3, 1) => denoise_data::image::LUMA
            .iter()
            .map(|w| w * w)
            .sum::<f32>()
            .sqrt(),
        _ => 1.0,
    }
}
