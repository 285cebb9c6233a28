//! What an image file carries besides its pixels (ICC profile, EXIF, XMP, resolution): read when
//! a file is decoded for denoising, and which of it each output format can take back.

use std::fmt;
use std::io::Cursor;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};

use image::codecs::jpeg::{PixelDensity, PixelDensityUnit};
use image::metadata::Orientation;
use image::{ImageDecoder, ImageFormat};

/// A file's metadata as decoding found it, to be written with the denoised pixels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    /// The ICC colour profile, as embedded.
    pub icc: Option<Vec<u8>>,
    /// The EXIF block, TIFF-structured (it starts `II*\0` or `MM\0*`, without JPEG's `Exif\0\0`).
    /// When decoding turned the pixels upright, its Orientation tag says 1.
    pub exif: Option<Vec<u8>>,
    /// The XMP packet (XML).
    pub xmp: Option<Vec<u8>>,
    /// Pixels per inch or centimetre.
    pub resolution: Option<Resolution>,
}

/// Pixel density in a physical unit. A density without a unit (only an aspect ratio, which
/// writers put in when they know no resolution) is not kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resolution {
    pub x: f64,
    pub y: f64,
    pub unit: ResolutionUnit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResolutionUnit {
    Inch,
    Centimetre,
}

/// One kind of metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetadataItem {
    Icc,
    Exif,
    Xmp,
    Resolution,
}

impl fmt::Display for MetadataItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MetadataItem::Icc => "ICC profile",
            MetadataItem::Exif => "EXIF",
            MetadataItem::Xmp => "XMP",
            MetadataItem::Resolution => "resolution",
        })
    }
}

/// An item of the input's metadata that an output goes without.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub item: MetadataItem,
    pub reason: DropReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The output format, as written here, has no place for it.
    Format,
    /// An ICC profile for other colours than the pixels written (an RGB profile on the gray
    /// result of a gray model, a CMYK one on the RGB pixels a CMYK JPEG decodes to).
    ColourSpace,
    /// More than the format's block for it holds (a JPEG segment holds 64 KiB).
    TooLarge,
    /// XMP that is not UTF-8, which PNG's text chunk requires.
    NotUtf8,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropReason::Format => "the format has no place for it",
            DropReason::ColourSpace => "it describes other colours than the pixels written",
            DropReason::TooLarge => "it is larger than the format holds",
            DropReason::NotUtf8 => "it is not UTF-8 text, which the format requires",
        })
    }
}

impl Metadata {
    /// The items present.
    pub fn items(&self) -> Vec<MetadataItem> {
        [
            (self.icc.is_some(), MetadataItem::Icc),
            (self.exif.is_some(), MetadataItem::Exif),
            (self.xmp.is_some(), MetadataItem::Xmp),
            (self.resolution.is_some(), MetadataItem::Resolution),
        ]
        .into_iter()
        .filter_map(|(present, item)| present.then_some(item))
        .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.items().is_empty()
    }

    fn without(&mut self, item: MetadataItem) {
        match item {
            MetadataItem::Icc => self.icc = None,
            MetadataItem::Exif => self.exif = None,
            MetadataItem::Xmp => self.xmp = None,
            MetadataItem::Resolution => self.resolution = None,
        }
    }

    /// What a file of `format` whose pixels have `channels` colour channels (as stored: WebP
    /// and BMP store gray as RGB) will hold, and what it goes without, and why.
    pub(crate) fn for_output(
        &self,
        format: ImageFormat,
        channels: usize,
    ) -> (Metadata, Vec<Dropped>) {
        let mut kept = self.clone();
        let mut dropped = Vec::new();
        for item in self.items() {
            let reason = if !carries(format, item) {
                Some(DropReason::Format)
            } else {
                self.unfit(format, channels, item)
            };
            if let Some(reason) = reason {
                kept.without(item);
                dropped.push(Dropped { item, reason });
            }
        }
        (kept, dropped)
    }

