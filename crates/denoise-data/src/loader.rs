//! Streaming patch loader: random patches of a set of images, augmented and noised by
//! background workers into a bounded queue, reproducible for a seed whatever the worker count,
//! and resumable at any batch.
//!
//! The stream is a pure function of `(files, config, batch index)`. Epoch `e` visits the images
//! in a permutation drawn from `(seed, e)`, taking `patches_per_image` consecutive patches from
//! each (so an image that does not fit in the cache is decoded once per epoch, not once per
//! patch). Patch `s` of epoch `e` draws its crop, augmentation and noise from an RNG seeded by
//! `(seed, e, s)`, and batch `k` holds global patches `k * batch_size ..`. Workers therefore
//! share nothing but the image cache, and the consumer only has to put batches back in order.

use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::augment::AugmentConfig;
use crate::dataset::{Skipped, conform_channels, scan};
use crate::io::{self, DEFAULT_MAX_PIXELS, RawImage};
use crate::noise::NoiseSpec;
use crate::{DataError, Image, Result};

fn default_patch_size() -> usize {
    64
}
fn default_patches_per_image() -> usize {
    8
}
fn default_batch_size() -> usize {
    64
}
fn default_channels() -> usize {
    3
}
fn default_queue_depth() -> usize {
    8
}
fn default_cache_bytes() -> u64 {
    1 << 30
}
fn default_max_pixels() -> u64 {
    DEFAULT_MAX_PIXELS
}

/// Everything that decides what a [`PatchLoader`] produces (and how fast). Only `noise` has no
/// default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderConfig {
    /// Side of the square patches.
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    /// Consecutive patches taken from each image per epoch.
    #[serde(default = "default_patches_per_image")]
    pub patches_per_image: usize,
    /// Patches per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Channels of the patches: 1 or 3.
    #[serde(default = "default_channels")]
    pub channels: usize,
    /// Convert images with other channel counts instead of refusing them.
    #[serde(default)]
    pub convert_channels: bool,
    /// Applied to each cropped patch before the noise.
    #[serde(default)]
    pub augment: AugmentConfig,
    /// Applied to each augmented patch.
    pub noise: NoiseSpec,
    #[serde(default)]
    pub seed: u64,
    /// Worker threads; 0 means one per available core.
    #[serde(default)]
    pub workers: usize,
    /// Batches prepared ahead of the consumer (at least one per worker is used).
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// Bytes of decoded images kept in the cache (8-bit images take 1 byte per sample).
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// Images above this many pixels are refused before decoding.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Fail at construction on any unusable file instead of skipping it.
    #[serde(default)]
    pub strict: bool,
}

impl LoaderConfig {
    /// The defaults, with `noise`.
    pub fn new(noise: NoiseSpec) -> Self {
        Self {
            patch_size: default_patch_size(),
            patches_per_image: default_patches_per_image(),
            batch_size: default_batch_size(),
            channels: default_channels(),
            convert_channels: false,
            augment: AugmentConfig::default(),
            noise,
            seed: 0,
            workers: 0,
            queue_depth: default_queue_depth(),
            cache_bytes: default_cache_bytes(),
            max_pixels: default_max_pixels(),
            strict: false,
        }
    }

    /// Checks the numbers make sense.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("patch_size", self.patch_size),
            ("patches_per_image", self.patches_per_image),
            ("batch_size", self.batch_size),
            ("queue_depth", self.queue_depth),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(DataError::Config(format!("{name} must be at least 1")));
            }
        }
        if self.channels != 1 && self.channels != 3 {
            return Err(DataError::Config(format!(
                "channels must be 1 or 3, not {}",
                self.channels
            )));
        }
        Ok(())
    }

    /// The worker count actually used.
    pub fn effective_workers(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// A batch of patches.
///
/// # Shapes
/// `clean` and `noisy` are NCHW, `n x channels x size x size`, contiguous; `sigma` (the noise's
/// per-pixel standard deviation on the `[0, 1]` scale, when the noise model provides one) is
/// `n x 1 x size x size`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Position in the stream (0-based): the training step it feeds.
    pub index: u64,
    /// Epoch of the batch's first patch (a batch may straddle two epochs).
    pub epoch: u64,
    pub n: usize,
    pub channels: usize,
    pub size: usize,
    pub clean: Vec<f32>,
    pub noisy: Vec<f32>,
    pub sigma: Option<Vec<f32>>,
}

