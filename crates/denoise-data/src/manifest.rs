//! `prepare-data`: validating one or more folders of clean images, dropping duplicates, a seeded
//! train/validation split of each folder, dataset statistics, optional fixed noisy validation
//! images, and the `manifest.json` that records it all.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::UNIX_EPOCH;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dataset::scan;
use crate::io::{self, BitDepth, DEFAULT_MAX_PIXELS, RawImage, Samples};
use crate::loader::derive_seed;
use crate::noise::NoiseSpec;
use crate::{DataError, Result};

/// Version of the manifest layout; bumped on any incompatible change.
pub const MANIFEST_VERSION: u32 = 1;
/// File name of the manifest inside the output folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Folder (inside the output folder) of the fixed noisy validation images.
pub const NOISY_VALIDATION_DIR: &str = "val_noisy";

/// Which side of the split a file is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    #[serde(rename = "val")]
    Validation,
}

/// One usable, unique image of the source folders.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative to the manifest's `source_dir`, `/`-separated.
    pub path: String,
    pub width: u32,
    pub height: u32,
    /// Colour channels (1 or 3); alpha is recorded separately.
    pub channels: usize,
    pub has_alpha: bool,
    pub bit_depth: BitDepth,
    /// Lower-case extension of the decoded format (`png`, `jpg`, ...).
    pub format: String,
    /// blake3 of the file's bytes, hex.
    pub blake3: String,
    /// File size in bytes and modification time (ns since the epoch), to skip unchanged files
    /// on a re-run.
    pub size: u64,
    pub mtime_ns: Option<u64>,
    pub split: Split,
    /// Per-channel sums of the samples and of their squares at `[0, 1]` scale: the statistics
    /// of any split can be recomputed from these without decoding again.
    pub sum: Vec<f64>,
    pub sum_sq: Vec<f64>,
}

/// A file that was left out because it could not be used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rejected {
    pub path: String,
    pub error: String,
}

/// A file left out because an earlier one (in path order) has the same bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Duplicate {
    pub path: String,
    pub duplicate_of: String,
    /// Size and modification time of the duplicate itself, so a re-run skips it too.
    pub size: u64,
    pub mtime_ns: Option<u64>,
}

/// Per-channel statistics of the training split at `[0, 1]` scale. When the split mixes gray
/// and RGB images, gray images count towards all three channels (as [`crate::Image::to_rgb`]
/// would convert them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statistics {
    pub channels: usize,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub images: usize,
    pub pixels: u64,
}

/// One fixed noisy validation image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoisyFile {
    /// The clean file, relative to `source_dir`.
    pub source: String,
    /// blake3 of the clean file it was made from.
    pub source_blake3: String,
    /// The noisy PNG, relative to the manifest's folder.
    pub noisy: String,
    /// The seed passed to [`NoiseSpec::apply`] for this file.
    pub seed: u64,
}

/// The noisy validation set recorded in a manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoisyValidation {
    pub noise: NoiseSpec,
    pub seed: u64,
    pub bit_depth: BitDepth,
    pub files: Vec<NoisyFile>,
}

/// The result of `prepare-data`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    /// Absolute path of the scanned folder; with several sources, the deepest folder that
    /// holds them all.
    pub source_dir: PathBuf,
    /// With several sources, each one relative to `source_dir` (`/`-separated) in the order
    /// they were given; empty when `source_dir` itself is the only source. A file's source is
    /// the one its path starts with (sources never nest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    pub seed: u64,
    pub val_fraction: f64,
    /// Usable unique files in path order.
    pub files: Vec<FileEntry>,
    pub duplicates: Vec<Duplicate>,
    pub rejected: Vec<Rejected>,
    pub statistics: Statistics,
    pub noisy_validation: Option<NoisyValidation>,
}

impl Manifest {
    /// Reads a manifest, checking the schema version before anything else so an old or newer
    /// file gets a clear message instead of a missing-field error.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |message: String| DataError::Manifest {
            path: path.into(),
            message,
        };
        let bytes = io::read_file(path)?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid json: {e}")))?;
        match value
            .get("schema_version")
            .and_then(serde_json::Value::as_u64)
        {
            Some(v) if v == u64::from(MANIFEST_VERSION) => {}
            Some(v) => {
                return Err(bad(format!(
                    "schema version {v} is not supported (this build reads version \
                     {MANIFEST_VERSION}); re-run prepare-data"
                )));
            }
            None => return Err(bad("no schema_version field; is this a manifest?".into())),
        }
        serde_json::from_value(value).map_err(|e| bad(e.to_string()))
    }

    /// Writes the manifest atomically, pretty-printed.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| DataError::Manifest {
            path: path.into(),
            message: e.to_string(),
        })?;
        bytes.push(b'\n');
        io::write_atomic(path, &bytes)
    }

    /// Absolute paths of the files of `split`, in path order.
    pub fn paths(&self, split: Split) -> Vec<PathBuf> {
        self.files
            .iter()
            .filter(|f| f.split == split)
            .map(|f| self.source_dir.join(&f.path))
            .collect()
    }

    /// Absolute paths of the source folders, in the order they were given.
    pub fn source_dirs(&self) -> Vec<PathBuf> {
        if self.sources.is_empty() {
            vec![self.source_dir.clone()]
        } else {
            self.sources
                .iter()
                .map(|s| self.source_dir.join(s))
                .collect()
        }
    }

    /// `(training, validation)` file counts of each source, in the order of
    /// [`Self::source_dirs`].
    pub fn split_counts(&self) -> Vec<(usize, usize)> {
        let mut counts = vec![(0, 0); self.sources.len().max(1)];
        for f in &self.files {
            let c = &mut counts[self.source_of(f)];
            match f.split {
                Split::Train => c.0 += 1,
                Split::Validation => c.1 += 1,
            }
        }
        counts
    }

    /// Index into [`Self::source_dirs`] of the source `file` came from.
    pub fn source_of(&self, file: &FileEntry) -> usize {
        self.sources
            .iter()
            .position(|s| Path::new(&file.path).starts_with(s))
            .unwrap_or(0)
    }

    /// Absolute paths of the training files (what a [`crate::loader::PatchLoader`] takes).
    pub fn train_paths(&self) -> Vec<PathBuf> {
        self.paths(Split::Train)
    }

    /// Absolute paths of the validation files.
    pub fn validation_paths(&self) -> Vec<PathBuf> {
        self.paths(Split::Validation)
    }

    /// `(clean, noisy)` path pairs of the noisy validation set; `manifest_dir` is the folder
    /// holding the manifest (noisy paths are relative to it).
    pub fn noisy_validation_pairs(
        &self,
        manifest_dir: impl AsRef<Path>,
    ) -> Vec<(PathBuf, PathBuf)> {
        let dir = manifest_dir.as_ref();
        self.noisy_validation.as_ref().map_or_else(Vec::new, |nv| {
            nv.files
                .iter()
                .map(|f| (self.source_dir.join(&f.source), dir.join(&f.noisy)))
                .collect()
        })
    }
}

