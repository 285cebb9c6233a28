//! Training throughput: patches per second of the training loop's own optimisation step
//! ([`crate::trainer`]'s Adam step, MSE loss) on random data, timed like
//! the PyTorch reference bench (`bench.py`) times PyTorch (warm-up, then the median of timed steps), so
//! the two can be compared side by side (`denoise-cli bench --train`, `cargo xtask bench`).

use crate::Result;
use crate::config::TrainConfig;
use crate::ema::MovingAverage;
use crate::loss::Loss;
use crate::optim::{Adam, OptimizerConfig};
use crate::timing::PhaseTimer;
use crate::trainer::optimisation_step;
use crate::weights::{self, Weights};
use denoise_models::{Layout, ModelConfig, Precision};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// What to time.
#[derive(Clone, Debug)]
pub struct TrainBench {
    pub model: ModelConfig,
    pub batch: i64,
    /// Side of the square patches.
    pub patch: i64,
    pub precision: Precision,
    pub device: Device,
    /// Weight and input layout (training picks [`Layout::for_training`] unless told).
    pub layout: Layout,
    pub warmup: usize,
    pub runs: usize,
}

/// Seconds per step of each timed run, in run order.
pub fn time_train_steps(b: &TrainBench) -> Result<Vec<f64>> {
    tch::manual_seed(0);
    let weights = Weights::new(&b.model, b.device, b.precision, b.layout)?;
    // Training's default moving average is part of its step, so it is timed too.
    let ema = MovingAverage::new(
        &b.model,
        b.device,
        b.layout,
        TrainConfig::default().ema_decay,
    )?;
    let mut adam = Adam::new(
        OptimizerConfig {
            lr: 1e-4,
            // No gradient clip, as the PyTorch reference bench (the configs clip at 1.0: one
            // norm over all gradients and a scale, a few per cent of a small model's step).
            ..Default::default()
        },
        weights::trainable(&weights.master),
    );
    let c = b.model.channels();
    let opts = (Kind::Float, b.device);
    let clean = Tensor::rand([b.batch, c, b.patch, b.patch], opts);
    let noisy = &clean + Tensor::randn([b.batch, c, b.patch, b.patch], opts) * (25.0 / 255.0);
    let sigma = b
        .model
        .noise_map()
        .then(|| denoise_models::model::sigma_map(b.batch, b.patch, b.patch, 25.0, b.device));
    let mut step = || {
        optimisation_step(
            &weights,
            Some(&ema),
            &mut adam,
            Loss::Mse,
            &noisy,
            sigma.as_ref(),
            &clean,
            1e-4,
            b.layout,
            &mut PhaseTimer::off(),
        )
    };
    for _ in 0..b.warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(b.runs);
    for _ in 0..b.runs {
        let start = Instant::now();
        step()?;
        // The step reads its loss back before the update, so wait for the update's kernels too.
        if let Device::Cuda(index) = b.device {
            tch::Cuda::synchronize(index as i64);
        }
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_the_requested_number_of_steps() {
        let _rng = crate::test_rng_lock();
        let model: ModelConfig =
            serde_json::from_str(r#"{"kind":"dncnn","depth":3,"features":8,"batch_norm":false}"#)
                .unwrap();
        let times = time_train_steps(&TrainBench {
            model,
            batch: 2,
            patch: 16,
            precision: Precision::Fp32,
            device: Device::Cpu,
            layout: Layout::Nchw,
            warmup: 1,
            runs: 3,
        })
        .unwrap();
        assert_eq!(times.len(), 3);
        assert!(times.iter().all(|t| *t > 0.0));
    }
}
