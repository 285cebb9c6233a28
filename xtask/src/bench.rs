//! `cargo xtask bench`: our throughput beside PyTorch's, same model, input and machine, in one
//! run. For each model it runs `denoise-cli bench` (inference MP/s, and with `--train` the
//! training step's patches/s) and the PyTorch reference's `bench.py` back to back, alternating which
//! goes first from round to round, and prints both with their ratio. The machine is shared and
//! noisy: only ratios measured this way mean anything.

use crate::{passthrough, util};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Comma-separated model kinds (ffdnet has no PyTorch twin: ours only).
    #[arg(long, default_value = "autoencoder,unet,ridnet,dncnn,ffdnet")]
    models: String,
    /// Side of the square inference input.
    #[arg(long, default_value_t = 256)]
    size: u32,
    /// Precision of our runs (fp32 or bf16); PyTorch runs fp32, fp32 channels-last and, for
    /// bf16, autocast bf16 channels-last.
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Also time training steps (batch 16 of 64x64; RIDNet 8 of 80x80, as the reference).
    #[arg(long)]
    train: bool,
    /// Skip inference (with --train: training only).
    #[arg(long)]
    no_infer: bool,
    /// Back-to-back rounds; each figure is the median over rounds of per-round medians.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=1000))]
    rounds: u16,
    /// Threads for both sides.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=4096))]
    threads: u16,
    /// The PyTorch reference bench script (`bench.py`), or $DENOISE_REFERENCE_BENCH.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Python with torch for the reference (default: $DENOISE_REF_PYTHON, the reference venv
    /// ~/.cache/denoise-ref-venv, then the venv `cargo xtask setup` made).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One figure: ours or a PyTorch mode, per round.
#[derive(Default)]
struct Figure {
    label: String,
    unit: &'static str,
    per_round: Vec<f64>,
}

