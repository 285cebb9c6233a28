//! The error type of `denoise-serve`, and the HTTP status each error answers with.

use crate::fetch::FetchError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use denoise_data::DataError;
use denoise_models::ModelError;
use std::path::PathBuf;

/// Everything that can go wrong serving. Messages are lower-case and say what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A configuration the server refuses to start with.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// A model that cannot be loaded (at start-up, or later on first use). The cause is in the
    /// message (API answers show only the message), so it is not also a `source`.
    #[error("cannot load model '{name}' from '{path}': {cause}")]
    LoadModel {
        name: String,
        path: PathBuf,
        cause: ModelError,
    },
    /// A malformed request: missing image, bad field, unknown model or sample.
    #[error("{0}")]
    BadRequest(String),
    /// A route or resource (job id, sample) that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An upload over the byte limit or an image over the pixel limit.
    #[error("{0}")]
    TooLarge(String),
    /// Not an image, or a format this build cannot read.
    #[error("{0}")]
    Unsupported(String),
    /// An image that does not decode: truncated or corrupt.
    #[error("{0}")]
    Undecodable(String),
    /// The job queue is full.
    #[error("the server is busy ({queued} job(s) waiting); retry in {retry_after_s} s")]
    Busy { queued: usize, retry_after_s: u64 },
    /// A request refused for where it comes from: a cross-site `Origin`, or a `Host` the server
    /// does not answer to (DNS rebinding).
    #[error("{0}")]
    Forbidden(String),
    /// Reading the request took too long.
    #[error("{0}")]
    Timeout(String),
    /// Fetching an image URL failed or was refused.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The model failed on this image.
    #[error("denoising failed: {0}")]
    Model(ModelError),
    /// The client went away while its job waited or ran, and the job was dropped. Nobody reads
    /// this answer: it tells the job's progress and the metrics what became of it.
    #[error("the client went away before its image was denoised")]
    Cancelled,
    /// A bug or a dead worker; the server keeps serving.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<DataError> for ServeError {
    fn from(err: DataError) -> Self {
        let message = err.to_string();
        match err {
            DataError::TooLarge { .. } => ServeError::TooLarge(message),
            DataError::Unsupported { .. } => ServeError::Unsupported(message),
            DataError::Decode { .. } => ServeError::Undecodable(message),
            DataError::EmptyFile { .. }
            | DataError::Channels { .. }
            | DataError::FileChannels { .. }
            | DataError::Shape(_) => ServeError::BadRequest(message),
            // An in-memory decode fails with `Io` only when the bytes end early.
            DataError::Io { .. } => ServeError::Undecodable(message),
            _ => ServeError::Internal(message),
        }
    }
}

impl From<ModelError> for ServeError {
    fn from(err: ModelError) -> Self {
        match err {
            ModelError::Cancelled => ServeError::Cancelled,
            err => ServeError::Model(err),
        }
    }
}

impl From<std::io::Error> for ServeError {
    fn from(err: std::io::Error) -> Self {
        ServeError::Internal(err.to_string())
    }
}

impl ServeError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServeError::NotFound(_) => StatusCode::NOT_FOUND,
            ServeError::Forbidden(_) => StatusCode::FORBIDDEN,
            ServeError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServeError::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ServeError::Undecodable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ServeError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ServeError::Fetch(e) => e.status(),
            // What proxies log for a client that closed its request (nginx's convention).
            ServeError::Cancelled => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
            ServeError::Config(_)
            | ServeError::LoadModel { .. }
            | ServeError::Model(_)
            | ServeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Every error answers `{"error": "..."}` with its status (and `Retry-After` when busy).
impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = axum::Json(serde_json::json!({ "error": self.to_string() }));
        let mut response = (status, body).into_response();
        if let ServeError::Busy { retry_after_s, .. } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
        }
        response
    }
}
