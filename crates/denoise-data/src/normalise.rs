//! Siddiqui's three invertible normalisations: scaling to [0, 1], global centering and
//! per-channel centering, with means taken per image or from dataset statistics.

use serde::{Deserialize, Serialize};

use crate::{DataError, Image, Result};

/// Where centering means come from.
///
/// Serde: `"per-image"` or `{"dataset": [0.45, 0.43, 0.40]}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MeanSource {
    /// Each image's own means, recomputed for every image (and remembered in its
    /// [`NormState`] so the output can be shifted back).
    #[default]
    PerImage,
    /// Fixed means of the whole training set, as saved in the dataset manifest: one per channel,
    /// or a single value standing for every channel.
    Dataset(Vec<f32>),
}

/// A normalisation and where its means come from.
///
/// Serde (internally tagged): `{"kind": "scale"}`, `{"kind": "global-centering", "mean":
/// "per-image"}`, `{"kind": "channel-centering", "mean": {"dataset": [0.45, 0.43, 0.40]}}`;
/// `mean` defaults to per-image. In TOML: `kind = "channel-centering"`, `mean = "per-image"`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Normalisation {
    /// Scale to [0, 1]. The images of this crate are already there (decoding divides by the
    /// format's maximum), so this is the identity, kept so configs can name it.
    #[default]
    Scale,
    /// Subtract one mean taken over all channels and pixels. With per-channel dataset means,
    /// the global mean is their average (every channel has the same number of pixels).
    GlobalCentering {
        #[serde(default)]
        mean: MeanSource,
    },
    /// Subtract each channel's own mean.
    ChannelCentering {
        #[serde(default)]
        mean: MeanSource,
    },
}

/// What a normalisation subtracted from each channel, to undo it with [`NormState::invert`].
#[derive(Clone, Debug, PartialEq)]
pub struct NormState {
    offsets: Vec<f32>,
}

impl Normalisation {
    /// Normalises `img` in place and returns what undoes it. Fails when dataset means fit
    /// neither one value nor one per channel.
    ///
    /// # Shapes
    /// C x H x W, changed in place; the state holds C offsets.
    pub fn apply(&self, img: &mut Image) -> Result<NormState> {
        let offsets = self.offsets(img)?;
        for (c, &m) in offsets.iter().enumerate() {
            if m != 0.0 {
                for v in img.plane_mut(c) {
                    *v -= m;
                }
            }
        }
        Ok(NormState { offsets })
    }

    /// The per-channel values [`Normalisation::apply`] would subtract from `img`.
    ///
    /// # Shapes
    /// C x H x W in; C values out.
    pub fn offsets(&self, img: &Image) -> Result<Vec<f32>> {
        let channels = img.channels();
        match self {
            Normalisation::Scale => Ok(vec![0.0; channels]),
            Normalisation::GlobalCentering { mean } => {
                let m = match mean {
                    MeanSource::PerImage => global_mean(img),
                    MeanSource::Dataset(means) => {
                        check_dataset_means(means, channels)?;
                        mean_f64(means.iter().copied(), means.len())
                    }
                };
                Ok(vec![m; channels])
            }
            Normalisation::ChannelCentering { mean } => match mean {
                MeanSource::PerImage => Ok(channel_means(img)),
                MeanSource::Dataset(means) => {
                    check_dataset_means(means, channels)?;
                    Ok(if means.len() == 1 {
                        vec![means[0]; channels]
                    } else {
                        means.clone()
                    })
                }
            },
        }
    }
}

impl NormState {
    /// The value subtracted from each channel.
    pub fn offsets(&self) -> &[f32] {
        &self.offsets
    }

    /// Whether normalising changed nothing.
    pub fn is_identity(&self) -> bool {
        self.offsets.iter().all(|&m| m == 0.0)
    }

