//! Denoising from your own program: load a model file, denoise an image in tiles, save it with
//! its alpha and bit depth. The CLI's `infer` and the web app go through the same [`Denoiser`].
//!
//! ```sh
//! cargo run --release -p denoise-models --example denoise_file -- noisy.png clean.png [MODEL]
//! ```
//! MODEL defaults to the shipped `assets/models/default.safetensors`.

use denoise_data::io;
use denoise_models::{Denoiser, Job, ModelSource, NoiseLevel, Settings};

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

    // CUDA when libtorch sees a GPU, else the CPU; bf16 only where it is native and cheap for
    // this model; tiles sized for about 1 GB of activations, blended over 32-pixel overlaps.
    // Loading checks the file and its config.
    let settings = Settings {
        device: tch::Device::cuda_if_available(),
        ..Settings::default()
    };
    let denoiser = Denoiser::load(&ModelSource::Path(model_path.into()), &settings)?;
    println!(
        "{} ({}), trained on {}",
        denoiser.source(),
        denoiser.model().config().kind(),
        denoiser
            .metadata()
            .noise
            .as_deref()
            .unwrap_or("unknown noise")
    );

    let noisy = io::load(&input)?;
    // Blind: a model that takes a noise level gets one estimated from the image; pass
    // `NoiseLevel::Uniform(sigma)` (0-255 scale) when it is known.
    let job = Job {
        progress: Some(&mut |done, total| eprint!("\rtile {done}/{total}")),
        ..Job::default()
    };
    let (clean, sigma) = denoiser.denoise(&noisy.image, NoiseLevel::Estimate, job)?;
    eprintln!();
    if let Some(sigma) = sigma {
        println!("estimated noise level: sigma {sigma:.1}");
    }
    // Clipped to [0, 1] and rounded to the file's bit depth; alpha restored as it was.
    io::save(&output, &clean, noisy.alpha.as_deref(), noisy.bit_depth)?;
    println!("wrote {output}");
    Ok(())
}