    fn unfit(
        &self,
        format: ImageFormat,
        channels: usize,
        item: MetadataItem,
    ) -> Option<DropReason> {
        match item {
            MetadataItem::Icc => {
                let icc = self.icc.as_deref().unwrap_or_default();
                if !icc_fits(icc, channels) {
                    Some(DropReason::ColourSpace)
                } else if format == ImageFormat::Jpeg && icc.len() > JPEG_MAX_ICC {
                    Some(DropReason::TooLarge)
                } else {
                    None
                }
            }
            MetadataItem::Exif => {
                let exif = self.exif.as_deref().unwrap_or_default();
                (format == ImageFormat::Jpeg && exif.len() > JPEG_MAX_EXIF)
                    .then_some(DropReason::TooLarge)
            }
            MetadataItem::Xmp => {
                let xmp = self.xmp.as_deref().unwrap_or_default();
                if format == ImageFormat::Jpeg && xmp.len() > JPEG_MAX_XMP {
                    Some(DropReason::TooLarge)
                } else if format == ImageFormat::Png && std::str::from_utf8(xmp).is_err() {
                    Some(DropReason::NotUtf8)
                } else {
                    None
                }
            }
            MetadataItem::Resolution => None,
        }
    }
}

/// Whether files of `format` written by this crate hold `item`.
pub fn carries(format: ImageFormat, item: MetadataItem) -> bool {
    match format {
        ImageFormat::Png | ImageFormat::Jpeg => true,
        // TIFF keeps EXIF as a directory of tags of its own, not as a block: writing it would
        // mean rewriting every tag.
        ImageFormat::Tiff => item != MetadataItem::Exif,
        // WebP has chunks for ICC, EXIF and XMP, and no field for a resolution.
        ImageFormat::WebP => item != MetadataItem::Resolution,
        _ => false,
    }
}

/// A JPEG segment's payload is at most 65533 bytes; EXIF's starts with `Exif\0\0`, XMP's with
/// its 29-byte namespace, and an ICC profile is split over up to 255 segments with 14-byte
/// headers.
const JPEG_MAX_EXIF: usize = 65533 - 6;
const JPEG_MAX_XMP: usize = 65533 - XMP_NAMESPACE.len();
const JPEG_MAX_ICC: usize = 255 * (65533 - 14);

/// What starts a JPEG APP1 segment that holds XMP.
const XMP_NAMESPACE: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";

/// The PNG text keyword under which XMP is kept.
pub(crate) const PNG_XMP_KEYWORD: &str = "XML:com.adobe.xmp";

/// The TIFF tag that holds XMP (XMLPacket).
pub(crate) const TIFF_XMP_TAG: u16 = 700;

/// Whether `icc`'s colour space (bytes 16..20 of its header) is that of pixels with `channels`
/// colour channels.
fn icc_fits(icc: &[u8], channels: usize) -> bool {
    match (channels, icc.get(16..20)) {
        (1, Some(space)) => space == b"GRAY",
        (3, Some(space)) => space == b"RGB ",
        _ => false,
    }
}

/// Reads `decoder`'s metadata, and the resolution from the file's bytes (which the decoders do
/// not report). `applied` is the orientation decoding turns the pixels by. A damaged item is
/// left out rather than failing the decode: the pixels are what was asked for.
pub(crate) fn read(
    decoder: &mut impl ImageDecoder,
    bytes: &[u8],
    format: ImageFormat,
    applied: Orientation,
) -> Metadata {
    let mut meta = if format == ImageFormat::Tiff {
        // `image`'s TIFF decoder caps a tag's size by the size of the pixels, so a small picture
        // would lose its profile; the `tiff` crate's own limits are made for tags. (The EXIF of
        // a TIFF is a directory of tags, not a block, and is not read.)
        catch_unwind(|| read_tiff(bytes))
            .ok()
            .flatten()
            .unwrap_or_default()
    } else {
        Metadata {
            icc: quietly(|| decoder.icc_profile()),
            exif: quietly(|| decoder.exif_metadata()).and_then(|e| upright_exif(e, applied)),
            xmp: quietly(|| decoder.xmp_metadata()),
            resolution: catch_unwind(|| resolution_of(bytes, format)).ok().flatten(),
        }
    };
    meta.icc = meta.icc.filter(|p| !p.is_empty());
    meta.xmp = meta.xmp.filter(|x| !x.is_empty());
    if swaps_axes(applied) {
        meta.resolution = meta.resolution.map(|r| Resolution {
            x: r.y,
            y: r.x,
            ..r
        });
    }
    meta
}

