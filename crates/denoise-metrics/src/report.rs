//! [`Report`]: the standard set of full-reference scores for one image pair, as the CLI prints it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::psnr::psnr_from_mse;
use crate::{Result, Shape, mae, mse, ssim};

/// PSNR (dB), SSIM, MSE and MAE of a test image against its reference.
///
/// Serialises with exactly the keys `psnr`, `ssim`, `mse`, `mae`; an infinite PSNR (identical
/// images) is written as the string `"inf"` (see [`crate::serde_db`]), so the output is valid
/// JSON.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// [`psnr`](crate::psnr()) in dB; `f64::INFINITY` for identical images.
    #[serde(with = "crate::serde_db")]
    pub psnr: f64,
    /// [`ssim`](crate::ssim()), mean over channels; `None` (JSON `null`) for an image smaller
    /// than SSIM's 11x11 window, whose other scores are still given.
    pub ssim: Option<f64>,
    /// [`mse`](crate::mse()).
    pub mse: f64,
    /// [`mae`](crate::mae()).
    pub mae: f64,
}

impl Report {
    /// All four scores for CHW images with values in [0, 1] (data range 1).
    ///
    /// # Errors
    /// Any error of the individual metrics, except SSIM's on an image under its window, which
    /// gives `ssim: None`.
    pub fn compute(reference: &[f32], test: &[f32], shape: Shape) -> Result<Self> {
        Self::compute_with_range(reference, test, shape, 1.0)
    }

    /// As [`Report::compute`] with another data range (e.g. 255 for values in [0, 255]).
    ///
    /// # Errors
    /// As [`Report::compute`], plus [`InvalidDataRange`](crate::MetricsError::InvalidDataRange).
    pub fn compute_with_range(
        reference: &[f32],
        test: &[f32],
        shape: Shape,
        data_range: f64,
    ) -> Result<Self> {
        // SSIM first: it checks the shape, the range and finiteness before the cheap metrics run
        // (and before it finds an image too small for its window).
        let ssim = match ssim(reference, test, shape, data_range) {
            Ok(v) => Some(v),
            Err(crate::MetricsError::TooSmall { .. }) => None,
            Err(e) => return Err(e),
        };
        let mse = mse(reference, test)?;
        Ok(Self {
            psnr: psnr_from_mse(mse, data_range),
            ssim,
            mse,
            mae: mae(reference, test)?,
        })
    }

    /// This report as a JSON object (the `--json` output).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "psnr": crate::db_to_json(self.psnr),
            "ssim": self.ssim,
            "mse": self.mse,
            "mae": self.mae,
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ssim = self
            .ssim
            .map_or_else(|| "n/a (under 11x11)".to_owned(), |s| format!("{s:.6}"));
        write!(
            f,
            "psnr {:.4} dB, ssim {ssim}, mse {:.6e}, mae {:.6e}",
            self.psnr, self.mse, self.mae
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::pattern_pair;

    #[test]
    fn agrees_with_the_individual_metrics() {
        let shape = Shape::new(3, 24, 20);
        let (a, b) = pattern_pair(shape);
        let r = Report::compute(&a, &b, shape).unwrap();
        assert_eq!(r.psnr, crate::psnr(&a, &b, 1.0).unwrap());
        assert_eq!(r.ssim, Some(ssim(&a, &b, shape, 1.0).unwrap()));
        assert_eq!(r.mse, mse(&a, &b).unwrap());
        assert_eq!(r.mae, mae(&a, &b).unwrap());
        // Reference values as in the psnr and ssim tests (scikit-image, data_range=1).
        assert!((r.psnr - 23.149567098453545).abs() < 1e-4);
        assert!((r.ssim.unwrap() - 0.9718531412009453).abs() < 1e-4);
    }

    #[test]
    fn json_has_exactly_the_cli_keys_and_survives_identical_images() {
        let shape = Shape::new(1, 12, 12);
        let (a, _) = pattern_pair(shape);
        let r = Report::compute(&a, &a, shape).unwrap();
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"psnr":"inf","ssim":1.0,"mse":0.0,"mae":0.0}"#);
        assert_eq!(serde_json::from_str::<Report>(&text).unwrap(), r);
        assert_eq!(serde_json::to_value(r).unwrap(), r.to_json());
        assert_eq!(
            r.to_string(),
            "psnr inf dB, ssim 1.000000, mse 0.000000e0, mae 0.000000e0"
        );
    }

    #[test]
    fn an_image_under_the_ssim_window_still_gets_the_other_scores() {
        let shape = Shape::new(3, 8, 8);
        let (a, b) = pattern_pair(shape);
        let r = Report::compute(&a, &b, shape).unwrap();
        assert_eq!(r.ssim, None);
        assert_eq!(r.psnr, crate::psnr(&a, &b, 1.0).unwrap());
        assert_eq!(r.to_json()["ssim"], serde_json::Value::Null);
        assert!(r.to_string().contains("ssim n/a"), "{r}");
        // The checks that come before the window's still fail.
        assert!(Report::compute(&a, &b[..b.len() - 1], shape).is_err());
        assert!(Report::compute_with_range(&a, &b, shape, -1.0).is_err());
    }

    #[test]
    fn errors_pass_through() {
        let shape = Shape::new(1, 12, 12);
        assert!(Report::compute(&[0.0; 144], &[0.0; 143], shape).is_err());
        assert!(Report::compute_with_range(&[0.0; 144], &[0.0; 144], shape, 0.0).is_err());
    }
}