impl Batch {
    /// Samples per patch: `channels * size * size`.
    pub fn patch_len(&self) -> usize {
        self.channels * self.size * self.size
    }

    /// Clean patch `i` as an image.
    ///
    /// # Shapes
    /// Returns `channels x size x size`.
    pub fn clean_patch(&self, i: usize) -> Image {
        let len = self.patch_len();
        Image::new(
            self.channels,
            self.size,
            self.size,
            self.clean[i * len..(i + 1) * len].to_vec(),
        )
        .expect("batch patches have the batch's shape")
    }

    /// Noisy patch `i` as an image.
    ///
    /// # Shapes
    /// Returns `channels x size x size`.
    pub fn noisy_patch(&self, i: usize) -> Image {
        let len = self.patch_len();
        Image::new(
            self.channels,
            self.size,
            self.size,
            self.noisy[i * len..(i + 1) * len].to_vec(),
        )
        .expect("batch patches have the batch's shape")
    }
}

/// Mixes `parts` into `seed` (splitmix64 finaliser per step): a cheap, well-spread way to give
/// every work item its own independent RNG stream.
pub fn derive_seed(seed: u64, parts: &[u64]) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    parts.iter().fold(mix(seed), |h, &p| mix(h ^ mix(p)))
}

// Domain tags keep the permutation and patch streams apart even for equal numbers.
const PERMUTATION_TAG: u64 = 0x7065_726d;
const PATCH_TAG: u64 = 0x7061_7463;

/// The order in which epoch `epoch` visits `n` images.
pub fn epoch_permutation(seed: u64, epoch: u64, n: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(derive_seed(
        seed,
        &[PERMUTATION_TAG, epoch],
    )));
    order
}

/// Counters of the decoded-image cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
    pub bytes: u64,
    pub budget: u64,
}

struct CacheEntry {
    image: Arc<RawImage>,
    last_used: u64,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<usize, CacheEntry>,
    /// `last_used -> file index`, oldest first, for eviction.
    lru: BTreeMap<u64, usize>,
    clock: u64,
    bytes: u64,
}

/// Decoded images by file index, least recently used evicted first once over the byte budget.
struct ImageCache {
    budget: u64,
    state: Mutex<CacheState>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl ImageCache {
    fn new(budget: u64) -> Self {
        Self {
            budget,
            state: Mutex::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // The state is consistent between statements, so a panic elsewhere cannot leave it
        // half-updated; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, index: usize) -> Option<Arc<RawImage>> {
        let mut state = self.lock();
        state.clock += 1;
        let now = state.clock;
        let entry = state.entries.get_mut(&index)?;
        let old = std::mem::replace(&mut entry.last_used, now);
        let image = entry.image.clone();
        state.lru.remove(&old);
        state.lru.insert(now, index);
        Some(image)
    }

    fn insert(&self, index: usize, image: Arc<RawImage>) {
        let size = image.bytes() as u64;
        if size > self.budget {
            return;
        }
        let mut state = self.lock();
        if state.entries.contains_key(&index) {
            return;
        }
        while state.bytes + size > self.budget {
            let Some((_, victim)) = state.lru.pop_first() else {
                break;
            };
            if let Some(e) = state.entries.remove(&victim) {
                state.bytes -= e.image.bytes() as u64;
            }
        }
        state.clock += 1;
        let now = state.clock;
        state.lru.insert(now, index);
        state.entries.insert(
            index,
            CacheEntry {
                image,
                last_used: now,
            },
        );
        state.bytes += size;
    }

    fn stats(&self) -> CacheStats {
        let state = self.lock();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: state.entries.len(),
            bytes: state.bytes,
            budget: self.budget,
        }
    }
}

/// What the workers share: the usable files, the config and the cache.
struct Plan {
    files: Vec<PathBuf>,
    config: LoaderConfig,
    cache: ImageCache,
    patches_per_epoch: u64,
}

impl Plan {
    fn image(&self, index: usize) -> Result<Arc<RawImage>> {
        if let Some(img) = self.cache.get(index) {
            self.cache.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(img);
        }
        self.cache.misses.fetch_add(1, Ordering::Relaxed);
        let path = &self.files[index];
        let raw = io::load_raw(path, self.config.max_pixels)?.without_alpha();
        // The file passed the header check at construction, but it may have changed since.
        check_usable(
            path,
            raw.width(),
            raw.height(),
            raw.channels(),
            &self.config,
        )?;
        let raw = Arc::new(raw);
        self.cache.insert(index, raw.clone());
        Ok(raw)
    }

