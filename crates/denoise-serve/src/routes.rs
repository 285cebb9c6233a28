//! The HTTP surface: the page and its two assets, the JSON API, and how a request becomes a
//! worker [`Job`]. Every error answers `{"error": "..."}` with a 4xx or 5xx status.

use crate::config::{ServeConfig, Strength, valid_name};
use crate::fetch::Fetcher;
use crate::metrics::{self, Gauges, Metrics};
use crate::models::ModelInfo;
use crate::progress::Registry;
use crate::samples::{self, SampleInfo};
use crate::worker::{Denoised, Job, Outcome, Pool, Rejected, Settings, Task, Worker, WorkerConfig};
use crate::{Result, ServeError};
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{
    DefaultBodyLimit, FromRequest, MatchedPath, Multipart, Path, Query, Request, State,
};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use denoise_models::tile::{ENSEMBLE_SIZES, ensemble_size};
use http_body_util::BodyExt;
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const PAGE: &str = include_str!("../web/index.html");
const SCRIPT: &str = include_str!("../web/app.js");
const STYLE: &str = include_str!("../web/style.css");

/// The page may load only what this server serves: no CDN, no external font, no inline script.
const CSP: &str = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; \
    script-src 'self'; connect-src 'self' blob:; object-src 'none'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// Whole request bodies must arrive within this (a slow client cannot hold a body open).
const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Past the limit, up to this much more is read and dropped, so the client sees the 413 rather
/// than a connection reset while it is still sending.
const DRAIN_BYTES: usize = 64 << 20;
/// Largest JSON request body.
const MAX_JSON_BYTES: usize = 64 << 10;
/// Jobs whose progress is tracked at once.
const MAX_TRACKED_JOBS: usize = 4096;
/// Demo noise when the request names none.
const DEFAULT_NOISE_SIGMA: f32 = 25.0;

struct AppState {
    pool: Pool<Job>,
    registry: Arc<Registry>,
    fetcher: Fetcher,
    models: Vec<ModelInfo>,
    default_model: String,
    samples: Vec<SampleInfo>,
    max_upload: usize,
    max_pixels: u64,
    max_ensemble: usize,
    /// Lower-case host names the `Host` header may carry; empty: any.
    allowed_hosts: Vec<String>,
    header_timeout: Duration,
    /// Requests being handled (headers read, response not yet produced).
    in_flight: Arc<AtomicUsize>,
    /// Open connections that have sent a request: at a stop, each is waited for (it closes
    /// once its response is written) up to the header timeout.
    answered: Arc<AtomicUsize>,
    /// Counters for `/metrics`, shared with the workers; `/readyz` reads their model loads.
    metrics: Arc<Metrics>,
    /// Set once a stop begins: `/readyz` then says so, and a load balancer sends no more work.
    stopping: AtomicBool,
}

/// A ready server: workers started (each with the default model loaded), routes built.
pub struct App {
    state: Arc<AppState>,
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