fn default_val_fraction() -> f64 {
    0.1
}
fn default_true() -> bool {
    true
}
fn default_max_pixels() -> u64 {
    DEFAULT_MAX_PIXELS
}
fn default_noisy_depth() -> BitDepth {
    BitDepth::Sixteen
}

/// Fixed noisy validation images to write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoisyValidationConfig {
    pub noise: NoiseSpec,
    pub seed: u64,
    /// PNG depth; 16 by default so quantisation barely touches the noise (values outside
    /// `[0, 1]` are still clipped, as any image file must).
    #[serde(default = "default_noisy_depth")]
    pub bit_depth: BitDepth,
}

impl NoisyValidationConfig {
    pub fn new(noise: NoiseSpec, seed: u64) -> Self {
        Self {
            noise,
            seed,
            bit_depth: default_noisy_depth(),
        }
    }
}

/// What `prepare-data` does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareConfig {
    /// Folders of clean images, each scanned recursively and split on its own; none may be, or
    /// hold, another.
    pub src: Vec<PathBuf>,
    /// Output folder for `manifest.json` (and the noisy validation images).
    pub out: PathBuf,
    /// Fraction of the unique images of each source put in the validation split.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Seed of the split.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub noisy_validation: Option<NoisyValidationConfig>,
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Reuse entries of an existing manifest for unchanged files.
    #[serde(default = "default_true")]
    pub reuse: bool,
}

impl PrepareConfig {
    /// The defaults for one source `src` and `out`; push more sources onto `src`.
    pub fn new(src: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            src: vec![src.into()],
            out: out.into(),
            val_fraction: default_val_fraction(),
            seed: 0,
            noisy_validation: None,
            max_pixels: default_max_pixels(),
            reuse: true,
        }
    }
}

/// Progress events, for a progress bar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The source folders were listed.
    Scanned { files: usize },
    /// One more file was checked (decoded, or reused from the previous manifest).
    Checked {
        done: usize,
        total: usize,
        path: PathBuf,
        reused: bool,
    },
    /// One more noisy validation image is in place.
    NoisyWritten { done: usize, total: usize },
    /// The manifest was written.
    Finished,
}

/// What a `prepare` run did.
#[derive(Clone, Debug, PartialEq)]
pub struct PrepareReport {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    /// Files decoded this run.
    pub decoded: usize,
    /// Files whose entry was taken from the previous manifest.
    pub reused: usize,
    /// Noisy validation images written this run, and kept from the previous one.
    pub noisy_written: usize,
    pub noisy_reused: usize,
    /// Why an existing manifest could not be reused, if it could not.
    pub previous_ignored: Option<String>,
}

/// Relative path with `/` separators, the same on every platform.
fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn modified_ns(meta: &fs::Metadata) -> Option<u64> {
    let since = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(since.as_nanos()).ok()
}

fn channel_sums(raw: &RawImage) -> (Vec<f64>, Vec<f64>) {
    let c = raw.channels();
    let mut sum = vec![0.0f64; c];
    let mut sum_sq = vec![0.0f64; c];
    match raw.samples() {
        // A histogram per channel turns millions of float operations into 256 each.
        Samples::U8(v) => {
            let mut hist = vec![[0u64; 256]; c];
            for px in v.chunks_exact(c) {
                for (h, &s) in hist.iter_mut().zip(px) {
                    h[usize::from(s)] += 1;
                }
            }
            for (ch, h) in hist.iter().enumerate() {
                for (level, &count) in h.iter().enumerate() {
                    let x = level as f64 / 255.0;
                    sum[ch] += count as f64 * x;
                    sum_sq[ch] += count as f64 * x * x;
                }
            }
        }
        Samples::U16(v) => {
            for px in v.chunks_exact(c) {
                for (ch, &s) in px.iter().enumerate() {
                    let x = f64::from(s) / 65535.0;
                    sum[ch] += x;
                    sum_sq[ch] += x * x;
                }
            }
        }
    }
    (sum, sum_sq)
}

fn format_name(format: io::ImageFormat) -> String {
    format
        .extensions_str()
        .first()
        .map_or_else(|| format!("{format:?}").to_lowercase(), |e| (*e).to_owned())
}

/// A checked file before duplicates and the split are settled.
enum Checked {
    Entry(Box<FileEntry>, bool),
    Rejected(Rejected),
}

fn check_file(
    root: &Path,
    path: &Path,
    previous: &HashMap<String, FileEntry>,
    max_pixels: u64,
) -> Checked {
    let rel = relative(root, path);
    let reject = |e: DataError| {
        Checked::Rejected(Rejected {
            path: rel.clone(),
            error: e.to_string(),
        })
    };
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(source) => {
            return reject(DataError::Io {
                path: path.into(),
                source,
            });
        }
    };
    let (size, mtime_ns) = (meta.len(), modified_ns(&meta));
    let prev = previous.get(&rel);
    if let Some(p) = prev
        && p.size == size
        && p.mtime_ns.is_some()
        && p.mtime_ns == mtime_ns
    {
        return Checked::Entry(Box::new(p.clone()), true);
    }
    let bytes = match io::read_file(path) {
        Ok(b) => b,
        Err(e) => return reject(e),
    };
    let hash = blake3::hash(&bytes).to_hex().to_string();
    // Touched but unchanged (a copy, a checkout): the hash proves the old entry still holds.
    if let Some(p) = prev
        && p.blake3 == hash
    {
        return Checked::Entry(
            Box::new(FileEntry {
                size,
                mtime_ns,
                ..p.clone()
            }),
            true,
        );
    }
    let raw = match io::decode_raw(&bytes, path, max_pixels) {
        Ok(r) => r,
        Err(e) => return reject(e),
    };
    let (sum, sum_sq) = channel_sums(&raw);
    Checked::Entry(
        Box::new(FileEntry {
            path: rel,
            width: raw.width() as u32,
            height: raw.height() as u32,
            channels: raw.channels(),
            has_alpha: raw.alpha().is_some(),
            bit_depth: raw.bit_depth(),
            format: format_name(raw.format()),
            blake3: hash,
            size,
            mtime_ns,
            split: Split::Train,
            sum,
            sum_sq,
        }),
        false,
    )
}

