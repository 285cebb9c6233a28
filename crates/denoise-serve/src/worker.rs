//! The inference workers: [`Pool`], a fixed set of threads fed by one bounded channel, and
//! [`Worker`], the per-thread state (its own models and decoded samples) that runs a [`Task`].
//!
//! **Invariant:** a job's failure, a panic included, is that job's error: the worker replies and
//! takes the next job. Submitting never blocks: a full queue hands the job back.

use crate::config::{ModelEntry, Strength};
use crate::metrics::Metrics;
use crate::models::Denoiser;
use crate::progress::ProgressHandle;
use crate::samples::{self, SampleInfo};
use crate::{Result, ServeError};
use crossbeam_channel::{Sender, TrySendError};
use denoise_data::{Image, io};
use denoise_models::tile::LevelUsed;
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

/// Why a job was not queued; the job comes back.
pub enum Rejected<J> {
    /// Every queue slot is taken.
    Full(J),
    /// The workers are gone (shutting down).
    Closed(J),
}

/// Worker threads fed by a bounded channel.
pub struct Pool<J> {
    tx: Option<Sender<J>>,
    threads: Vec<JoinHandle<()>>,
    capacity: usize,
    workers: usize,
    /// Workers running a job.
    busy: Arc<AtomicUsize>,
}

