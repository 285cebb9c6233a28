//! `denoise-cli noise`: add synthetic noise to an image file.

use anyhow::{Result, bail};
use denoise_data::io;
use denoise_data::noise::NoiseSpec;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = denoise_data::noise::SPEC_HELP)]
pub struct Args {
    /// Noise recipe (see below), e.g. gaussian:25, gaussian:0-55, method2, jpeg:30+gaussian:5.
    #[arg(long, value_name = "SPEC")]
    kind: String,
    /// Seed: the same seed gives the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Clean input image.
    input: PathBuf,
    /// Output image (format from the extension; written at the input's bit depth, clipped).
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(args: &Args) -> Result<()> {
    let spec: NoiseSpec = args.kind.parse()?;
    if args.output.is_dir() {
        bail!(
            "-o '{}' is a directory: give a file name",
            args.output.display()
        );
    }
    crate::outputs::check_output_file(&args.output)?;
    if crate::outputs::canonical(&args.output) == crate::outputs::canonical(&args.input) {
        bail!(
            "'{}' would overwrite the input: write the noisy image elsewhere",
            args.output.display()
        );
    }
    crate::outputs::create_parent_dir(&args.output)?;
    let loaded = io::load(&args.input)?;
    let noisy = spec.apply(&loaded.image, args.seed);
    io::save(
        &args.output,
        &noisy.image,
        loaded.alpha.as_deref(),
        loaded.bit_depth,
    )?;
    Ok(())
}