/// The hash [`assign_splits`] compares with the threshold: `(seed, content hash)` as a u64.
fn split_key(seed: u64, content_hash: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(content_hash.as_bytes());
    let bytes: [u8; 8] = h.finalize().as_bytes()[..8].try_into().unwrap_or_default();
    u64::from_le_bytes(bytes)
}

/// Puts a file in validation when a hash of `(seed, its content hash)`, read as a fraction of
/// 2^64, is under `val_fraction`: deterministic, independent of file names and order, and a file
/// keeps its side when others are added or removed (so a grown data set does not move training
/// images into validation). The count is therefore about, not exactly, `n * val_fraction`. The
/// one exception to stability: when the fraction asks for both sides and the hashes leave one
/// empty, the file nearest the threshold moves across.
fn assign_splits(files: &mut [FileEntry], seed: u64, val_fraction: f64) {
    let n = files.len();
    let mut keyed: Vec<(u64, usize)> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (split_key(seed, &f.blake3), i))
        .collect();
    keyed.sort_unstable();
    // 2^64 * fraction, exactly for 1.0.
    let threshold = (val_fraction.clamp(0.0, 1.0) * 2f64.powi(64)) as u128;
    let mut n_val = keyed
        .iter()
        .filter(|(k, _)| u128::from(*k) < threshold)
        .count();
    // Keep both sides non-empty whenever the fraction asks for both.
    let lo = usize::from(val_fraction > 0.0 && n > 1);
    let hi = if val_fraction < 1.0 && n > 0 {
        n - 1
    } else {
        n
    };
    n_val = n_val.clamp(lo, hi);
    for f in files.iter_mut() {
        f.split = Split::Train;
    }
    for &(_, i) in &keyed[..n_val] {
        files[i].split = Split::Validation;
    }
}

/// Puts every file that `previous` (made with the same seed and fraction) already split back
/// on its side, matched by content, so that a re-run never moves a file a run has trained or
/// validated on; only new files take the hash rule. This also holds for manifests from before
/// the hash-threshold split (which split by rank). Kept only while both sides stay non-empty.
fn keep_previous_sides(files: &mut [FileEntry], previous: &Manifest) {
    let sides: HashMap<&str, Split> = previous
        .files
        .iter()
        .map(|f| (f.blake3.as_str(), f.split))
        .collect();
    let fresh: Vec<Split> = files.iter().map(|f| f.split).collect();
    for f in files.iter_mut() {
        if let Some(&side) = sides.get(f.blake3.as_str()) {
            f.split = side;
        }
    }
    let val = files
        .iter()
        .filter(|f| f.split == Split::Validation)
        .count();
    let fresh_val = fresh.iter().filter(|s| **s == Split::Validation).count();
    let emptied = (val == 0 || val == files.len()) && fresh_val != val;
    if emptied {
        for (f, side) in files.iter_mut().zip(fresh) {
            f.split = side;
        }
    }
}

/// Splits each source on its own (and keeps its previous sides), so that a small source beside a
/// large one still has files on both sides; `sources[i]` is the source of `files[i]`.
fn split_each_source(
    files: &mut [FileEntry],
    sources: &[usize],
    seed: u64,
    val_fraction: f64,
    previous: Option<&Manifest>,
) {
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &source) in sources.iter().enumerate() {
        groups.entry(source).or_default().push(i);
    }
    for members in groups.values() {
        let mut group: Vec<FileEntry> = members.iter().map(|&i| files[i].clone()).collect();
        assign_splits(&mut group, seed, val_fraction);
        if let Some(m) = previous {
            keep_previous_sides(&mut group, m);
        }
        for (&i, g) in members.iter().zip(&group) {
            files[i].split = g.split;
        }
    }
}

fn statistics(files: &[FileEntry]) -> Statistics {
    let train: Vec<&FileEntry> = files.iter().filter(|f| f.split == Split::Train).collect();
    let channels = if train.iter().any(|f| f.channels == 3) {
        3
    } else {
        1
    };
    let mut sum = vec![0.0f64; channels];
    let mut sum_sq = vec![0.0f64; channels];
    let mut pixels = 0u64;
    for f in &train {
        pixels += u64::from(f.width) * u64::from(f.height);
        for ch in 0..channels {
            let src = if f.channels == 1 { 0 } else { ch };
            sum[ch] += f.sum[src];
            sum_sq[ch] += f.sum_sq[src];
        }
    }
    let denom = pixels.max(1) as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / denom).collect();
    let std = sum_sq
        .iter()
        .zip(&mean)
        .map(|(sq, m)| (sq / denom - m * m).max(0.0).sqrt())
        .collect();
    Statistics {
        channels,
        mean,
        std,
        images: train.len(),
        pixels,
    }
}

/// The noisy copy of `source`: its whole name with `.png` added (`a.jpg` -> `a.jpg.png`), so
/// that `a.jpg` and `a.png` in one folder do not write one file.
fn noisy_name(source: &str) -> String {
    format!("{NOISY_VALIDATION_DIR}/{}.png", source.replace('\\', "/"))
}