impl<J: Send + 'static> Pool<J> {
    /// Starts `workers` threads named `name-N`; each calls `make(N)` on its own thread (so what
    /// it builds, models say, never crosses threads) and then runs the returned closure on every
    /// job it receives. Waits until every worker is ready; if any `make` fails, stops the others
    /// and returns that error. At most `capacity` jobs wait in the queue.
    pub fn start<W, F, E>(name: &str, workers: usize, capacity: usize, make: F) -> Result<Self, E>
    where
        F: Fn(usize) -> Result<W, E> + Send + Sync + 'static,
        W: FnMut(J) + 'static,
        E: Send + 'static,
        E: From<std::io::Error>,
    {
        let (tx, rx) = crossbeam_channel::bounded::<J>(capacity);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), E>>();
        let make = Arc::new(make);
        let busy = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::with_capacity(workers);
        for i in 0..workers {
            let (rx, ready_tx, make) = (rx.clone(), ready_tx.clone(), Arc::clone(&make));
            let busy = Arc::clone(&busy);
            let thread = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || match make(i) {
                    Ok(mut work) => {
                        let _ = ready_tx.send(Ok(()));
                        drop(ready_tx);
                        for job in rx.iter() {
                            busy.fetch_add(1, Ordering::SeqCst);
                            // A job that panics must not take its thread down: the next job
                            // still needs a worker. (`Worker::handle` replies before this.)
                            let _ = catch_unwind(AssertUnwindSafe(|| work(job)));
                            busy.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                })?;
            threads.push(thread);
        }
        drop(ready_tx);
        let mut pool = Self {
            tx: Some(tx),
            threads,
            capacity,
            workers,
            busy,
        };
        for _ in 0..workers {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    pool.shutdown_in_place();
                    return Err(e);
                }
                Err(_) => {
                    pool.shutdown_in_place();
                    return Err(std::io::Error::other("a worker died while starting").into());
                }
            }
        }
        Ok(pool)
    }

    /// Queues `job` without blocking.
    pub fn try_submit(&self, job: J) -> Result<(), Rejected<J>> {
        match &self.tx {
            None => Err(Rejected::Closed(job)),
            Some(tx) => tx.try_send(job).map_err(|e| match e {
                TrySendError::Full(j) => Rejected::Full(j),
                TrySendError::Disconnected(j) => Rejected::Closed(j),
            }),
        }
    }

    /// Jobs waiting (not those being worked on).
    pub fn queued(&self) -> usize {
        self.tx.as_ref().map_or(0, Sender::len)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Workers running a job now.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::SeqCst)
    }

    /// Stops taking jobs, lets the workers finish the queue, and joins them.
    pub fn shutdown(mut self) {
        self.shutdown_in_place();
    }

    fn shutdown_in_place(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl<J> Drop for Pool<J> {
    fn drop(&mut self) {
        // Closing the channel ends the workers after their queue; not joined here, since a drop
        // may happen on the async runtime. `shutdown` joins.
        self.tx = None;
    }
}

/// How a [`Task::Denoise`] denoises.
#[derive(Clone, Debug)]
pub struct Settings {
    /// One of the configured model names (checked by the caller).
    pub model: String,
    pub strength: Strength,
    /// Self-ensemble passes (checked by the caller: 1, 2, 4 or 8).
    pub ensemble: usize,
}

/// Work a [`Worker`] does.
pub enum Task {
    /// Decode an image and denoise it.
    Denoise {
        bytes: Vec<u8>,
        /// For error messages; its extension picks the format when the content does not.
        name: String,
        settings: Settings,
        /// A sample name (checked by the caller): report PSNR against its clean image.
        reference: Option<String>,
        progress: Option<ProgressHandle>,
    },
    /// Decode an image and re-encode it as PNG with its metadata (what a fetched URL is shown
    /// as, and sent back to be denoised).
    Normalise { bytes: Vec<u8>, name: String },
    /// A demo sample with noise added, as PNG.
    NoisySample { name: String, sigma: f32 },
}

/// A denoised image and what the response headers say about it.
#[derive(Debug)]
pub struct Denoised {
    pub png: Vec<u8>,
    pub width: usize,
    pub height: usize,
    pub model: String,
    /// The level used, for models that take one.
    pub sigma: Option<LevelUsed>,
    /// Self-ensemble passes.
    pub ensemble: usize,
    /// PSNR (dB) of the input and of the result against the clean reference.
    pub psnr: Option<(f64, f64)>,
    /// Decode + denoise + encode, in milliseconds.
    pub compute_ms: f64,
    /// Time spent waiting for a worker, in milliseconds.
    pub queue_ms: f64,
}

/// What a [`Task`] gives.
#[derive(Debug)]
pub enum Outcome {
    Denoised(Denoised),
    Png(Vec<u8>),
}

/// A task, where to send its result, and when it was queued.
pub struct Job {
    pub task: Task,
    pub reply: tokio::sync::oneshot::Sender<Result<Outcome>>,
    pub queued_at: Instant,
}

/// What every worker shares (read-only).
pub struct WorkerConfig {
    pub models: Vec<ModelEntry>,
    pub default_model: String,
    pub samples: Vec<SampleInfo>,
    pub device: tch::Device,
    pub tile: usize,
    pub max_pixels: u64,
    /// Where workers count the models they load and the images they denoise.
    pub metrics: Arc<Metrics>,
}

/// One worker thread's state: the models it has loaded and the clean samples it has decoded.
pub struct Worker {
    config: Arc<WorkerConfig>,
    models: HashMap<String, Denoiser>,
    clean: HashMap<String, Arc<Image>>,
}

impl Worker {
    /// A worker with the default model loaded (so a bad model fails at start-up).
    pub fn new(config: Arc<WorkerConfig>) -> Result<Self> {
        let mut worker = Self {
            config,
            models: HashMap::new(),
            clean: HashMap::new(),
        };
        let default = worker.config.default_model.clone();
        worker.model(&default)?;
        Ok(worker)
    }

    /// Runs one job and replies; never panics out.
    pub fn handle(&mut self, job: Job) {
        let Job {
            task,
            reply,
            queued_at,
        } = job;
        let queue_ms = queued_at.elapsed().as_secs_f64() * 1e3;
        let progress = match &task {
            Task::Denoise { progress, .. } => progress.clone(),
            _ => None,
        };
        if reply.is_closed() {
            // Nobody waits for it (the client went away while it queued): skip the work.
            self.config.metrics.record_cancelled();
            if let Some(p) = progress {
                p.cancelled();
            }
            return;
        }
        // A client that goes away while its job runs stops it at the next pass over a tile,
        // so the worker is free for the next job.
        let client_gone = || reply.is_closed();
        let mut result = catch_unwind(AssertUnwindSafe(|| self.run(task, &client_gone)))
            .unwrap_or_else(|payload| {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(ServeError::Internal(format!("the job failed: {message}")))
            });
        if let Ok(Outcome::Denoised(d)) = &mut result {
            d.queue_ms = queue_ms;
            // Before the reply, so a client that scrapes after its answer sees its image.
            self.config.metrics.record_denoised(d.width, d.height);
        }
        if matches!(result, Err(ServeError::Cancelled)) {
            self.config.metrics.record_cancelled();
        }
        if let Some(p) = progress {
            match &result {
                Err(ServeError::Cancelled) => p.cancelled(),
                _ => p.finish(result.is_ok()),
            }
        }
        // The client may have gone; its result is dropped.
        let _ = reply.send(result);
    }

    /// Runs `task`; a denoise stops with [`ServeError::Cancelled`] once `cancelled()` says so.
    fn run(&mut self, task: Task, cancelled: &dyn Fn() -> bool) -> Result<Outcome> {
        match task {
            Task::Denoise {
                bytes,
                name,
                settings,
                reference,
                progress,
            } => self
                .denoise(
                    &bytes,
                    &name,
                    &settings,
                    reference.as_deref(),
                    progress.as_ref(),
                    cancelled,
                )
                .map(Outcome::Denoised),
            Task::Normalise { bytes, name } => {
                // The metadata goes with it: the page sends this PNG back to be denoised.
                let (loaded, metadata) =
                    io::decode_with_metadata(&bytes, &name, self.config.max_pixels)?;
                let (png, _) = io::encode_with_metadata(
                    &loaded.image,
                    loaded.alpha.as_deref(),
                    loaded.bit_depth,
                    io::ImageFormat::Png,
                    &metadata,
                )?;
                Ok(Outcome::Png(png))
            }
            Task::NoisySample { name, sigma } => {
                let clean = self.clean_sample(&name)?;
                let noisy = samples::add_noise(&clean, sigma)?;
                Ok(Outcome::Png(io::encode_png(
                    &noisy,
                    None,
                    io::BitDepth::Eight,
                )?))
            }
        }
    }

    fn denoise(
        &mut self,
        bytes: &[u8],
        name: &str,
        settings: &Settings,
        reference: Option<&str>,
        progress: Option<&ProgressHandle>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Denoised> {
        let start = Instant::now();
        if let Some(p) = progress {
            p.running();
        }
        let (loaded, metadata) = io::decode_with_metadata(bytes, name, self.config.max_pixels)?;
        let clean = match reference {
            Some(r) => {
                let clean = self.clean_sample(r)?;
                if clean.shape() != loaded.image.shape() {
                    let (c, h, w) = clean.shape();
                    let (c2, h2, w2) = loaded.image.shape();
                    return Err(ServeError::BadRequest(format!(
                        "reference '{r}' is {w}x{h}x{c} but the image is {w2}x{h2}x{c2}"
                    )));
                }
                Some(clean)
            }
            None => None,
        };
        let denoiser = self.model(&settings.model)?;
        let mut on_tile = |done: usize, total: usize| {
            if let Some(p) = progress {
                p.tiles(done, total);
            }
        };
        let (out, sigma) = denoiser.denoise(
            &loaded.image,
            settings.strength,
            settings.ensemble,
            &mut on_tile,
            cancelled,
        )?;
        // What the PNG holds, so the PSNR is that of the file the user downloads.
        let out = io::quantize(&out, loaded.bit_depth);
        let psnr = match clean {
            Some(clean) => {
                let metric = |img: &Image| {
                    denoise_metrics::psnr(clean.data(), img.data(), 1.0)
                        .map_err(|e| ServeError::Internal(format!("psnr: {e}")))
                };
                Some((metric(&loaded.image)?, metric(&out)?))
            }
            None => None,
        };
        // PNG has a place for all of the input's metadata (an ICC profile that does not fit a
        // gray result aside), so the download keeps it.
        let (png, _) = io::encode_with_metadata(
            &out,
            loaded.alpha.as_deref(),
            loaded.bit_depth,
            io::ImageFormat::Png,
            &metadata,
        )?;
        Ok(Denoised {
            png,
            width: out.width(),
            height: out.height(),
            model: settings.model.clone(),
            sigma,
            ensemble: settings.ensemble,
            psnr,
            compute_ms: start.elapsed().as_secs_f64() * 1e3,
            queue_ms: 0.0,
        })
    }

    /// The named model, loaded on first use.
    fn model(&mut self, name: &str) -> Result<&Denoiser> {
        if !self.models.contains_key(name) {
            let entry = self
                .config
                .models
                .iter()
                .find(|m| m.name == name)
                .ok_or_else(|| ServeError::BadRequest(format!("unknown model '{name}'")))?;
            let denoiser = Denoiser::load(entry, self.config.device, self.config.tile)?;
            self.models.insert(name.to_owned(), denoiser);
            self.config.metrics.record_model_loaded(name);
        }
        Ok(&self.models[name])
    }

    /// The named sample's clean image, decoded on first use.
    fn clean_sample(&mut self, name: &str) -> Result<Arc<Image>> {
        if let Some(img) = self.clean.get(name) {
            return Ok(Arc::clone(img));
        }
        let info = self
            .config
            .samples
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ServeError::NotFound(format!("no sample '{name}'")))?;
        let img = Arc::new(samples::load_clean(info)?);
        self.clean.insert(name.to_owned(), Arc::clone(&img));
        Ok(img)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_full_queue_hands_the_job_back_and_the_pool_recovers() {
        // One worker blocked on its first job, a queue of one: the third job is refused.
        let (started_tx, started_rx) = mpsc::channel::<u32>();
        let (go_tx, go_rx) = crossbeam_channel::unbounded::<()>();
        let (done_tx, done_rx) = mpsc::channel::<u32>();
        let started_tx = std::sync::Mutex::new(started_tx);
        let done_tx = std::sync::Mutex::new(done_tx);
        let pool = Pool::<u32>::start("test", 1, 1, move |_| {
            let started = started_tx.lock().unwrap().clone();
            let done = done_tx.lock().unwrap().clone();
            let go = go_rx.clone();
            Ok::<_, std::io::Error>(move |job: u32| {
                started.send(job).unwrap();
                go.recv().unwrap();
                done.send(job).unwrap();
            })
        })
        .unwrap();
        assert!(pool.try_submit(1).is_ok());
        assert_eq!(started_rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        assert_eq!(pool.busy(), 1);
        assert!(pool.try_submit(2).is_ok());
        assert_eq!(pool.queued(), 1);
        assert!(matches!(pool.try_submit(3), Err(Rejected::Full(3))));
        go_tx.send(()).unwrap();
        go_tx.send(()).unwrap();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)).unwrap(), 2);
        assert!(pool.try_submit(4).is_ok());
        go_tx.send(()).unwrap();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)).unwrap(), 4);
        pool.shutdown();
    }

    #[test]
    fn a_panicking_job_leaves_the_worker_running() {
        let (done_tx, done_rx) = mpsc::channel::<u32>();
        let done_tx = std::sync::Mutex::new(done_tx);
        let pool = Pool::<u32>::start("test", 1, 4, move |_| {
            let done = done_tx.lock().unwrap().clone();
            Ok::<_, std::io::Error>(move |job: u32| {
                assert!(job != 1, "job 1 panics");
                done.send(job).unwrap();
            })
        })
        .unwrap();
        for job in [1, 2, 1, 3] {
            assert!(pool.try_submit(job).is_ok());
        }
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)).unwrap(), 2);
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)).unwrap(), 3);
        pool.shutdown();
    }

    /// A worker with one tiny (untrained) DnCNN, "m", saved in `dir`.
    fn tiny_worker(dir: &std::path::Path) -> Worker {
        let cfg: denoise_models::ModelConfig =
            serde_json::from_str(r#"{"kind":"dncnn","depth":3,"features":8,"batch_norm":false}"#)
                .unwrap();
        let model = denoise_models::Model::new(&cfg, tch::Device::Cpu).unwrap();
        let path = dir.join("m.safetensors");
        let meta = denoise_models::Metadata::new(model.config());
        denoise_models::artefact::save(&model, &meta, &path).unwrap();
        Worker::new(Arc::new(WorkerConfig {
            models: vec![ModelEntry {
                name: "m".into(),
                path,
                white: None,
            }],
            default_model: "m".into(),
            samples: Vec::new(),
            device: tch::Device::Cpu,
            tile: 0,
            max_pixels: 1 << 20,
            metrics: Arc::new(Metrics::new(["m"])),
        }))
        .unwrap()
    }

    #[test]
    fn a_job_nobody_waits_for_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut worker = tiny_worker(dir.path());
        let registry = crate::progress::Registry::new(4);
        let image = Image::from_fn(3, 8, 8, |_, _, _| 0.5);
        let png = io::encode_png(&image, None, io::BitDepth::Eight).unwrap();
        let job = |id: &str, reply| Job {
            task: Task::Denoise {
                bytes: png.clone(),
                name: "a.png".into(),
                settings: Settings {
                    model: "m".into(),
                    strength: Strength::Blind,
                    ensemble: 1,
                },
                reference: None,
                progress: registry.register(id),
            },
            reply,
            queued_at: Instant::now(),
        };
        let state = |id| registry.get(id).unwrap().state;
        let (reply, answer) = tokio::sync::oneshot::channel();
        drop(answer);
        worker.handle(job("gone", reply));
        assert_eq!(state("gone"), crate::progress::State::Cancelled);
        let (reply, answer) = tokio::sync::oneshot::channel();
        worker.handle(job("here", reply));
        assert!(answer.blocking_recv().unwrap().is_ok());
        assert_eq!(state("here"), crate::progress::State::Done);
        assert!(
            worker
                .config
                .metrics
                .render(&Default::default())
                .contains("\ndenoise_jobs_cancelled_total 1\n")
        );
    }

    #[test]
    fn a_running_denoise_stops_once_its_check_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let mut worker = tiny_worker(dir.path());
        let image = Image::from_fn(3, 8, 8, |_, _, _| 0.5);
        let task = |ensemble| Task::Denoise {
            bytes: io::encode_png(&image, None, io::BitDepth::Eight).unwrap(),
            name: "a.png".into(),
            settings: Settings {
                model: "m".into(),
                strength: Strength::Fixed(10.0),
                ensemble,
            },
            reference: None,
            progress: None,
        };
        // Asked before each of the eight passes: stop before the third.
        let asked = std::cell::Cell::new(0);
        let stop_at_third = || {
            asked.set(asked.get() + 1);
            asked.get() > 2
        };
        let result = worker.run(task(8), &stop_at_third);
        assert!(matches!(result, Err(ServeError::Cancelled)), "{result:?}");
        assert_eq!(asked.get(), 3);
        assert!(worker.run(task(8), &|| false).is_ok());
    }

    #[test]
    fn the_download_keeps_the_uploads_metadata_upright() {
        use denoise_data::metadata::{Metadata, Resolution, ResolutionUnit};
        let dir = tempfile::tempdir().unwrap();
        let mut worker = tiny_worker(dir.path());
        let mut icc = vec![0u8; 132];
        icc[16..20].copy_from_slice(b"RGB ");
        // IFD0 with Orientation 6: stored sideways.
        let exif = |orientation: u8| {
            let mut exif = b"II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0".to_vec();
            exif.extend_from_slice(&[orientation, 0, 0, 0, 0, 0, 0, 0]);
            exif
        };
        let upload = Metadata {
            icc: Some(icc),
            exif: Some(exif(6)),
            xmp: Some(b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>".to_vec()),
            resolution: Some(Resolution {
                x: 300.0,
                y: 300.0,
                unit: ResolutionUnit::Inch,
            }),
        };
        let image = Image::from_fn(3, 8, 16, |c, y, x| ((c + y + x) % 5) as f32 / 4.0);
        let (jpeg, _) = io::encode_with_metadata(
            &image,
            None,
            io::BitDepth::Eight,
            io::ImageFormat::Jpeg,
            &upload,
        )
        .unwrap();
        let settings = Settings {
            model: "m".into(),
            strength: Strength::Blind,
            ensemble: 1,
        };
        let task = Task::Denoise {
            bytes: jpeg.clone(),
            name: "photo.jpg".into(),
            settings,
            reference: None,
            progress: None,
        };
        let denoised = match worker.run(task, &|| false) {
            Ok(Outcome::Denoised(d)) => d,
            other => panic!("{other:?}"),
        };
        let task = Task::Normalise {
            bytes: jpeg,
            name: "photo.jpg".into(),
        };
        let normalised = match worker.run(task, &|| false) {
            Ok(Outcome::Png(png)) => png,
            other => panic!("{other:?}"),
        };
        for png in [denoised.png, normalised] {
            let (loaded, kept) = io::decode_with_metadata(&png, "d.png", 1 << 20).unwrap();
            assert_eq!(loaded.image.shape(), (3, 16, 8));
            assert_eq!(kept.icc, upload.icc);
            assert_eq!(kept.exif, Some(exif(1)));
            assert_eq!(kept.xmp, upload.xmp);
            let (x, y) = kept.resolution.unwrap().per_inch();
            assert!(
                (x - 300.0).abs() < 0.02 && (y - 300.0).abs() < 0.02,
                "{x} {y}"
            );
        }
    }

    #[test]
    fn a_failing_worker_start_is_an_error() {
        let result = Pool::<u32>::start("test", 2, 4, |i| {
            if i == 1 {
                Err(std::io::Error::other("no model"))
            } else {
                Ok(|_job: u32| {})
            }
        });
        assert_eq!(result.err().unwrap().to_string(), "no model");
    }
}
