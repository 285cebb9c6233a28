//! `denoise-cli doctor`: what this build runs on.

use crate::lookup;
use anyhow::Result;
use denoise_models::perf::CpuFeatures;

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let cpu = CpuFeatures::detect();
    let lib = env!("DENOISE_LIBTORCH_LIB");
    let version = std::fs::read_to_string(format!("{lib}/../version.py"))
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("__version__ = ")
                    .map(|v| v.trim_matches(['\'', '"']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown (no version.py beside lib/)".into());
    let default_model = lookup::default_model().ok();
    let report = serde_json::json!({
        "denoise": env!("CARGO_PKG_VERSION"),
        "libtorch_version": version,
        "libtorch_lib": lib,
        "libtorch_lib_resolved": std::fs::canonicalize(lib).ok(),
        "cuda_available": tch::Cuda::is_available(),
        "cuda_devices": tch::Cuda::device_count(),
        "cudnn": tch::Cuda::cudnn_is_available(),
        "threads": tch::get_num_threads(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "mkldnn": tch::utils::has_mkldnn(),
        "cpu": cpu,
        "bf16_fast": cpu.fast_bf16(),
        "default_model": default_model,
        "default_model_present": default_model.is_some(),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("denoise {}", env!("CARGO_PKG_VERSION"));
    println!("libtorch       {version} at {lib}");
    println!(
        "CUDA           {} ({} device(s), cuDNN {})",
        if tch::Cuda::is_available() {
            "available"
        } else {
            "not available"
        },
        tch::Cuda::device_count(),
        tch::Cuda::cudnn_is_available()
    );
    println!(
        "threads        {} (cores: {})",
        report["threads"], report["cores"]
    );
    println!(
        "CPU            avx2 {}, avx512f {}, avx512_bf16 {}, amx_bf16 {} -> bf16 {}",
        cpu.avx2,
        cpu.avx512f,
        cpu.avx512_bf16,
        cpu.amx_bf16,
        if cpu.fast_bf16() {
            "fast"
        } else {
            "emulated (slow)"
        }
    );
    match &default_model {
        Some(path) => println!("default model  {} (present)", path.display()),
        None => println!("default model  missing"),
    }
    Ok(())
}