    /// Builds batch `index`; `stop` aborts early when the consumer has gone.
    fn batch(
        &self,
        index: u64,
        stop: &AtomicBool,
        memo: &mut Option<(u64, Vec<u32>)>,
    ) -> Result<Batch> {
        let cfg = &self.config;
        let (b, ps, c) = (cfg.batch_size, cfg.patch_size, cfg.channels);
        let len = c * ps * ps;
        let mut clean = Vec::with_capacity(b * len);
        let mut noisy = Vec::with_capacity(b * len);
        let mut sigma: Option<Vec<f32>> = None;
        let first = index
            .checked_mul(b as u64)
            .ok_or_else(|| DataError::Config(format!("batch index {index} is out of range")))?;
        let mut current: Option<(usize, Arc<RawImage>)> = None;
        for j in 0..b as u64 {
            if stop.load(Ordering::Relaxed) {
                return Err(DataError::Worker("the loader was stopped".into()));
            }
            let g = first + j;
            let (epoch, slot) = (g / self.patches_per_epoch, g % self.patches_per_epoch);
            if memo.as_ref().is_none_or(|(e, _)| *e != epoch) {
                *memo = Some((epoch, epoch_permutation(cfg.seed, epoch, self.files.len())));
            }
            let order = &memo.as_ref().expect("permutation just computed").1;
            let file = order[(slot / cfg.patches_per_image as u64) as usize] as usize;
            let raw = match &current {
                Some((f, raw)) if *f == file => raw.clone(),
                _ => {
                    let raw = self.image(file)?;
                    current = Some((file, raw.clone()));
                    raw
                }
            };

            let mut rng =
                ChaCha8Rng::seed_from_u64(derive_seed(cfg.seed, &[PATCH_TAG, epoch, slot]));
            let y = rng.random_range(0..=raw.height() - ps);
            let x = rng.random_range(0..=raw.width() - ps);
            let patch = conform_channels(raw.crop(y, x, ps, ps)?, Some(c), cfg.convert_channels)?;
            let patch = cfg.augment.apply(&patch, &mut rng);
            if patch.shape() != (c, ps, ps) {
                return Err(DataError::Shape(format!(
                    "augmentation turned a {c}x{ps}x{ps} patch into {:?}",
                    patch.shape()
                )));
            }
            let out = cfg.noise.apply_rng(&patch, &mut rng);
            if out.image.shape() != (c, ps, ps) {
                return Err(DataError::Shape(format!(
                    "noise turned a {c}x{ps}x{ps} patch into {:?}",
                    out.image.shape()
                )));
            }
            clean.extend_from_slice(patch.data());
            noisy.extend_from_slice(out.image.data());
            match (out.sigma_map, &mut sigma) {
                (Some(map), _) if map.shape() != (1, ps, ps) => {
                    return Err(DataError::Shape(format!(
                        "sigma map of shape {:?} for a {ps}x{ps} patch",
                        map.shape()
                    )));
                }
                (Some(map), Some(s)) => s.extend_from_slice(map.data()),
                (Some(map), None) if j == 0 => {
                    let mut s = Vec::with_capacity(b * ps * ps);
                    s.extend_from_slice(map.data());
                    sigma = Some(s);
                }
                (None, None) => {}
                _ => {
                    return Err(DataError::Shape(
                        "the noise gave a sigma map for some patches of a batch only".into(),
                    ));
                }
            }
        }
        Ok(Batch {
            index,
            epoch: first / self.patches_per_epoch,
            n: b,
            channels: c,
            size: ps,
            clean,
            noisy,
            sigma,
        })
    }
}

fn check_usable(
    path: &Path,
    width: usize,
    height: usize,
    channels: usize,
    config: &LoaderConfig,
) -> Result<()> {
    if width < config.patch_size || height < config.patch_size {
        return Err(DataError::TooSmall {
            path: path.into(),
            width: width as u64,
            height: height as u64,
            patch: config.patch_size as u64,
        });
    }
    if channels != config.channels && !config.convert_channels {
        return Err(DataError::FileChannels {
            path: path.into(),
            expected: config.channels,
            got: channels,
        });
    }
    Ok(())
}

/// Splits `files` into those [`PatchLoader`] would stream and those it would leave out (with
/// the reason), reading only headers, in parallel: what a trainer checks before any work.
/// Errors: an invalid `config`, a channel mismatch without `convert_channels`, or any unusable
/// file under `strict`.
pub fn usable_files(
    files: Vec<PathBuf>,
    config: &LoaderConfig,
) -> Result<(Vec<PathBuf>, Vec<Skipped>)> {
    config.validate()?;
    let checks: Vec<Result<()>> = files
        .par_iter()
        .map(|path| {
            let info = io::probe(path)?;
            if info.pixels() > config.max_pixels {
                return Err(DataError::TooLarge {
                    path: path.clone(),
                    width: info.width.into(),
                    height: info.height.into(),
                    pixels: info.pixels(),
                    limit: config.max_pixels,
                });
            }
            check_usable(
                path,
                info.width as usize,
                info.height as usize,
                info.channels,
                config,
            )
        })
        .collect();
    let mut usable = Vec::with_capacity(files.len());
    let mut skipped = Vec::new();
    for (path, check) in files.into_iter().zip(checks) {
        match check {
            Ok(()) => usable.push(path),
            Err(e @ DataError::FileChannels { .. }) => return Err(e),
            Err(e) if config.strict => return Err(e),
            Err(error) => skipped.push(Skipped { path, error }),
        }
    }
    Ok((usable, skipped))
}

type Item = (u64, Result<Batch>);

/// Background-threaded, reproducible stream of [`Batch`]es. It never ends: take as many
/// batches as training needs. Dropping it stops the workers.
///
/// Errors met by a worker (a file that became unreadable, say) arrive as `Err` items in the
/// batch's place; the stream goes on after them.
pub struct PatchLoader {
    plan: Arc<Plan>,
    skipped: Vec<Skipped>,
    work: Option<Sender<u64>>,
    results: Receiver<Item>,
    pending: BTreeMap<u64, Result<Batch>>,
    /// The next batch index to yield.
    next: u64,
    /// The next batch index to hand to the workers.
    issued: u64,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl PatchLoader {
    /// Streams patches of every image under `dir` (see [`scan`]) from batch 0.
    pub fn from_dir(dir: impl AsRef<Path>, config: LoaderConfig) -> Result<Self> {
        let dir = dir.as_ref();
        let files = scan(dir)?;
        if files.is_empty() {
            return Err(DataError::EmptyDataset { path: dir.into() });
        }
        Self::resume(files, config, 0)
    }

    /// Streams patches of `files` from batch 0.
    pub fn new(files: Vec<PathBuf>, config: LoaderConfig) -> Result<Self> {
        Self::resume(files, config, 0)
    }

    /// Streams patches of `files` from batch `start`: exactly what an uninterrupted loader
    /// yields from its batch `start` on, so training can resume at step `start`.
    ///
    /// Headers are read up front (in parallel) so unusable files (unreadable, too large or
    /// smaller than a patch) are left out before the stream starts, which keeps the stream the
    /// same across runs; they are listed in [`PatchLoader::skipped`], or fail the construction
    /// under `strict`. A channel mismatch without `convert_channels` always fails.
    pub fn resume(files: Vec<PathBuf>, config: LoaderConfig, start: u64) -> Result<Self> {
        let (usable, skipped) = usable_files(files, &config)?;
        if usable.is_empty() {
            let path = skipped
                .first()
                .and_then(|s| s.path.parent())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
            return Err(DataError::EmptyDataset { path });
        }

        let patches_per_epoch = usable.len() as u64 * config.patches_per_image as u64;
        let workers = config.effective_workers();
        // At least one batch per worker in flight, or some workers would idle.
        let window = config.queue_depth.max(workers);
        let plan = Arc::new(Plan {
            files: usable,
            cache: ImageCache::new(config.cache_bytes),
            config,
            patches_per_epoch,
        });
        let (work_tx, work_rx) = crossbeam_channel::unbounded::<u64>();
        // Never more than `window` batches are issued and not yet yielded, so workers never
        // block on this queue and dropping the loader cannot deadlock.
        let (result_tx, result_rx) = crossbeam_channel::bounded::<Item>(window);
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            let (p, rx, tx, st) = (
                plan.clone(),
                work_rx.clone(),
                result_tx.clone(),
                stop.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name(format!("denoise-loader-{i}"))
                .spawn(move || worker(&p, &rx, &tx, &st));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // The workers already started exit once `work_tx` is dropped on return.
                    stop.store(true, Ordering::Relaxed);
                    return Err(DataError::Worker(format!(
                        "cannot start a loader thread: {e}"
                    )));
                }
            }
        }
        let mut loader = Self {
            plan,
            skipped,
            work: Some(work_tx),
            results: result_rx,
            pending: BTreeMap::new(),
            next: start,
            issued: start,
            stop,
            workers: handles,
        };
        for _ in 0..window {
            loader.issue();
        }
        Ok(loader)
    }

