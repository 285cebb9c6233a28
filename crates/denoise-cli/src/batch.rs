//! A batch split across processes and machines: which share of the inputs one process takes
//! (`--shard`, given or read from a Slurm job array's or a Kubernetes Indexed Job's
//! environment), lists of inputs (`--files-from`), and the JSON report of a run (`--report`).
//!
//! A file's shard is a pure function of its key, the path its output takes under `--out-dir`
//! (the path relative to the input folder, or to the list's folder), and of the shard count:
//! blake3 of the key's bytes, its first 8 bytes as a little-endian integer, modulo N. So every
//! machine and every run agree without talking to each other, and a file keeps its shard when
//! others are added or removed: a listing that changes while the array runs can leave a file
//! that arrived late to no shard, never one that was there all along (contiguous ranges of the
//! sorted listing would move the boundaries, and a file near one could be missed by both of its
//! neighbours or taken by both). Shards hold the binomial share of a hash, close to n/N each
//! for batches much larger than N.

use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::path::{Component, Path, PathBuf};

/// `--shard`: this process's share of the inputs, `I/N`, or `auto` from the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardArg {
    Auto,
    Fixed(Shard),
}

/// Shard `index` of `count` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl std::str::FromStr for ShardArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(ShardArg::Auto);
        }
        let usage = || format!("'{s}' is not I/N (shard I of N, from 0: 0/4 to 3/4) or 'auto'");
        let (i, n) = s.split_once('/').ok_or_else(usage)?;
        let index: u64 = i.trim().parse().map_err(|_| usage())?;
        let count: u64 = n.trim().parse().map_err(|_| usage())?;
        Shard::new(index, count).map(ShardArg::Fixed)
    }
}

impl Shard {
    /// Checks that there is at least one shard and that `index` is one of them.
    pub fn new(index: u64, count: u64) -> Result<Self, String> {
        if count == 0 {
            return Err("the shard count must be at least 1".into());
        }
        if index >= count {
            return Err(format!(
                "shard {index} is out of range for {count} shard(s): shards count from 0, so \
                 give 0 to {}",
                count - 1
            ));
        }
        Ok(Self { index, count })
    }

    /// Whether the file with `key` (see [`key_bytes`]) falls to this shard.
    pub fn holds(&self, key: &[u8]) -> bool {
        shard_of(key, self.count) == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// `--shards`: a shard count, at least 1.
pub fn parse_shards(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "'{s}' is not a shard count (a whole number, at least 1)"
        )),
    }
}

/// The shard of `count` that `key` falls to: blake3's first 8 bytes, little-endian, modulo
/// `count` (the modulo's bias is below 2^-40 for any count a batch uses).
pub fn shard_of(key: &[u8], count: u64) -> u64 {
    let hash = blake3::hash(key);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first) % count
}

/// A relative path as the bytes that are hashed: its components joined by `/`, so `./a//b.png`
/// and `a/b.png` are one key.
pub fn key_bytes(rel: &Path) -> Vec<u8> {
    let mut key = Vec::new();
    for part in rel.components() {
        if let Component::Normal(name) = part {
            if !key.is_empty() {
                key.push(b'/');
            }
            key.extend_from_slice(name.as_encoded_bytes());
        }
    }
    key
}

/// The environment variables `--shard auto` reads.
pub const SLURM_ID: &str = "SLURM_ARRAY_TASK_ID";
pub const SLURM_COUNT: &str = "SLURM_ARRAY_TASK_COUNT";
pub const SLURM_MIN: &str = "SLURM_ARRAY_TASK_MIN";
pub const SLURM_STEP: &str = "SLURM_ARRAY_TASK_STEP";
pub const K8S_INDEX: &str = "JOB_COMPLETION_INDEX";

