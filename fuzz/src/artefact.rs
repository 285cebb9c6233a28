//! Model files (`--model`, `train --init`, the web app's models): the safetensors header, its
//! JSON metadata and the weights, read as `artefact::load` reads them.

use denoise_models::tile::{self, NoiseLevel, TileConfig};
use denoise_models::{Model, ModelConfig, artefact};
use tch::Device;

pub struct Artefact;

impl super::Target for Artefact {
    fn run(&self, data: &[u8]) {
        let Ok((model, metadata)) = artefact::from_bytes(data, Device::Cpu) else {
            return;
        };
        // An accepted model denoises, and saves and loads back unchanged.
        let config = model.config();
        let side = 2 * config.multiple().max(8) as usize;
        let image =
            denoise_data::Image::from_fn(config.channels() as usize, side, side, |c, y, x| {
                ((c + y + 2 * x) % 5) as f32 / 4.0
            });
        let whole = TileConfig {
            tile: 0,
            overlap: 0,
            ensemble: 1,
        };
        let (out, _) = tile::denoise_image(
            &model,
            &image,
            NoiseLevel::Uniform(25.0),
            whole,
            &mut |_, _| {},
        )
        .expect("an accepted model denoises a small image");
        assert_eq!(out.shape(), image.shape());
        let bytes = artefact::to_bytes(&model, &metadata).expect("an accepted model saves");
        let (again, meta_again) =
            artefact::from_bytes(&bytes, Device::Cpu).expect("a saved model loads back");
        assert_eq!(
            meta_again, metadata,
            "metadata changed in a save-and-load round trip"
        );
        assert_eq!(again.num_params(), model.num_params());
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        [
            r#"{"kind":"dncnn","depth":3,"features":8}"#,
            r#"{"kind":"ffdnet","depth":3,"features":8}"#,
            r#"{"kind":"unet","base":8,"levels":2,"up":"upsample"}"#,
            r#"{"kind":"autoencoder","widths":[8,16]}"#,
            r#"{"kind":"ridnet","features":8,"blocks":1,"reduction":4}"#,
        ]
        .iter()
        .map(|json| {
            tch::manual_seed(0);
            let config: ModelConfig = serde_json::from_str(json).expect("a model config");
            let model = Model::new(&config, Device::Cpu).expect("a tiny model");
            artefact::to_bytes(&model, &artefact::Metadata::new(&config)).expect("it saves")
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Target;

    #[test]
    fn seeds_load_and_their_mutations_run_clean() {
        let seeds = Artefact.seeds();
        for seed in &seeds {
            artefact::from_bytes(seed, Device::Cpu).expect("a seed loads");
        }
        for input in crate::mutations(&seeds) {
            Artefact.run(&input);
        }
    }
}
