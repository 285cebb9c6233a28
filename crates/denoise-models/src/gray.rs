//! The gray twin of a colour model: a gray network that computes what the colour one computes on
//! a gray picture repeated into RGB with its noise level times sqrt(3) (see
//! `tile::conversion_noise_gain`), its three outputs turned back to gray with BT.601 luma
//! weights. A starting point for training a gray model from a colour one.

use crate::{Model, ModelConfig, ModelError, Result};
use tch::Tensor;

/// Where a network's first layer reads the image and its last layer writes it: the names of
/// those weights and how many input (or output) channels each image channel has there.
struct Ends {
    /// The first layer's weight; its inputs are `group` per image channel, then the map.
    first: String,
    /// The last layer's weights and biases, all named with this prefix; their outputs are
    /// `group` per image channel.
    last: String,
    group: i64,
}

fn ends(cfg: &ModelConfig) -> Option<Ends> {
    match cfg {
        // Four half-resolution sub-images per channel.
        ModelConfig::Ffdnet(c) => Some(Ends {
            first: "body.0.weight".into(),
            last: format!("body.{}.", c.depth - 1),
            group: 4,
        }),
        ModelConfig::Drunet(_) => Some(Ends {
            first: "head.weight".into(),
            last: "tail.".into(),
            group: 1,
        }),
        _ => None,
    }
}

/// The gray twin of `colour` (an FFDNet or a DRUNet with a level map), without the colour
/// model's level-estimation branch if it has one.
///
/// The first layer sums the weights of the three channels' inputs and scales the map's by
/// sqrt(3); the last combines the channels' outputs (and biases) with the luma weights, which
/// sum to 1, so a residual `input - out` passes through. Every other weight of the body is
/// copied.
pub fn gray_from_colour(colour: &Model) -> Result<Model> {
    let cfg = colour.config();
    let (Some(gray_cfg), Some(ends)) = (cfg.gray_twin(), ends(cfg)) else {
        return Err(ModelError::Config(format!(
            "only a colour ffdnet or drunet (with a level map) turns into a gray model, not a \
             {}-channel {}",
            cfg.channels(),
            cfg.kind()
        )));
    };
    let gray = Model::new(&gray_cfg, colour.device())?;
    let src = colour.var_store().variables();
    let g = ends.group;
    let luma = denoise_data::image::LUMA.map(f64::from);
    tch::no_grad(|| -> Result<()> {
        for (name, mut dst) in gray.var_store().variables() {
            let s = src
                .get(&name)
                .ok_or_else(|| ModelError::Config(format!("the colour model has no '{name}'")))?;
            let value = if name == ends.first {
                let sum = s.f_narrow(1, 0, g)? + s.f_narrow(1, g, g)? + s.f_narrow(1, 2 * g, g)?;
                let map = s.f_narrow(1, 3 * g, 1)? * 3f64.sqrt();
                Tensor::f_cat(&[sum, map], 1)?
            } else if name.starts_with(&ends.last) {
                let mut acc = s.f_narrow(0, 0, g)? * luma[0];
                for (c, w) in luma.iter().enumerate().skip(1) {
                    acc += s.f_narrow(0, g * c as i64, g)? * *w;
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

    /// The largest gap between what `colour` and its gray twin make of one gray picture.
    fn twin_gap(json: &str, seed: i64) -> f32 {
        tch::manual_seed(seed);
        let cfg: ModelConfig = serde_json::from_str(json).unwrap();
        let colour = Model::new(&cfg, Device::Cpu).unwrap();
        // Trained-looking weights: a fresh DRUNet's tail starts small and would hide a mix-up.
        tch::no_grad(|| {
            for (_, mut v) in colour.var_store().variables() {
                v.copy_(&(v.randn_like() * 0.2));
            }
        });
        let gray = gray_from_colour(&colour).unwrap();
        assert_eq!(gray.config().channels(), 1);
        assert!(gray_from_colour(&gray).is_err(), "already gray");
        let img = Image::from_fn(1, 18, 22, |_, y, x| ((3 * y + 5 * x) % 11) as f32 / 11.0);
        let whole = TileConfig {
            tile: 0,
            overlap: 0,
            ensemble: 1,
        };
        let run = |m: &Model| {
            denoise_image(m, &img, NoiseLevel::Uniform(20.0), whole, &mut |_, _| {})
                .unwrap()
                .0
        };
        let (a, b) = (run(&colour), run(&gray));
        a.data()
            .iter()
            .zip(b.data())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    }

    #[test]
    fn a_gray_model_from_a_colour_one_computes_what_the_colour_one_does_on_gray() {
        let _rng = crate::test_rng_lock();
        for json in [
            r#"{"kind":"ffdnet","depth":4,"features":8}"#,
            r#"{"kind":"drunet","widths":[8,16],"blocks":1}"#,
        ] {
            let gap = twin_gap(json, 3);
            // Float rounding only: a channel mixed up moves outputs by tenths.
            assert!(gap < 1e-4, "{json}: {gap}");
        }
    }

    #[test]
    fn models_without_a_gray_twin_are_refused() {
        let _rng = crate::test_rng_lock();
        for json in [
            r#"{"kind":"dncnn","depth":3,"features":4}"#,
            r#"{"kind":"drunet","widths":[8],"blocks":1,"noise_map":false}"#,
        ] {
            let cfg: ModelConfig = serde_json::from_str(json).unwrap();
            let model = Model::new(&cfg, Device::Cpu).unwrap();
            let err = gray_from_colour(&model).unwrap_err().to_string();
            assert!(err.contains("turns into a gray model"), "{json}: {err}");
        }
    }

    #[test]
    fn a_colour_model_with_an_estimator_gives_the_gray_twin_of_its_body() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(7);
        for json in [
            r#"{"kind":"ffdnet","depth":3,"features":4,"estimator":{"depth":2,"features":4}}"#,
            r#"{"kind":"drunet","widths":[8],"blocks":1,"estimator":{"depth":2,"features":4}}"#,
        ] {
            let cfg: ModelConfig = serde_json::from_str(json).unwrap();
            let colour = Model::new(&cfg, Device::Cpu).unwrap();
            let gray = gray_from_colour(&colour).unwrap();
            assert!(!gray.config().estimates_level(), "{json}");
            assert_eq!(
                Some(gray.config().clone()),
                cfg.without_estimator().gray_twin()
            );
            // The body's gray twin, weight for weight.
            let body = Model::new(&cfg.without_estimator(), Device::Cpu).unwrap();
            let named = colour.var_store().variables();
            tch::no_grad(|| {
                for (name, mut v) in body.var_store().variables() {
                    v.copy_(&named[&name]);
                }
            });
            let twin = gray_from_colour(&body).unwrap();
            let a = gray.var_store().variables();
            for (name, v) in twin.var_store().variables() {
                assert!(a[&name].equal(&v), "{json}: {name}");
            }
        }
    }
}
