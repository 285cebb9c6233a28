//! Fixed validation: centre crops of the manifest's validation images with seeded noise, scored
//! by PSNR and SSIM beside the noisy input's PSNR.

use crate::Result;
use denoise_data::Image;
use denoise_data::noise::NoiseSpec;
use denoise_metrics::Shape;
use denoise_models::Model;
use serde::Serialize;
use std::path::PathBuf;
use tch::Tensor;

/// Clean and noisy validation images, made once so every validation sees the same input.
#[derive(Debug)]
pub struct ValidationSet {
    items: Vec<(Image, Image, Option<Image>)>,
}

/// Mean scores over the validation set.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ValScores {
    pub psnr: f64,
    pub ssim: f64,
    pub noisy_psnr: f64,
}

impl ValidationSet {
    /// Loads up to `count` images, centre-crops them to at most `crop` x `crop` (made a multiple
    /// of `multiple`), converts them to `channels` explicitly, and adds `noise` seeded by
    /// `seed + index`.
    pub fn new(
        files: &[PathBuf],
        count: usize,
        crop: usize,
        multiple: usize,
        channels: usize,
        noise: &NoiseSpec,
        seed: u64,
    ) -> Result<Self> {
        let mut items = Vec::new();
        for (i, path) in files.iter().take(count).enumerate() {
            let loaded = denoise_data::io::load(path)?;
            let img = loaded.image.to_channels(channels)?;
            let h = img.height().min(crop) / multiple * multiple;
            let w = img.width().min(crop) / multiple * multiple;
            let clean = img.crop((img.height() - h) / 2, (img.width() - w) / 2, h, w)?;
            let noisy = noise.apply(&clean, seed.wrapping_add(i as u64));
            items.push((clean, noisy.image, noisy.sigma_map));
        }
        Ok(Self { items })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Denoises every image with `model` and averages PSNR, SSIM and the noisy PSNR.
    pub fn score(&self, model: &Model) -> Result<ValScores> {
        let (mut psnr, mut ssim, mut noisy_psnr) = (0.0, 0.0, 0.0);
        for (clean, noisy, sigma) in &self.items {
            let (c, h, w) = clean.shape();
            let x = Tensor::from_slice(noisy.data()).view([1, c as i64, h as i64, w as i64]);
            // A model that reads the level itself is validated reading it: its branch is what
            // training changes (blind use gives white noise the classical estimate instead).
            let map = sigma
                .as_ref()
                .filter(|_| !model.config().estimates_level())
                .map(|s| Tensor::from_slice(s.data()).view([1, 1, h as i64, w as i64]));
            let out = model.denoise(&x, map.as_ref())?;
            let out: Vec<f32> = Vec::try_from(out.view([-1]))?;
            let shape = Shape {
                channels: c,
                height: h,
                width: w,
            };
            psnr += denoise_metrics::psnr(clean.data(), &out, 1.0)?;
            ssim += denoise_metrics::ssim(clean.data(), &out, shape, 1.0)?;
            noisy_psnr += denoise_metrics::psnr(clean.data(), noisy.data(), 1.0)?;
        }
        let n = self.items.len().max(1) as f64;
        Ok(ValScores {
            psnr: psnr / n,
            ssim: ssim / n,
            noisy_psnr: noisy_psnr / n,
        })
    }
}
