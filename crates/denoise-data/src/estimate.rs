//! Blind estimation of the level of additive white Gaussian noise in an image (Immerkær's
//! fast noise variance estimation).

use crate::Image;

/// `sqrt(pi / 2) / 6`: turns the mean absolute mask response into a standard deviation. The
/// mask's squared weights sum to 36, so its response to white noise of std s is normal with
/// std 6 s, whose mean absolute value is 6 s sqrt(2 / pi).
const SCALE: f64 = 0.208_885_689_552_583_35;

/// The standard deviation of additive white Gaussian noise in `img`, on the 0-255 scale (for
/// an image on [0, 1]), averaged over channels.
///
/// Method: J. Immerkær, "Fast Noise Variance Estimation", Computer Vision and Image
/// Understanding 64(2):300-302, 1996. The 3x3 mask `[1 -2 1; -2 4 -2; 1 -2 1]` (the difference
/// of two Laplacians) annihilates every polynomial of degree 2, so on smooth content only the
/// noise responds; `sigma = sqrt(pi/2) / (6 (W-2) (H-2)) * sum |I * N|` over the interior.
/// Edges and texture respond too, so on busy images it overestimates; clipped noise (values
/// piled at 0 or 1) is underestimated.
///
/// An image smaller than 3x3 has no interior and gives 0.
///
/// # Shapes
/// C x H x W in.
pub fn estimate_sigma(img: &Image) -> f32 {
    let per_channel = estimate_sigma_channels(img);
    if per_channel.is_empty() {
        return 0.0;
    }
    per_channel.iter().sum::<f32>() / per_channel.len() as f32
}

/// [`estimate_sigma`] of each channel separately (0-255 scale).
///
/// # Shapes
/// C x H x W in; C values out.
pub fn estimate_sigma_channels(img: &Image) -> Vec<f32> {
    let (channels, h, w) = img.shape();
    if h < 3 || w < 3 {
        return vec![0.0; channels];
    }
    (0..channels)
        .map(|c| {
            let p = img.plane(c);
            let mut sum = 0.0f64;
            for y in 1..h - 1 {
                let (up, mid, down) = (
                    &p[(y - 1) * w..y * w],
                    &p[y * w..(y + 1) * w],
                    &p[(y + 1) * w..(y + 2) * w],
                );
                for x in 1..w - 1 {
                    let corners = up[x - 1] + up[x + 1] + down[x - 1] + down[x + 1];
                    let edges = up[x] + down[x] + mid[x - 1] + mid[x + 1];
                    let r = corners - 2.0 * edges + 4.0 * mid[x];
                    sum += f64::from(r.abs());
                }
            }
            let interior = ((h - 2) * (w - 2)) as f64;
            (SCALE * sum / interior * 255.0) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::NoiseSpec;

    fn smooth(channels: usize, h: usize, w: usize) -> Image {
        Image::from_fn(channels, h, w, |c, y, x| {
            let (y, x) = (y as f32 / h as f32, x as f32 / w as f32);
            0.5 + 0.3 * (3.0 * y + c as f32).sin() * (2.0 * x).cos()
        })
    }

    #[test]
    fn scale_constant_is_sqrt_half_pi_over_6() {
        assert!((SCALE - (std::f64::consts::FRAC_PI_2).sqrt() / 6.0).abs() < 1e-15);
    }

    #[test]
    fn estimates_sigma_25_within_10_percent_on_a_smooth_image() {
        let clean = smooth(1, 256, 256);
        for seed in 0..3 {
            let noisy = NoiseSpec::Gaussian { lo: 25.0, hi: 25.0 }
                .apply(&clean, seed)
                .image;
            let est = estimate_sigma(&noisy);
            assert!((est / 25.0 - 1.0).abs() < 0.1, "seed {seed}: {est}");
        }
    }

    #[test]
    fn tracks_other_levels_and_averages_rgb_channels() {
        let clean = smooth(3, 128, 128);
        for sigma in [5.0f32, 15.0, 50.0] {
            let noisy = NoiseSpec::Gaussian {
                lo: sigma,
                hi: sigma,
            }
            .apply(&clean, 1)
            .image;
            let est = estimate_sigma(&noisy);
            assert!((est / sigma - 1.0).abs() < 0.1, "sigma {sigma}: {est}");
            let channels = estimate_sigma_channels(&noisy);
            assert_eq!(channels.len(), 3);
            assert!(
                channels.iter().all(|c| (c / sigma - 1.0).abs() < 0.1),
                "{channels:?}"
            );
        }
    }

    #[test]
    fn quadratic_images_read_as_noise_free() {
        let quad = Image::from_fn(1, 32, 40, |_, y, x| {
            let (y, x) = (y as f32 / 32.0, x as f32 / 40.0);
            0.1 + 0.3 * x + 0.2 * y + 0.2 * x * x - 0.1 * x * y + 0.15 * y * y
        });
        assert!(estimate_sigma(&quad) < 0.01, "{}", estimate_sigma(&quad));
        assert_eq!(estimate_sigma(&Image::zeros(3, 2, 10)), 0.0);
        assert_eq!(estimate_sigma(&Image::zeros(0, 5, 5)), 0.0);
    }
}
