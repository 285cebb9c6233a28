//! Training losses on tensors: MSE, L1 (MAE), Charbonnier and KL divergence, each agreeing with
//! the `denoise-metrics` definition on the same data (tested below), an MSE that weighs each
//! patch by its noise level, and one that follows the patches' mean PSNR.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Which loss to minimise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Loss {
    #[default]
    Mse,
    /// Mean absolute error (MAE).
    L1,
    /// sqrt((x - y)^2 + eps^2), a smooth L1 (Charbonnier 1994; used by many restoration nets).
    Charbonnier { eps: f64 },
    /// KL divergence (Siddiqui's Keras article trains with one), defined as `denoise_metrics::kld`: each
    /// image becomes a distribution `p = (max(x, 0) + 1e-7) / sum`, and the loss is
    /// `sum p_clean ln(p_clean / p_output)` per image, averaged over the batch.
    Kld,
    /// MSE with each patch weighted by `(25 + floor) / (sigma + floor)`, `sigma` being the
    /// patch's mean noise level on the 0-255 scale (from the noise-level map). A denoiser's MSE
    /// grows about linearly with sigma (the shipped default's, on CBSD68, about 4x from sigma 15
    /// to 50), so plain MSE over a blind range lets the noisiest patches drive training; this
    /// weight brings a dB gained at each level closer to counting the same (with floor 5, a dB
    /// at sigma 50 still counts about 1.45x one at 15). The weight is 1 at sigma 25, and
    /// `floor` bounds it for nearly clean patches.
    #[serde(rename = "mse-level")]
    MseLevel { floor: f64 },
    /// The geometric mean of the patches' MSEs: the MSE whose PSNR is the patches' mean PSNR, so
    /// minimising it maximises the mean PSNR, the figure evaluation reports. A dB counts the
    /// same on a nearly clean patch as on a noisy one, where plain MSE barely sees the clean
    /// patch (and a model learns to smooth clean photos). A patch scoring over `max_db` counts
    /// as `max_db` and pulls no further: without such a cap, nearly clean patches, whose every
    /// dB is cheap to win, can outweigh the rest.
    Psnr {
        #[serde(default = "default_max_db")]
        max_db: f64,
    },
}

fn default_max_db() -> f64 {
    100.0
}

/// Each patch's mean over C, H and W: no view, so a channels-last tensor works too.
fn per_patch(t: &Tensor) -> Tensor {
    t.mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float)
}

