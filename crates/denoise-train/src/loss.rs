//! Training losses on tensors: MSE, L1 (MAE), Charbonnier and KL divergence, each agreeing with
//! the `denoise-metrics` definition on the same data (tested below).

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
    /// KL divergence (the article trains with one), defined as `denoise_metrics::kld`: each
    /// image becomes a distribution `p = (max(x, 0) + 1e-7) / sum`, and the loss is
    /// `sum p_clean ln(p_clean / p_output)` per image, averaged over the batch.
    Kld,
}

impl Loss {
    /// The mean loss of `output` against `target`, as an fp32 scalar.
    ///
    /// # Shapes
    /// `output`, `target`: N x C x H x W (any kind; computed in fp32).
    pub fn compute(self, output: &Tensor, target: &Tensor) -> Tensor {
        let (x, y) = (output.to_kind(Kind::Float), target.to_kind(Kind::Float));
        match self {
            Loss::Mse => (&x - &y).square().mean(Kind::Float),
            Loss::L1 => (&x - &y).abs().mean(Kind::Float),
            Loss::Charbonnier { eps } => ((&x - &y).square() + eps * eps).sqrt().mean(Kind::Float),
            Loss::Kld => {
                let n = x.size()[0];
                let dist = |t: &Tensor| {
                    let t = t.view([n, -1]).clamp_min(0.0) + denoise_metrics::KLD_EPSILON;
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
        let mse = Loss::Mse.compute(&t(&a), &t(&b)).double_value(&[]);
        assert!((mse - denoise_metrics::mse(&b, &a).unwrap()).abs() < 1e-6);
        let l1 = Loss::L1.compute(&t(&a), &t(&b)).double_value(&[]);
        assert!((l1 - denoise_metrics::mae(&b, &a).unwrap()).abs() < 1e-6);
        let ch = Loss::Charbonnier { eps: 1e-3 }
            .compute(&t(&a), &t(&b))
            .double_value(&[]);
        assert!(ch >= l1 && ch - l1 < 1e-3);
        let kld = Loss::Kld.compute(&t(&a), &t(&b)).double_value(&[]);
        let reference = denoise_metrics::kld(&b, &a).unwrap();
        assert!(
            (kld - reference).abs() < 1e-5 * reference.max(1.0),
            "{kld} vs {reference}"
        );
        assert_eq!(Loss::Kld.compute(&t(&a), &t(&a)).double_value(&[]), 0.0);
    }
}
