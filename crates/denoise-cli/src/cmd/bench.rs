//! `denoise-cli bench`: inference throughput (megapixels per second), median of several runs
//! after warm-up, on a random 1 x C x S x S input; with `--train`, training throughput (patches
//! per second of the training loop's Adam step), batched as the PyTorch reference bench does.

use crate::runner::PrecisionArg;
use anyhow::{Context, Result};
use denoise_models::artefact::Metadata;
use denoise_models::{Model, ModelKind};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A shipped model name, an artefact file or a run directory (default: the shipped default),
    /// or a model kind (autoencoder, unet, ridnet, dncnn, ffdnet, drunet: its default config with random
    /// weights, for speed comparisons before training).
    #[arg(long)]
    model: Option<String>,
    /// Side of the square input.
    #[arg(long, default_value_t = 512)]
    size: i64,
    /// fp32, bf16, or auto: the precision `infer` would pick for this model here for a single
    /// pass (bf16 only on hardware with native bf16, for a model whose recorded bf16 loss is
    /// under 0.05 dB).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
    precision: PrecisionArg,
    /// auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Timed runs, at least 5 (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(5..))]
    runs: u16,
    /// Untimed runs first (allocator, caches, CUDA kernels' autotuning).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Print {"model", "precision", "size", "mp_per_s"} (with --train: "patches_per_s").
    #[arg(long)]
    json: bool,
    /// Time training steps instead of inference (random weights and data, MSE, Adam).
    #[arg(long)]
    train: bool,
    /// Training batch size (default: 8 for RIDNet, 16 otherwise, as the PyTorch reference).
    #[arg(long, requires = "train")]
    batch: Option<i64>,
    /// Training patch side (default: 80 for RIDNet, 64 otherwise, as the PyTorch reference).
    #[arg(long, requires = "train")]
    patch: Option<i64>,
    /// Training memory layout: channels-last or nchw (default: what `train` picks for the model
    /// and device).
    #[arg(long, requires = "train", value_parser = parse_layout)]
    layout: Option<denoise_models::Layout>,
}

fn parse_layout(s: &str) -> std::result::Result<denoise_models::Layout, String> {
    s.parse()
        .map_err(|e: denoise_models::ModelError| e.to_string())
}

/// The median: the middle value, or the mean of the two middle ones.
fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    let n = times.len();
    if n % 2 == 1 {
        times[n / 2]
    } else {
        (times[n / 2 - 1] + times[n / 2]) / 2.0
    }
}

fn run_train(args: &Args, config: denoise_models::ModelConfig, device: tch::Device) -> Result<()> {
    let kind = config.kind();
    let ridnet = kind == ModelKind::Ridnet;
    let bench = denoise_train::bench::TrainBench {
        model: config,
        batch: args.batch.unwrap_or(if ridnet { 8 } else { 16 }),
        patch: args.patch.unwrap_or(if ridnet { 80 } else { 64 }),
        // Training runs bf16 only when asked (auto is about inference).
        precision: match args.precision {
            PrecisionArg::Bf16 => denoise_models::Precision::Bf16,
            PrecisionArg::Fp32 | PrecisionArg::Auto => denoise_models::Precision::Fp32,
        },
        device,
        layout: args
            .layout
            .unwrap_or_else(|| denoise_models::Layout::for_training(kind, device)),
        warmup: args.warmup,
        runs: args.runs.into(),
    };
    let median = median(denoise_train::bench::time_train_steps(&bench)?);
    let rate = bench.batch as f64 / median;
    let name = kind.name();
    let precision = bench.precision;
    let layout = bench.layout;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"model": name, "precision": precision.to_string(), "mode": "train", "layout": layout.to_string(), "batch": bench.batch, "patch": bench.patch, "patches_per_s": rate, "median_s": median, "runs": args.runs})
        );
    } else {
        println!(
            "{name} {precision} {layout} train {}x{}x{}: {rate:.2} patches/s (median {median:.3} s of {} runs, {} threads)",
            bench.batch,
            bench.patch,
            bench.patch,
            args.runs,
            tch::get_num_threads()
        );
    }
    Ok(())
}

pub fn run(args: &Args) -> Result<()> {
    anyhow::ensure!(
        (8..=16384).contains(&args.size),
        "--size must be in 8-16384, got {}",
        args.size
    );
    let device = denoise_models::parse_device(&args.device).context("--device")?;
    let kind = args
        .model
        .as_deref()
        .and_then(|m| m.parse::<ModelKind>().ok());
    // The name in the report: the kind for random weights, else the artefact's path.
    let (mut model, metadata, name) = match kind {
        Some(kind) if args.train => return run_train(args, kind.default_config(3), device),
        Some(kind) => {
            let config = kind.default_config(3);
            let model = Model::new(&config, device)?;
            (
                model,
                Metadata::new(&config),
                format!("{} (random weights)", kind.name()),
            )
        }
        None => {
            let path = crate::lookup::resolve_model(args.model.as_deref())?;
            let loaded = denoise_models::artefact::load(&path, device)?;
            if args.train {
                return run_train(args, loaded.model.config().clone(), device);
            }
            let name = format!(
                "{} ({})",
                loaded.path.display(),
                loaded.model.config().kind().name()
            );
            (loaded.model, loaded.metadata, name)
        }
    };
    let precision = args.precision.policy().resolve(&metadata, device, 1);
    model.set_precision(precision);
    let c = model.config().channels();
    let x = tch::Tensor::f_rand([1, c, args.size, args.size], (tch::Kind::Float, device))
        .map_err(|e| anyhow::anyhow!("cannot allocate a {}x{} input: {e}", args.size, args.size))?;
    let sigma = denoise_models::model::sigma_map(1, args.size, args.size, 25.0, device);
    let map = model.config().noise_map().then_some(&sigma);
    for _ in 0..args.warmup {
        let _ = model.denoise(&x, map)?.f_to_device(tch::Device::Cpu)?;
    }
    let mut times = Vec::with_capacity(args.runs.into());
    for _ in 0..args.runs {
        let start = Instant::now();
        let out = model.denoise(&x, map)?;
        // On CUDA, kernels run asynchronously and `denoise` leaves its output on the device:
        // the copy back to host memory (which a caller needs anyway) waits for them to finish.
        let _ = out.f_to_device(tch::Device::Cpu)?;
        times.push(start.elapsed().as_secs_f64());
    }
    let median = median(times);
    let mp_per_s = (args.size * args.size) as f64 / 1e6 / median;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"model": name, "precision": precision.to_string(), "size": args.size, "mp_per_s": mp_per_s, "median_s": median, "runs": args.runs})
        );
    } else {
        println!(
            "{name} {precision} {}x{}: {mp_per_s:.3} MP/s (median {median:.3} s of {} runs, {} threads)",
            args.size,
            args.size,
            args.runs,
            tch::get_num_threads()
        );
    }
    Ok(())
}
