//! `denoise-cli export`: write a model as TorchScript for TorchServe, Triton or `torch.jit.load`.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Torchscript,
}

#[derive(clap::Args)]
#[command(
    after_help = "The exported forward() takes N x (C + m) x H x W in [0, 1]: m = 1 for \
models with a noise-level map (last channel = sigma / 255), and H, W multiples of the model's \
multiple (pad by edge replication, crop back). It returns the denoised N x C x H x W."
)]
pub struct Args {
    /// Model: a shipped name, an artefact file or a training run directory.
    model: String,
    #[arg(long, value_enum, default_value_t = Format::Torchscript)]
    format: Format,
    /// Output file (e.g. model.pt).
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(args: &Args) -> Result<()> {
    let out = &args.output;
    if out.is_dir() {
        bail!("-o '{}' is a directory: give a file name", out.display());
    }
    if denoise_data::io::ImageFormat::from_path(out).is_ok() {
        bail!(
            "-o '{}' is named as an image: name the TorchScript file model.pt, say",
            out.display()
        );
    }
    crate::outputs::check_output_file(out)?;
    let path = crate::lookup::resolve_model(Some(&args.model))?;
    let model_file = denoise_models::artefact::resolve(&path)?;
    if same_file(out, &model_file) {
        bail!(
            "-o '{}' is the model being exported ('{}'): the TorchScript file would replace it; \
             write it elsewhere (model.pt, say)",
            out.display(),
            model_file.display()
        );
    }
    crate::outputs::create_parent_dir(out)?;
    let artefact = denoise_models::artefact::load(&model_file, tch::Device::Cpu)?;
    match args.format {
        Format::Torchscript => {
            denoise_models::export::torchscript(&artefact.model, &args.output, 64)
                .with_context(|| format!("failed to export to '{}'", args.output.display()))?
        }
    }
    let cfg = artefact.model.config();
    eprintln!(
        "wrote {} ({}, input N x {} x H x W, H and W multiples of {})",
        args.output.display(),
        cfg.kind(),
        cfg.channels() + i64::from(cfg.noise_map()),
        cfg.multiple()
    );
    Ok(())
}

/// Whether `a` and `b` name one file: the same path once resolved (symbolic links, `..`), or
/// two hard links to it.
fn same_file(a: &Path, b: &Path) -> bool {
    if crate::outputs::canonical(a) == crate::outputs::canonical(b) {
        return true;
    }
    #[cfg(unix)]
    if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        use std::os::unix::fs::MetadataExt;
        return (x.dev(), x.ino()) == (y.dev(), y.ino());
    }
    false
}
