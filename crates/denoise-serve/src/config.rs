//! [`ServeConfig`]: everything the server needs, checked once by [`ServeConfig::validate`]; and
//! [`Strength`], the `sigma` field of a request.

use crate::fetch::FetchConfig;
use crate::{Result, ServeError};
use denoise_models::tile::ENSEMBLE_SIZES;
use serde::Deserialize;
use std::path::PathBuf;

/// A model the page and the API offer, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelEntry {
    /// What requests name it by (`[A-Za-z0-9._-]+`).
    pub name: String,
    /// The artefact file (or training run directory).
    pub path: PathBuf,
    /// A model that, blind, denoises the pictures whose noise is white in its place
    /// (`denoise_models::Denoiser::with_white_noise_model`): the shipped default has one.
    pub white: Option<PathBuf>,
}

/// The server's configuration, built by `denoise-cli serve` from its flags.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Models offered; requests name one of these.
    pub models: Vec<ModelEntry>,
    /// The model used when a request names none; one of `models`.
    pub default_model: String,
    /// Clean demo images (`NAME.png`), offered with noise added so their PSNR can be shown.
    pub samples_dir: Option<PathBuf>,
    /// Largest upload (request body) in bytes.
    pub max_upload_bytes: usize,
    /// Largest image in pixels, checked from the header before decoding.
    pub max_pixels: u64,
    /// Most self-ensemble passes a request may ask for (1, 2, 4 or 8): each pass holds the
    /// worker as long as a plain request.
    pub max_ensemble: usize,
    /// Inference worker threads, each with its own copy of the models it uses.
    pub workers: usize,
    /// Jobs that may wait for a worker; beyond that requests get 503.
    pub queue: usize,
    /// Where the models run.
    pub device: tch::Device,
    /// Tile side for inference (0: whole images). Bounds memory, and gives the page progress.
    pub tile: usize,
    /// How image URLs are fetched.
    pub fetch: FetchConfig,
    /// Host names (without port) requests may address in their `Host` header; empty: any.
    /// `denoise-cli serve` on a loopback address allows only the loopback names, so a web page
    /// cannot reach the server through a name of its own that resolves to 127.0.0.1 (DNS
    /// rebinding).
    pub allowed_hosts: Vec<String>,
    /// A connection must send its request headers within this, or it is closed (a client that
    /// trickles them cannot hold connections open). At a stop, a response still being written
    /// is waited for this long once no request is in flight.
    pub header_timeout: std::time::Duration,
}

impl ServeConfig {
    /// A configuration for `models` (the first is the default) with the defaults of
    /// `denoise-cli serve`.
    pub fn new(models: Vec<ModelEntry>) -> Self {
        let default_model = models.first().map(|m| m.name.clone()).unwrap_or_default();
        Self {
            models,
            default_model,
            samples_dir: None,
            max_upload_bytes: 20 << 20,
            max_pixels: 40_000_000,
            max_ensemble: 8,
            workers: 1,
            queue: 16,
            device: tch::Device::Cpu,
            tile: 512,
            fetch: FetchConfig::default(),
            allowed_hosts: Vec::new(),
            header_timeout: std::time::Duration::from_secs(30),
        }
    }

    /// Checks the values; code past this point relies on them.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ServeError::Config(m));
        if self.models.is_empty() {
            return bad("no models to serve".into());
        }
        for (i, m) in self.models.iter().enumerate() {
            if !valid_name(&m.name) {
                return bad(format!(
                    "model name '{}' must be 1-64 of A-Z a-z 0-9 . _ -",
                    m.name
                ));
            }
            if self.models[..i].iter().any(|o| o.name == m.name) {
                return bad(format!("model name '{}' appears twice", m.name));
            }
        }
        if !self.models.iter().any(|m| m.name == self.default_model) {
            return bad(format!(
                "the default model '{}' is not among the models",
                self.default_model
            ));
        }
        if self.workers == 0 || self.workers > 64 {
            return bad(format!("workers must be 1-64, got {}", self.workers));
        }
        if self.queue == 0 {
            return bad("the queue must hold at least 1 job".into());
        }
        if self.max_upload_bytes == 0 {
            return bad("the upload limit must be at least 1 byte".into());
        }
        if self.header_timeout.is_zero() {
            return bad("the header timeout must be positive".into());
        }
        if self.max_pixels == 0 {
            return bad("the pixel limit must be at least 1".into());
        }
        if !ENSEMBLE_SIZES.contains(&self.max_ensemble) {
            return bad(format!(
                "the self-ensemble limit must be one of {ENSEMBLE_SIZES:?}, got {}",
                self.max_ensemble
            ));
        }
        if self.tile != 0 && self.tile < 64 {
            return bad(format!(
                "tile must be 0 (whole image) or at least 64, got {}",
                self.tile
            ));
        }
        self.fetch.validate()
    }
}