    /// Undoes the normalisation on `img` (the normalised image, or a model's output for it):
    /// adds the offsets back. `invert` after `apply` restores the samples within 1e-6 for
    /// samples of magnitude up to ~8.
    ///
    /// # Shapes
    /// C x H x W with the C of the normalised image, changed in place.
    pub fn invert(&self, img: &mut Image) -> Result<()> {
        if img.channels() != self.offsets.len() {
            return Err(DataError::Channels {
                expected: self.offsets.len(),
                got: img.channels(),
            });
        }
        for (c, &m) in self.offsets.iter().enumerate() {
            if m != 0.0 {
                for v in img.plane_mut(c) {
                    *v += m;
                }
            }
        }
        Ok(())
    }
}

/// The mean of each channel (accumulated in f64); 0 for an image without pixels.
///
/// # Shapes
/// C x H x W in; C values out.
pub fn channel_means(img: &Image) -> Vec<f32> {
    (0..img.channels())
        .map(|c| mean_f64(img.plane(c).iter().copied(), img.pixels()))
        .collect()
}

/// The mean over all channels and pixels (accumulated in f64); 0 for an empty image.
///
/// # Shapes
/// C x H x W in.
pub fn global_mean(img: &Image) -> f32 {
    mean_f64(img.data().iter().copied(), img.data().len())
}

fn mean_f64(values: impl Iterator<Item = f32>, count: usize) -> f32 {
    if count == 0 {
        return 0.0;
    }
    (values.map(f64::from).sum::<f64>() / count as f64) as f32
}