fn quietly(f: impl FnOnce() -> image::ImageResult<Option<Vec<u8>>>) -> Option<Vec<u8>> {
    catch_unwind(AssertUnwindSafe(f))
        .ok()
        .and_then(Result::ok)
        .flatten()
}

fn swaps_axes(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// The EXIF block as it is kept: without a stray `Exif\0\0` (some WebP writers keep JPEG's),
/// TIFF-structured, and saying "upright" when decoding turned the pixels upright: a viewer
/// must not turn them again.
fn upright_exif(mut exif: Vec<u8>, applied: Orientation) -> Option<Vec<u8>> {
    if exif.starts_with(b"Exif\0\0") {
        exif.drain(..6);
    }
    if !(exif.starts_with(b"II*\0") || exif.starts_with(b"MM\0*")) {
        return None;
    }
    if applied != Orientation::NoTransforms {
        let _ = Orientation::remove_from_exif_chunk(&mut exif);
    }
    Some(exif)
}

fn resolution_of(bytes: &[u8], format: ImageFormat) -> Option<Resolution> {
    let (x, y, unit) = match format {
        ImageFormat::Png => {
            let mut decoder = png::Decoder::new(Cursor::new(bytes));
            decoder.set_ignore_text_chunk(true);
            decoder.set_ignore_iccp_chunk(true);
            let reader = decoder.read_info().ok()?;
            let dims = reader.info().pixel_dims?;
            if dims.unit != png::Unit::Meter {
                return None;
            }
            let per_cm = |v: u32| f64::from(v) / 100.0;
            (
                per_cm(dims.xppu),
                per_cm(dims.yppu),
                ResolutionUnit::Centimetre,
            )
        }
        ImageFormat::Jpeg => {
            // JFIF's APP0: "JFIF\0", version (2 bytes), unit, x and y density (2 bytes each).
            let (_, _, payload) = jpeg_segments(bytes).find(|(marker, _, p)| {
                *marker == 0xE0 && bytes[p.clone()].starts_with(b"JFIF\0")
            })?;
            let jfif = bytes.get(payload)?;
            let unit = match jfif.get(7)? {
                1 => ResolutionUnit::Inch,
                2 => ResolutionUnit::Centimetre,
                _ => return None,
            };
            let density = |at: usize| {
                Some(f64::from(u16::from_be_bytes([
                    *jfif.get(at)?,
                    *jfif.get(at + 1)?,
                ])))
            };
            (density(8)?, density(10)?, unit)
        }
        _ => return None,
    };
    Resolution::checked(x, y, unit)
}

/// A TIFF's ICC profile, XMP and resolution, from its first directory.
fn read_tiff(bytes: &[u8]) -> Option<Metadata> {
    use tiff::decoder::ifd::Value;
    use tiff::tags::Tag;
    let mut decoder = tiff::decoder::Decoder::new(Cursor::new(bytes)).ok()?;
    let mut block = |tag| decoder.find_tag(tag).ok()??.into_u8_vec().ok();
    let icc = block(Tag::IccProfile);
    let xmp = block(Tag::Unknown(TIFF_XMP_TAG));
    let mut ratio = |tag| match decoder.find_tag(tag).ok()?? {
        Value::Rational(n, d) if d != 0 => Some(f64::from(n) / f64::from(d)),
        _ => None,
    };
    let (x, y) = (ratio(Tag::XResolution), ratio(Tag::YResolution));
    // TIFF's default unit is the inch.
    let unit = match decoder.find_tag(Tag::ResolutionUnit) {
        Ok(Some(v)) => v.into_u16().ok(),
        Ok(None) => Some(2),
        Err(_) => None,
    };
    let unit = match unit {
        Some(2) => Some(ResolutionUnit::Inch),
        Some(3) => Some(ResolutionUnit::Centimetre),
        _ => None,
    };
    let resolution = match (x, y, unit) {
        (Some(x), Some(y), Some(unit)) => Resolution::checked(x, y, unit),
        _ => None,
    };
    Some(Metadata {
        icc,
        exif: None,
        xmp,
        resolution,
    })
}

/// The segments of a JPEG's header, SOI to the first scan: (marker, offset of its 0xFF, payload).
fn jpeg_segments(jpeg: &[u8]) -> impl Iterator<Item = (u8, usize, Range<usize>)> + '_ {
    let mut at = if jpeg.starts_with(&[0xFF, 0xD8]) {
        2
    } else {
        jpeg.len()
    };
    std::iter::from_fn(move || {
        loop {
            let &[0xFF, marker, hi, lo] = jpeg.get(at..at + 4)? else {
                return None;
            };
            match marker {
                // A fill byte before a marker.
                0xFF => at += 1,
                // Markers without a length.
                0x01 | 0xD0..=0xD8 => at += 2,
                // The scan, or the end.
                0xDA | 0xD9 => return None,
                _ => {
                    let len = usize::from(u16::from_be_bytes([hi, lo]));
                    let end = at + 2 + len;
                    if len < 2 || end > jpeg.len() {
                        return None;
                    }
                    let segment = (marker, at, at + 4..end);
                    at = end;
                    return Some(segment);
                }
            }
        }
    })
}