    fn issue(&mut self) {
        if let Some(work) = &self.work {
            // Workers only hang up when stopping, and then nobody needs more work.
            let _ = work.send(self.issued);
            self.issued += 1;
        }
    }

    /// The next batch, blocking until it is ready.
    ///
    /// # Shapes
    /// `clean`/`noisy`: `batch_size x channels x patch_size x patch_size`; `sigma`:
    /// `batch_size x 1 x patch_size x patch_size` (see [`Batch`]).
    pub fn next_batch(&mut self) -> Result<Batch> {
        loop {
            if let Some(result) = self.pending.remove(&self.next) {
                self.next += 1;
                self.issue();
                return result;
            }
            match self.results.recv() {
                Ok((index, result)) => {
                    self.pending.insert(index, result);
                }
                Err(_) => {
                    return Err(DataError::Worker("all loader workers have stopped".into()));
                }
            }
        }
    }

    /// Builds batch `index` on the calling thread, bypassing the queue: the same batch the
    /// stream yields at that index.
    ///
    /// # Shapes
    /// As [`PatchLoader::next_batch`].
    pub fn batch_at(&self, index: u64) -> Result<Batch> {
        self.plan.batch(index, &AtomicBool::new(false), &mut None)
    }

    /// Index of the batch [`PatchLoader::next_batch`] returns next (a resume point).
    pub fn position(&self) -> u64 {
        self.next
    }

