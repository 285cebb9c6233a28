//! Denoising from your own program: load a model file, denoise an image in tiles, save it with
//! its alpha and bit depth. The CLI's `infer` and the web app go through the same two calls
//! (`artefact::load`, `tile::denoise_image`).
//!
//! ```sh
//! cargo run --release -p denoise-models --example denoise_file -- noisy.png clean.png [MODEL]
//! ```
//! MODEL defaults to the shipped `assets/models/default.safetensors`.

use denoise_data::io;
use denoise_models::artefact;
use denoise_models::tile::{self, NoiseLevel, TileConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(input), Some(output)) = (args.next(), args.next()) else {
        return Err("usage: denoise_file INPUT OUTPUT [MODEL]".into());
    };
    let model_path = args.next().unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../assets/models/default.safetensors"
        )
        .into()
    });

    // CUDA when libtorch sees a GPU, else the CPU. Loading checks the file and its config.
    let device = tch::Device::cuda_if_available();
    let loaded = artefact::load(model_path.as_ref(), device)?;
    println!(
        "{} ({}), trained on {}",
        loaded.path.display(),
        loaded.model.config().kind(),
        loaded.metadata.noise.as_deref().unwrap_or("unknown noise")
    );

    let noisy = io::load(&input)?;
    // Tiles sized for about 1 GB of activations, blended over 32-pixel overlaps.
    let tiles = TileConfig {
        tile: tile::tile_for_budget(&loaded.model, 1024),
        overlap: 32,
        ensemble: 1,
    };
    // Blind: a model that takes a noise level gets one estimated from the image; pass
    // `NoiseLevel::Uniform(sigma)` (0-255 scale) when it is known.
    let (clean, sigma) = tile::denoise_image(
        &loaded.model,
        &noisy.image,
        NoiseLevel::Estimate,
        tiles,
        &mut |done, total| eprint!("\rtile {done}/{total}"),
    )?;
    eprintln!();
    if let Some(sigma) = sigma {
        println!("estimated noise level: sigma {sigma:.1}");
    }
    // Clipped to [0, 1] and rounded to the file's bit depth; alpha restored as it was.
    io::save(&output, &clean, noisy.alpha.as_deref(), noisy.bit_depth)?;
    println!("wrote {output}");
    Ok(())
}
