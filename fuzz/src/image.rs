//! Image decoding with the pixel limit, as `infer`, the loader and the web app decode: a file of
//! any of the five formats, with its metadata.

use denoise_data::io::{self, BitDepth, ImageFormat};
use denoise_data::metadata::Metadata;

/// Images above this many pixels are refused from the header; small enough that an accepted
/// one decodes quickly.
const MAX_PIXELS: u64 = 1 << 20;
/// Accepted images up to this size also go through the PNG round trip.
const ROUND_TRIP_PIXELS: usize = 4096;

pub struct Image;

impl super::Target for Image {
    fn run(&self, data: &[u8]) {
        // The name's extension picks the decoder only for content without a signature.
        let name = ["in.png", "in.jpg", "in.tif", "in.webp", "in.bmp"][data.len() % 5];
        let Ok((loaded, metadata)) = io::decode_with_metadata(data, name, MAX_PIXELS) else {
            return;
        };
        let (c, h, w) = loaded.image.shape();
        assert!(c == 1 || c == 3, "{c} channels");
        assert!(h > 0 && w > 0 && (h * w) as u64 <= MAX_PIXELS, "{w}x{h}");
        assert_eq!(loaded.image.data().len(), c * h * w);
        assert!(
            loaded.image.data().iter().all(|v| (0.0..=1.0).contains(v)),
            "samples outside [0, 1]"
        );
        if let Some(alpha) = &loaded.alpha {
            assert_eq!(alpha.len(), h * w);
        }
        if h * w <= ROUND_TRIP_PIXELS {
            round_trip(&loaded, &metadata);
        }
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        seeds()
    }
}

/// Written as PNG at the file's depth with its metadata and read back, an accepted image keeps
/// every sample, its alpha and the metadata PNG carries (what `infer` does to a PNG output).
fn round_trip(loaded: &io::LoadedImage, metadata: &Metadata) {
    let (png, dropped) = io::encode_with_metadata(
        &loaded.image,
        loaded.alpha.as_deref(),
        loaded.bit_depth,
        ImageFormat::Png,
        metadata,
    )
    .expect("a decoded image encodes as PNG");
    let (again, meta_again) = io::decode_with_metadata(&png, "again.png", MAX_PIXELS)
        .expect("the PNG just written decodes");
    assert_eq!(
        again.image, loaded.image,
        "pixels changed in a PNG round trip"
    );
    assert_eq!(
        again.alpha, loaded.alpha,
        "alpha changed in a PNG round trip"
    );
    assert_eq!(again.bit_depth, loaded.bit_depth);
    if dropped.is_empty() {
        assert_eq!(meta_again.icc, metadata.icc, "ICC profile changed");
        assert_eq!(meta_again.xmp, metadata.xmp, "XMP changed");
    }
}

/// A small picture in each format and layout the product reads: gray, colour, alpha, 16 bits.
pub fn seeds() -> Vec<Vec<u8>> {
    let colour = picture(3, 6, 5);
    let gray = picture(1, 4, 7);
    let alpha: Vec<f32> = (0..30).map(|i| i as f32 / 29.0).collect();
    let mut out = Vec::new();
    for format in [
        ImageFormat::Png,
        ImageFormat::Jpeg,
        ImageFormat::Tiff,
        ImageFormat::WebP,
        ImageFormat::Bmp,
    ] {
        for image in [&colour, &gray] {
            if let Ok(bytes) = io::encode(image, None, BitDepth::Eight, format) {
                out.push(bytes);
            }
        }
    }
    for depth in [BitDepth::Eight, BitDepth::Sixteen] {
        out.push(io::encode_png(&colour, Some(&alpha), depth).expect("PNG with alpha"));
    }
    out.push(io::encode(&colour, None, BitDepth::Sixteen, ImageFormat::Tiff).expect("TIFF 16"));
    out
}

fn picture(channels: usize, h: usize, w: usize) -> denoise_data::Image {
    denoise_data::Image::from_fn(channels, h, w, |c, y, x| {
        ((c * 7 + y * 5 + x * 3) % 11) as f32 / 10.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Target;

    #[test]
    fn seeds_cover_every_format_and_decode() {
        let seeds = seeds();
        assert!(seeds.len() >= 12, "{}", seeds.len());
        for seed in &seeds {
            io::decode_bytes(seed, "seed", MAX_PIXELS).expect("a seed decodes");
        }
    }

    #[test]
    fn seeds_and_their_mutations_run_clean() {
        for input in crate::mutations(&seeds()) {
            Image.run(&input);
        }
    }
}