/// `--shard auto`: the shard from a Slurm job array (`SLURM_ARRAY_TASK_ID` less
/// `SLURM_ARRAY_TASK_MIN`, divided by `SLURM_ARRAY_TASK_STEP`, of `SLURM_ARRAY_TASK_COUNT`) or,
/// failing that, from a Kubernetes Indexed Job (`JOB_COMPLETION_INDEX` of `shards`, the Job's
/// completions, which its pods are not told). Returns the shard and the variables it came from,
/// for the log. `var` reads the environment (a map in tests).
pub fn shard_from_env(
    shards: Option<u64>,
    var: impl Fn(&str) -> Option<String>,
) -> Result<(Shard, String)> {
    let number = |name: &str| -> Result<Option<u64>> {
        var(name)
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| anyhow::anyhow!("{name}='{v}' is not a whole number"))
            })
            .transpose()
    };
    if let Some(id) = number(SLURM_ID)? {
        let count = number(SLURM_COUNT)?.with_context(|| {
            format!("{SLURM_ID} is set but {SLURM_COUNT} is not: is this a Slurm job array?")
        })?;
        let min = number(SLURM_MIN)?.unwrap_or(0);
        let step = number(SLURM_STEP)?.unwrap_or(1).max(1);
        let offset = id.checked_sub(min).with_context(|| {
            format!("{SLURM_ID}={id} is below {SLURM_MIN}={min}: is this a Slurm job array?")
        })?;
        let index = offset / step;
        if offset % step != 0 || index >= count {
            bail!(
                "{SLURM_ID}={id} is not one of {count} evenly spaced indices from {min} (step \
                 {step}): submit the array as one range (--array=0-3, or 0-30:10), not a list"
            );
        }
        if let Some(n) = shards.filter(|&n| n != count) {
            bail!("--shards {n} disagrees with {SLURM_COUNT}={count}: leave --shards out");
        }
        let mut from = format!("{SLURM_ID}={id}");
        if min != 0 {
            from += &format!(", {SLURM_MIN}={min}");
        }
        if step != 1 {
            from += &format!(", {SLURM_STEP}={step}");
        }
        from += &format!(", {SLURM_COUNT}={count}");
        let shard = Shard::new(index, count).map_err(anyhow::Error::msg)?;
        return Ok((shard, from));
    }
    if let Some(index) = number(K8S_INDEX)? {
        let count = shards.with_context(|| {
            format!(
                "{K8S_INDEX}={index} is set (a Kubernetes Indexed Job), but not --shards: give \
                 --shards N, the Job's completions"
            )
        })?;
        if index >= count {
            bail!(
                "{K8S_INDEX}={index} is out of range for --shards {count}: --shards must be the \
                 Job's completions"
            );
        }
        let shard = Shard::new(index, count).map_err(anyhow::Error::msg)?;
        return Ok((shard, format!("{K8S_INDEX}={index}, --shards {count}")));
    }
    bail!(
        "--shard auto found neither {SLURM_ID} and {SLURM_COUNT} (a Slurm job array) nor \
         {K8S_INDEX} (a Kubernetes Indexed Job, with --shards N): give --shard I/N"
    )
}

/// One entry of a `--files-from` list: the file to read and its key, the path its output takes
/// under `--out-dir`.
#[derive(Debug, PartialEq, Eq)]
pub struct Listed {
    pub file: PathBuf,
    pub key: PathBuf,
}

/// Reads a `--files-from` list: one path per line, relative to the list's folder or absolute;
/// blank lines, lines starting with `#` and the spaces around a path are skipped. A file's key
/// is its path relative to the list's folder; a file outside that folder (an absolute path
/// elsewhere, or one reached through `..`) is keyed by its name alone.
pub fn read_list(list: &Path) -> Result<Vec<Listed>> {
    let text = std::fs::read_to_string(list)
        .with_context(|| format!("cannot read the list '{}'", list.display()))?;
    let dir = list
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let root = normalise(&std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()));
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let file = dir.join(line);
        let absolute = normalise(&std::path::absolute(&file).unwrap_or_else(|_| file.clone()));
        let key = match absolute.strip_prefix(&root) {
            Ok(rel) if !rel.as_os_str().is_empty() => rel.to_path_buf(),
            _ => PathBuf::from(absolute.file_name().with_context(|| {
                format!(
                    "'{line}' (line {} of '{}') names no file",
                    n + 1,
                    list.display()
                )
            })?),
        };
        if !file.is_file() {
            bail!(
                "'{}' (line {} of '{}') is not a file",
                file.display(),
                n + 1,
                list.display()
            );
        }
        entries.push(Listed { file, key });
    }
    Ok(entries)
}