/// Names of models, samples and jobs: short and URL-safe.
pub(crate) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The denoising strength a request asks for (`sigma`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Strength {
    /// Estimate the noise level (`denoise_data::estimate::estimate_noise`: a map that follows
    /// brightness for colour, one level otherwise) for models that take one: `blind`, `auto`
    /// or absent.
    #[default]
    Blind,
    /// A fixed noise level on the 0-255 scale.
    Fixed(f32),
}

impl std::str::FromStr for Strength {
    type Err = ServeError;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("blind") || s.eq_ignore_ascii_case("auto") {
            return Ok(Strength::Blind);
        }
        let v: f32 = s.parse().map_err(|_| {
            ServeError::BadRequest(format!("sigma '{s}' is not a number (0-255) or 'blind'"))
        })?;
        Strength::fixed(v)
    }
}

impl Strength {
    /// A fixed level, checked to be in 0-255.
    pub fn fixed(v: f32) -> Result<Self> {
        if !(0.0..=255.0).contains(&v) {
            return Err(ServeError::BadRequest(format!(
                "sigma must be in 0-255, got {v}"
            )));
        }
        Ok(Strength::Fixed(v))
    }
}

/// JSON accepts `25`, `"25"`, `"blind"` or `null`.
impl<'de> Deserialize<'de> for Strength {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f32),
            Text(String),
        }
        match Option::<Raw>::deserialize(d)? {
            None => Ok(Strength::Blind),
            Some(Raw::Number(v)) => Strength::fixed(v).map_err(serde::de::Error::custom),
            Some(Raw::Text(s)) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> ModelEntry {
        ModelEntry {
            name: name.into(),
            path: "m.safetensors".into(),
            white: None,
        }
    }

    #[test]
    fn strength_parses_text_and_json() {
        assert_eq!("blind".parse::<Strength>().unwrap(), Strength::Blind);
        assert_eq!("".parse::<Strength>().unwrap(), Strength::Blind);
        assert_eq!("AUTO".parse::<Strength>().unwrap(), Strength::Blind);
        assert_eq!("25".parse::<Strength>().unwrap(), Strength::Fixed(25.0));
        assert!("300".parse::<Strength>().is_err());
        assert!("-1".parse::<Strength>().is_err());
        assert!("NaN".parse::<Strength>().is_err());
        assert!("loud".parse::<Strength>().is_err());
        let parse = |j: &str| serde_json::from_str::<Strength>(j);
        assert_eq!(parse("15").unwrap(), Strength::Fixed(15.0));
        assert_eq!(parse("\"15\"").unwrap(), Strength::Fixed(15.0));
        assert_eq!(parse("\"blind\"").unwrap(), Strength::Blind);
        assert_eq!(parse("null").unwrap(), Strength::Blind);
        assert!(parse("999").is_err());
        assert!(parse("[1]").is_err());
    }

    #[test]
    fn validate_rejects_what_would_break_later() {
        let ok = ServeConfig::new(vec![entry("default"), entry("dncnn-25")]);
        ok.validate().unwrap();
        let mut c = ok.clone();
        c.default_model = "nope".into();
        assert!(c.validate().is_err());
        let c = ServeConfig::new(vec![entry("a b")]);
        assert!(c.validate().is_err());
        let c = ServeConfig::new(vec![entry("a"), entry("a")]);
        assert!(c.validate().is_err());
        for f in [
            |c: &mut ServeConfig| c.workers = 0,
            |c: &mut ServeConfig| c.queue = 0,
            |c: &mut ServeConfig| c.tile = 16,
            |c: &mut ServeConfig| c.max_upload_bytes = 0,
            |c: &mut ServeConfig| c.models.clear(),
        ] {
            let mut c = ok.clone();
            f(&mut c);
            assert!(c.validate().is_err(), "{c:?}");
        }
    }

    #[test]
    fn names_are_url_safe() {
        assert!(valid_name("default"));
        assert!(valid_name("ffdnet-blind_v1.2"));
        assert!(!valid_name(""));
        assert!(!valid_name("../etc"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"x".repeat(65)));
    }
}
