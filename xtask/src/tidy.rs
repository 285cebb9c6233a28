//! `cargo xtask tidy`: checks of the repository's text that neither the compiler nor clippy
//! makes. The product speaks of itself, so its files carry no words about how the work was
//! organised and no paths outside the repository; library crates keep typed errors; the README
//! stays a user's page; every relative link resolves; figures live in docs, not doc comments.

use crate::util;
use anyhow::{Context, Result, bail};
use regex::Regex;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The README's limit in bytes: a page a user reads, with depth in `docs/`.
pub const README_LIMIT: usize = 12 * 1024;

/// A finding: where, and what is wrong.
#[derive(Debug, PartialEq)]
pub struct Finding {
    pub path: PathBuf,
    pub line: usize,
    pub message: String,
}

pub fn run() -> Result<()> {
    let root = util::root();
    let files = tracked_files(&root)?;
    let mut findings = Vec::new();
    let rules = Rules::new();
    for rel in &files {
        let path = root.join(rel);
        if !is_text(rel) || !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read '{}'", path.display()))?;
        // This file names what it forbids.
        if rel != Path::new("xtask/src/tidy.rs") {
            findings.extend(rules.process_words(rel, &text));
        }
        if rel.extension().is_some_and(|e| e == "rs") {
            findings.extend(rules.figures_in_doc_comments(rel, &text));
        }
        if rel.extension().is_some_and(|e| e == "md") {
            findings.extend(rules.broken_links(&root, rel, &text));
        }
        if rel.file_name().is_some_and(|n| n == "Cargo.toml") {
            findings.extend(anyhow_in_library(rel, &text));
        }
    }
    let readme = std::fs::metadata(root.join("README.md"))
        .context("cannot read README.md")?
        .len() as usize;
    findings.extend(readme_size(readme));
    if findings.is_empty() {
        eprintln!("tidy: {} files clean", files.len());
        return Ok(());
    }
    for f in &findings {
        eprintln!("{}:{}: {}", f.path.display(), f.line, f.message);
    }
    bail!("tidy: {} finding(s)", findings.len())
}

/// The files git tracks or would track (untracked but not ignored), relative to the root.
fn tracked_files(root: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("git")
        .args([
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
            "-z",
        ])
        .current_dir(root)
        .output()
        .context("cannot run git ls-files")?;
    if !out.status.success() {
        bail!(
            "git ls-files failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out
        .stdout
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(String::from_utf8_lossy(p).into_owned()))
        .collect())
}

fn is_text(path: &Path) -> bool {
    const TEXT: &[&str] = &[
        "rs", "md", "toml", "sh", "html", "js", "css", "txt", "yaml", "yml", "json", "sbatch",
    ];
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| TEXT.contains(&e))
        || path.file_name().is_some_and(|n| n == "run")
}

struct Rules {
    process: Vec<(Regex, &'static str)>,
    figure: Regex,
    threshold: Regex,
    link: Regex,
}

impl Rules {
    fn new() -> Self {
        // Character classes keep these patterns from matching their own source.
        let process = [
            (r"(?i)\bsess[i]ons? \d", "a numbered work period"),
            (r"(?i)\biss[u]es? #?\d", "an issue number"),
            (r"(?i)\bl[e]nt\b", "a lent machine"),
            (r"\.\./sh[a]red\b", "a path outside the repository"),
            (r"/w[o]rk/(main|shared)\b", "a path outside the repository"),
            (r"(?i)\bpr[o]be\d", "a scratch program"),
            (r"(?i)\bthe [a]rticle\b", "an unnamed source (name it)"),
            (r"(?i)\bw[o]rk periods?\b", "a work period"),
        ];
        Self {
            process: process
                .into_iter()
                .map(|(p, why)| (Regex::new(p).expect("valid pattern"), why))
                .collect(),
            figure: Regex::new(r"\d(\.\d+)?\s?(dB|ms|s/MP|MP/s|patches/s)\b").expect("valid"),
            threshold: Regex::new(r"(?i)\b(under|over|below|above|at least|at most|threshold)\b")
                .expect("valid"),
            link: Regex::new(r"\]\(([^)\s]+)\)").expect("valid"),
        }
    }