/// `path` with `.` dropped and `..` taken back lexically.
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// What became of one input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Denoised and written.
    Done,
    /// Left alone: `--skip-existing` and its output exists.
    Skipped,
    /// Not written; `error` says why.
    Failed,
}

/// One input's line in the report.
#[derive(Debug, Serialize)]
pub struct FileReport {
    pub input: String,
    pub output: String,
    pub status: Status,
    /// Wall seconds spent on it (0 when skipped).
    pub seconds: f64,
    /// The noise level the model was told (its root mean square for a map estimated from
    /// brightness), on the 0-255 scale; `null` for a model without a noise-level input, for one
    /// that reads the level itself (an FFDNet with an estimation branch, run blind), a skipped
    /// file or a failure.
    pub sigma: Option<f32>,
    /// Whether `sigma` was estimated from the image rather than given.
    pub sigma_estimated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Counts over a report's files.
#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub files: usize,
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
    /// Wall seconds of the whole run, model loading included.
    pub seconds: f64,
}

/// The shard a report covers.
#[derive(Debug, Serialize)]
pub struct ShardReport {
    pub index: u64,
    pub count: u64,
    /// Where `--shard auto` read it (`SLURM_ARRAY_TASK_ID=2, SLURM_ARRAY_TASK_COUNT=4`), or
    /// `--shard`.
    pub from: String,
    /// Images in the whole batch, over all shards.
    pub batch_files: usize,
}

/// `--report`: what a run did with each of its inputs.
#[derive(Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub shard: Option<ShardReport>,
    pub files: Vec<FileReport>,
    pub totals: Totals,
}