fn check_dataset_means(means: &[f32], channels: usize) -> Result<()> {
    if means.len() != 1 && means.len() != channels {
        return Err(DataError::Config(format!(
            "dataset means have {} value(s) for a {channels}-channel image; expected 1 or {channels}",
            means.len()
        )));
    }
    if let Some(bad) = means.iter().find(|m| !m.is_finite()) {
        return Err(DataError::Config(format!(
            "dataset means must be finite, got {bad}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rgb() -> Image {
        // Channel means 0.25, 0.5, 0.75 exactly: each channel is a constant plus a +-0.1 pattern.
        Image::from_fn(3, 2, 2, |c, y, x| {
            0.25 * (c + 1) as f32 + if (y + x) % 2 == 0 { 0.1 } else { -0.1 }
        })
    }

    #[test]
    fn reference_offsets() {
        let img = rgb();
        let per_image = |n: Normalisation| n.offsets(&img).unwrap();
        assert_eq!(per_image(Normalisation::Scale), [0.0; 3]);
        let channel = per_image(Normalisation::ChannelCentering {
            mean: MeanSource::PerImage,
        });
        for (got, want) in channel.iter().zip([0.25, 0.5, 0.75]) {
            assert!((got - want).abs() < 1e-7, "{channel:?}");
        }
        let global = per_image(Normalisation::GlobalCentering {
            mean: MeanSource::PerImage,
        });
        assert!(global.iter().all(|&m| (m - 0.5).abs() < 1e-7), "{global:?}");

        let dataset = MeanSource::Dataset(vec![0.1, 0.2, 0.6]);
        let global = per_image(Normalisation::GlobalCentering {
            mean: dataset.clone(),
        });
        assert!(global.iter().all(|&m| (m - 0.3).abs() < 1e-7), "{global:?}");
        let channel = per_image(Normalisation::ChannelCentering { mean: dataset });
        assert_eq!(channel, [0.1, 0.2, 0.6]);
        let one = MeanSource::Dataset(vec![0.4]);
        assert_eq!(
            per_image(Normalisation::ChannelCentering { mean: one }),
            [0.4; 3]
        );
    }

    #[test]
    fn centering_centres() {
        let mut img = rgb();
        let state = Normalisation::ChannelCentering {
            mean: MeanSource::PerImage,
        }
        .apply(&mut img)
        .unwrap();
        assert!(channel_means(&img).iter().all(|m| m.abs() < 1e-7));
        assert!(!state.is_identity());
        let mut img = rgb();
        Normalisation::GlobalCentering {
            mean: MeanSource::PerImage,
        }
        .apply(&mut img)
        .unwrap();
        assert!(global_mean(&img).abs() < 1e-7);
        let means = channel_means(&img);
        assert!(
            (means[0] + 0.25).abs() < 1e-7 && (means[2] - 0.25).abs() < 1e-7,
            "{means:?}"
        );
        let mut img = rgb();
        assert!(Normalisation::Scale.apply(&mut img).unwrap().is_identity());
        assert_eq!(img, rgb());
    }

    #[test]
    fn mismatches_are_errors() {
        let mut img = rgb();
        let two = Normalisation::ChannelCentering {
            mean: MeanSource::Dataset(vec![0.1, 0.2]),
        };
        let err = two.apply(&mut img).unwrap_err().to_string();
        assert!(
            err.contains("dataset means have 2 value(s) for a 3-channel image"),
            "{err}"
        );
        assert_eq!(img, rgb(), "a failed apply leaves the image alone");
        let nan = Normalisation::GlobalCentering {
            mean: MeanSource::Dataset(vec![f32::NAN]),
        };
        assert!(nan.apply(&mut img).is_err());
        let state = Normalisation::Scale.apply(&mut img).unwrap();
        assert!(state.invert(&mut img.to_gray()).is_err());
        assert_eq!(channel_means(&Image::zeros(3, 0, 4)), [0.0; 3]);
    }

    #[test]
    fn serde_forms() {
        let cases = [
            (r#"{"kind":"scale"}"#, Normalisation::Scale),
            (
                r#"{"kind":"global-centering"}"#,
                Normalisation::GlobalCentering {
                    mean: MeanSource::PerImage,
                },
            ),
            (
                r#"{"kind":"channel-centering","mean":{"dataset":[0.5,0.25,0.125]}}"#,
                Normalisation::ChannelCentering {
                    mean: MeanSource::Dataset(vec![0.5, 0.25, 0.125]),
                },
            ),
        ];
        for (json, value) in &cases {
            assert_eq!(
                &serde_json::from_str::<Normalisation>(json).unwrap(),
                value,
                "{json}"
            );
            let back = serde_json::to_string(value).unwrap();
            assert_eq!(
                &serde_json::from_str::<Normalisation>(&back).unwrap(),
                value
            );
        }
        let json = r#"{"kind":"channel-centering","mean":"per-image"}"#;
        assert_eq!(
            serde_json::to_string(&cases[1].1)
                .unwrap()
                .replace("global", "channel"),
            json
        );
        assert!(serde_json::from_str::<Normalisation>(r#"{"kind":"whiten"}"#).is_err());
        let typo = r#"{"kind":"global-centering","means":"per-image"}"#;
        assert!(serde_json::from_str::<Normalisation>(typo).is_err());
    }

    fn image() -> impl Strategy<Value = Image> {
        (prop_oneof![Just(1usize), Just(3)], 1usize..16, 1usize..16).prop_flat_map(|(c, h, w)| {
            proptest::collection::vec(-1.0f32..2.0, c * h * w)
                .prop_map(move |data| Image::new(c, h, w, data).unwrap())
        })
    }

    fn normalisation() -> impl Strategy<Value = Normalisation> {
        let source = prop_oneof![
            Just(MeanSource::PerImage),
            (0.0f32..1.0).prop_map(|m| MeanSource::Dataset(vec![m])),
        ];
        prop_oneof![
            Just(Normalisation::Scale),
            source
                .clone()
                .prop_map(|mean| Normalisation::GlobalCentering { mean }),
            source.prop_map(|mean| Normalisation::ChannelCentering { mean }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_within_1e_6(img in image(), n in normalisation()) {
            let mut x = img.clone();
            let state = n.apply(&mut x).unwrap();
            state.invert(&mut x).unwrap();
            for (a, b) in x.data().iter().zip(img.data()) {
                prop_assert!((a - b).abs() <= 1e-6, "{} vs {}", a, b);
            }
        }
    }
}