    /// Serves until `shutdown` resolves, then lets the workers finish their queue.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        use hyper_util::rt::{TokioIo, TokioTimer};
        let router = self.router();
        let header_timeout = self.state.header_timeout;
        // Each connection is watched: at shutdown, idle ones close and requests in flight
        // finish before this returns.
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut connections = tokio::task::JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            while connections.try_join_next().is_some() {}
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    // Out of file descriptors, or a connection reset while queued: keep serving.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => {
                    self.state.stopping.store(true, Ordering::SeqCst);
                    break;
                }
            };
            let _ = stream.set_nodelay(true);
            let inner = hyper_util::service::TowerToHyperService::new(router.clone());
            // Counted in `answered` from its first request to its end.
            let answered = Arc::clone(&self.state.answered);
            let counted = Arc::new(AtomicBool::new(false));
            let mark = Arc::clone(&counted);
            let service = hyper::service::service_fn(move |request| {
                if !mark.swap(true, Ordering::SeqCst) {
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                hyper::service::Service::call(&inner, request)
            });
            let answered = Answered {
                count: Arc::clone(&self.state.answered),
                counted,
            };
            let watcher = graceful.watcher();
            connections.spawn(async move {
                // Counted down when this task ends, however it ends (aborted at a stop too).
                let _answered = answered;
                let mut stream = stream;
                // The first head is checked here so a malformed one gets a JSON error; its
                // timer is the header timeout, as hyper's is for later requests.
                let read = match crate::head::read_first(&mut stream, header_timeout).await {
                    crate::head::Head::Ready(read) => read,
                    crate::head::Head::Refused | crate::head::Head::Gone => return,
                };
                // The header timer starts when a request's head is awaited, bytes or not, so a
                // silent client is dropped as well as a trickling one.
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(
                        TokioIo::new(crate::head::Replay::new(read, stream)),
                        service,
                    );
                // A failed connection (reset, timed out) concerns that client only.
                let _ = watcher.watch(connection).await;
            });
        }
        drop(listener);
        // Requests in flight finish, and so do the responses being written: a connection that
        // has sent a request closes once its response is out (graceful shutdown closes idle
        // keep-alive ones at once), and a client that reads slowly is given up to the header
        // timeout once no request is left in flight. Connections that never sent a whole
        // request head are not waited for once everything else has been quiet for 2 s.
        let (in_flight, answered) = (
            Arc::clone(&self.state.in_flight),
            Arc::clone(&self.state.answered),
        );
        let idle = async move {
            let tick = Duration::from_millis(50);
            let (mut quiet_for, mut writing_for) = (Duration::ZERO, Duration::ZERO);
            while quiet_for < Duration::from_secs(2) && writing_for < header_timeout {
                tokio::time::sleep(tick).await;
                if in_flight.load(Ordering::SeqCst) > 0 {
                    (quiet_for, writing_for) = (Duration::ZERO, Duration::ZERO);
                } else if answered.load(Ordering::SeqCst) > 0 {
                    (quiet_for, writing_for) = (Duration::ZERO, writing_for + tick);
                } else {
                    quiet_for += tick;
                }
            }
        };
        tokio::select! {
            () = graceful.shutdown() => {}
            () = idle => {}
        }
        // Connections still open now (a reader slower than the limit, headers never finished)
        // are closed, so their tasks let go of the state and the workers can be joined.
        connections.abort_all();
        while connections.join_next().await.is_some() {}
        drop(router);
        let mut state = self.state;
        for _ in 0..100 {
            match Arc::try_unwrap(state) {
                Ok(state) => {
                    return tokio::task::spawn_blocking(move || state.pool.shutdown())
                        .await
                        .map_err(|e| ServeError::Internal(e.to_string()));
                }
                Err(shared) => {
                    state = shared;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        Ok(())
    }
}

/// Refuses (403) a request whose `Host` the server does not answer to, or a POST from another
/// site's page (its `Origin` is not this server): browsers send `Origin` on every cross-site
/// POST, so no other page can queue work here or make the server fetch URLs for it.
async fn guard_origin(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: middleware::Next,
) -> Response {
    let refusal = {
        let headers = request.headers();
        let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        origin_refusal(
            text(header::HOST),
            text(header::ORIGIN),
            request.method() == axum::http::Method::POST,
            &state.allowed_hosts,
        )
    };
    match refusal {
        Some(message) => ServeError::Forbidden(message).into_response(),
        None => {
            state.in_flight.fetch_add(1, Ordering::SeqCst);
            // Counted down however the handler ends (a client gone drops its future).
            let _done = InFlight(Arc::clone(&state.in_flight));
            next.run(request).await
        }
    }
}

/// Counts a connection that has sent a request down when its task ends.
struct Answered {
    count: Arc<AtomicUsize>,
    counted: Arc<AtomicBool>,
}

impl Drop for Answered {
    fn drop(&mut self) {
        if self.counted.load(Ordering::SeqCst) {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Counts a request down when dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a request with these `Host` and `Origin` headers is refused, if it is.
fn origin_refusal(
    host: Option<&str>,
    origin: Option<&str>,
    is_post: bool,
    allowed_hosts: &[String],
) -> Option<String> {
    let host = host.map(str::to_ascii_lowercase);
    if !allowed_hosts.is_empty() {
        let name = host.as_deref().map(host_name);
        if !name.is_some_and(|n| allowed_hosts.iter().any(|a| a == n)) {
            return Some(format!(
                "this server answers to {} only, not to Host '{}' (start it with --allowed-host \
                 NAME to add a name)",
                allowed_hosts.join(", "),
                host.as_deref().unwrap_or("")
            ));
        }
    }
    let origin = origin?.to_ascii_lowercase();
    if !is_post {
        return None;
    }
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    if let Some(authority) = authority {
        // The page of this server: the same authority as the request's Host, or (behind a
        // proxy that rewrites Host) a domain name the server was told to answer to. Not by
        // loopback name or IP alone: another port there is another local service's origin.
        let name = host_name(authority);
        let local = name == "localhost"
            || name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok();
        let named = !local && allowed_hosts.iter().any(|a| a == name);
        if Some(authority) == host.as_deref() || named {
            return None;
        }
    }
    Some(format!(
        "cross-site request refused: the page at '{origin}' is not this server"
    ))
}

/// The name part of a `Host` header value: `[::1]:8080` -> `[::1]`, `localhost:8080` ->
/// `localhost`.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// Security headers on every response, one log line per API call (not progress polls), and
/// every answered request counted in the metrics (refusals, errors and `/metrics` itself
/// included) by its route's pattern.
async fn headers_and_log(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: middleware::Next,
) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    // The pattern, never the path: label values stay as few as the routes.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let mut response = next.run(request).await;
    state.metrics.record_request(
        route.as_deref().unwrap_or(metrics::OTHER_ROUTE),
        response.status().as_u16(),
        start.elapsed(),
    );
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // API answers (JSON, errors included) describe one moment: never cache them.
    let probe = matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics");
    if (path.starts_with("/api/") || probe) && !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if path.starts_with("/api/") && !path.starts_with("/api/progress/") {
        eprintln!(
            "{method} {path} {} ({:.0} ms)",
            response.status().as_u16(),
            start.elapsed().as_secs_f64() * 1e3
        );
    }
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

async fn not_found(uri: Uri) -> ServeError {
    ServeError::NotFound(format!("no route for '{}'", uri.path()))
}

async fn method_not_allowed() -> Response {
    let body = Json(serde_json::json!({ "error": "method not allowed on this route" }));
    (StatusCode::METHOD_NOT_ALLOWED, body).into_response()
}

async fn healthz(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "workers": s.pool.workers(),
        "queued": s.pool.queued(),
        "queue_capacity": s.pool.capacity(),
    }))
}

/// What readiness depends on, read at one moment.
struct Readiness<'a> {
    stopping: bool,
    default_model: &'a str,
    /// Workers that have reported the default model loaded.
    loaded: usize,
    workers: usize,
    queued: usize,
    capacity: usize,
}

