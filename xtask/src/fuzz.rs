//! `cargo xtask fuzz`: builds the fuzz targets of `fuzz/` with coverage instrumentation on
//! stable Rust and runs each under libFuzzer for a set time, then prints what each did
//! (executions, edges covered, corpus) and any crash, whose input is kept under
//! `fuzz/artifacts/TARGET/` (ignored by git). `cargo xtask ci` runs a short, seeded pass.
//!
//! The instrumented build shares nothing with the ordinary one (every crate is compiled with
//! other flags), so it lives in the cache directory (`$DENOISE_CACHE_DIR/fuzz-target`, default
//! `~/.cache/denoise`), where a fresh checkout, CI's included, finds its dependencies built.
//!
//! libFuzzer comes from the `libfuzzer-sys` crate, compiled from source by its build script:
//! nothing to install beyond the C++ compiler libtorch's bindings already need. Stable rustc
//! instruments with `-Cpasses=sancov-module` and LLVM's coverage options; only sanitizers
//! need nightly, and the code fuzzed is safe Rust, where a bug shows as a panic.

use crate::{setup, util};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The targets of `fuzz/src/lib.rs` (`TARGETS`, checked by a test) and the longest input each
/// is given: images and model files need room for a header and some data.
const TARGETS: [(&str, usize); 6] = [
    ("image", 16 << 10),
    ("noise", 256),
    ("train_config", 4 << 10),
    ("manifest", 4 << 10),
    ("artefact", 64 << 10),
    ("http", 16 << 10),
];

/// Coverage instrumentation for libFuzzer that stable rustc accepts, with the checks of a
/// debug build (overflow, debug assertions) on.
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cdebug-assertions",
    "-Coverflow-checks",
    "-Cdebuginfo=line-tables-only",
];

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Run only this target (repeatable); default: all of them, one after another.
    #[arg(long = "target", value_parser = target_name)]
    targets: Vec<String>,
    /// libFuzzer's random seed (default: a new one each run).
    #[arg(long)]
    seed: Option<u32>,
}

/// What `cargo xtask ci` runs: every target for a few seconds from a fixed seed, so a bug that
/// the seeds and their first mutations reach fails CI, and the same way every time.
pub fn smoke() -> Result<()> {
    run(&FuzzArgs {
        seconds: 5,
        targets: Vec::new(),
        seed: Some(1),
    })
}

fn target_name(name: &str) -> std::result::Result<String, String> {
    if TARGETS.iter().any(|(t, _)| *t == name) {
        Ok(name.to_owned())
    } else {
        let names: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).collect();
        Err(format!("one of {}", names.join(", ")))
    }
}

/// What one target's run did, read from libFuzzer's output.
#[derive(Debug, Default, PartialEq)]
struct Outcome {
    executions: u64,
    per_second: u64,
    /// Edges reached, and how many the binary has (every target's code included).
    covered: u64,
    edges: u64,
    features: u64,
    corpus: u64,
    /// Inputs that crashed, timed out or ran out of memory, as libFuzzer wrote them.
    findings: Vec<PathBuf>,
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    let start = Instant::now();
    let binary = build()?;
    eprintln!("    build: {:.0}s", start.elapsed().as_secs_f64());
    let chosen: Vec<(&str, usize)> = TARGETS
        .iter()
        .copied()
        .filter(|(t, _)| args.targets.is_empty() || args.targets.iter().any(|a| a == t))
        .collect();
    let mut outcomes = Vec::new();
    for (name, max_len) in chosen {
        let outcome = fuzz(&binary, name, max_len, args)?;
        eprintln!(
            "{name}: {} runs ({}/s), {} of {} edges, {} features, corpus {}, {} crashes",
            outcome.executions,
            outcome.per_second,
            outcome.covered,
            outcome.edges,
            outcome.features,
            outcome.corpus,
            outcome.findings.len()
        );
        outcomes.push((name, outcome));
    }
    let found: Vec<String> = outcomes
        .iter()
        .flat_map(|(name, o)| o.findings.iter().map(move |f| (name, f)))
        .map(|(name, f)| {
            format!(
                "{name}: {} (rerun: DENOISE_FUZZ_TARGET={name} {} {})",
                f.display(),
                binary.display(),
                f.display()
            )
        })
        .collect();
    eprintln!("fuzz: done in {:.0}s", start.elapsed().as_secs_f64());
    if !found.is_empty() {
        bail!("{} crashing inputs:\n{}", found.len(), found.join("\n"));
    }
    Ok(())
}

/// Builds `fuzz/`'s libFuzzer binary in its own target directory (instrumented code must not
/// mix with the ordinary build's) and returns its path. `--target` keeps build scripts and
/// procedural macros uninstrumented: they run on the host, without libFuzzer's runtime.
fn build() -> Result<PathBuf> {
    let host = host_triple()?;
    let dir = setup::cache_dir()?.join("fuzz-target");
    util::run_step(
        "cargo build (fuzz targets, instrumented)",
        util::cargo()
            .args(["build", "-p", "denoise-fuzz", "--features", "engine"])
            .args(["--bin", "fuzz", "--target", &host, "--target-dir"])
            .arg(&dir)
            .env("RUSTFLAGS", RUSTFLAGS.join(" ")),
    )?;
    Ok(dir.join(host).join("debug").join("fuzz"))
}

