//! What a run says as it trains: `train.jsonl` (a line per step and per validation, cut back to
//! the checkpoint's step when the run resumes, so each step is logged once) and its progress on
//! the terminal (a bar, or a plain line a minute when the output is not a terminal).

use crate::plot::{self, History};
use crate::{Result, TrainError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a run whose output is not a terminal prints a progress line.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(60);

/// Opens the history of a run at `path`: a fresh run starts an empty log; a run resumed from the
/// checkpoint of `resumed_at` keeps the lines up to that step (later ones are redone).
pub(crate) fn start(path: &Path, resumed_at: Option<u64>) -> Result<History> {
    let io_err = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let Some(step) = resumed_at else {
        if path.exists() {
            std::fs::remove_file(path).map_err(io_err)?;
        }
        return Ok(History::default());
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(e)),
    };
    let kept = plot::log_up_to(&text, step);
    if kept != text {
        denoise_data::io::write_atomic(path, kept.as_bytes())?;
    }
    Ok(History::parse(&kept))
}

/// A run's log, open for appending.
pub(crate) struct RunLog {
    path: PathBuf,
    file: std::fs::File,
}

impl RunLog {
    pub(crate) fn append(path: PathBuf) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| TrainError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Self { path, file })
    }

    /// Appends `line` as one line of JSON.
    pub(crate) fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{line}").map_err(|source| TrainError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// A run's progress on the terminal.
pub(crate) struct Progress {
    bar: indicatif::ProgressBar,
    quiet: bool,
    /// When the last plain progress line was printed (no bar is drawn).
    last_line: Option<Instant>,
}

impl Progress {
    /// Progress from `step` to `end`: a bar, hidden when `quiet` or when the output is not a
    /// terminal.
    pub(crate) fn new(quiet: bool, step: u64, end: u64) -> Self {
        let bar = if quiet {
            indicatif::ProgressBar::hidden()
        } else {
            let bar = indicatif::ProgressBar::new(end);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_position(step);
            bar
        };
        Self {
            bar,
            quiet,
            last_line: None,
        }
    }

    /// Shows step `step` of `end` done, `elapsed_s` seconds into this call's training. Without a
    /// bar (output redirected: nohup, a log file) a plain line says where the run is, after the
    /// first step and then once a minute.
    pub(crate) fn step(&mut self, step: u64, end: u64, loss: f64, rate: f64, elapsed_s: f64) {
        self.bar.set_position(step);
        self.bar
            .set_message(format!("loss {loss:.5}  {rate:.0} patches/s"));
        if !self.quiet
            && self.bar.is_hidden()
            && self
                .last_line
                .is_none_or(|t| t.elapsed() >= PLAIN_PROGRESS_EVERY)
        {
            self.last_line = Some(Instant::now());
            eprintln!(
                "step {step}/{end}: loss {loss:.5}, {rate:.1} patches/s, {elapsed_s:.0} s elapsed"
            );
        }
    }

    /// A line for the user (validation scores), unless quiet.
    pub(crate) fn report(&self, line: String) {
        if !self.quiet {
            self.say(line);
        }
    }

    /// A warning, said even when quiet.
    pub(crate) fn warn(&self, line: String) {
        self.say(line);
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// Prints a line above the bar, or to stderr when the bar is hidden (indicatif drops
    /// `println` on a hidden bar, which would lose validation lines in logs).
    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_log_keeps_the_lines_up_to_its_checkpoint_and_a_new_one_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.jsonl");
        let mut log = RunLog::append(path.clone()).unwrap();
        for step in 1..=4 {
            log.write(&serde_json::json!({"step": step, "loss": 0.5 / step as f64}))
                .unwrap();
        }
        log.write(&serde_json::json!({"step": 2, "val_psnr": 30.0, "noisy_psnr": 20.0}))
            .unwrap();
        drop(log);
        // Killed after step 4's line, with the checkpoint of step 2.
        let history = start(&path, Some(2)).unwrap();
        assert_eq!(history.val_points().count(), 1);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"loss\":0.5,\"step\":1}\n{\"loss\":0.25,\"step\":2}\n\
             {\"noisy_psnr\":20.0,\"step\":2,\"val_psnr\":30.0}\n"
        );
        let fresh = start(&path, None).unwrap();
        assert_eq!(fresh.val_points().count(), 0);
        assert!(!path.exists());
    }
}