impl Figure {
    fn median(&self) -> f64 {
        let mut v = self.per_round.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let cli = passthrough::build_cli()?;
    let reference = args
        .reference
        .clone()
        .or_else(|| std::env::var_os("DENOISE_REFERENCE_BENCH").map(PathBuf::from))
        .map(|p| util::root().join(p))
        .unwrap_or_default();
    let python = if reference.is_file() {
        Some(find_python(args.python.as_deref())?)
    } else {
        eprintln!(
            "bench: no reference script at '{}': our figures only",
            reference.display()
        );
        None
    };
    let bf16 = match args.precision.as_str() {
        "fp32" => false,
        "bf16" => true,
        other => bail!("--precision must be fp32 or bf16, not '{other}'"),
    };
    let mut rows: Vec<(String, String, Vec<Figure>)> = Vec::new();
    for model in args.models.split(',').map(str::trim) {
        let twin = model != "ffdnet";
        let mut tasks: Vec<(&str, Vec<&str>)> = Vec::new();
        if !args.no_infer {
            let modes = if bf16 {
                vec!["fp32", "fp32_cl", "bf16_cl"]
            } else {
                vec!["fp32", "fp32_cl"]
            };
            tasks.push(("infer", modes));
        }
        if args.train {
            let modes = if bf16 {
                vec!["train_fp32", "train_fp32_cl", "train_bf16_cl"]
            } else {
                vec!["train_fp32", "train_fp32_cl"]
            };
            tasks.push(("train", modes));
        }
        for (task, modes) in tasks {
            let ours_label = format!("ours {}", args.precision);
            let mut figures = vec![Figure {
                label: ours_label,
                unit: if task == "train" { "patches/s" } else { "MP/s" },
                ..Default::default()
            }];
            for mode in &modes {
                figures.push(Figure {
                    label: format!("PyTorch {mode}"),
                    unit: figures[0].unit,
                    ..Default::default()
                });
            }
            for round in 0..args.rounds {
                let ours_first = round % 2 == 0;
                let mut order = vec![true, false];
                if !ours_first {
                    order.reverse();
                }
                for ours in order {
                    if ours {
                        eprintln!("bench: {model} {task}: ours (round {})", round + 1);
                        figures[0]
                            .per_round
                            .push(run_ours(&cli, args, model, task)?);
                    } else if let (Some(py), true) = (&python, twin) {
                        eprintln!("bench: {model} {task}: PyTorch (round {})", round + 1);
                        let got = run_reference(py, &reference, args, model, &modes)?;
                        for (fig, value) in figures[1..].iter_mut().zip(got) {
                            fig.per_round.push(value);
                        }
                    }
                }
            }
            figures.retain(|f| !f.per_round.is_empty());
            rows.push((model.to_owned(), task.to_owned(), figures));
        }
    }
    print_table(args, &rows);
    let report: Vec<Value> = rows
        .iter()
        .map(|(model, task, figs)| {
            serde_json::json!({
                "model": model, "task": task,
                "size": if task == "infer" { Some(args.size) } else { None },
                "figures": figs.iter().map(|f| serde_json::json!({
                    "label": f.label, "unit": f.unit, "median": f.median(), "per_round": f.per_round,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| util::target_dir().join("bench/xtask-bench.json"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::json!({"threads": args.threads, "rounds": args.rounds, "rows": report});
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("cannot write '{}'", out.display()))?;
    eprintln!("bench: report in {}", out.display());
    Ok(())
}

fn print_table(args: &BenchArgs, rows: &[(String, String, Vec<Figure>)]) {
    println!(
        "\n{} threads, inference on 1x3x{}x{}, {} round(s); ratio = ours / best PyTorch mode",
        args.threads, args.size, args.size, args.rounds
    );
    println!("| model | task | unit | ours | PyTorch (mode: value) | ratio |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (model, task, figs) in rows {
        let ours = figs[0].median();
        let theirs: Vec<String> = figs[1..]
            .iter()
            .map(|f| {
                let label = f.label.trim_start_matches("PyTorch ");
                format!("{label}: {}", fmt(f.median()))
            })
            .collect();
        let best = figs[1..]
            .iter()
            .map(Figure::median)
            .fold(f64::NAN, f64::max);
        let ratio = if best.is_finite() {
            format!("{:.2}", ours / best)
        } else {
            "-".into()
        };
        println!(
            "| {model} | {task} | {} | {} | {} | {ratio} |",
            figs[0].unit,
            fmt(ours),
            if theirs.is_empty() {
                "-".into()
            } else {
                theirs.join(", ")
            }
        );
    }
}

fn fmt(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn run_ours(cli: &Path, args: &BenchArgs, model: &str, task: &str) -> Result<f64> {
    let mut cmd = Command::new(cli);
    cmd.args(["--threads", &args.threads.to_string(), "bench", "--json"])
        .args(["--model", model, "--precision", &args.precision])
        .args(["--size", &args.size.to_string()]);
    if task == "train" {
        cmd.arg("--train");
    }
    let json = json_output(&mut cmd)?;
    let key = if task == "train" {
        "patches_per_s"
    } else {
        "mp_per_s"
    };
    json[key]
        .as_f64()
        .with_context(|| format!("denoise-cli bench printed no {key}: {json}"))
}

fn run_reference(
    python: &Path,
    script: &Path,
    args: &BenchArgs,
    model: &str,
    modes: &[&str],
) -> Result<Vec<f64>> {
    // The reference names the autoencoder "ae".
    let ref_name = if model == "autoencoder" { "ae" } else { model };
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .args(["--models", ref_name, "--modes", &modes.join(",")])
        .args(["--size", &args.size.to_string()])
        .args(["--threads", &args.threads.to_string(), "--json"])
        .current_dir(script.parent().unwrap_or(Path::new(".")));
    let json = json_output(&mut cmd)?;
    let results = json["results"]
        .as_array()
        .context("bench.py printed no results")?;
    modes
        .iter()
        .map(|mode| {
            results
                .iter()
                .find(|r| r["mode"] == *mode)
                .and_then(|r| r["median"].as_f64())
                .with_context(|| format!("bench.py gave no {mode} figure for {model}"))
        })
        .collect()
}

/// Runs `cmd`, passing its stderr through, and parses its stdout as JSON.
fn json_output(cmd: &mut Command) -> Result<Value> {
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("{cmd:?} printed no JSON"))
}

fn find_python(given: Option<&Path>) -> Result<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut candidates: Vec<PathBuf> = Vec::new();
    candidates.extend(given.map(Path::to_path_buf));
    candidates.extend(std::env::var_os("DENOISE_REF_PYTHON").map(PathBuf::from));
    if let Some(home) = &home {
        candidates.push(home.join(".cache/denoise-ref-venv/bin/python"));
    }
    // The venv `cargo xtask setup` made: .libtorch -> <venv>/lib/pythonX.Y/site-packages/torch.
    if let Ok(torch) = std::fs::canonicalize(util::root().join(".libtorch")) {
        if let Some(venv) = torch.ancestors().nth(4) {
            candidates.push(venv.join("bin/python"));
        }
    }
    for py in &candidates {
        let ok = Command::new(py)
            .args(["-c", "import torch"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(py.clone());
        }
        if given.is_some_and(|g| g == py) {
            bail!("--python '{}' cannot import torch", py.display());
        }
    }
    bail!(
        "no Python with torch for the reference bench (tried {}): pass --python",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}