fn host_triple() -> Result<String> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc)
        .arg("-vV")
        .output()
        .context("cannot run rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV names no host")
}

/// Runs one target for `args.seconds`, its corpus in `fuzz/corpus/NAME` (seeded by the target) and
/// its findings in `fuzz/artifacts/NAME/`, with libFuzzer's output kept in `log.txt` there
/// (the web app's target logs every request).
fn fuzz(binary: &Path, name: &str, max_len: usize, args: &FuzzArgs) -> Result<Outcome> {
    let seconds = args.seconds;
    let fuzz_dir = util::root().join("fuzz");
    let corpus = fuzz_dir.join("corpus").join(name);
    let artifacts = fuzz_dir.join("artifacts").join(name);
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    let log_path = artifacts.join("log.txt");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    eprintln!("==> fuzz {name} for {seconds}s");
    let mut prefix = artifacts.clone().into_os_string();
    prefix.push("/");
    let status = Command::new(binary)
        .arg(&corpus)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={max_len}"))
        .arg({
            let mut a = std::ffi::OsString::from("-artifact_prefix=");
            a.push(&prefix);
            a
        })
        // A slow input is a finding (a request the server holds for a minute, say).
        .args(["-timeout=60", "-rss_limit_mb=4096", "-print_final_stats=1"])
        .args(args.seed.map(|s| format!("-seed={s}")))
        .env("DENOISE_FUZZ_TARGET", name)
        .env("DENOISE_FUZZ_SEEDS", &corpus)
        .stdout(Stdio::null())
        .stderr(log)
        .current_dir(&fuzz_dir)
        .status()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let outcome = parse(&text);
    if !status.success() && outcome.findings.is_empty() {
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        bail!(
            "fuzz target {name} failed ({status}) without a finding; the end of {}:\n{}",
            log_path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    if !outcome.findings.is_empty() {
        // The panic message and where: the lines before libFuzzer's report.
        let report: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("panicked at") || l.starts_with("==") || l.contains("SUMMARY"))
            .take(6)
            .collect();
        eprintln!("{}", report.join("\n"));
    }
    Ok(outcome)
}

/// Reads libFuzzer's output: the instrumented edges at start, the last status line's coverage,
/// the final statistics, and the paths of inputs it wrote as findings.
fn parse(text: &str) -> Outcome {
    let mut o = Outcome::default();
    let number = |s: &str| s.trim().parse::<u64>().unwrap_or(0);
    let after = |line: &str, key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        Some(number(rest.split_whitespace().next()?.split('/').next()?))
    };
    for line in text.lines() {
        if line.starts_with("INFO: Loaded") && line.contains("inline 8-bit counters") {
            o.edges += line
                .split('(')
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .map_or(0, number);
        }
        if line.starts_with('#') && line.contains(" cov: ") {
            o.covered = after(line, " cov: ").unwrap_or(o.covered);
            o.features = after(line, " ft: ").unwrap_or(o.features);
            o.corpus = after(line, " corp: ").unwrap_or(o.corpus);
        }
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            o.executions = number(v);
        }
        if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
            o.per_second = number(v);
        }
        if let Some(at) = line.find("Test unit written to ") {
            o.findings.push(PathBuf::from(
                line[at + "Test unit written to ".len()..].trim(),
            ));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_list_matches_the_fuzz_crate() {
        let lib = std::fs::read_to_string(util::root().join("fuzz/src/lib.rs")).unwrap();
        let list = lib
            .split("pub const TARGETS")
            .nth(1)
            .and_then(|s| s.split(']').nth(1))
            .expect("fuzz/src/lib.rs declares TARGETS");
        let names: Vec<&str> = list.split('"').skip(1).step_by(2).collect();
        let ours: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).collect();
        assert_eq!(names, ours);
    }

    #[test]
    fn libfuzzer_output_is_read_into_figures_and_findings() {
        let text = "\
INFO: Seed: 1234
INFO: Loaded 1 modules   (912345 inline 8-bit counters): 912345 [0x1, 0x2),
#2\tINITED cov: 100 ft: 120 corp: 5/300b exec/s: 0 rss: 80Mb
#4096\tpulse  cov: 2345 ft: 3456 corp: 78/9Kb lim: 4096 exec/s: 1365 rss: 120Mb
thread '<unnamed>' panicked at src/x.rs:1:1:
boom
==77== ERROR: libFuzzer: deadly signal
artifact_prefix='a/'; Test unit written to a/crash-0123abcd
stat::number_of_executed_units: 5000
stat::average_exec_per_sec:     1250
";
        assert_eq!(
            parse(text),
            Outcome {
                executions: 5000,
                per_second: 1250,
                covered: 2345,
                edges: 912345,
                features: 3456,
                corpus: 78,
                findings: vec![PathBuf::from("a/crash-0123abcd")],
            }
        );
    }
}