impl Loss {
    /// The mean loss of `output` against `target`, as an fp32 scalar.
    ///
    /// # Panics
    /// For [`Loss::MseLevel`] without `sigma` (the trainer's config check refuses that loss for
    /// models without a noise-level map).
    ///
    /// # Shapes
    /// `output`, `target`: N x C x H x W (any kind; computed in fp32); `sigma`: N x 1 x H x W on
    /// the [0, 1] scale.
    pub fn compute(self, output: &Tensor, target: &Tensor, sigma: Option<&Tensor>) -> Tensor {
        let (x, y) = (output.to_kind(Kind::Float), target.to_kind(Kind::Float));
        match self {
            Loss::Mse => (&x - &y).square().mean(Kind::Float),
            Loss::MseLevel { floor } => {
                let sigma = sigma.expect("the mse-level loss needs the noise-level map");
                let level = per_patch(&sigma.to_kind(Kind::Float)) * 255.0;
                let weight = (level + floor).reciprocal() * (25.0 + floor);
                (per_patch(&(&x - &y).square()) * weight).mean(Kind::Float)
            }
            Loss::Psnr { max_db } => per_patch(&(&x - &y).square())
                .clamp_min(10f64.powf(-max_db / 10.0))
                .log()
                .mean(Kind::Float)
                .exp(),
            Loss::L1 => (&x - &y).abs().mean(Kind::Float),
            Loss::Charbonnier { eps } => ((&x - &y).square() + eps * eps).sqrt().mean(Kind::Float),
            Loss::Kld => {
                let n = x.size()[0];
                let dist = |t: &Tensor| {
                    let t = t.reshape([n, -1]).clamp_min(0.0) + denoise_metrics::KLD_EPSILON;
                    let sum = t.sum_dim_intlist(1, true, Kind::Float);
                    t / sum
                };
                let (q, p) = (dist(&x), dist(&y));
                (&p * (&p / &q).log())
                    .sum_dim_intlist(1, false, Kind::Float)
                    .mean(Kind::Float)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn pair() -> (Vec<f32>, Vec<f32>) {
        let a: Vec<f32> = (0..300).map(|i| ((i * 37 % 101) as f32) / 100.0).collect();
        let b: Vec<f32> = (0..300).map(|i| ((i * 53 % 97) as f32) / 96.0).collect();
        (a, b)
    }

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v)
            .view([1, 3, 10, 10])
            .to_device(Device::Cpu)
    }

    #[test]
    fn losses_agree_with_the_metrics_crate() {
        let (a, b) = pair();
        let mse = Loss::Mse.compute(&t(&a), &t(&b), None).double_value(&[]);
        assert!((mse - denoise_metrics::mse(&b, &a).unwrap()).abs() < 1e-6);
        let l1 = Loss::L1.compute(&t(&a), &t(&b), None).double_value(&[]);
        assert!((l1 - denoise_metrics::mae(&b, &a).unwrap()).abs() < 1e-6);
        let ch = Loss::Charbonnier { eps: 1e-3 }
            .compute(&t(&a), &t(&b), None)
            .double_value(&[]);
        assert!(ch >= l1 && ch - l1 < 1e-3);
        let kld = Loss::Kld.compute(&t(&a), &t(&b), None).double_value(&[]);
        let reference = denoise_metrics::kld(&b, &a).unwrap();
        assert!(
            (kld - reference).abs() < 1e-5 * reference.max(1.0),
            "{kld} vs {reference}"
        );
        assert_eq!(
            Loss::Kld.compute(&t(&a), &t(&a), None).double_value(&[]),
            0.0
        );
    }

    /// Two 3 x 4 x 4 patches filled with `a` and `b`.
    fn two_patches(a: f64, b: f64) -> Tensor {
        let patch = |v| Tensor::full([1, 3, 4, 4], v, (Kind::Float, Device::Cpu));
        Tensor::cat(&[patch(a), patch(b)], 0)
    }

    #[test]
    fn the_psnr_loss_is_the_mse_at_the_patches_mean_psnr() {
        // Patches with MSEs 1e-2 (20 dB) and 1e-4 (40 dB): mean PSNR 30 dB, so the loss is
        // 1e-3, where plain MSE (5.05e-3) is nearly all the noisier patch's.
        let output = Tensor::zeros([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        let target = two_patches(0.1, 0.01);
        let psnr = Loss::Psnr { max_db: 100.0 };
        let loss = psnr.compute(&output, &target, None).double_value(&[]);
        assert!((loss - 1e-3).abs() < 1e-9, "{loss}");
        let (a, b) = pair();
        let one = psnr.compute(&t(&a), &t(&b), None).double_value(&[]);
        let mse = denoise_metrics::mse(&b, &a).unwrap();
        assert!((one - mse).abs() < 1e-6 * mse, "one patch: {one} vs {mse}");
        // Identical patches count as max_db (a log of zero would be infinite).
        let same = psnr.compute(&t(&a), &t(&a), None).double_value(&[]);
        assert!((same - 1e-10).abs() < 1e-15, "{same}");
        // Capped at 30 dB, the 40 dB patch counts as 30: the mean is 25 dB.
        let capped = Loss::Psnr { max_db: 30.0 }
            .compute(&output, &target, None)
            .double_value(&[]);
        assert!((capped - 10f64.powf(-2.5)).abs() < 1e-8, "{capped}");
        let parsed: Loss = toml::from_str("kind = \"psnr\"").unwrap();
        assert_eq!(parsed, psnr);
        let parsed: Loss = toml::from_str("kind = \"psnr\"\nmax_db = 42.0").unwrap();
        assert_eq!(parsed, Loss::Psnr { max_db: 42.0 });
    }

    #[test]
    fn the_level_loss_weighs_each_patch_by_its_noise_level() {
        // Two patches with squared errors 0.01 and 0.04 at sigma 5 and 45 (0-255 scale); with
        // floor 5 the weights are 30/10 = 3 and 30/50 = 0.6: (3 * 0.01 + 0.6 * 0.04) / 2.
        let output = Tensor::zeros([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        let target = two_patches(0.1, 0.2);
        let sigma = Tensor::cat(
            &[
                Tensor::full([1, 1, 4, 4], 5.0 / 255.0, (Kind::Float, Device::Cpu)),
                Tensor::full([1, 1, 4, 4], 45.0 / 255.0, (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        let loss = Loss::MseLevel { floor: 5.0 }
            .compute(&output, &target, Some(&sigma))
            .double_value(&[]);
        assert!((loss - 0.027).abs() < 1e-6, "{loss}");
        // At sigma 25 the weight is 1: plain MSE.
        let at25 = Tensor::full([2, 1, 4, 4], 25.0 / 255.0, (Kind::Float, Device::Cpu));
        let plain = Loss::Mse.compute(&output, &target, None).double_value(&[]);
        let level = Loss::MseLevel { floor: 5.0 }
            .compute(&output, &target, Some(&at25))
            .double_value(&[]);
        assert!((plain - level).abs() < 1e-7, "{plain} vs {level}");
        let parsed: Loss = toml::from_str("kind = \"mse-level\"\nfloor = 5.0").unwrap();
        assert_eq!(parsed, Loss::MseLevel { floor: 5.0 });
    }
}
