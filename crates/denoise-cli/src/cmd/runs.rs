//! `denoise-cli runs RUN_DIR...`: compare training runs by what they reached for the CPU time
//! they cost (validation PSNR against CPU-minutes of training steps, from each `train.jsonl`).

use anyhow::{Context, Result};
use denoise_train::TrainConfig;
use denoise_train::plot::{History, ValPoint};
use denoise_train::trainer::LOG_FILE;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// Training run directories (each holding config.toml and train.jsonl).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Also report each run's validation PSNR at these CPU-minute marks (the last validation at
    /// or before each), e.g. `--at 10,20,60`.
    #[arg(long, value_delimiter = ',', value_name = "MINUTES")]
    at: Vec<f64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// What one run reached.
#[derive(serde::Serialize)]
struct Summary {
    run: String,
    model: String,
    noise: String,
    steps: u64,
    /// CPU minutes of training steps at the last validation (None: a log from before the cost
    /// was recorded).
    cpu_minutes: Option<f64>,
    best_val_psnr: Option<f64>,
    best_at_step: Option<u64>,
    best_at_cpu_minutes: Option<f64>,
    noisy_psnr: Option<f64>,
    /// `(minutes, psnr)` for each `--at` mark the run has reached.
    at: Vec<(f64, f64)>,
}

pub fn run(args: &Args) -> Result<()> {
    anyhow::ensure!(
        args.at.iter().all(|m| *m >= 0.0),
        "--at takes non-negative minutes"
    );
    // A directory that is not a run is reported after the others' table, not instead of it.
    let mut summaries = Vec::new();
    let mut failures = Vec::new();
    for dir in &args.runs {
        match summarise(dir, &args.at) {
            Ok(s) => summaries.push(s),
            Err(err) => failures.push(crate::report::describe(&err)),
        }
    }
    if !summaries.is_empty() {
        print_summaries(args, &summaries)?;
    }
    if !failures.is_empty() {
        anyhow::bail!("{}", failures.join("; "));
    }
    Ok(())
}

fn print_summaries(args: &Args, summaries: &[Summary]) -> Result<()> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
        return Ok(());
    }
    let marks: String = args
        .at
        .iter()
        .map(|m| format!(" | at {m} CPU-min"))
        .collect();
    println!("| run | model | noise | steps | CPU-min | best val PSNR (step, CPU-min){marks} |");
    println!("|{}", " --- |".repeat(6 + args.at.len()));
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    for s in summaries {
        let best = match (s.best_val_psnr, s.best_at_step) {
            (Some(p), Some(step)) => {
                format!("{p:.2} dB ({step}, {})", opt(s.best_at_cpu_minutes, 1))
            }
            _ => "-".into(),
        };
        let marks: String = args
            .at
            .iter()
            .map(|m| {
                let hit = s.at.iter().find(|(at, _)| at == m);
                format!(" | {}", opt(hit.map(|(_, p)| *p), 2))
            })
            .collect();
        println!(
            "| {} | {} | {} | {} | {} | {best}{marks} |",
            s.run,
            s.model,
            s.noise,
            s.steps,
            opt(s.cpu_minutes, 1)
        );
    }
    Ok(())
}

fn summarise(dir: &Path, marks: &[f64]) -> Result<Summary> {
    let config = TrainConfig::from_file(&dir.join("config.toml"))
        .with_context(|| format!("'{}' is not a training run", dir.display()))?;
    let log = dir.join(LOG_FILE);
    let text = std::fs::read_to_string(&log)
        .with_context(|| format!("cannot read '{}'", log.display()))?;
    let history = History::parse(&text);
    let vals: Vec<ValPoint> = history.val_points().copied().collect();
    let best = vals
        .iter()
        .filter(|v| v.psnr.is_finite())
        .max_by(|a, b| a.psnr.total_cmp(&b.psnr));
    let minutes = |v: &ValPoint| v.cpu_s.map(|s| s / 60.0);
    let at = marks
        .iter()
        .filter_map(|&mark| {
            vals.iter()
                .rev()
                .find(|v| minutes(v).is_some_and(|m| m <= mark))
                .map(|v| (mark, v.psnr))
        })
        .collect();
    Ok(Summary {
        run: dir.display().to_string(),
        model: config
            .model
            .as_ref()
            .map_or("-".into(), |m| m.kind().to_string()),
        noise: config.noise.clone(),
        steps: history.last_step().unwrap_or(0),
        cpu_minutes: vals.last().and_then(minutes),
        best_val_psnr: best.map(|v| v.psnr),
        best_at_step: best.map(|v| v.step),
        best_at_cpu_minutes: best.and_then(minutes),
        noisy_psnr: vals.last().map(|v| v.noisy_psnr),
        at,
    })
}