impl Readiness<'_> {
    /// Why the server should be sent no new work now; `None` when it is ready.
    fn not_ready(&self) -> Option<String> {
        if self.stopping {
            return Some("the server is stopping".into());
        }
        if self.loaded < self.workers {
            return Some(format!(
                "loading the default model '{}' ({} of {} workers ready)",
                self.default_model, self.loaded, self.workers
            ));
        }
        if self.queued >= self.capacity {
            return Some(format!(
                "the queue is full ({} of {} jobs waiting)",
                self.queued, self.capacity
            ));
        }
        None
    }
}

/// `GET /readyz`, the readiness probe: 200 `{"ready": true}` while every worker holds the
/// default model and the queue has room, else 503 `{"ready": false, "reason"}`. (`/healthz` is
/// the liveness probe: it answers whenever the process serves.)
async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    let readiness = Readiness {
        stopping: s.stopping.load(Ordering::SeqCst),
        default_model: &s.default_model,
        loaded: s.metrics.workers_with(&s.default_model),
        workers: s.pool.workers(),
        queued: s.pool.queued(),
        capacity: s.pool.capacity(),
    };
    match readiness.not_ready() {
        None => Json(serde_json::json!({ "ready": true })).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ready": false, "reason": reason })),
        )
            .into_response(),
    }
}

