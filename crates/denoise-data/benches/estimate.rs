//! Cost of the blind noise-level estimates on a CBSD68-sized colour image (481x321) and on a
//! 2000x1500 one (sampled on a grid: the patch method's cost stops growing at 20,000 patches,
//! the brightness function's at 60,000; its per-pixel map grows with the image).
//! Synthetic content, so no data set is needed. The patch sums are a matrix product per block of
//! 256 patches, on all cores.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use denoise_data::Image;
use denoise_data::estimate::{estimate_noise, estimate_sigma, immerkaer_sigma};
use denoise_data::noise::NoiseSpec;

fn noisy(h: usize, w: usize) -> Image {
    let clean = Image::from_fn(3, h, w, |c, y, x| {
        let (y, x, c) = (y as f32, x as f32, c as f32);
        0.5 + 0.2 * (0.05 * x + 0.03 * y + c).sin() * (0.4 * x - 0.2 * y).cos()
    });
    NoiseSpec::Gaussian { lo: 25.0, hi: 25.0 }
        .apply(&clean, 0)
        .image
}

fn estimates(c: &mut Criterion) {
    for (h, w) in [(321, 481), (1500, 2000)] {
        let img = noisy(h, w);
        c.bench_function(&format!("patch covariance {w}x{h}"), |b| {
            b.iter(|| estimate_sigma(black_box(&img)))
        });
        c.bench_function(&format!("estimate_noise (by brightness) {w}x{h}"), |b| {
            b.iter(|| estimate_noise(black_box(&img)))
        });
        c.bench_function(&format!("brightness map {w}x{h}"), |b| {
            let denoise_data::estimate::NoiseEstimate::Brightness(nlf) = estimate_noise(&img)
            else {
                panic!("white colour noise gives a brightness estimate");
            };
            b.iter(|| nlf.map(black_box(&img)))
        });
        c.bench_function(&format!("immerkaer {w}x{h}"), |b| {
            b.iter(|| immerkaer_sigma(black_box(&img)))
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = estimates
}
criterion_main!(benches);