/// Writes the noisy validation images, reusing those of `previous` that match exactly.
fn write_noisy(
    source_dir: &Path,
    out: &Path,
    files: &[FileEntry],
    config: &NoisyValidationConfig,
    previous: Option<&NoisyValidation>,
    max_pixels: u64,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<(NoisyValidation, usize)> {
    let val: Vec<&FileEntry> = files
        .iter()
        .filter(|f| f.split == Split::Validation)
        .collect();
    let same_recipe = previous.filter(|p| {
        p.noise == config.noise && p.seed == config.seed && p.bit_depth == config.bit_depth
    });
    let old: HashMap<(&str, &str), &NoisyFile> = same_recipe.map_or_else(HashMap::new, |p| {
        p.files
            .iter()
            .map(|f| ((f.source.as_str(), f.source_blake3.as_str()), f))
            .collect()
    });
    let done = AtomicUsize::new(0);
    let total = val.len();
    let results: Vec<Result<(NoisyFile, bool)>> = val
        .par_iter()
        .map(|entry| {
            // Seeded by content, so a file's noise does not change when others come or go.
            let hash_word = u64::from_str_radix(&entry.blake3[..16], 16).unwrap_or(0);
            let record = NoisyFile {
                source: entry.path.clone(),
                source_blake3: entry.blake3.clone(),
                noisy: noisy_name(&entry.path),
                seed: derive_seed(config.seed, &[hash_word]),
            };
            let target = out.join(&record.noisy);
            let reused = old
                .get(&(entry.path.as_str(), entry.blake3.as_str()))
                .is_some_and(|o| **o == record)
                && target.is_file();
            if !reused {
                let loaded = io::load_with_limit(source_dir.join(&entry.path), max_pixels)?;
                let noisy = config.noise.apply(&loaded.image, record.seed);
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(|source| DataError::Write {
                        path: parent.into(),
                        source,
                    })?;
                }
                io::save(
                    &target,
                    &noisy.image,
                    loaded.alpha.as_deref(),
                    config.bit_depth,
                )?;
            }
            let d = done.fetch_add(1, Ordering::Relaxed) + 1;
            progress(Progress::NoisyWritten { done: d, total });
            Ok((record, reused))
        })
        .collect();
    let mut records = Vec::with_capacity(results.len());
    let mut reused = 0;
    for r in results {
        let (record, was_reused) = r?;
        reused += usize::from(was_reused);
        records.push(record);
    }
    // Images of files that left the validation split (or of an old recipe) would otherwise
    // linger and be mistaken for part of the set; only files this tool recorded are removed.
    if let Some(p) = previous {
        for f in &p.files {
            if !records.iter().any(|r| r.noisy == f.noisy) {
                let _ = fs::remove_file(out.join(&f.noisy));
            }
        }
    }
    Ok((
        NoisyValidation {
            noise: config.noise.clone(),
            seed: config.seed,
            bit_depth: config.bit_depth,
            files: records,
        },
        reused,
    ))
}

/// The deepest folder that holds every one of `dirs` (absolute paths); `None` when they share
/// no root, as on two Windows drives.
fn common_ancestor(dirs: &[PathBuf]) -> Option<PathBuf> {
    let (first, rest) = dirs.split_first()?;
    let mut common = first.clone();
    for d in rest {
        while !d.starts_with(&common) {
            if !common.pop() {
                return None;
            }
        }
    }
    Some(common)
}

/// Refuses a source given twice or inside another (`canonical` are the folders of `given`),
/// whose files would be scanned twice and left out as duplicates of themselves.
fn check_distinct(given: &[PathBuf], canonical: &[PathBuf]) -> Result<()> {
    for (i, a) in canonical.iter().enumerate() {
        for (j, b) in canonical.iter().enumerate().skip(i + 1) {
            let (ga, gb) = (given[i].display(), given[j].display());
            let problem = if a == b {
                format!("the sources '{ga}' and '{gb}' are the same folder")
            } else if b.starts_with(a) {
                format!("the source '{ga}' holds the source '{gb}'")
            } else if a.starts_with(b) {
                format!("the source '{gb}' holds the source '{ga}'")
            } else {
                continue;
            };
            return Err(DataError::Config(format!(
                "{problem}: give each folder once, and none inside another"
            )));
        }
    }
    Ok(())
}

