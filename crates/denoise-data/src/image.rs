//! [`Image`]: a planar f32 image (channels x height x width), the currency of this crate.

use crate::{DataError, Result};

/// A planar image: `channels` planes of `height * width` f32 samples, row-major (CHW).
///
/// Clean images are in `[0, 1]`; noisy ones may leave that range (noise is not clipped unless
/// asked). Channels are 1 (gray) or 3 (RGB); alpha never lives here (see [`crate::io`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    channels: usize,
    height: usize,
    width: usize,
    data: Vec<f32>,
}

/// ITU-R BT.601 luma weights of R, G and B (they sum to 1): [`Image::to_gray`]'s.
pub const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

impl Image {
    /// Wraps CHW data, checking that its length is `channels * height * width`.
    pub fn new(channels: usize, height: usize, width: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != channels * height * width {
            return Err(DataError::Shape(format!(
                "{} samples for a {channels}x{height}x{width} image",
                data.len()
            )));
        }
        Ok(Self {
            channels,
            height,
            width,
            data,
        })
    }

    /// An image of zeros.
    pub fn zeros(channels: usize, height: usize, width: usize) -> Self {
        Self {
            channels,
            height,
            width,
            data: vec![0.0; channels * height * width],
        }
    }

    /// Builds an image from `f(c, y, x)`.
    pub fn from_fn(
        channels: usize,
        height: usize,
        width: usize,
        mut f: impl FnMut(usize, usize, usize) -> f32,
    ) -> Self {
        let mut data = Vec::with_capacity(channels * height * width);
        for c in 0..channels {
            for y in 0..height {
                for x in 0..width {
                    data.push(f(c, y, x));
                }
            }
        }
        Self {
            channels,
            height,
            width,
            data,
        }
    }

    pub fn channels(&self) -> usize {
        self.channels
    }
    pub fn height(&self) -> usize {
        self.height
    }
    pub fn width(&self) -> usize {
        self.width
    }
    /// `(channels, height, width)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
    }
    /// Number of pixels (`height * width`).
    pub fn pixels(&self) -> usize {
        self.height * self.width
    }
    /// All samples, CHW.
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }
    /// Plane `c` (`height * width` samples).
    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.pixels();
        &self.data[c * n..(c + 1) * n]
    }
    pub fn plane_mut(&mut self, c: usize) -> &mut [f32] {
        let n = self.pixels();
        &mut self.data[c * n..(c + 1) * n]
    }
    #[inline]
    pub fn get(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[(c * self.height + y) * self.width + x]
    }
    #[inline]
    pub fn set(&mut self, c: usize, y: usize, x: usize, v: f32) {
        self.data[(c * self.height + y) * self.width + x] = v;
    }

    /// The `h x w` window whose top-left corner is `(y, x)`.
    pub fn crop(&self, y: usize, x: usize, h: usize, w: usize) -> Result<Image> {
        if y + h > self.height || x + w > self.width {
            return Err(DataError::Shape(format!(
                "crop {h}x{w} at ({y}, {x}) outside a {}x{} image",
                self.height, self.width
            )));
        }
        let mut data = Vec::with_capacity(self.channels * h * w);
        for c in 0..self.channels {
            for row in y..y + h {
                let start = (c * self.height + row) * self.width + x;
                data.extend_from_slice(&self.data[start..start + w]);
            }
        }
        Ok(Image {
            channels: self.channels,
            height: h,
            width: w,
            data,
        })
    }

    /// Clamps every sample to `[0, 1]` in place.
    pub fn clamp01(&mut self) {
        for v in &mut self.data {
            *v = v.clamp(0.0, 1.0);
        }
    }

    /// Whether no pixel's channels differ by more than `tolerance` (always for one channel): a
    /// gray picture stored as RGB. Stops at the first pixel that differs more.
    pub fn is_gray_within(&self, tolerance: f32) -> bool {
        let n = self.height * self.width;
        (0..n).all(|i| {
            let mut channel = (0..self.channels).map(|c| self.data[c * n + i]);
            let first = channel.next().unwrap_or(0.0);
            let (lo, hi) = channel.fold((first, first), |(lo, hi), v| (lo.min(v), hi.max(v)));
            hi - lo <= tolerance
        })
    }

    /// Gray from RGB with ITU-R BT.601 luma weights (as PIL's `convert("L")` and MATLAB's
    /// `rgb2gray`); a gray image is returned unchanged. Explicit: nothing converts silently.
    pub fn to_gray(&self) -> Image {
        if self.channels == 1 {
            return self.clone();
        }
        let (r, g, b) = (self.plane(0), self.plane(1), self.plane(2));
        let data = r
            .iter()
            .zip(g)
            .zip(b)
            .map(|((r, g), b)| LUMA[0] * r + LUMA[1] * g + LUMA[2] * b)
            .collect();
        Image {
            channels: 1,
            height: self.height,
            width: self.width,
            data,
        }
    }

    /// RGB from gray by repeating the plane; an RGB image is returned unchanged.
    pub fn to_rgb(&self) -> Image {
        if self.channels == 3 {
            return self.clone();
        }
        let mut data = Vec::with_capacity(3 * self.data.len());
        for _ in 0..3 {
            data.extend_from_slice(&self.data);
        }
        Image {
            channels: 3,
            height: self.height,
            width: self.width,
            data,
        }
    }

    /// Converts to `channels` (1 or 3) explicitly.
    pub fn to_channels(&self, channels: usize) -> Result<Image> {
        match channels {
            1 => Ok(self.to_gray()),
            3 => Ok(self.to_rgb()),
            _ => Err(DataError::Channels {
                expected: channels,
                got: self.channels,
            }),
        }
    }

    /// Fails unless the image has `channels` channels.
    pub fn expect_channels(&self, channels: usize) -> Result<()> {
        if self.channels == channels {
            Ok(())
        } else {
            Err(DataError::Channels {
                expected: channels,
                got: self.channels,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gray_within_a_tolerance() {
        let gray = Image::from_fn(1, 3, 4, |_, y, x| (y * 4 + x) as f32 / 12.0);
        assert!(gray.is_gray_within(0.0));
        assert!(gray.to_rgb().is_gray_within(0.0));
        let mut tinted = gray.to_rgb();
        tinted.plane_mut(2)[5] += 0.25;
        tinted.plane_mut(0)[7] -= 0.125;
        assert!(tinted.is_gray_within(0.25));
        assert!(!tinted.is_gray_within(0.24));
        assert!(!Image::from_fn(3, 2, 2, |c, _, _| c as f32).is_gray_within(0.5));
    }

    #[test]
    fn crop_takes_the_window() {
        let img = Image::from_fn(2, 4, 5, |c, y, x| (c * 100 + y * 10 + x) as f32);
        let crop = img.crop(1, 2, 2, 3).unwrap();
        assert_eq!(crop.shape(), (2, 2, 3));
        assert_eq!(crop.get(1, 1, 2), 124.0);
        assert!(img.crop(3, 0, 2, 1).is_err());
    }

    #[test]
    fn gray_uses_bt601() {
        let img = Image::new(3, 1, 1, vec![1.0, 0.0, 0.0]).unwrap();
        assert!((img.to_gray().data()[0] - 0.299).abs() < 1e-7);
        assert_eq!(img.to_gray().to_rgb().channels(), 3);
    }

    #[test]
    fn new_checks_length() {
        assert!(Image::new(3, 2, 2, vec![0.0; 11]).is_err());
    }
}
