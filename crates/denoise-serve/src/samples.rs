//! Demo images: clean PNGs from a directory, handed out with seeded Gaussian noise added so the
//! page can show the PSNR of the result against the clean original.

use crate::config::valid_name;
use crate::{Result, ServeError};
use denoise_data::noise::NoiseSpec;
use denoise_data::{Image, io};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The seed of the demo noise: the same sample and sigma always give the same bytes.
pub const NOISE_SEED: u64 = 2024;
/// The largest demo noise level (0-255 scale).
pub const MAX_NOISE_SIGMA: f32 = 100.0;

/// What `GET /api/samples` says about one sample.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SampleInfo {
    pub name: String,
    pub width: u32,
    pub height: u32,
    #[serde(skip)]
    pub path: PathBuf,
}

/// Lists the `*.png` files of `dir` whose names are valid sample names, sorted by name.
/// A missing directory gives no samples.
pub fn scan(dir: &Path) -> Result<Vec<SampleInfo>> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut samples = Vec::new();
    for entry in read.filter_map(|e| e.ok()) {
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".png"))
        else {
            continue;
        };
        if !valid_name(name) {
            continue;
        }
        let info =
            io::probe(&path).map_err(|e| ServeError::Config(format!("bad sample image: {e}")))?;
        samples.push(SampleInfo {
            name: name.to_owned(),
            width: info.width,
            height: info.height,
            path,
        });
    }
    samples.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(samples)
}

/// The clean sample as an 8-bit-exact image in [0, 1].
pub fn load_clean(sample: &SampleInfo) -> Result<Image> {
    Ok(io::load(&sample.path)
        .map_err(|e| ServeError::Internal(format!("sample '{}': {e}", sample.name)))?
        .image)
}

/// `clean` with Gaussian noise of `sigma` (0-255 scale), clipped and quantised to 8 bits as a
/// PNG stores it.
///
/// # Shapes
/// C x H x W in and out.
pub fn add_noise(clean: &Image, sigma: f32) -> Result<Image> {
    if !(0.0..=MAX_NOISE_SIGMA).contains(&sigma) {
        return Err(ServeError::BadRequest(format!(
            "noise sigma must be in 0-{MAX_NOISE_SIGMA}, got {sigma}"
        )));
    }
    let spec: NoiseSpec = format!("gaussian:{sigma}+clip")
        .parse()
        .map_err(|e| ServeError::Internal(format!("noise spec: {e}")))?;
    Ok(io::quantize_8bit(&spec.apply(clean, NOISE_SEED).image))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_seeded_clipped_and_at_the_asked_level() {
        let clean = Image::from_fn(3, 64, 64, |c, y, x| 0.2 + 0.002 * (c + y + x) as f32);
        let a = add_noise(&clean, 25.0).unwrap();
        assert_eq!(a, add_noise(&clean, 25.0).unwrap());
        assert!(a.data().iter().all(|v| (0.0..=1.0).contains(v)));
        let psnr = denoise_metrics::psnr(clean.data(), a.data(), 1.0).unwrap();
        // sigma 25 on the 0-255 scale: 20 * log10(255 / 25) = 20.2 dB.
        assert!((psnr - 20.2).abs() < 0.5, "{psnr}");
        assert!(add_noise(&clean, 101.0).is_err());
        assert_eq!(add_noise(&clean, 0.0).unwrap(), io::quantize_8bit(&clean));
    }

    #[test]
    fn scan_lists_pngs_with_valid_names() {
        let dir = tempfile::tempdir().unwrap();
        let img = Image::zeros(3, 8, 12);
        io::save(dir.path().join("b.png"), &img, None, io::BitDepth::Eight).unwrap();
        io::save(dir.path().join("a.png"), &img, None, io::BitDepth::Eight).unwrap();
        io::save(
            dir.path().join("bad name.png"),
            &img,
            None,
            io::BitDepth::Eight,
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let names: Vec<_> = scan(dir.path())
            .unwrap()
            .into_iter()
            .map(|s| (s.name, s.width, s.height))
            .collect();
        assert_eq!(names, [("a".into(), 12, 8), ("b".into(), 12, 8)]);
        assert!(scan(&dir.path().join("missing")).unwrap().is_empty());
    }
}