fn quoted(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| format!("'{}'", d.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Scans every folder of `config.src`, validates every image (in parallel), drops exact
/// duplicates, splits train/validation within each source, computes statistics, optionally
/// writes noisy validation images, and writes `config.out/manifest.json` atomically. Unchanged
/// files of a previous run's manifest are not decoded again.
pub fn prepare(
    config: &PrepareConfig,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<PrepareReport> {
    if !(0.0..=1.0).contains(&config.val_fraction) {
        return Err(DataError::Config(format!(
            "val_fraction must be between 0 and 1, not {}",
            config.val_fraction
        )));
    }
    if config.src.is_empty() {
        return Err(DataError::Config("no source folder given".into()));
    }
    let srcs = config
        .src
        .iter()
        .map(|s| {
            fs::canonicalize(s).map_err(|source| DataError::Io {
                path: s.clone(),
                source,
            })
        })
        .collect::<Result<Vec<PathBuf>>>()?;
    check_distinct(&config.src, &srcs)?;
    // Files under the output folder are never scanned, so it cannot hold a source.
    if let Ok(out) = fs::canonicalize(&config.out)
        && let Some(i) = srcs.iter().position(|s| s.starts_with(&out))
    {
        return Err(DataError::Config(format!(
            "the output folder '{}' is (or holds) the source '{}', whose images would all be \
             left out: write the manifest to another folder",
            config.out.display(),
            config.src[i].display()
        )));
    }
    let root = common_ancestor(&srcs).ok_or_else(|| {
        DataError::Config(format!(
            "the sources {} share no folder to record paths from",
            quoted(&config.src)
        ))
    })?;
    let sources: Vec<String> = if srcs.len() > 1 {
        srcs.iter().map(|s| relative(&root, s)).collect()
    } else {
        Vec::new()
    };
    fs::create_dir_all(&config.out).map_err(|source| DataError::Write {
        path: config.out.clone(),
        source,
    })?;
    let out = fs::canonicalize(&config.out).map_err(|source| DataError::Io {
        path: config.out.clone(),
        source,
    })?;
    let manifest_path = out.join(MANIFEST_FILE);

    // An output folder inside a source must not feed its own noisy images back in.
    let mut paths: Vec<(PathBuf, usize)> = Vec::new();
    for (i, src) in srcs.iter().enumerate() {
        let found = scan(src)?.into_iter().filter(|p| !p.starts_with(&out));
        paths.extend(found.map(|p| (p, i)));
    }
    // Path order across sources, so which copy of a duplicate is kept does not depend on the
    // order the sources were given in.
    paths.sort();
    progress(Progress::Scanned { files: paths.len() });

    let mut previous_ignored = None;
    let previous = if config.reuse && manifest_path.is_file() {
        match Manifest::load(&manifest_path) {
            // One shared source is enough: its entries and sides carry over when other sources
            // are added or dropped.
            Ok(m) if m.source_dirs().iter().any(|d| srcs.contains(d)) => Some(m),
            Ok(m) => {
                previous_ignored = Some(format!(
                    "it describes {}, not {}",
                    quoted(&m.source_dirs()),
                    quoted(&srcs)
                ));
                None
            }
            Err(e) => {
                previous_ignored = Some(e.to_string());
                None
            }
        }
    } else {
        None
    };
    let mut by_path: HashMap<String, FileEntry> = HashMap::new();
    if let Some(m) = &previous {
        // Keyed by the path under this run's root, which moves when sources are added or dropped.
        let rebase = |path: &str| {
            let abs = m.source_dir.join(path);
            abs.starts_with(&root).then(|| relative(&root, &abs))
        };
        for f in &m.files {
            if let Some(rel) = rebase(&f.path) {
                let entry = FileEntry {
                    path: rel.clone(),
                    ..f.clone()
                };
                by_path.insert(rel, entry);
            }
        }
        // A duplicate shares everything but its path, size and time with its original.
        for d in &m.duplicates {
            if let Some(rel) = rebase(&d.path)
                && let Some(original) = m.files.iter().find(|f| f.path == d.duplicate_of)
            {
                let entry = FileEntry {
                    path: rel.clone(),
                    size: d.size,
                    mtime_ns: d.mtime_ns,
                    ..original.clone()
                };
                by_path.insert(rel, entry);
            }
        }
    }

    let done = AtomicUsize::new(0);
    let total = paths.len();
    let checked: Vec<Checked> = paths
        .par_iter()
        .map(|(path, _)| {
            let c = check_file(&root, path, &by_path, config.max_pixels);
            let d = done.fetch_add(1, Ordering::Relaxed) + 1;
            let reused = matches!(c, Checked::Entry(_, true));
            progress(Progress::Checked {
                done: d,
                total,
                path: path.clone(),
                reused,
            });
            c
        })
        .collect();

    let mut files = Vec::new();
    let mut file_sources = Vec::new();
    let mut rejected = Vec::new();
    let mut duplicates = Vec::new();
    let mut first_by_hash: HashMap<String, String> = HashMap::new();
    let (mut decoded, mut reused) = (0, 0);
    for (c, (_, source)) in checked.into_iter().zip(&paths) {
        match c {
            Checked::Rejected(r) => rejected.push(r),
            Checked::Entry(entry, was_reused) => {
                if was_reused {
                    reused += 1;
                } else {
                    decoded += 1;
                }
                // Paths arrive sorted, so the first copy in path order is the one kept.
                if let Some(first) = first_by_hash.get(&entry.blake3) {
                    duplicates.push(Duplicate {
                        path: entry.path,
                        duplicate_of: first.clone(),
                        size: entry.size,
                        mtime_ns: entry.mtime_ns,
                    });
                } else {
                    first_by_hash.insert(entry.blake3.clone(), entry.path.clone());
                    files.push(*entry);
                    file_sources.push(*source);
                }
            }
        }
    }
    if files.is_empty() {
        return Err(DataError::EmptyDataset { path: root });
    }
    let same_rule = previous
        .as_ref()
        .filter(|m| m.seed == config.seed && m.val_fraction == config.val_fraction);
    split_each_source(
        &mut files,
        &file_sources,
        config.seed,
        config.val_fraction,
        same_rule,
    );
    let statistics = statistics(&files);

    let (noisy_validation, noisy_written, noisy_reused) = match &config.noisy_validation {
        Some(nv) => {
            let prev = previous.as_ref().and_then(|m| m.noisy_validation.as_ref());
            let (set, kept) =
                write_noisy(&root, &out, &files, nv, prev, config.max_pixels, progress)?;
            let written = set.files.len() - kept;
            (Some(set), written, kept)
        }
        None => (None, 0, 0),
    };

    let manifest = Manifest {
        schema_version: MANIFEST_VERSION,
        source_dir: root,
        sources,
        seed: config.seed,
        val_fraction: config.val_fraction,
        files,
        duplicates,
        rejected,
        statistics,
        noisy_validation,
    };
    manifest.save(&manifest_path)?;
    progress(Progress::Finished);
    Ok(PrepareReport {
        manifest,
        manifest_path,
        decoded,
        reused,
        noisy_written,
        noisy_reused,
        previous_ignored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Image;
    use crate::io::save;
    use std::sync::Mutex;

    fn image(channels: usize, h: usize, w: usize, salt: usize) -> Image {
        Image::from_fn(channels, h, w, |c, y, x| {
            ((salt * 41 + c * 13 + y * 5 + x * 3) % 256) as f32 / 255.0
        })
    }

    /// Seven unique images (gray, RGB, 8/16-bit, several formats), one duplicate, one corrupt
    /// file and one non-image.
    fn source() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        fs::create_dir_all(p.join("sub")).unwrap();
        save(p.join("a.png"), &image(3, 20, 16, 1), None, BitDepth::Eight).unwrap();
        save(
            p.join("sub/b.png"),
            &image(1, 12, 18, 2),
            None,
            BitDepth::Sixteen,
        )
        .unwrap();
        save(
            p.join("c.tif"),
            &image(3, 10, 10, 3),
            None,
            BitDepth::Sixteen,
        )
        .unwrap();
        save(p.join("e.bmp"), &image(3, 9, 11, 4), None, BitDepth::Eight).unwrap();
        save(
            p.join("f.png"),
            &image(3, 14, 14, 5),
            Some(&vec![0.5; 196]),
            BitDepth::Eight,
        )
        .unwrap();
        save(p.join("g.webp"), &image(3, 8, 8, 6), None, BitDepth::Eight).unwrap();
        save(
            p.join("sub/h.jpg"),
            &image(3, 16, 16, 7),
            None,
            BitDepth::Eight,
        )
        .unwrap();
        fs::copy(p.join("a.png"), p.join("sub/dup.png")).unwrap();
        fs::write(p.join("bad.jpg"), b"\xff\xd8\xff garbage").unwrap();
        fs::write(p.join("readme.txt"), b"not an image").unwrap();
        dir
    }

    fn quiet(_: Progress) {}

    #[test]
    fn prepare_validates_dedupes_splits_and_measures() {
        let src = source();
        let out = tempfile::tempdir().unwrap();
        let mut config = PrepareConfig::new(src.path(), out.path());
        config.val_fraction = 0.3;
        config.seed = 42;
        let events = Mutex::new(Vec::new());
        let report = prepare(&config, &|p| events.lock().unwrap().push(p)).unwrap();
        let m = &report.manifest;

        let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "a.png",
                "c.tif",
                "e.bmp",
                "f.png",
                "g.webp",
                "sub/b.png",
                "sub/h.jpg"
            ]
        );
        assert_eq!(m.duplicates.len(), 1);
        assert_eq!(
            (
                m.duplicates[0].path.as_str(),
                m.duplicates[0].duplicate_of.as_str()
            ),
            ("sub/dup.png", "a.png")
        );
        assert_eq!(m.rejected.len(), 1);
        assert_eq!(m.rejected[0].path, "bad.jpg");
        assert!(m.rejected[0].error.contains("bad.jpg"));
        assert_eq!((report.decoded, report.reused), (8, 0));

        let b = &m.files[5];
        assert_eq!(
            (b.width, b.height, b.channels, b.bit_depth),
            (18, 12, 1, BitDepth::Sixteen)
        );
        assert!(m.files[3].has_alpha);
        assert_eq!(m.files[1].format, "tiff");
        assert_eq!(
            m.files[0].blake3,
            blake3::hash(&fs::read(src.path().join("a.png")).unwrap())
                .to_hex()
                .to_string()
        );

        // round(7 * 0.3) = 2 validation files.
        assert_eq!(m.validation_paths().len(), 2);
        assert_eq!(m.train_paths().len(), 5);

        // Statistics against a direct computation over the training images.
        let mut sum = [0.0f64; 3];
        let mut sq = [0.0f64; 3];
        let mut n = 0u64;
        for path in m.train_paths() {
            let img = io::load(&path).unwrap().image.to_rgb();
            n += img.pixels() as u64;
            for c in 0..3 {
                for &v in img.plane(c) {
                    sum[c] += f64::from(v);
                    sq[c] += f64::from(v) * f64::from(v);
                }
            }
        }
        assert_eq!(
            (
                m.statistics.channels,
                m.statistics.images,
                m.statistics.pixels
            ),
            (3, 5, n)
        );
        for c in 0..3 {
            let mean = sum[c] / n as f64;
            let std = (sq[c] / n as f64 - mean * mean).sqrt();
            assert!((m.statistics.mean[c] - mean).abs() < 1e-6);
            assert!((m.statistics.std[c] - std).abs() < 1e-6);
        }

        assert_eq!(Manifest::load(&report.manifest_path).unwrap(), *m);
        let events = events.into_inner().unwrap();
        assert_eq!(events[0], Progress::Scanned { files: 9 });
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Progress::Checked { .. }))
                .count(),
            9
        );
        assert_eq!(events.last(), Some(&Progress::Finished));
    }

    #[test]
    fn the_split_depends_on_the_seed_only() {
        let src = source();
        let splits = |seed: u64| {
            let out = tempfile::tempdir().unwrap();
            let mut config = PrepareConfig::new(src.path(), out.path());
            config.seed = seed;
            config.val_fraction = 0.4;
            prepare(&config, &quiet)
                .unwrap()
                .manifest
                .validation_paths()
        };
        assert_eq!(splits(1), splits(1));
        assert!((0..20).any(|s| splits(s) != splits(1)));
    }

    #[test]
    fn rerun_reuses_unchanged_entries() {
        let src = source();
        let out = tempfile::tempdir().unwrap();
        let config = PrepareConfig::new(src.path(), out.path());
        let first = prepare(&config, &quiet).unwrap();
        let second = prepare(&config, &quiet).unwrap();
        assert_eq!((second.decoded, second.reused), (0, 8));
        assert_eq!(second.manifest, first.manifest);

        save(
            src.path().join("e.bmp"),
            &image(3, 30, 11, 9),
            None,
            BitDepth::Eight,
        )
        .unwrap();
        let third = prepare(&config, &quiet).unwrap();
        assert_eq!((third.decoded, third.reused), (1, 7));
        let e = third
            .manifest
            .files
            .iter()
            .find(|f| f.path == "e.bmp")
            .unwrap();
        assert_eq!(e.height, 30);

        // A side recorded by an earlier manifest (by an older split rule, say) is kept.
        let path = out.path().join(MANIFEST_FILE);
        let mut edited = Manifest::load(&path).unwrap();
        let moved = edited
            .files
            .iter_mut()
            .find(|f| f.split == Split::Train)
            .unwrap();
        moved.split = Split::Validation;
        let moved = moved.path.clone();
        edited.save(&path).unwrap();
        let fourth = prepare(&config, &quiet).unwrap();
        assert_eq!(fourth.manifest.files, edited.files);
        assert!(
            fourth
                .manifest
                .validation_paths()
                .iter()
                .any(|p| p.ends_with(&moved))
        );

        let fresh = PrepareConfig {
            reuse: false,
            ..config
        };
        let fresh = prepare(&fresh, &quiet).unwrap();
        assert_eq!(fresh.reused, 0);
        assert!(
            !fresh
                .manifest
                .validation_paths()
                .iter()
                .any(|p| p.ends_with(&moved))
        );
    }

    #[test]
    fn noisy_validation_images_are_written_once() {
        let src = source();
        let out = tempfile::tempdir().unwrap();
        let mut config = PrepareConfig::new(src.path(), out.path());
        config.val_fraction = 0.5;
        config.noisy_validation = Some(NoisyValidationConfig::new(
            "gaussian:25".parse().unwrap(),
            3,
        ));
        let report = prepare(&config, &quiet).unwrap();
        let pairs = report.manifest.noisy_validation_pairs(out.path());
        assert_eq!(pairs.len(), report.manifest.validation_paths().len());
        assert_eq!(report.noisy_written, pairs.len());
        for (clean, noisy) in &pairs {
            let c = io::load(clean).unwrap();
            let n = io::load(noisy).unwrap();
            assert_eq!(n.image.shape(), c.image.shape());
            assert_eq!(n.bit_depth, BitDepth::Sixteen);
            assert_eq!(n.format, io::ImageFormat::Png);
        }
        let bytes: Vec<Vec<u8>> = pairs.iter().map(|(_, n)| fs::read(n).unwrap()).collect();

        let again = prepare(&config, &quiet).unwrap();
        assert_eq!((again.noisy_written, again.noisy_reused), (0, pairs.len()));

        // Regenerated from scratch, the images are byte-identical.
        for (_, n) in &pairs {
            fs::remove_file(n).unwrap();
        }
        let regenerated = prepare(&config, &quiet).unwrap();
        assert_eq!(regenerated.noisy_written, pairs.len());
        let again: Vec<Vec<u8>> = pairs.iter().map(|(_, n)| fs::read(n).unwrap()).collect();
        assert_eq!(again, bytes);
    }

    #[test]
    fn an_output_inside_the_source_is_not_scanned() {
        let src = source();
        let out = src.path().join("prepared");
        let mut config = PrepareConfig::new(src.path(), &out);
        config.val_fraction = 0.5;
        config.noisy_validation = Some(NoisyValidationConfig::new(
            "gaussian:10".parse().unwrap(),
            1,
        ));
        let first = prepare(&config, &quiet).unwrap();
        let second = prepare(&config, &quiet).unwrap();
        assert_eq!(first.manifest.files, second.manifest.files);

        // The source itself, or a folder above it, as the output is refused, not an empty set.
        for out in [src.path().to_path_buf(), src.path().join("..")] {
            let err = prepare(&PrepareConfig::new(src.path(), &out), &quiet).unwrap_err();
            assert!(err.to_string().contains("holds) the source"), "{err}");
        }
    }

    #[test]
    fn load_checks_the_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        fs::write(&path, r#"{"schema_version": 99, "files": []}"#).unwrap();
        let e = Manifest::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("schema version 99") && e.contains(MANIFEST_FILE),
            "{e}"
        );
        fs::write(&path, r#"{"files": []}"#).unwrap();
        assert!(
            Manifest::load(&path)
                .unwrap_err()
                .to_string()
                .contains("schema_version")
        );
        fs::write(&path, "{").unwrap();
        assert!(
            Manifest::load(&path)
                .unwrap_err()
                .to_string()
                .contains("not valid json")
        );
    }

    #[test]
    fn bad_fraction_and_empty_source_are_errors() {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let mut config = PrepareConfig::new(src.path(), out.path());
        assert!(matches!(
            prepare(&config, &quiet),
            Err(DataError::EmptyDataset { .. })
        ));
        config.val_fraction = 1.5;
        assert!(matches!(
            prepare(&config, &quiet),
            Err(DataError::Config(_))
        ));
    }

    #[test]
    fn noisy_copies_of_one_stem_do_not_collide() {
        assert_eq!(noisy_name("a.jpg"), "val_noisy/a.jpg.png");
        assert_eq!(noisy_name("a.png"), "val_noisy/a.png.png");
        assert_eq!(noisy_name("sub\\b.JPG"), "val_noisy/sub/b.JPG.png");
    }

    /// A 1x1 gray entry named `i.png` with a content hash of `i`.
    fn fake_entry(i: usize) -> FileEntry {
        FileEntry {
            path: format!("{i}.png"),
            width: 1,
            height: 1,
            channels: 1,
            has_alpha: false,
            bit_depth: BitDepth::Eight,
            format: "png".into(),
            blake3: blake3::hash(&i.to_le_bytes()).to_hex().to_string(),
            size: 1,
            mtime_ns: None,
            split: Split::Train,
            sum: vec![0.0],
            sum_sq: vec![0.0],
        }
    }

    #[test]
    fn split_sizes_keep_both_sides() {
        let count = |n: usize, f: f64| {
            let mut files: Vec<FileEntry> = (0..n).map(fake_entry).collect();
            assign_splits(&mut files, 0, f);
            files
                .iter()
                .filter(|f| f.split == Split::Validation)
                .count()
        };
        assert_eq!(count(10, 0.0), 0);
        assert_eq!(count(10, 1.0), 10);
        assert_eq!(count(3, 0.01), 1);
        assert_eq!(count(3, 0.99), 2);
        assert_eq!(count(1, 0.5), 0);
        // About the fraction asked for: 1000 * 0.1 is binomial, sd 9.5.
        let val = count(1000, 0.1);
        assert!((70..=130).contains(&val), "{val}");
        assert_eq!(count(1000, 0.1), val);
    }

    #[test]
    fn a_file_keeps_its_side_when_others_are_added() {
        let validation = |n: usize| {
            let mut files: Vec<FileEntry> = (0..n).map(fake_entry).collect();
            assign_splits(&mut files, 3, 0.2);
            files
                .into_iter()
                .filter(|f| f.split == Split::Validation)
                .map(|f| f.path)
                .collect::<Vec<_>>()
        };
        let (before, after) = (validation(100), validation(150));
        assert!(!before.is_empty() && after.len() > before.len());
        // The first 100 files are on the same side in both: only new files joined validation.
        let after_old: Vec<&String> = after
            .iter()
            .filter(|p| p.trim_end_matches(".png").parse::<usize>().unwrap() < 100)
            .collect();
        assert_eq!(after_old, before.iter().collect::<Vec<_>>());
    }

    /// `n` distinct RGB images `0.png`... in `dir`, their content set by `salt`.
    fn images(dir: &Path, n: usize, salt: usize) {
        fs::create_dir_all(dir).unwrap();
        for i in 0..n {
            let img = image(3, 8 + i, 10, salt + i);
            save(dir.join(format!("{i}.png")), &img, None, BitDepth::Eight).unwrap();
        }
    }

    /// `photos/` with `n_photos` images and `set/more/` with `n_more` others in one tempdir, and
    /// a config over both (in that order) writing to a second tempdir.
    fn two_sources(
        n_photos: usize,
        n_more: usize,
    ) -> (tempfile::TempDir, tempfile::TempDir, PrepareConfig) {
        let top = tempfile::tempdir().unwrap();
        let (photos, more) = (top.path().join("photos"), top.path().join("set/more"));
        images(&photos, n_photos, 0);
        images(&more, n_more, 100);
        let out = tempfile::tempdir().unwrap();
        let mut config = PrepareConfig::new(photos, out.path());
        config.src.push(more);
        (top, out, config)
    }

    /// The split side of every file of `m`, by absolute path.
    fn sides(m: &Manifest) -> HashMap<PathBuf, Split> {
        m.files
            .iter()
            .map(|f| (m.source_dir.join(&f.path), f.split))
            .collect()
    }

    /// Every file of `before` is in `after`, on the same side.
    fn assert_sides_kept(before: &Manifest, after: &Manifest) {
        let after = sides(after);
        for (path, side) in sides(before) {
            assert_eq!(after.get(&path), Some(&side), "{}", path.display());
        }
    }

    #[test]
    fn each_source_holds_out_validation_files() {
        let (top, out, mut config) = two_sources(12, 3);
        let more = &config.src[1];
        fs::copy(top.path().join("photos/0.png"), more.join("copy.png")).unwrap();
        config.val_fraction = 0.05;
        let m = prepare(&config, &quiet).unwrap().manifest;

        assert_eq!(m.source_dir, fs::canonicalize(top.path()).unwrap());
        assert_eq!(m.sources, ["photos", "set/more"]);
        assert_eq!(m.source_dirs()[1], fs::canonicalize(more).unwrap());
        // 0.05 of 15 files is under one: split as one set, the small source would get none.
        let counts = m.split_counts();
        assert_eq!(
            (counts[0].0 + counts[0].1, counts[1].0 + counts[1].1),
            (12, 3)
        );
        assert!(counts.iter().all(|&(t, v)| t >= 1 && v >= 1), "{counts:?}");
        // Identical bytes in two sources are a duplicate as within one.
        assert_eq!(
            (
                m.duplicates[0].path.as_str(),
                m.duplicates[0].duplicate_of.as_str()
            ),
            ("set/more/copy.png", "photos/0.png")
        );
        assert!(m.train_paths().iter().all(|p| p.is_file()));
        assert!(m.validation_paths().iter().all(|p| p.is_file()));
        assert_eq!(Manifest::load(out.path().join(MANIFEST_FILE)).unwrap(), m);
    }

    #[test]
    fn a_rerun_with_one_more_file_keeps_every_side() {
        let (_top, _out, mut config) = two_sources(6, 3);
        // So small that each source's one validation file is the one nearest the threshold.
        config.val_fraction = 0.001;
        let first = prepare(&config, &quiet).unwrap();
        assert_eq!(first.manifest.split_counts(), [(5, 1), (2, 1)]);
        let held_out = first
            .manifest
            .files
            .iter()
            .find(|f| f.path.starts_with("set/more/") && f.split == Split::Validation)
            .unwrap();

        // A new file nearer the threshold, which a fresh split would hold out instead.
        let added = config.src[1].join("added.png");
        let key = |p: &Path| split_key(0, &blake3::hash(&fs::read(p).unwrap()).to_hex());
        for salt in 200.. {
            save(&added, &image(3, 9, 9, salt), None, BitDepth::Eight).unwrap();
            if key(&added) < split_key(0, &held_out.blake3) {
                break;
            }
        }
        let second = prepare(&config, &quiet).unwrap();
        assert_eq!((second.decoded, second.reused), (1, 9));
        assert_eq!(second.manifest.files.len(), 10);
        assert_sides_kept(&first.manifest, &second.manifest);
        let fresh = PrepareConfig {
            reuse: false,
            ..config
        };
        let fresh = prepare(&fresh, &quiet).unwrap().manifest;
        let moved = fresh.source_dir.join(&held_out.path);
        assert_eq!(sides(&fresh)[&moved], Split::Train);
    }

    #[test]
    fn a_source_added_later_keeps_the_first_ones_entries_and_sides() {
        let (_top, _out, mut config) = two_sources(6, 4);
        let more = config.src.pop().unwrap();
        config.val_fraction = 0.3;
        let one = prepare(&config, &quiet).unwrap();
        assert!(one.manifest.sources.is_empty());

        config.src.push(more);
        let two = prepare(&config, &quiet).unwrap();
        assert_eq!((two.decoded, two.reused), (4, 6));
        assert_sides_kept(&one.manifest, &two.manifest);
    }

    #[test]
    fn nested_or_repeated_sources_are_refused() {
        let src = source();
        let out = tempfile::tempdir().unwrap();
        let refused = |first: PathBuf, second: PathBuf| {
            let mut config = PrepareConfig::new(first, out.path());
            config.src.push(second);
            prepare(&config, &quiet).unwrap_err().to_string()
        };
        let (top, sub) = (src.path().to_path_buf(), src.path().join("sub"));
        let holds = format!(
            "the source '{}' holds the source '{}'",
            top.display(),
            sub.display()
        );
        let e = refused(top.clone(), sub.clone());
        assert!(e.contains(&holds), "{e}");
        let e = refused(sub.clone(), top.clone());
        assert!(e.contains(&holds), "{e}");
        let again = sub.join("..");
        let e = refused(top.clone(), again.clone());
        assert!(
            e.contains(&format!(
                "the sources '{}' and '{}' are the same folder",
                top.display(),
                again.display()
            )),
            "{e}"
        );
        assert!(!out.path().join(MANIFEST_FILE).exists());
    }

    #[test]
    fn a_single_source_manifest_without_sources_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        let entry = |path: &str, split: &str| {
            format!(
                r#"{{"path": "{path}", "width": 4, "height": 3, "channels": 3,
                "has_alpha": false, "bit_depth": 8, "format": "png", "blake3": "ab",
                "size": 10, "mtime_ns": null, "split": "{split}",
                "sum": [1.0, 1.0, 1.0], "sum_sq": [0.5, 0.5, 0.5]}}"#
            )
        };
        let text = format!(
            r#"{{"schema_version": 1, "source_dir": "/data/clean", "seed": 7,
            "val_fraction": 0.1, "files": [{}, {}], "duplicates": [], "rejected": [],
            "statistics": {{"channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2],
            "images": 1, "pixels": 12}}, "noisy_validation": null}}"#,
            entry("a.png", "train"),
            entry("b/c.png", "val")
        );
        fs::write(&path, &text).unwrap();
        let m = Manifest::load(&path).unwrap();
        assert!(m.sources.is_empty());
        assert_eq!(m.source_dirs(), [PathBuf::from("/data/clean")]);
        assert_eq!(m.split_counts(), [(1, 1)]);
        assert_eq!(m.validation_paths(), [PathBuf::from("/data/clean/b/c.png")]);
        // Written back, it is the same document: one source adds nothing to the file.
        let written = serde_json::to_value(&m).unwrap();
        assert_eq!(
            written,
            serde_json::from_str::<serde_json::Value>(&text).unwrap()
        );
    }
}
