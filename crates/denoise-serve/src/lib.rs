//! The denoise web app: one page (upload, URL or demo sample; model and strength; a before/after
//! slider with zoom, timings, PSNR where the clean image is known; PNG download) and the HTTP API
//! behind it (`POST /api/denoise`, `POST /api/denoise-url`, `GET /api/models`, `GET /healthz`, ...),
//! with `GET /readyz` and Prometheus `GET /metrics` ([`metrics`]) for running it as replicas.
//!
//! Built on [axum](https://docs.rs/axum) over tokio: it is maintained by the tokio team, the
//! common choice for Rust web services, and its extractors give typed rejections we can turn into
//! JSON errors. URLs are fetched with reqwest through a DNS resolver that filters addresses
//! ([`fetch`]).
//!
//! **Invariant:** inference never runs on the async runtime. Decoding, noise, denoising and
//! encoding run on a fixed set of worker threads ([`worker`]), each owning its models (a tch
//! `Tensor` is `Send` but not `Sync`), fed by one bounded channel; a full queue answers 503 with
//! `Retry-After` instead of buffering more work. A failure in a job (libtorch error, even a
//! panic) becomes that request's error; the worker and the server keep going.
//!
//! Start it with [`App::new`] (validates the config and loads the default model in every worker)
//! and [`serve`].

mod body;
pub mod config;
pub mod error;
pub mod fetch;
mod handlers;
mod head;
pub mod metrics;
mod middleware;
pub mod models;
pub mod progress;
mod routes;
pub mod samples;
mod server;
pub mod worker;

pub use crate::config::{ModelEntry, ServeConfig, Strength};
pub use crate::error::ServeError;
pub use crate::routes::App;

/// Result alias for this crate.
pub type Result<T, E = ServeError> = std::result::Result<T, E>;

/// Serves `app` on `listener` until `shutdown` resolves, then lets the workers finish their
/// queue (see [`App::serve`]).
pub async fn serve(
    app: App,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    app.serve(listener, shutdown).await
}
