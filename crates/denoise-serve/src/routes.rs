//! The server's state ([`App`]) and its table of routes: which handler answers which path,
//! behind which layers. The handlers are in `handlers`, the layers in `middleware`, the accept
//! loop in `server`.

use crate::config::ServeConfig;
use crate::fetch::Fetcher;
use crate::handlers::{
    denoise, denoise_url, fetch_url, healthz, method_not_allowed, metrics_text, models,
    noisy_sample, not_found, page, progress, readyz, sample_list, script, style,
};
use crate::metrics::Metrics;
use crate::middleware::{guard_origin, headers_and_log};
use crate::models::ModelInfo;
use crate::progress::Registry;
use crate::samples::{self, SampleInfo};
use crate::worker::{Job, Pool, Worker, WorkerConfig};
use crate::{Result, ServeError};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{Router, middleware};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Duration;

/// Jobs whose progress is tracked at once.
const MAX_TRACKED_JOBS: usize = 4096;

/// What every handler and layer shares.
pub(crate) struct AppState {
    pub(crate) pool: Pool<Job>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) fetcher: Fetcher,
    pub(crate) models: Vec<ModelInfo>,
    pub(crate) default_model: String,
    pub(crate) samples: Vec<SampleInfo>,
    pub(crate) max_upload: usize,
    pub(crate) max_pixels: u64,
    pub(crate) max_ensemble: usize,
    /// Lower-case host names the `Host` header may carry; empty: any.
    pub(crate) allowed_hosts: Vec<String>,
    pub(crate) header_timeout: Duration,
    /// Requests being handled (headers read, response not yet produced).
    pub(crate) in_flight: Arc<AtomicUsize>,
    /// Open connections that have sent a request: at a stop, each is waited for (it closes
    /// once its response is written) up to the header timeout.
    pub(crate) answered: Arc<AtomicUsize>,
    /// Counters for `/metrics`, shared with the workers; `/readyz` reads their model loads.
    pub(crate) metrics: Arc<Metrics>,
    /// Set once a stop begins: `/readyz` then says so, and a load balancer sends no more work.
    pub(crate) stopping: AtomicBool,
}

/// A ready server: workers started (each with the default model loaded), routes built.
pub struct App {
    pub(crate) state: Arc<AppState>,
}

impl App {
    /// Validates `config`, reads every model's header, lists the samples, and starts the
    /// workers; fails if the default model does not load. Blocks while models load: call it
    /// before (or outside) the async runtime.
    pub fn new(config: ServeConfig) -> Result<Self> {
        config.validate()?;
        let models = config
            .models
            .iter()
            .map(ModelInfo::read)
            .collect::<Result<Vec<_>>>()?;
        let samples = match &config.samples_dir {
            Some(dir) => samples::scan(dir)?,
            None => Vec::new(),
        };
        let mut fetch = config.fetch.clone();
        fetch.max_bytes = config.max_upload_bytes;
        let fetcher = Fetcher::new(&fetch)?;
        let metrics = Arc::new(Metrics::new(config.models.iter().map(|m| m.name.as_str())));
        let worker_config = Arc::new(WorkerConfig {
            models: config.models.clone(),
            default_model: config.default_model.clone(),
            samples: samples.clone(),
            device: config.device,
            tile: config.tile,
            max_pixels: config.max_pixels,
            metrics: Arc::clone(&metrics),
        });
        let pool = Pool::start("denoise-worker", config.workers, config.queue, move |_| {
            let mut worker = Worker::new(Arc::clone(&worker_config))?;
            Ok::<_, ServeError>(move |job: Job| worker.handle(job))
        })?;
        Ok(Self {
            state: Arc::new(AppState {
                pool,
                registry: Registry::new(MAX_TRACKED_JOBS),
                fetcher,
                models,
                default_model: config.default_model,
                samples,
                max_upload: config.max_upload_bytes,
                max_pixels: config.max_pixels,
                max_ensemble: config.max_ensemble,
                allowed_hosts: config
                    .allowed_hosts
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
                header_timeout: config.header_timeout,
                in_flight: Arc::new(AtomicUsize::new(0)),
                answered: Arc::new(AtomicUsize::new(0)),
                metrics,
                stopping: AtomicBool::new(false),
            }),
        })
    }

    /// The routes (see the README's "Web app" section for the API).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(page))
            .route("/app.js", get(script))
            .route("/style.css", get(style))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text))
            .route("/api/models", get(models))
            .route("/api/samples", get(sample_list))
            .route("/api/samples/{name}", get(noisy_sample))
            .route("/api/progress/{id}", get(progress))
            .route("/api/denoise", post(denoise))
            .route("/api/denoise-url", post(denoise_url))
            .route("/api/fetch-url", post(fetch_url))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            // Bodies are read by `read_body`, with its own limit and drain.
            .layer(DefaultBodyLimit::disable())
            .layer(middleware::from_fn_with_state(
                Arc::clone(&self.state),
                guard_origin,
            ))
            .layer(middleware::from_fn_with_state(
                Arc::clone(&self.state),
                headers_and_log,
            ))
            .with_state(Arc::clone(&self.state))
    }
}
