//! `denoise-cli models`: the model kinds, their size and cost.

use anyhow::Result;
use denoise_models::{Model, ModelKind};

#[derive(clap::Args)]
pub struct Args {
    /// Print `[{"name", "params", "flops_per_pixel"}, ...]`.
    #[arg(long)]
    json: bool,
    /// Image channels of the default configs (3 colour, 1 gray).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i64).range(1..=3))]
    channels: i64,
}

pub fn run(args: &Args) -> Result<()> {
    let mut rows = Vec::new();
    for kind in ModelKind::ALL {
        let model = Model::new(&kind.default_config(args.channels), tch::Device::Cpu)?;
        rows.push(serde_json::json!({
            "name": kind.name(),
            "params": model.num_params(),
            "flops_per_pixel": model.flops_per_pixel(),
        }));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{:<12} {:>12} {:>16}", "model", "params", "GFLOP/megapixel");
    for r in &rows {
        println!(
            "{:<12} {:>12} {:>16.1}",
            r["name"].as_str().unwrap_or_default(),
            r["params"].as_i64().unwrap_or_default(),
            r["flops_per_pixel"].as_f64().unwrap_or_default() / 1e3
        );
    }
    Ok(())
}