/// `jpeg` with an XMP segment after its leading JFIF and EXIF segments, where readers look.
/// The caller has checked that `xmp` fits one segment.
pub(crate) fn with_jpeg_xmp(jpeg: Vec<u8>, xmp: &[u8]) -> Vec<u8> {
    let at = jpeg_segments(&jpeg)
        .take_while(|(marker, _, _)| matches!(marker, 0xE0 | 0xE1))
        .last()
        .map_or(2, |(_, _, payload)| payload.end);
    let len = u16::try_from(2 + XMP_NAMESPACE.len() + xmp.len())
        .expect("the caller keeps XMP within one segment");
    let mut out = Vec::with_capacity(jpeg.len() + 4 + XMP_NAMESPACE.len() + xmp.len());
    out.extend_from_slice(&jpeg[..at]);
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(XMP_NAMESPACE);
    out.extend_from_slice(xmp);
    out.extend_from_slice(&jpeg[at..]);
    out
}

fn whole(v: f64) -> bool {
    (v - v.round()).abs() < 1e-6
}

impl Resolution {
    fn checked(x: f64, y: f64, unit: ResolutionUnit) -> Option<Self> {
        let valid = |v: f64| v.is_finite() && v > 0.0;
        (valid(x) && valid(y)).then_some(Resolution { x, y, unit })
    }

    /// Pixels per inch, x and y.
    pub fn per_inch(&self) -> (f64, f64) {
        match self.unit {
            ResolutionUnit::Inch => (self.x, self.y),
            ResolutionUnit::Centimetre => (self.x * 2.54, self.y * 2.54),
        }
    }

    /// PNG's pHYs: pixels per metre.
    pub(crate) fn to_png(self) -> png::PixelDimensions {
        let per_metre = |v: f64| match self.unit {
            ResolutionUnit::Inch => v / 0.0254,
            ResolutionUnit::Centimetre => v * 100.0,
        };
        let round = |v: f64| v.round().clamp(1.0, f64::from(u32::MAX)) as u32;
        png::PixelDimensions {
            xppu: round(per_metre(self.x)),
            yppu: round(per_metre(self.y)),
            unit: png::Unit::Meter,
        }
    }

