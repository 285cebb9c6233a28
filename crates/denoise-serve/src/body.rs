//! Request bodies: read whole with a byte limit, a drain past it and a deadline; JSON bodies;
//! and the multipart form of `POST /api/denoise`.

use crate::{Result, ServeError};
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{HeaderMap, header};
use http_body_util::BodyExt;
use serde::Deserialize;
use std::time::Duration;

/// Whole request bodies must arrive within this (a slow client cannot hold a body open).
const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Past the limit, up to this much more is read and dropped, so the client sees the 413 rather
/// than a connection reset while it is still sending.
const DRAIN_BYTES: usize = 64 << 20;
/// Largest JSON request body.
const MAX_JSON_BYTES: usize = 64 << 10;

/// The fields of `POST /api/denoise`, from the query string (form fields override them).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Params {
    pub(crate) model: Option<String>,
    pub(crate) sigma: Option<String>,
    pub(crate) ensemble: Option<String>,
    pub(crate) reference: Option<String>,
    pub(crate) job: Option<String>,
}

/// Reads a whole body of at most `limit` bytes within [`BODY_TIMEOUT`]. Over the limit, the
/// rest is drained (up to [`DRAIN_BYTES`]) before answering 413.
/// `(limit, shown)`: the limit enforced, and the one named in the error (a form's limit allows
/// for its framing, but the user chose the image's).
pub(crate) async fn read_body(
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
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(request: Request) -> Result<T> {
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
pub(crate) async fn read_form(
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
                // Bytes, not `text()`: that decodes lossily, and a mangled value could read as
                // a valid one.
                let bytes = field.bytes().await.map_err(bad)?;
                let value = String::from_utf8(bytes.to_vec()).map_err(|_| {
                    ServeError::BadRequest(format!(
                        "invalid multipart form: the field '{name}' is not UTF-8 text"
                    ))
                })?;
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
    fn limits_read_as_people_write_them() {
        assert_eq!(human_bytes(20 << 20), "20 MB");
        assert_eq!(human_bytes(1000), "1000 bytes");
    }
}
