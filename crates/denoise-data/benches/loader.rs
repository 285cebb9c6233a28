//! Throughput of the streaming patch loader on BSD432: RGB 64x64 patches, dihedral
//! augmentation, Gaussian noise (sigma 25), all cores. Skips (with a message) when the data
//! set is absent: `DENOISE_BSD432` names the folder of BSD432's photos.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use denoise_data::loader::{LoaderConfig, PatchLoader};

fn loader_throughput(c: &mut Criterion) {
    let Some(dir) = std::env::var_os("DENOISE_BSD432").map(PathBuf::from) else {
        eprintln!("skipping the loader bench: set DENOISE_BSD432 to a folder of training photos");
        return;
    };
    if !dir.is_dir() {
        eprintln!("skipping the loader bench: '{}' not found", dir.display());
        return;
    }
    // Built from JSON, the form training configs take, so the bench exercises that path too.
    let config: LoaderConfig = serde_json::from_value(serde_json::json!({
        "patch_size": 64,
        "patches_per_image": 8,
        "batch_size": 128,
        "channels": 3,
        "augment": { "dihedral": true },
        "noise": "gaussian:25",
        "seed": 0,
        "workers": 0,
    }))
    .expect("valid loader config");
    let batch = config.batch_size as u64;
    let workers = config.effective_workers();
    let mut loader = PatchLoader::from_dir(&dir, config).expect("loader starts");
    assert!(
        loader.skipped().is_empty(),
        "unreadable files in {}",
        dir.display()
    );

    // The first epoch decodes every JPEG into the cache; report it apart from the steady state.
    let batches = loader.patches_per_epoch().div_ceil(batch);
    let start = Instant::now();
    for _ in 0..batches {
        black_box(loader.next_batch().expect("batch"));
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "first epoch ({} images, {workers} workers): {secs:.2} s, {:.0} patches/s (includes decoding)",
        loader.files().len(),
        (batches * batch) as f64 / secs
    );

    let mut group = c.benchmark_group("loader");
    group.throughput(Throughput::Elements(batch));
    group.bench_function("bsd432_rgb64_dihedral_gaussian25", |b| {
        b.iter(|| black_box(loader.next_batch().expect("batch")));
    });
    group.finish();
    eprintln!("cache: {:?}", loader.cache_stats());
}

criterion_group!(benches, loader_throughput);
criterion_main!(benches);
