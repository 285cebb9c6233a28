//! Criterion benchmark of SSIM on a 24-megapixel RGB pair (6000x4000x3), the issue's < 1 s target,
//! plus a CBSD68-sized image for the per-image cost of an evaluation run.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use denoise_metrics::{Shape, ssim};

/// A textured reference (smooth gradients plus fine stripes) and a noisy copy of it, so the
/// filtered statistics are realistic rather than constant.
fn pair(shape: Shape) -> (Vec<f32>, Vec<f32>) {
    let n = shape.checked_len().expect("bench shape fits in usize");
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut reference = Vec::with_capacity(n);
    let mut test = Vec::with_capacity(n);
    for c in 0..shape.channels {
        for y in 0..shape.height {
            for x in 0..shape.width {
                let smooth = (x as f32 / shape.width as f32 + y as f32 / shape.height as f32) / 2.0;
                let stripes = ((c * 7 + y * 13 + x * 17) % 31) as f32 / 31.0;
                let v = 0.8 * smooth + 0.2 * stripes;
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let noise = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                reference.push(v);
                test.push((v + 0.2 * noise).clamp(0.0, 1.0));
            }
        }
    }
    (reference, test)
}

fn bench_ssim(c: &mut Criterion) {
    let mut group = c.benchmark_group("ssim");
    for (name, shape, samples) in [
        ("481x321x3", Shape::new(3, 321, 481), 50),
        ("6000x4000x3", Shape::new(3, 4000, 6000), 10),
    ] {
        let (reference, test) = pair(shape);
        group.sample_size(samples);
        group.bench_function(name, |b| {
            b.iter(|| ssim(black_box(&reference), black_box(&test), shape, 1.0).unwrap());
        });
    }
    group.finish();
}

criterion_group!(benches, bench_ssim);
criterion_main!(benches);