    /// The files patches are drawn from, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.plan.files
    }

    /// Files left out at construction, and why; print them as a warning.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// `files().len() * patches_per_image`.
    pub fn patches_per_epoch(&self) -> u64 {
        self.plan.patches_per_epoch
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.plan.config
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.plan.cache.stats()
    }
}

impl Iterator for PatchLoader {
    type Item = Result<Batch>;

    /// Never `None`.
    fn next(&mut self) -> Option<Result<Batch>> {
        Some(self.next_batch())
    }
}

impl Drop for PatchLoader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.work = None;
        for handle in self.workers.drain(..) {
            // A worker that panicked outside `catch_unwind` has nothing left to clean up.
            let _ = handle.join();
        }
    }
}

fn worker(plan: &Plan, work: &Receiver<u64>, results: &Sender<Item>, stop: &AtomicBool) {
    let mut memo = None;
    while let Ok(index) = work.recv() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // Augmentation and noise are other modules' code; a panic there must reach the
        // consumer as an error instead of leaving it waiting for a batch that never comes.
        let result = catch_unwind(AssertUnwindSafe(|| plan.batch(index, stop, &mut memo)))
            .unwrap_or_else(|panic| {
                memo = None;
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(DataError::Worker(format!(
                    "batch {index} panicked: {message}"
                )))
            });
        if results.send((index, result)).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{BitDepth, save};
    use std::time::{Duration, Instant};

    /// A folder of small, distinct RGB images (one of them 16-bit).
    fn image_dir(count: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..count {
            let (h, w) = (24 + 3 * i, 30 + 2 * i);
            let img = Image::from_fn(3, h, w, |c, y, x| {
                ((i * 53 + c * 71 + y * y * 3 + x * 7 + x * y) % 256) as f32 / 255.0
            });
            let depth = if i == 1 {
                BitDepth::Sixteen
            } else {
                BitDepth::Eight
            };
            save(dir.path().join(format!("img{i:02}.png")), &img, None, depth).unwrap();
        }
        dir
    }

    fn config(workers: usize, seed: u64) -> LoaderConfig {
        LoaderConfig {
            patch_size: 16,
            patches_per_image: 3,
            // 4 does not divide the 15 patches of an epoch, so batches straddle epochs.
            batch_size: 4,
            workers,
            seed,
            queue_depth: 3,
            ..LoaderConfig::new("gaussian:25".parse().unwrap())
        }
    }

    fn take(loader: &mut PatchLoader, n: usize) -> Vec<Batch> {
        (0..n).map(|_| loader.next_batch().unwrap()).collect()
    }

    #[test]
    fn reproducible_for_any_worker_count() {
        let dir = image_dir(5);
        let one = take(
            &mut PatchLoader::from_dir(dir.path(), config(1, 7)).unwrap(),
            12,
        );
        let two = take(
            &mut PatchLoader::from_dir(dir.path(), config(2, 7)).unwrap(),
            12,
        );
        let three = take(
            &mut PatchLoader::from_dir(dir.path(), config(3, 7)).unwrap(),
            12,
        );
        assert_eq!(one, two);
        assert_eq!(one, three);
        // 15 patches per epoch in batches of 4: batch 3 starts in epoch 0, batch 4 in epoch 1.
        let epochs: Vec<u64> = one.iter().map(|b| b.epoch).collect();
        assert_eq!(epochs, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
        for (k, b) in one.iter().enumerate() {
            assert_eq!(b.index, k as u64);
            assert_eq!((b.n, b.channels, b.size), (4, 3, 16));
            assert_eq!(b.clean.len(), 4 * 3 * 16 * 16);
            assert_eq!(b.noisy.len(), b.clean.len());
            assert!(b.clean.iter().all(|v| (0.0..=1.0).contains(v)));
            if let Some(s) = &b.sigma {
                assert_eq!(s.len(), 4 * 16 * 16);
            }
        }
    }

    #[test]
    fn resumes_at_any_batch() {
        let dir = image_dir(4);
        let files = scan(dir.path()).unwrap();
        let full = take(
            &mut PatchLoader::new(files.clone(), config(2, 3)).unwrap(),
            14,
        );
        for k in [1u64, 5, 9] {
            let mut resumed = PatchLoader::resume(files.clone(), config(2, 3), k).unwrap();
            assert_eq!(resumed.position(), k);
            let rest = take(&mut resumed, 14 - k as usize);
            assert_eq!(rest, full[k as usize..], "resume at {k}");
            assert_eq!(resumed.batch_at(2).unwrap(), full[2]);
        }
    }

    #[test]
    fn seeds_and_epochs_differ() {
        let dir = image_dir(4);
        let a = take(
            &mut PatchLoader::from_dir(dir.path(), config(1, 1)).unwrap(),
            3,
        );
        let b = take(
            &mut PatchLoader::from_dir(dir.path(), config(1, 2)).unwrap(),
            3,
        );
        assert_ne!(a[0].clean, b[0].clean);
        assert_ne!(a[0].noisy, b[0].noisy);
        assert_ne!(epoch_permutation(1, 0, 50), epoch_permutation(1, 1, 50));
        assert_eq!(epoch_permutation(1, 4, 50), epoch_permutation(1, 4, 50));
    }

    #[test]
    fn patches_are_windows_of_the_images() {
        let dir = image_dir(3);
        let mut cfg = config(1, 11);
        cfg.noise = "gaussian:0".parse().unwrap();
        let loader = PatchLoader::from_dir(dir.path(), cfg).unwrap();
        let images: Vec<Image> = loader
            .files()
            .iter()
            .map(|p| io::load(p).unwrap().image)
            .collect();
        let batch = loader.batch_at(0).unwrap();
        for i in 0..batch.n {
            let patch = batch.clean_patch(i);
            let found = images.iter().any(|img| {
                (0..=img.height() - 16).any(|y| {
                    (0..=img.width() - 16).any(|x| img.crop(y, x, 16, 16).unwrap() == patch)
                })
            });
            assert!(found, "patch {i} is not a window of any image");
        }
    }

    #[test]
    fn cache_holds_the_set_when_it_fits_and_evicts_when_not() {
        let dir = image_dir(4);
        let mut loader = PatchLoader::from_dir(dir.path(), config(1, 0)).unwrap();
        take(&mut loader, 12);
        let stats = loader.cache_stats();
        assert_eq!(stats.entries, 4);
        assert_eq!(stats.misses, 4);

        let mut small = config(1, 0);
        small.cache_bytes = 3000;
        let mut loader = PatchLoader::from_dir(dir.path(), small.clone()).unwrap();
        let streamed = take(&mut loader, 12);
        let stats = loader.cache_stats();
        assert!(stats.bytes <= 3000 && stats.entries <= 1, "{stats:?}");
        assert!(stats.misses > 4);
        // The cache changes speed, never content.
        let mut big = small;
        big.cache_bytes = 1 << 30;
        assert_eq!(
            take(&mut PatchLoader::from_dir(dir.path(), big).unwrap(), 12),
            streamed
        );
    }

    #[test]
    fn unusable_files_are_skipped_or_fail_strictly() {
        let dir = image_dir(3);
        std::fs::write(dir.path().join("bad.png"), b"garbage").unwrap();
        let tiny = Image::zeros(3, 8, 8);
        save(dir.path().join("tiny.png"), &tiny, None, BitDepth::Eight).unwrap();
        let loader = PatchLoader::from_dir(dir.path(), config(1, 0)).unwrap();
        assert_eq!(loader.files().len(), 3);
        let skipped: Vec<String> = loader
            .skipped()
            .iter()
            .map(|s| s.error.to_string())
            .collect();
        assert_eq!(skipped.len(), 2);
        assert!(skipped[0].contains("bad.png"), "{skipped:?}");
        assert!(
            skipped[1].contains("smaller than the 16x16 patch"),
            "{skipped:?}"
        );

        let strict = LoaderConfig {
            strict: true,
            ..config(1, 0)
        };
        let err = PatchLoader::from_dir(dir.path(), strict).err().unwrap();
        assert!(err.to_string().contains("bad.png"), "{err}");
    }

    #[test]
    fn gray_images_need_explicit_conversion() {
        let dir = tempfile::tempdir().unwrap();
        let gray = Image::from_fn(1, 20, 20, |_, y, x| (y * 20 + x) as f32 / 400.0);
        save(dir.path().join("g.png"), &gray, None, BitDepth::Eight).unwrap();
        let err = PatchLoader::from_dir(dir.path(), config(1, 0))
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                DataError::FileChannels {
                    expected: 3,
                    got: 1,
                    ..
                }
            ),
            "{err}"
        );

        let convert = LoaderConfig {
            convert_channels: true,
            ..config(1, 0)
        };
        let batch = PatchLoader::from_dir(dir.path(), convert)
            .unwrap()
            .next_batch()
            .unwrap();
        let p = batch.clean_patch(0);
        assert_eq!(p.plane(0), p.plane(2));
    }

    #[test]
    fn worker_errors_reach_the_consumer_in_place() {
        let dir = image_dir(2);
        // No cache, so every batch decodes again and sees the broken file.
        let loader_cfg = LoaderConfig {
            batch_size: 3,
            cache_bytes: 0,
            ..config(2, 5)
        };
        let mut loader = PatchLoader::from_dir(dir.path(), loader_cfg).unwrap();
        // The header was fine at construction; the file breaks afterwards.
        let victim = loader.files()[1].clone();
        std::fs::write(&victim, b"").unwrap();
        let results: Vec<Result<Batch>> = (0..6).map(|_| loader.next_batch()).collect();
        let errors: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(ToString::to_string)
            .collect();
        assert!(!errors.is_empty());
        assert!(
            errors.iter().all(|e| e.contains(victim.to_str().unwrap())),
            "{errors:?}"
        );
        assert!(results.iter().any(Result::is_ok));
    }

    #[test]
    fn dropping_a_full_loader_is_prompt() {
        let dir = image_dir(3);
        let mut cfg = config(2, 0);
        cfg.queue_depth = 2;
        let loader = PatchLoader::from_dir(dir.path(), cfg).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        drop(loader);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn config_round_trips_through_json_with_defaults() {
        let cfg: LoaderConfig =
            serde_json::from_str(r#"{"noise": "gaussian:25", "seed": 4}"#).unwrap();
        assert_eq!(cfg.patch_size, 64);
        assert_eq!(cfg.seed, 4);
        let back: LoaderConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        assert!(
            serde_json::from_str::<LoaderConfig>(r#"{"noise": "gaussian:25", "typo": 1}"#).is_err()
        );
        assert!(
            LoaderConfig {
                channels: 2,
                ..cfg.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            LoaderConfig {
                batch_size: 0,
                ..cfg
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn derived_seeds_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for e in 0..20 {
            for s in 0..200 {
                assert!(seen.insert(derive_seed(9, &[PATCH_TAG, e, s])));
            }
        }
        assert_ne!(derive_seed(1, &[2, 3]), derive_seed(1, &[3, 2]));
    }
}
