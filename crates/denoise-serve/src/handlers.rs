//! The handlers: the page and its two assets, the probes and `/metrics`, the JSON API, and how
//! a request becomes a worker [`Job`]. Every error answers `{"error": "..."}` with a 4xx or 5xx
//! status.

use crate::body::{Params, read_body, read_form, read_json};
use crate::config::{Strength, valid_name};
use crate::metrics::{self, Gauges};
use crate::routes::AppState;
use crate::samples;
use crate::worker::{Denoised, Job, Outcome, Rejected, Settings, Task};
use crate::{Result, ServeError};
use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use denoise_models::tile::{ENSEMBLE_SIZES, ensemble_size};
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

const PAGE: &str = include_str!("../web/index.html");
const SCRIPT: &str = include_str!("../web/app.js");
const STYLE: &str = include_str!("../web/style.css");

/// Demo noise when the request names none.
const DEFAULT_NOISE_SIGMA: f32 = 25.0;

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

pub(crate) async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

pub(crate) async fn not_found(uri: Uri) -> ServeError {
    ServeError::NotFound(format!("no route for '{}'", uri.path()))
}

pub(crate) async fn method_not_allowed() -> Response {
    let body = Json(serde_json::json!({ "error": "method not allowed on this route" }));
    (StatusCode::METHOD_NOT_ALLOWED, body).into_response()
}

pub(crate) async fn healthz(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
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
pub(crate) async fn readyz(State(s): State<Arc<AppState>>) -> Response {
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
pub(crate) async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
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

pub(crate) async fn models(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
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

pub(crate) async fn sample_list(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
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

pub(crate) async fn progress(
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
pub(crate) async fn noisy_sample(
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

/// `POST /api/denoise`: a multipart form (field `image`, plus any of `model`, `sigma`,
/// `ensemble`, `reference`, `job`) or the raw image as the body (fields in the query string).
pub(crate) async fn denoise(State(s): State<Arc<AppState>>, request: Request) -> Result<Response> {
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
pub(crate) async fn denoise_url(
    State(s): State<Arc<AppState>>,
    request: Request,
) -> Result<Response> {
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
pub(crate) async fn fetch_url(
    State(s): State<Arc<AppState>>,
    request: Request,
) -> Result<Response> {
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
        // A map (following brightness, or read by the model): its least and greatest level.
        if let Some((lo, hi)) = used.range {
            set("x-denoise-sigma-range", format!("{lo:.1}-{hi:.1}"));
        }
        if used.by_model {
            set("x-denoise-sigma-source", "model".into());
        }
        // Blind white noise that the model's white-noise network denoised.
        if used.by_white_model {
            set("x-denoise-network", "white-noise".into());
        }
    }
    if let Some((input, output)) = d.psnr {
        set("x-denoise-psnr-input", format!("{input:.2}"));
        set("x-denoise-psnr", format!("{output:.2}"));
    }
    (headers, d.png).into_response()
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