    /// JFIF's density, whole numbers: per centimetre when it is whole there, else per inch
    /// (where the usual densities are whole: a PNG's 2835 per metre is 72.009 per inch).
    pub(crate) fn to_jfif(self) -> PixelDensity {
        let round = |v: f64| v.round().clamp(1.0, f64::from(u16::MAX)) as u16;
        if self.unit == ResolutionUnit::Centimetre && whole(self.x) && whole(self.y) {
            return PixelDensity {
                density: (round(self.x), round(self.y)),
                unit: PixelDensityUnit::Centimeters,
            };
        }
        let (x, y) = self.per_inch();
        PixelDensity {
            density: (round(x), round(y)),
            unit: PixelDensityUnit::Inches,
        }
    }

    /// TIFF's ResolutionUnit and its X and Y resolution, in the unit the input gave.
    pub(crate) fn to_tiff(
        self,
    ) -> (
        tiff::tags::ResolutionUnit,
        tiff::encoder::Rational,
        tiff::encoder::Rational,
    ) {
        let rational = |v: f64| {
            let d = if whole(v) { 1 } else { 1000 };
            let n = (v * f64::from(d)).round().clamp(1.0, f64::from(u32::MAX)) as u32;
            tiff::encoder::Rational { n, d }
        };
        let unit = match self.unit {
            ResolutionUnit::Inch => tiff::tags::ResolutionUnit::Inch,
            ResolutionUnit::Centimetre => tiff::tags::ResolutionUnit::Centimeter,
        };
        (unit, rational(self.x), rational(self.y))
    }
}

/// A TIFF value of type UNDEFINED, the type the TIFF/EP and ICC specifications give the
/// profile's tag (the tiff crate writes `[u8]` as BYTE).
pub(crate) struct TiffUndefined<'a>(pub &'a [u8]);

