//! The error type of `denoise-data`.

use std::path::PathBuf;

/// Everything that can go wrong in this crate. Messages are lower-case and name the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    #[error("failed to read '{path}': {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to decode '{path}': {message}")]
    Decode { path: PathBuf, message: String },
    #[error("failed to encode '{path}': {message}")]
    Encode { path: PathBuf, message: String },
    #[error("'{path}' is empty (0 bytes)")]
    EmptyFile { path: PathBuf },
    #[error("'{path}' is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels")]
    TooLarge {
        path: PathBuf,
        width: u64,
        height: u64,
        pixels: u64,
        limit: u64,
    },
    #[error("unsupported image format for '{path}': {message}")]
    Unsupported { path: PathBuf, message: String },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("channel mismatch: expected {expected} channel(s), got {got}")]
    Channels { expected: usize, got: usize },
    #[error(
        "'{path}' has {got} channel(s) but {expected} are wanted: use a set that is all colour \
         or all gray (a mixed set is refused rather than converted silently)"
    )]
    FileChannels {
        path: PathBuf,
        expected: usize,
        got: usize,
    },
    #[error("invalid noise spec '{spec}': {message}")]
    NoiseSpec { spec: String, message: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("no usable images in '{path}'")]
    EmptyDataset { path: PathBuf },
    #[error("invalid manifest '{path}': {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("failed to write '{path}': {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("'{path}' is {width}x{height}, smaller than the {patch}x{patch} patch")]
    TooSmall {
        path: PathBuf,
        width: u64,
        height: u64,
        patch: u64,
    },
    #[error("loader worker failed: {0}")]
    Worker(String),
}