    fn process_words(&self, path: &Path, text: &str) -> Vec<Finding> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            for (re, why) in &self.process {
                if let Some(m) = re.find(line) {
                    out.push(Finding {
                        path: path.into(),
                        line: i + 1,
                        message: format!("'{}': {why}; say it in the product's terms", m.as_str()),
                    });
                }
            }
        }
        out
    }

    /// Measurements belong in docs/benchmarks.md with their command, not in doc comments or
    /// `--help` (clap takes help from doc comments): a doc comment keeps the why in a sentence.
    /// A threshold the code applies ("under 0.05 dB") is a rule, not a measurement.
    fn figures_in_doc_comments(&self, path: &Path, text: &str) -> Vec<Finding> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let t = line.trim_start();
            if !(t.starts_with("///") || t.starts_with("//!")) {
                continue;
            }
            if self.figure.is_match(t) && !self.threshold.is_match(t) {
                out.push(Finding {
                    path: path.into(),
                    line: i + 1,
                    message: "a measured figure in a doc comment: move it to \
                              docs/benchmarks.md with its command"
                        .into(),
                });
            }
        }
        out
    }

    fn broken_links(&self, root: &Path, path: &Path, text: &str) -> Vec<Finding> {
        let dir = path.parent().unwrap_or(Path::new(""));
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            for cap in self.link.captures_iter(line) {
                let target = &cap[1];
                if target.contains("://")
                    || target.starts_with('#')
                    || target.starts_with("mailto:")
                {
                    continue;
                }
                let file = target.split('#').next().unwrap_or(target);
                if file.is_empty() || root.join(dir).join(file).exists() {
                    continue;
                }
                out.push(Finding {
                    path: path.into(),
                    line: i + 1,
                    message: format!("link to '{target}', which does not exist"),
                });
            }
        }
        out
    }
}

/// Library crates return typed errors; only the CLI and xtask use anyhow.
fn anyhow_in_library(path: &Path, manifest: &str) -> Vec<Finding> {
    let crate_dir = path.parent().and_then(Path::file_name);
    if !path.starts_with("crates")
        || crate_dir.is_some_and(|n| n == "denoise-cli")
        || path.components().count() != 3
    {
        return Vec::new();
    }
    let mut section = "";
    let mut out = Vec::new();
    for (i, line) in manifest.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            section = t;
        } else if section == "[dependencies]" && t.starts_with("anyhow") {
            out.push(Finding {
                path: path.into(),
                line: i + 1,
                message: "anyhow in a library crate: return a typed error (thiserror)".into(),
            });
        }
    }
    out
}

fn readme_size(bytes: usize) -> Option<Finding> {
    (bytes > README_LIMIT).then(|| Finding {
        path: "README.md".into(),
        line: 1,
        message: format!("{bytes} bytes, over the {README_LIMIT}-byte limit: move depth to docs/"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_process_words_are_found() {
        let rules = Rules::new();
        let text = "ok line\nthe model of sess\u{69}on 12 is better\nsee ../sh\u{61}red/data\n\
                    trained on a l\u{65}nt H200\nas in the \u{61}rticle\n";
        let found = rules.process_words(Path::new("README.md"), text);
        let lines: Vec<usize> = found.iter().map(|f| f.line).collect();
        assert_eq!(lines, [2, 3, 4, 5]);
        assert!(
            rules
                .process_words(Path::new("a.rs"), "a session of training\n")
                .is_empty()
        );
    }

    #[test]
    fn figures_in_doc_comments_are_found_and_thresholds_pass() {
        let rules = Rules::new();
        let text = "/// On CBSD68 this gained 0.08 dB.\n/// bf16 when its loss is under 0.05 dB.\n\
                    // 3.5 dB in a plain comment\nlet x = 1; // 2 ms\n//! took 26 ms here\n";
        let found = rules.figures_in_doc_comments(Path::new("a.rs"), text);
        let lines: Vec<usize> = found.iter().map(|f| f.line).collect();
        assert_eq!(lines, [1, 5]);
    }

    #[test]
    fn broken_relative_links_are_found() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("docs")).unwrap();
        std::fs::write(dir.path().join("docs/guide.md"), "").unwrap();
        let rules = Rules::new();
        let text = "[guide](docs/guide.md) [gone](docs/gone.md#x) [web](https://example.org) \
                    [here](#top)\n";
        let found = rules.broken_links(dir.path(), Path::new("README.md"), text);
        assert_eq!(found.len(), 1);
        assert!(found[0].message.contains("docs/gone.md"));
    }

    #[test]
    fn anyhow_is_refused_in_a_library_crate_only() {
        let manifest = "[package]\nname = \"x\"\n[dependencies]\nanyhow.workspace = true\n";
        assert_eq!(
            anyhow_in_library(Path::new("crates/denoise-data/Cargo.toml"), manifest).len(),
            1
        );
        assert!(anyhow_in_library(Path::new("crates/denoise-cli/Cargo.toml"), manifest).is_empty());
        let dev = "[dev-dependencies]\nanyhow = \"1\"\n";
        assert!(anyhow_in_library(Path::new("crates/denoise-data/Cargo.toml"), dev).is_empty());
    }

    #[test]
    fn a_long_readme_is_refused() {
        assert!(readme_size(README_LIMIT).is_none());
        assert!(readme_size(README_LIMIT + 1).is_some());
    }
}