impl Report {
    /// Fills in the totals and writes the report to `path` atomically (a temporary file
    /// renamed over it), making its folder if missing.
    pub fn write(&mut self, path: &Path, seconds: f64) -> Result<()> {
        let count = |s: Status| self.files.iter().filter(|f| f.status == s).count();
        self.totals = Totals {
            files: self.files.len(),
            done: count(Status::Done),
            skipped: count(Status::Skipped),
            failed: count(Status::Failed),
            seconds,
        };
        let mut json = serde_json::to_vec_pretty(self).context("cannot encode the report")?;
        json.push(b'\n');
        crate::outputs::create_parent_dir(path)?;
        denoise_data::io::write_atomic(path, &json)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn shard_specs_parse_and_refuse_what_is_out_of_range() {
        assert_eq!("auto".parse(), Ok(ShardArg::Auto));
        assert_eq!(
            "2/4".parse(),
            Ok(ShardArg::Fixed(Shard { index: 2, count: 4 }))
        );
        for (bad, needle) in [
            ("4/4", "out of range"),
            ("0/0", "at least 1"),
            ("3", "is not I/N"),
            ("-1/4", "is not I/N"),
            ("a/b", "is not I/N"),
            ("", "is not I/N"),
        ] {
            let err = bad.parse::<ShardArg>().unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    /// The rule itself, pinned: a change would move files between the shards of a batch that
    /// is half done.
    #[test]
    fn the_shard_of_a_key_is_blake3_modulo_the_count() {
        let hash = blake3::hash(b"a/b.png");
        let first = u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap());
        for n in 1..10 {
            assert_eq!(shard_of(b"a/b.png", n), first % n);
        }
        assert_eq!(key_bytes(Path::new("./a//b.png")), b"a/b.png");
    }

    #[test]
    fn shards_cover_every_key_once_and_share_them_out() {
        let keys: Vec<Vec<u8>> = (0..1000)
            .map(|i| format!("dir{}/img{i}.png", i % 7).into_bytes())
            .collect();
        for n in [1, 3, 4, 16] {
            let mut sizes = vec![0usize; n as usize];
            for key in &keys {
                let owners: Vec<u64> = (0..n)
                    .filter(|&i| Shard { index: i, count: n }.holds(key))
                    .collect();
                assert_eq!(owners.len(), 1);
                sizes[owners[0] as usize] += 1;
            }
            let fair = keys.len() / n as usize;
            // Binomial spread: within five standard deviations of the fair share.
            let slack = (5.0 * (fair as f64).sqrt()) as usize;
            assert!(
                sizes.iter().all(|&s| s.abs_diff(fair) <= slack),
                "{sizes:?}"
            );
        }
    }

    #[test]
    fn slurm_arrays_give_the_index_from_their_minimum_and_step() {
        let (shard, from) = shard_from_env(
            None,
            env(&[(SLURM_ID, "2"), (SLURM_COUNT, "4"), (SLURM_MIN, "0")]),
        )
        .unwrap();
        assert_eq!(shard, Shard { index: 2, count: 4 });
        assert_eq!(from, "SLURM_ARRAY_TASK_ID=2, SLURM_ARRAY_TASK_COUNT=4");
        let (shard, from) = shard_from_env(
            None,
            env(&[(SLURM_ID, "7"), (SLURM_COUNT, "4"), (SLURM_MIN, "5")]),
        )
        .unwrap();
        assert_eq!(shard, Shard { index: 2, count: 4 });
        assert!(from.contains("SLURM_ARRAY_TASK_MIN=5"), "{from}");
        let (shard, _) = shard_from_env(
            None,
            env(&[
                (SLURM_ID, "20"),
                (SLURM_COUNT, "4"),
                (SLURM_MIN, "0"),
                (SLURM_STEP, "10"),
            ]),
        )
        .unwrap();
        assert_eq!(shard, Shard { index: 2, count: 4 });
        // Slurm wins over a Kubernetes index; a --shards that matches is accepted.
        let (shard, _) = shard_from_env(
            Some(4),
            env(&[(SLURM_ID, "1"), (SLURM_COUNT, "4"), (K8S_INDEX, "3")]),
        )
        .unwrap();
        assert_eq!(shard.index, 1);
    }

    #[test]
    fn kubernetes_indexed_jobs_need_shards() {
        let (shard, from) = shard_from_env(Some(3), env(&[(K8S_INDEX, "2")])).unwrap();
        assert_eq!(shard, Shard { index: 2, count: 3 });
        assert_eq!(from, "JOB_COMPLETION_INDEX=2, --shards 3");
    }

    /// `--shards`, the environment, and what the error must say.
    type Case = (
        Option<u64>,
        &'static [(&'static str, &'static str)],
        &'static str,
    );

    #[test]
    fn missing_or_inconsistent_variables_are_refused_naming_them() {
        let cases: &[Case] = &[
            (None, &[], "found neither SLURM_ARRAY_TASK_ID"),
            (None, &[(SLURM_ID, "1")], "SLURM_ARRAY_TASK_COUNT is not"),
            (None, &[(SLURM_ID, "x"), (SLURM_COUNT, "2")], "'x' is not"),
            (None, &[(SLURM_ID, "4"), (SLURM_COUNT, "4")], "one range"),
            (
                None,
                &[(SLURM_ID, "1"), (SLURM_COUNT, "4"), (SLURM_MIN, "2")],
                "below",
            ),
            (Some(3), &[(SLURM_ID, "1"), (SLURM_COUNT, "4")], "disagrees"),
            (None, &[(K8S_INDEX, "0")], "give --shards N"),
            (Some(3), &[(K8S_INDEX, "3")], "out of range"),
            (Some(3), &[(K8S_INDEX, "-1")], "not a whole number"),
        ];
        for (shards, vars, needle) in cases {
            let err = shard_from_env(*shards, env(vars)).unwrap_err().to_string();
            assert!(err.contains(needle), "{vars:?}: {err}");
        }
    }

    #[test]
    fn lists_are_read_relative_to_their_folder_with_comments_and_blanks_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("lists/sub")).unwrap();
        for f in ["lists/a.png", "lists/sub/b.png", "c.png"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let outside = dir.path().join("c.png");
        let list = dir.path().join("lists/list.txt");
        std::fs::write(
            &list,
            format!(
                "# inputs\n\na.png\n  ./sub//b.png  \r\n../c.png\n{}\n",
                outside.display()
            ),
        )
        .unwrap();
        let keys: Vec<PathBuf> = read_list(&list)
            .unwrap()
            .into_iter()
            .map(|l| l.key)
            .collect();
        assert_eq!(
            keys,
            ["a.png", "sub/b.png", "c.png", "c.png"].map(PathBuf::from)
        );
        std::fs::write(&list, "a.png\nmissing.png\n").unwrap();
        let err = read_list(&list).unwrap_err().to_string();
        assert!(
            err.contains("missing.png") && err.contains("line 2"),
            "{err}"
        );
    }
}