impl tiff::encoder::TiffValue for TiffUndefined<'_> {
    const BYTE_LEN: u8 = 1;
    const FIELD_TYPE: tiff::tags::Type = tiff::tags::Type::UNDEFINED;

    fn count(&self) -> usize {
        self.0.len()
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Image;
    use crate::io::{self, BitDepth};

    /// A profile header naming `space`: what the colour-space check reads.
    fn icc(space: &[u8; 4]) -> Vec<u8> {
        let mut icc = vec![0u8; 132];
        icc[..4].copy_from_slice(&132u32.to_be_bytes());
        icc[12..16].copy_from_slice(b"mntr");
        icc[16..20].copy_from_slice(space);
        icc[36..40].copy_from_slice(b"acsp");
        icc
    }

    /// EXIF whose IFD0 holds Orientation (SHORT) and Make (ASCII "test", stored after the IFD).
    fn exif(orientation: u16) -> Vec<u8> {
        let mut exif = b"II*\0\x08\0\0\0\x02\0".to_vec();
        exif.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0]);
        exif.extend_from_slice(&orientation.to_le_bytes());
        exif.extend_from_slice(&[0, 0]);
        exif.extend_from_slice(&[0x0f, 0x01, 2, 0, 5, 0, 0, 0, 38, 0, 0, 0]);
        exif.extend_from_slice(&[0, 0, 0, 0]);
        exif.extend_from_slice(b"test\0");
        exif
    }

    const XMP: &[u8] = br#"<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>"#;

    fn sample() -> Metadata {
        Metadata {
            icc: Some(icc(b"RGB ")),
            exif: Some(exif(1)),
            xmp: Some(XMP.to_vec()),
            resolution: Some(Resolution {
                x: 300.0,
                y: 150.0,
                unit: ResolutionUnit::Inch,
            }),
        }
    }

    fn picture() -> Image {
        Image::from_fn(3, 12, 20, |c, y, x| {
            ((c * 7 + y * 3 + x) % 11) as f32 / 10.0
        })
    }

    /// Encodes `picture()` with `meta` as `format`, checks what was dropped, and decodes it.
    fn round_trip(meta: &Metadata, format: ImageFormat, dropped: &[MetadataItem]) -> Metadata {
        let (bytes, gone) =
            io::encode_with_metadata(&picture(), None, BitDepth::Eight, format, meta).unwrap();
        let gone: Vec<_> = gone.iter().map(|d| (d.item, d.reason)).collect();
        let want: Vec<_> = dropped.iter().map(|&i| (i, DropReason::Format)).collect();
        assert_eq!(gone, want, "{format:?}");
        let name = format!("a.{}", format.extensions_str()[0]);
        let (loaded, back) =
            io::decode_with_metadata(&bytes, name, io::DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(loaded.image.shape(), (3, 12, 20));
        back
    }

    fn dpi(meta: &Metadata) -> (f64, f64) {
        meta.resolution.expect("a resolution").per_inch()
    }

    #[test]
    fn png_keeps_the_profile_exif_xmp_and_resolution() {
        let back = round_trip(&sample(), ImageFormat::Png, &[]);
        assert_eq!(back.icc, sample().icc);
        assert_eq!(back.exif, sample().exif);
        assert_eq!(back.xmp, sample().xmp);
        // 11811 and 5906 pixels per metre.
        let (x, y) = dpi(&back);
        assert!(
            (x - 300.0).abs() < 0.02 && (y - 150.0).abs() < 0.02,
            "{x} {y}"
        );
    }

    #[test]
    fn jpeg_keeps_the_profile_exif_xmp_and_resolution() {
        let back = round_trip(&sample(), ImageFormat::Jpeg, &[]);
        assert_eq!(back, sample());
        // Readers look for XMP among the first segments, before the image's tables.
        let (bytes, _) = io::encode_with_metadata(
            &picture(),
            None,
            BitDepth::Eight,
            ImageFormat::Jpeg,
            &sample(),
        )
        .unwrap();
        let markers: Vec<u8> = jpeg_segments(&bytes).map(|(m, _, _)| m).collect();
        assert_eq!(markers[..4], [0xE0, 0xE1, 0xE1, 0xE2], "{markers:x?}");
    }

    #[test]
    fn tiff_keeps_the_profile_xmp_and_resolution_and_drops_exif() {
        let back = round_trip(&sample(), ImageFormat::Tiff, &[MetadataItem::Exif]);
        assert_eq!(
            back,
            Metadata {
                exif: None,
                ..sample()
            }
        );
        let (bytes, _) = io::encode_with_metadata(
            &picture(),
            None,
            BitDepth::Eight,
            ImageFormat::Tiff,
            &sample(),
        )
        .unwrap();
        let mut decoder = tiff::decoder::Decoder::new(Cursor::new(bytes)).unwrap();
        let icc = decoder
            .find_tag(tiff::tags::Tag::IccProfile)
            .unwrap()
            .unwrap();
        assert_eq!(icc.into_u8_vec().unwrap(), sample().icc.unwrap());
    }

    #[test]
    fn webp_keeps_the_profile_exif_and_xmp_and_drops_the_resolution() {
        let back = round_trip(&sample(), ImageFormat::WebP, &[MetadataItem::Resolution]);
        assert_eq!(
            back,
            Metadata {
                resolution: None,
                ..sample()
            }
        );
    }

    #[test]
    fn bmp_drops_everything_and_says_so() {
        use MetadataItem::*;
        let back = round_trip(&sample(), ImageFormat::Bmp, &[Icc, Exif, Xmp, Resolution]);
        assert!(back.is_empty(), "{back:?}");
    }

    #[test]
    fn a_turned_photo_keeps_exif_saying_upright_and_its_resolution_turned() {
        let turned = Metadata {
            exif: Some(exif(6)),
            ..sample()
        };
        let (bytes, _) = io::encode_with_metadata(
            &picture(),
            None,
            BitDepth::Eight,
            ImageFormat::Jpeg,
            &turned,
        )
        .unwrap();
        let (loaded, back) =
            io::decode_with_metadata(&bytes, "t.jpg", io::DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(loaded.image.shape(), (3, 20, 12));
        assert_eq!(back.exif, Some(exif(1)));
        assert_eq!(dpi(&back), (150.0, 300.0));
        // Without the metadata the decode is the same.
        assert_eq!(
            io::decode_bytes(&bytes, "t.jpg", io::DEFAULT_MAX_PIXELS)
                .unwrap()
                .image,
            loaded.image
        );
    }

    #[test]
    fn each_format_keeps_what_it_can_and_names_the_rest() {
        let mut icc = vec![0u8; 132];
        icc[16..20].copy_from_slice(b"RGB ");
        let meta = Metadata {
            icc: Some(icc),
            exif: Some(b"II*\0\x08\0\0\0\0\0\0\0\0\0".to_vec()),
            xmp: Some(b"<x:xmpmeta/>".to_vec()),
            resolution: Some(Resolution {
                x: 300.0,
                y: 300.0,
                unit: ResolutionUnit::Inch,
            }),
        };
        let dropped = |format, channels| {
            let (kept, dropped) = meta.for_output(format, channels);
            let items: Vec<_> = dropped.iter().map(|d| d.item).collect();
            assert_eq!(kept.items().len() + items.len(), 4);
            dropped
        };
        assert!(dropped(ImageFormat::Png, 3).is_empty());
        assert!(dropped(ImageFormat::Jpeg, 3).is_empty());
        let format = |item| Dropped {
            item,
            reason: DropReason::Format,
        };
        assert_eq!(dropped(ImageFormat::Tiff, 3), [format(MetadataItem::Exif)]);
        assert_eq!(
            dropped(ImageFormat::WebP, 3),
            [format(MetadataItem::Resolution)]
        );
        assert_eq!(dropped(ImageFormat::Bmp, 3).len(), 4);
        // An RGB profile does not describe gray pixels.
        assert_eq!(
            dropped(ImageFormat::Png, 1),
            [Dropped {
                item: MetadataItem::Icc,
                reason: DropReason::ColourSpace
            }]
        );
        let big = Metadata {
            xmp: Some(vec![b' '; 70_000]),
            ..Metadata::default()
        };
        assert_eq!(
            big.for_output(ImageFormat::Jpeg, 3).1[0].reason,
            DropReason::TooLarge
        );
        assert!(big.for_output(ImageFormat::Png, 3).1.is_empty());
    }

    #[test]
    fn resolutions_convert_between_units_without_drift() {
        let png = Resolution {
            x: 28.35,
            y: 28.35,
            unit: ResolutionUnit::Centimetre,
        };
        assert_eq!(png.to_png().xppu, 2835);
        assert_eq!(png.to_jfif().density, (72, 72));
        assert_eq!(png.to_jfif().unit, PixelDensityUnit::Inches);
        let dpi = Resolution {
            x: 300.0,
            y: 150.0,
            unit: ResolutionUnit::Inch,
        };
        assert_eq!((dpi.to_png().xppu, dpi.to_png().yppu), (11811, 5906));
        assert_eq!(dpi.to_jfif().density, (300, 150));
        let (_, x, y) = dpi.to_tiff();
        assert_eq!((x.n, x.d, y.n, y.d), (300, 1, 150, 1));
        let (_, x, _) = png.to_tiff();
        assert_eq!((x.n, x.d), (28350, 1000));
    }

    #[test]
    fn exif_is_kept_upright_only_when_decoding_turned_the_pixels() {
        // IFD0 with one entry: Orientation (0x0112), SHORT, 1 value: 6.
        let exif = b"II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0\x06\0\0\0\0\0\0\0".to_vec();
        let turned = upright_exif(exif.clone(), Orientation::Rotate90).unwrap();
        assert_eq!(
            Orientation::from_exif_chunk(&turned),
            Some(Orientation::NoTransforms)
        );
        let prefixed = [b"Exif\0\0".as_slice(), &exif].concat();
        assert_eq!(
            upright_exif(prefixed, Orientation::NoTransforms).unwrap(),
            exif
        );
        assert_eq!(upright_exif(b"junk".to_vec(), Orientation::Rotate90), None);
    }
}
