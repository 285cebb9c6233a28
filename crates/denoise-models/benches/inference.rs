//! Inference throughput of every model kind (default config, random weights) through
//! `Model::denoise`, the path `infer` takes: 1x3xSxS fp32 channels-last, and bf16 where the CPU
//! runs it natively (AMX or AVX512-BF16). S is 256 by default (`DENOISE_BENCH_SIZE`), and the
//! threads are all cores. Reported as elements = pixels, so criterion prints pixels per second.
//! `cargo xtask bench` sets these figures beside PyTorch's, measured in one run.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use denoise_models::perf::CpuFeatures;
use denoise_models::{Model, ModelKind, Precision};
use std::hint::black_box;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

fn inference(c: &mut Criterion) {
    let size: i64 = std::env::var("DENOISE_BENCH_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let mut precisions = vec![Precision::Fp32];
    if CpuFeatures::detect().fast_bf16() {
        precisions.push(Precision::Bf16);
    }
    let mut group = c.benchmark_group("inference");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements((size * size) as u64));
    for kind in ModelKind::ALL {
        for &precision in &precisions {
            tch::manual_seed(0);
            let mut model = Model::new(&kind.default_config(3), Device::Cpu).expect("model builds");
            model.set_precision(precision);
            let x = Tensor::rand([1, 3, size, size], (Kind::Float, Device::Cpu));
            let sigma = denoise_models::model::sigma_map(1, size, size, 25.0, Device::Cpu);
            let map = kind.default_config(3).noise_map().then_some(&sigma);
            let id = format!("{}/{precision}/{size}", kind.name());
            group.bench_function(id, |b| {
                b.iter(|| black_box(model.denoise(black_box(&x), map).expect("denoise runs")))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, inference);
criterion_main!(benches);