/// `GET /metrics`: the Prometheus text format (see [`crate::metrics`]).
async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    let gauges = Gauges {
        queued: s.pool.queued(),
        capacity: s.pool.capacity(),
        busy: s.pool.busy(),
        workers: s.pool.workers(),
    };
    (
        [
            (header::CONTENT_TYPE, metrics::CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        s.metrics.render(&gauges),
    )
        .into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "default": s.default_model,
        "models": s.models,
        "limits": {
            "max_upload_bytes": s.max_upload,
            "max_pixels": s.max_pixels,
            "max_ensemble": s.max_ensemble,
        },
    }))
}

async fn sample_list(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "samples": s.samples,
        "noise_seed": samples::NOISE_SEED,
    }))
}

/// A path segment that axum cannot give as a `String` (percent-encoded bytes that are not
/// UTF-8, such as `%ff`) answers a JSON error like every other, not axum's plain text.
fn segment(path: std::result::Result<Path<String>, PathRejection>) -> Result<String> {
    path.map(|Path(s)| s)
        .map_err(|e| ServeError::BadRequest(format!("bad path: {}", e.body_text())))
}

async fn progress(
    State(s): State<Arc<AppState>>,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<crate::progress::Snapshot>> {
    let id = segment(id)?;
    s.registry
        .get(&id)
        .map(Json)
        .ok_or_else(|| ServeError::NotFound(format!("no job '{id}' (finished jobs expire)")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoiseParams {
    sigma: Option<f32>,
}

/// `GET /api/samples/{name}?sigma=S`: the clean sample with seeded Gaussian noise, as PNG.
async fn noisy_sample(
    State(s): State<Arc<AppState>>,
    name: std::result::Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Response> {
    let name = segment(name)?;
    let params = Query::<NoiseParams>::try_from_uri(&uri)
        .map_err(|e| ServeError::BadRequest(e.body_text()))?;
    let sigma = params.sigma.unwrap_or(DEFAULT_NOISE_SIGMA);
    if !(0.0..=samples::MAX_NOISE_SIGMA).contains(&sigma) {
        return Err(ServeError::BadRequest(format!(
            "sigma must be in 0-{}, got {sigma}",
            samples::MAX_NOISE_SIGMA
        )));
    }
    if !s.samples.iter().any(|x| x.name == name) {
        return Err(ServeError::NotFound(format!("no sample '{name}'")));
    }
    match s.run(Task::NoisySample { name, sigma }).await? {
        Outcome::Png(png) => Ok((
            [
                (header::CONTENT_TYPE, "image/png".to_owned()),
                (header::CACHE_CONTROL, "no-store".to_owned()),
                (
                    HeaderName::from_static("x-denoise-noise"),
                    format!("gaussian:{sigma}"),
                ),
            ],
            png,
        )
            .into_response()),
        Outcome::Denoised(_) => Err(ServeError::Internal("unexpected outcome".into())),
    }
}

/// The fields of `POST /api/denoise`, from the query string (form fields override them).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    model: Option<String>,
    sigma: Option<String>,
    ensemble: Option<String>,
    reference: Option<String>,
    job: Option<String>,
}

/// `POST /api/denoise`: a multipart form (field `image`, plus any of `model`, `sigma`,
/// `ensemble`, `reference`, `job`) or the raw image as the body (fields in the query string).
async fn denoise(State(s): State<Arc<AppState>>, request: Request) -> Result<Response> {
    let mut params = Query::<Params>::try_from_uri(request.uri())
        .map_err(|e| ServeError::BadRequest(e.body_text()))?
        .0;
    let (parts, body) = request.into_parts();
    let is_form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    // Multipart framing adds a few hundred bytes around the image.
    let limit = if is_form {
        s.max_upload + (64 << 10)
    } else {
        s.max_upload
    };
    let bytes = read_body(&parts.headers, body, (limit, s.max_upload), "upload").await?;
    let (image, name) = if is_form {
        let request = Request::from_parts(parts, Body::from(bytes));
        read_form(request, &mut params, s.max_upload).await?
    } else {
        (bytes, "upload".to_owned())
    };
    if image.is_empty() {
        return Err(ServeError::BadRequest(
            "no image: send it as the request body or in a form field named 'image'".into(),
        ));
    }
    let strength: Strength = params.sigma.as_deref().unwrap_or("").parse()?;
    let fields = s.check_fields(params.model, params.ensemble, params.reference, params.job)?;
    s.denoise(image, name, fields, strength).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UrlRequest {
    url: String,
    model: Option<String>,
    #[serde(default)]
    sigma: Strength,
    /// A number or a string, as `sigma`.
    ensemble: Option<serde_json::Value>,
    reference: Option<String>,
    job: Option<String>,
}

/// `POST /api/denoise-url`: `{"url": ..., "model": ..., "sigma": ..., "ensemble": ...}`.
async fn denoise_url(State(s): State<Arc<AppState>>, request: Request) -> Result<Response> {
    let req: UrlRequest = read_json(request).await?;
    // Every field is checked before the (slow, outbound) fetch.
    let ensemble = req.ensemble.map(|v| match v {
        serde_json::Value::String(text) => text,
        other => other.to_string(),
    });
    let fields = s.check_fields(req.model, ensemble, req.reference, req.job)?;
    let fetched = s.fetcher.fetch(&req.url).await?;
    s.denoise(fetched.bytes, fetched.name, fields, req.sigma)
        .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchRequest {
    url: String,
}

/// `POST /api/fetch-url`: `{"url": ...}`; the image at the URL as PNG (what the page shows as
/// "before"). Re-encoding means only a decoded image ever comes back from our origin.
async fn fetch_url(State(s): State<Arc<AppState>>, request: Request) -> Result<Response> {
    let req: FetchRequest = read_json(request).await?;
    let fetched = s.fetcher.fetch(&req.url).await?;
    let task = Task::Normalise {
        bytes: fetched.bytes,
        name: fetched.name,
    };
    match s.run(task).await? {
        Outcome::Png(png) => Ok((
            [
                (header::CONTENT_TYPE, "image/png"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            png,
        )
            .into_response()),
        Outcome::Denoised(_) => Err(ServeError::Internal("unexpected outcome".into())),
    }
}

/// A denoising request's fields, checked.
struct Fields {
    model: String,
    ensemble: usize,
    reference: Option<String>,
    job: Option<String>,
}

impl AppState {
    /// Checks a request's model, self-ensemble, reference and job fields (empty strings are
    /// absent).
    fn check_fields(
        &self,
        model: Option<String>,
        ensemble: Option<String>,
        reference: Option<String>,
        job: Option<String>,
    ) -> Result<Fields> {
        let model = model
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| self.default_model.clone());
        if !self.models.iter().any(|m| m.name == model) {
            let known: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
            return Err(ServeError::BadRequest(format!(
                "unknown model '{model}' (known: {})",
                known.join(", ")
            )));
        }
        let reference = reference.filter(|r| !r.is_empty());
        if let Some(r) = reference
            .as_ref()
            .filter(|r| !self.samples.iter().any(|x| &x.name == *r))
        {
            return Err(ServeError::BadRequest(format!(
                "unknown reference '{r}': it must name a sample"
            )));
        }
        let job = job.filter(|j| !j.is_empty());
        if job.as_ref().is_some_and(|id| !valid_name(id)) {
            return Err(ServeError::BadRequest(
                "job ids are 1-64 of A-Z a-z 0-9 . _ -".into(),
            ));
        }
        let ensemble = match ensemble.as_deref().map(str::trim).unwrap_or("") {
            "" => 1,
            text => ensemble_size(text).ok_or_else(|| {
                ServeError::BadRequest(format!(
                    "ensemble must be one of {ENSEMBLE_SIZES:?}, got '{text}'"
                ))
            })?,
        };
        if ensemble > self.max_ensemble {
            return Err(ServeError::BadRequest(format!(
                "ensemble {ensemble} is over this server's limit of {} passes",
                self.max_ensemble
            )));
        }
        Ok(Fields {
            model,
            ensemble,
            reference,
            job,
        })
    }

    /// Queues the job and answers with the PNG and its headers.
    async fn denoise(
        &self,
        bytes: Vec<u8>,
        name: String,
        fields: Fields,
        strength: Strength,
    ) -> Result<Response> {
        let Fields {
            model,
            ensemble,
            reference,
            job,
        } = fields;
        let progress = job.and_then(|id| self.registry.register(&id));
        let task = Task::Denoise {
            bytes,
            name,
            settings: Settings {
                model,
                strength,
                ensemble,
            },
            reference,
            progress,
        };
        match self.run(task).await? {
            Outcome::Denoised(d) => Ok(denoised_response(d)),
            Outcome::Png(_) => Err(ServeError::Internal("unexpected outcome".into())),
        }
    }

    /// Queues `task` (or answers 503 when the queue is full) and waits for its outcome.
    async fn run(&self, task: Task) -> Result<Outcome> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            task,
            reply,
            queued_at: Instant::now(),
        };
        match self.pool.try_submit(job) {
            Ok(()) => {}
            Err(Rejected::Full(job)) => {
                if let Task::Denoise {
                    progress: Some(p), ..
                } = &job.task
                {
                    p.finish(false);
                }
                let queued = self.pool.queued();
                let retry_after_s = (1 + queued / self.pool.workers()).min(30) as u64;
                return Err(ServeError::Busy {
                    queued,
                    retry_after_s,
                });
            }
            Err(Rejected::Closed(_)) => {
                return Err(ServeError::Internal("the server is shutting down".into()));
            }
        }
        answer
            .await
            .map_err(|_| ServeError::Internal("the worker stopped before answering".into()))?
    }
}

fn denoised_response(d: Denoised) -> Response {
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    };
    set("content-type", "image/png".into());
    set("cache-control", "no-store".into());
    set(
        "content-disposition",
        "inline; filename=\"denoised.png\"".into(),
    );
    set("x-denoise-ms", format!("{:.0}", d.compute_ms));
    set("x-denoise-queue-ms", format!("{:.0}", d.queue_ms));
    set("x-denoise-model", d.model);
    set("x-denoise-size", format!("{}x{}", d.width, d.height));
    set("x-denoise-ensemble", d.ensemble.to_string());
    if let Some(used) = d.sigma {
        set("x-denoise-sigma", format!("{:.1}", used.sigma));
        // An estimate that follows brightness: its least and greatest level.
        if let Some((lo, hi)) = used.range {
            set("x-denoise-sigma-range", format!("{lo:.1}-{hi:.1}"));
        }
    }
    if let Some((input, output)) = d.psnr {
        set("x-denoise-psnr-input", format!("{input:.2}"));
        set("x-denoise-psnr", format!("{output:.2}"));
    }
    (headers, d.png).into_response()
}

/// Reads a whole body of at most `limit` bytes within [`BODY_TIMEOUT`]. Over the limit, the
/// rest is drained (up to [`DRAIN_BYTES`]) before answering 413.
/// `(limit, shown)`: the limit enforced, and the one named in the error (a form's limit allows
/// for its framing, but the user chose the image's).
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    (limit, shown): (usize, usize),
    what: &str,
) -> Result<Vec<u8>> {
    let too_large = || {
        ServeError::TooLarge(format!(
            "the {what} is larger than the limit of {}",
            human_bytes(shown)
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit.saturating_add(DRAIN_BYTES)) {
        return Err(too_large());
    }
    let read = async move {
        let mut body = body;
        let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(limit));
        let mut over = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ServeError::BadRequest(format!("failed to read the request body: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if over > 0 || buf.len() + data.len() > limit {
                buf = Vec::new();
                over += data.len();
                if over > DRAIN_BYTES {
                    break;
                }
                continue;
            }
            buf.extend_from_slice(&data);
        }
        if over > 0 { Err(too_large()) } else { Ok(buf) }
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .map_err(|_| ServeError::Timeout("the request body took too long to arrive".into()))?
}

/// Parses a JSON body of at most [`MAX_JSON_BYTES`].
async fn read_json<T: serde::de::DeserializeOwned>(request: Request) -> Result<T> {
    let (parts, body) = request.into_parts();
    let bytes = read_body(
        &parts.headers,
        body,
        (MAX_JSON_BYTES, MAX_JSON_BYTES),
        "JSON body",
    )
    .await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ServeError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Reads the multipart form of `request`: the image (field `image`, or `file`) and its file
/// name, and the other fields into `params` (they win over the query string).
async fn read_form(
    request: Request,
    params: &mut Params,
    max_upload: usize,
) -> Result<(Vec<u8>, String)> {
    let bad = |e: axum::extract::multipart::MultipartError| {
        ServeError::BadRequest(format!("invalid multipart form: {}", e.body_text()))
    };
    let mut form = Multipart::from_request(request, &())
        .await
        .map_err(|e| ServeError::BadRequest(e.body_text()))?;
    let mut image: Option<(Vec<u8>, String)> = None;
    while let Some(field) = form.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            "image" | "file" => {
                if image.is_some() {
                    return Err(ServeError::BadRequest("send one image per request".into()));
                }
                // Only the extension matters (it picks the format when the content does not).
                let file_name = field
                    .file_name()
                    .and_then(|n| n.rsplit(['/', '\\']).next())
                    .filter(|n| !n.is_empty())
                    .unwrap_or("upload")
                    .chars()
                    .take(100)
                    .collect();
                let data = field.bytes().await.map_err(bad)?;
                if data.len() > max_upload {
                    return Err(ServeError::TooLarge(format!(
                        "the upload is larger than the limit of {}",
                        human_bytes(max_upload)
                    )));
                }
                image = Some((data.to_vec(), file_name));
            }
            "model" | "sigma" | "ensemble" | "reference" | "job" => {
                let value = field.text().await.map_err(bad)?;
                let slot = match name.as_str() {
                    "model" => &mut params.model,
                    "sigma" => &mut params.sigma,
                    "ensemble" => &mut params.ensemble,
                    "reference" => &mut params.reference,
                    _ => &mut params.job,
                };
                *slot = Some(value);
            }
            other => {
                return Err(ServeError::BadRequest(format!(
                    "unknown form field '{other}' (expected image, model, sigma, ensemble, reference, job)"
                )));
            }
        }
    }
    image.ok_or_else(|| {
        ServeError::BadRequest("no image in the form: send it in a field named 'image'".into())
    })
}

/// `20 MB` for whole mebibytes, else bytes.
fn human_bytes(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_references_nothing_outside_this_server() {
        for (name, text) in [
            ("index.html", PAGE),
            ("app.js", SCRIPT),
            ("style.css", STYLE),
        ] {
            for needle in ["http://", "https://", "//cdn", "@import", "fonts.g"] {
                assert!(!text.contains(needle), "{name} contains '{needle}'");
            }
        }
        assert!(PAGE.contains("src=\"/app.js\"") && PAGE.contains("href=\"/style.css\""));
        assert!(
            !PAGE.contains("<script>"),
            "inline scripts would break the CSP"
        );
    }

    #[test]
    fn requests_from_other_sites_and_other_host_names_are_refused() {
        let local: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .map(String::from)
            .to_vec();
        let refused = |host, origin, post, allowed: &[String]| {
            origin_refusal(host, origin, post, allowed).is_some()
        };
        // The page's own requests, and tools that send no Origin (curl, scripts).
        assert!(!refused(
            Some("localhost:8080"),
            Some("http://localhost:8080"),
            true,
            &local
        ));
        assert!(!refused(
            Some("[::1]:8080"),
            Some("http://[::1]:8080"),
            true,
            &local
        ));
        assert!(!refused(Some("127.0.0.1:8080"), None, true, &local));
        assert!(!refused(Some("LOCALHOST:8080"), None, false, &local));
        // DNS rebinding: a name of the attacker's that resolves to 127.0.0.1.
        assert!(refused(Some("evil.example:8080"), None, false, &local));
        assert!(refused(None, None, false, &local));
        // Another site's page posting here (a simple request needs no preflight).
        assert!(refused(
            Some("localhost:8080"),
            Some("https://evil.example"),
            true,
            &local
        ));
        assert!(refused(
            Some("localhost:8080"),
            Some("http://localhost:9999"),
            true,
            &local
        ));
        assert!(refused(Some("localhost:8080"), Some("null"), true, &local));
        // A GET from another origin only reads public, same-origin-protected answers.
        assert!(!refused(
            Some("localhost:8080"),
            Some("https://evil.example"),
            false,
            &local
        ));
        // Behind a proxy that rewrites Host, a page at an allowed name may still post.
        let proxied: Vec<String> = vec!["denoise.example.org".into(), "127.0.0.1".into()];
        assert!(!refused(
            Some("127.0.0.1:8080"),
            Some("https://denoise.example.org"),
            true,
            &proxied
        ));
        // No host list (a server on a LAN address): any Host, same Origin rule.
        assert!(!refused(
            Some("box.lan:8080"),
            Some("http://box.lan:8080"),
            true,
            &[]
        ));
        assert!(refused(
            Some("box.lan:8080"),
            Some("http://evil.example"),
            true,
            &[]
        ));
        assert_eq!(host_name("[::1]:80"), "[::1]");
        assert_eq!(host_name("example.org"), "example.org");
    }

    #[test]
    fn limits_read_as_people_write_them() {
        assert_eq!(human_bytes(20 << 20), "20 MB");
        assert_eq!(human_bytes(1000), "1000 bytes");
    }

    #[test]
    fn ready_only_with_the_default_model_in_every_worker_and_room_in_the_queue() {
        let ready = Readiness {
            stopping: false,
            default_model: "default",
            loaded: 2,
            workers: 2,
            queued: 15,
            capacity: 16,
        };
        assert_eq!(ready.not_ready(), None);
        let loading = Readiness { loaded: 1, ..ready };
        assert_eq!(
            loading.not_ready().unwrap(),
            "loading the default model 'default' (1 of 2 workers ready)"
        );
        let full = Readiness {
            queued: 16,
            ..ready
        };
        assert_eq!(
            full.not_ready().unwrap(),
            "the queue is full (16 of 16 jobs waiting)"
        );
        let stopping = Readiness {
            stopping: true,
            ..ready
        };
        assert_eq!(stopping.not_ready().unwrap(), "the server is stopping");
    }
}
