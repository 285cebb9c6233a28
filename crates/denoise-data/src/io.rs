//! Image files in and out: decoding PNG, JPEG, TIFF, BMP and WebP to planar f32 with alpha kept
//! aside, refusing oversized images before decoding, and atomic writes at the original bit depth
//! with the metadata the format holds.

use std::borrow::Cow;
use std::fs;
use std::io::{BufRead, BufReader, Cursor, Seek, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use image::codecs::jpeg::JpegEncoder;
use image::metadata::Orientation;
use image::{
    ColorType, DynamicImage, ImageBuffer, ImageDecoder, ImageEncoder, ImageError, ImageReader,
    Limits,
};
use serde::{Deserialize, Serialize};

pub use image::ImageFormat;

use crate::metadata::{self, Dropped, Metadata, Resolution};
use crate::{DataError, Image, Result};

/// Images with more pixels than this are refused unless a caller raises the limit: 100 MP is
/// far beyond any training image, and a forged header must not make us allocate gigabytes.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

/// Quality for JPEG output; high because results are compared against references.
pub const JPEG_QUALITY: u8 = 95;

/// Bits per sample of a file, remembered so results go back at the depth they came in.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(into = "u8", try_from = "u8")]
pub enum BitDepth {
    /// 8 bits per sample (256 levels).
    #[default]
    Eight,
    /// 16 bits per sample (65536 levels).
    Sixteen,
}

impl BitDepth {
    /// 8 or 16.
    pub fn bits(self) -> u8 {
        match self {
            BitDepth::Eight => 8,
            BitDepth::Sixteen => 16,
        }
    }

    /// The largest sample value: 255 or 65535.
    pub fn max_level(self) -> f32 {
        match self {
            BitDepth::Eight => 255.0,
            BitDepth::Sixteen => 65535.0,
        }
    }
}

impl From<BitDepth> for u8 {
    fn from(depth: BitDepth) -> u8 {
        depth.bits()
    }
}

impl TryFrom<u8> for BitDepth {
    type Error = String;
    fn try_from(bits: u8) -> std::result::Result<Self, String> {
        match bits {
            8 => Ok(BitDepth::Eight),
            16 => Ok(BitDepth::Sixteen),
            _ => Err(format!("unsupported bit depth {bits}; expected 8 or 16")),
        }
    }
}

impl std::fmt::Display for BitDepth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-bit", self.bits())
    }
}

/// Samples at the file's own depth.
#[derive(Clone, Debug, PartialEq)]
pub enum Samples {
    U8(Vec<u8>),
    U16(Vec<u16>),
}

impl Samples {
    pub fn len(&self) -> usize {
        match self {
            Samples::U8(v) => v.len(),
            Samples::U16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bit_depth(&self) -> BitDepth {
        match self {
            Samples::U8(_) => BitDepth::Eight,
            Samples::U16(_) => BitDepth::Sixteen,
        }
    }

    /// Heap bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Samples::U8(v) => v.len(),
            Samples::U16(v) => 2 * v.len(),
        }
    }
}

// One conversion for every path (whole images, crops, alpha) so that a patch cropped from a
// cached raw image is bit-identical to the same window of the loaded f32 image.
#[inline]
fn u8_to_f32(v: u8) -> f32 {
    f32::from(v) / 255.0
}

#[inline]
fn u16_to_f32(v: u16) -> f32 {
    f32::from(v) / 65535.0
}

/// A decoded image before conversion to f32: colour samples interleaved (HWC) at the file's own
/// depth, alpha separate. The streaming loader caches these because they take a quarter (8-bit)
/// or half (16-bit) of the memory of the f32 image.
#[derive(Clone, Debug, PartialEq)]
pub struct RawImage {
    width: usize,
    height: usize,
    channels: usize,
    samples: Samples,
    alpha: Option<Samples>,
    format: ImageFormat,
}

impl RawImage {
    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    /// Colour channels: 1 (gray) or 3 (RGB). Alpha is never counted here.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// `height * width * channels` samples, interleaved (HWC).
    pub fn samples(&self) -> &Samples {
        &self.samples
    }

    /// `height * width` alpha samples (same depth as the colour), if the file had alpha.
    pub fn alpha(&self) -> Option<&Samples> {
        self.alpha.as_ref()
    }

    pub fn format(&self) -> ImageFormat {
        self.format
    }

    pub fn bit_depth(&self) -> BitDepth {
        self.samples.bit_depth()
    }

    /// Heap bytes held (what the loader's cache budget counts).
    pub fn bytes(&self) -> usize {
        self.samples.bytes() + self.alpha.as_ref().map_or(0, Samples::bytes)
    }

    /// Drops the alpha plane (the loader trains on colour only).
    pub fn without_alpha(mut self) -> Self {
        self.alpha = None;
        self
    }

    /// The `h x w` window at `(y, x)` as a planar f32 image in `[0, 1]`, with the image's own
    /// channels.
    ///
    /// # Shapes
    /// Returns `channels x h x w`.
    pub fn crop(&self, y: usize, x: usize, h: usize, w: usize) -> Result<Image> {
        if y + h > self.height || x + w > self.width {
            return Err(DataError::Shape(format!(
                "crop {h}x{w} at ({y}, {x}) outside a {}x{} image",
                self.height, self.width
            )));
        }
        let mut data = vec![0.0f32; self.channels * h * w];
        Window {
            width: self.width,
            channels: self.channels,
            y,
            x,
            h,
            w,
        }
        .convert(&self.samples, &mut data);
        Image::new(self.channels, h, w, data)
    }

    /// The whole image as planar f32 in `[0, 1]`.
    pub fn to_image(&self) -> Image {
        let mut data = vec![0.0f32; self.channels * self.height * self.width];
        Window {
            width: self.width,
            channels: self.channels,
            y: 0,
            x: 0,
            h: self.height,
            w: self.width,
        }
        .convert(&self.samples, &mut data);
        Image::new(self.channels, self.height, self.width, data)
            .expect("raw image samples match its dimensions")
    }

    /// Alpha in `[0, 1]`, `height * width` values.
    pub fn alpha_f32(&self) -> Option<Vec<f32>> {
        self.alpha.as_ref().map(|a| match a {
            Samples::U8(v) => v.iter().map(|&s| u8_to_f32(s)).collect(),
            Samples::U16(v) => v.iter().map(|&s| u16_to_f32(s)).collect(),
        })
    }

    /// Converts to the f32 form the rest of the toolkit uses.
    pub fn into_loaded(self) -> LoadedImage {
        LoadedImage {
            image: self.to_image(),
            alpha: self.alpha_f32(),
            bit_depth: self.bit_depth(),
            format: self.format,
        }
    }
}

/// A rectangle of an interleaved buffer.
struct Window {
    width: usize,
    channels: usize,
    y: usize,
    x: usize,
    h: usize,
    w: usize,
}

impl Window {
    /// Converts the window of `src` into planes of `out`; the loader runs this for every patch,
    /// so the common layouts get loops the compiler can keep free of bounds checks.
    fn deinterleave<T: Copy>(&self, src: &[T], out: &mut [f32], f: impl Fn(T) -> f32) {
        let (c, w) = (self.channels, self.w);
        let plane = self.h * w;
        let rows = (0..self.h).map(|row| {
            let start = ((self.y + row) * self.width + self.x) * c;
            (row * w, &src[start..start + w * c])
        });
        match c {
            1 => {
                for (o, src_row) in rows {
                    for (d, &s) in out[o..o + w].iter_mut().zip(src_row) {
                        *d = f(s);
                    }
                }
            }
            3 => {
                let (p0, rest) = out.split_at_mut(plane);
                let (p1, p2) = rest.split_at_mut(plane);
                for (o, src_row) in rows {
                    let dst = p0[o..o + w]
                        .iter_mut()
                        .zip(&mut p1[o..o + w])
                        .zip(&mut p2[o..o + w]);
                    for (((r, g), b), px) in dst.zip(src_row.chunks_exact(3)) {
                        *r = f(px[0]);
                        *g = f(px[1]);
                        *b = f(px[2]);
                    }
                }
            }
            _ => {
                for (o, src_row) in rows {
                    for (col, px) in src_row.chunks_exact(c).enumerate() {
                        for (ch, &s) in px.iter().enumerate() {
                            out[ch * plane + o + col] = f(s);
                        }
                    }
                }
            }
        }
    }

    fn convert(&self, samples: &Samples, out: &mut [f32]) {
        match samples {
            Samples::U8(s) => {
                // A table lookup instead of a division per sample; built from the same function,
                // so the values are identical.
                let lut: [f32; 256] = std::array::from_fn(|i| u8_to_f32(i as u8));
                self.deinterleave(s, out, |v| lut[usize::from(v)]);
            }
            Samples::U16(s) => self.deinterleave(s, out, u16_to_f32),
        }
    }
}

/// A decoded image file: colour as planar f32 in `[0, 1]`, alpha aside.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedImage {
    /// 1 (gray) or 3 (RGB) channels.
    pub image: Image,
    /// `height * width` alpha values in `[0, 1]`, if the file had alpha; restore it on write.
    pub alpha: Option<Vec<f32>>,
    pub bit_depth: BitDepth,
    pub format: ImageFormat,
}

/// What a file's header says, read without decoding the pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub width: u32,
    pub height: u32,
    /// Colour channels: 1 or 3.
    pub channels: usize,
    pub has_alpha: bool,
    pub bit_depth: BitDepth,
    pub format: ImageFormat,
}

impl ImageInfo {
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// Reads a whole file, telling an empty file apart from an unreadable one.
pub fn read_file(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    let bytes = fs::read(path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(DataError::EmptyFile { path: path.into() });
    }
    Ok(bytes)
}

/// Loads an image file with the default pixel limit.
pub fn load(path: impl AsRef<Path>) -> Result<LoadedImage> {
    load_with_limit(path, DEFAULT_MAX_PIXELS)
}

/// Loads an image file, refusing images of more than `max_pixels` pixels before decoding them.
pub fn load_with_limit(path: impl AsRef<Path>, max_pixels: u64) -> Result<LoadedImage> {
    load_raw(path, max_pixels).map(RawImage::into_loaded)
}

/// Loads an image file at its own depth, without converting to f32.
pub fn load_raw(path: impl AsRef<Path>, max_pixels: u64) -> Result<RawImage> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    decode_raw(&bytes, path, max_pixels)
}

/// Decodes an in-memory file (an upload, say). `name` is used in error messages and, when the
/// content has no recognisable signature, its extension picks the format.
pub fn decode_bytes(bytes: &[u8], name: impl AsRef<Path>, max_pixels: u64) -> Result<LoadedImage> {
    decode_raw(bytes, name, max_pixels).map(RawImage::into_loaded)
}

/// Like [`decode_bytes`] but keeps the samples at their own depth.
pub fn decode_raw(bytes: &[u8], name: impl AsRef<Path>, max_pixels: u64) -> Result<RawImage> {
    decode_with(bytes, name.as_ref(), max_pixels, false).map(|(raw, _)| raw)
}

/// [`load_with_limit`] with what the file carries besides its pixels, for
/// [`save_with_metadata`] to write with the result.
pub fn load_with_metadata(
    path: impl AsRef<Path>,
    max_pixels: u64,
) -> Result<(LoadedImage, Metadata)> {
    let path = path.as_ref();
    decode_with_metadata(&read_file(path)?, path, max_pixels)
}

/// [`decode_bytes`] with what the file carries besides its pixels, for
/// [`encode_with_metadata`] to write with the result.
pub fn decode_with_metadata(
    bytes: &[u8],
    name: impl AsRef<Path>,
    max_pixels: u64,
) -> Result<(LoadedImage, Metadata)> {
    decode_with(bytes, name.as_ref(), max_pixels, true)
        .map(|(raw, metadata)| (raw.into_loaded(), metadata))
}

/// Decodes, reading the metadata only when asked (the training loader never wants it).
fn decode_with(
    bytes: &[u8],
    name: &Path,
    max_pixels: u64,
    with_metadata: bool,
) -> Result<(RawImage, Metadata)> {
    if bytes.is_empty() {
        return Err(DataError::EmptyFile { path: name.into() });
    }
    let (reader, format) = reader_for(Cursor::new(bytes), name)?;
    if format == ImageFormat::Jpeg {
        check_jpeg_end(name, bytes)?;
    }
    let mut decoder = open_decoder(reader, name)?;
    let (width, height) = decoder.dimensions();
    if format == ImageFormat::WebP && (width == 0 || height == 0) {
        return Err(webp_side_of_16384(name, width, height, max_pixels));
    }
    check_pixels(name, width, height, max_pixels)?;
    decoder
        .set_limits(alloc_limits(max_pixels))
        .map_err(|e| image_error(name, e))?;
    let orientation = orientation(&mut decoder);
    let metadata = if with_metadata {
        metadata::read(&mut decoder, bytes, format, orientation)
    } else {
        Metadata::default()
    };
    // Decoders are meant to fail cleanly on hostile input; should one panic anyway, an upload
    // must not take the server (or a loader worker) down with it.
    let mut decoded = catch_unwind(AssertUnwindSafe(|| DynamicImage::from_decoder(decoder)))
        .map_err(|_| DataError::Decode {
            path: name.into(),
            message: "the decoder panicked on this file".into(),
        })?
        .map_err(|e| image_error(name, e))?;
    decoded.apply_orientation(orientation);
    Ok((raw_from_dynamic(decoded, format), metadata))
}

/// The decoder for `reader`'s format, its header read. A decoder can panic on a malformed
/// header (the TIFF decoder indexes an empty SampleFormat list), which must end as this file's
/// error, not the process.
fn open_decoder<'a, R: BufRead + Seek + 'a>(
    reader: ImageReader<R>,
    name: &Path,
) -> Result<impl ImageDecoder + 'a> {
    catch_unwind(AssertUnwindSafe(|| reader.into_decoder()))
        .map_err(|_| DataError::Decode {
            path: name.into(),
            message: "the decoder panicked on this file's header".into(),
        })?
        .map_err(|e| image_error(name, e))
}

/// The WebP decoder reads a lossless image's side of 16384 pixels, the largest its header
/// holds, as 0 (a lossy side of 0 it refuses itself): said as what it is, an image too large,
/// for the pixel limit or for the decoder.
fn webp_side_of_16384(name: &Path, width: u32, height: u32, max_pixels: u64) -> DataError {
    let side = |s: u32| if s == 0 { 16384 } else { s };
    let (width, height) = (side(width), side(height));
    if let Err(too_large) = check_pixels(name, width, height, max_pixels) {
        return too_large;
    }
    DataError::Unsupported {
        path: name.into(),
        message: format!(
            "the image is {width}x{height}: a WebP side of 16384 pixels is more than this \
             build's decoder reads (at most 16383)"
        ),
    }
}

/// Refuses a JPEG whose data stops before its end-of-image marker: the decoder fills what is
/// missing with gray and says nothing, so a truncated download would be denoised and scored as
/// if whole. The segments are walked up to the first scan; past it, an `FF D9` can only be the
/// marker (the coded data stuffs every `FF` byte), so one found anywhere after (bytes may
/// follow it) means the data is whole. An `FF D9` inside an earlier segment (an EXIF thumbnail's)
/// is skipped with its segment.
fn check_jpeg_end(name: &Path, bytes: &[u8]) -> Result<()> {
    const SOS: u8 = 0xda;
    let truncated = || DataError::Decode {
        path: name.into(),
        message: "the JPEG data ends before its end-of-image marker (a truncated file?)".into(),
    };
    if !bytes.starts_with(&[0xff, 0xd8]) {
        // Named .jpg but without the start-of-image marker: the decoder says what is wrong.
        return Ok(());
    }
    // After the start-of-image marker, segments are `FF kind length(2) ...`, up to the scan.
    let mut at = 2;
    loop {
        let Some(&[0xff, kind, hi, lo]) = bytes.get(at..at + 4) else {
            // Not the layout we know, or the headers themselves cut short: the decoder says so.
            return Ok(());
        };
        match kind {
            // Fill bytes before a marker.
            0xff => at += 1,
            // Markers without a length.
            0x01 | 0xd0..=0xd8 => at += 2,
            // Ends before any scan: the decoder says so.
            0xd9 => return Ok(()),
            _ => {
                at += 2 + usize::from(u16::from_be_bytes([hi, lo]));
                if kind == SOS {
                    break;
                }
            }
        }
    }
    let scan = bytes.get(at..).ok_or_else(truncated)?;
    if scan.windows(2).any(|w| w == [0xff, 0xd9]) {
        Ok(())
    } else {
        Err(truncated())
    }
}

/// The EXIF orientation `decoder` reports, applied on load so that a portrait photo is
/// denoised and saved upright (the EXIF kept for its output says so). Unreadable metadata, or a
/// decoder that panics on it, leaves the pixels as stored.
fn orientation(decoder: &mut impl ImageDecoder) -> Orientation {
    catch_unwind(AssertUnwindSafe(|| decoder.orientation()))
        .ok()
        .and_then(Result::ok)
        .unwrap_or(Orientation::NoTransforms)
}

/// Reads only the header of a file: dimensions, channels, alpha, depth and format.
pub fn probe(path: impl AsRef<Path>) -> Result<ImageInfo> {
    let path = path.as_ref();
    let file = fs::File::open(path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| DataError::Io {
            path: path.into(),
            source,
        })?
        .len();
    if len == 0 {
        return Err(DataError::EmptyFile { path: path.into() });
    }
    let (reader, format) = reader_for(BufReader::new(file), path)?;
    let mut decoder = open_decoder(reader, path)?;
    let (mut width, mut height) = decoder.dimensions();
    // As `load` will show it: turned upright by its EXIF orientation.
    if matches!(
        orientation(&mut decoder),
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    ) {
        std::mem::swap(&mut width, &mut height);
    }
    let color = decoder.color_type();
    Ok(ImageInfo {
        width,
        height,
        channels: if color.has_color() { 3 } else { 1 },
        has_alpha: color.has_alpha(),
        bit_depth: depth_of(color),
        format,
    })
}

fn depth_of(color: ColorType) -> BitDepth {
    // Float formats are stored as 16-bit after decoding (see `raw_from_dynamic`).
    if color.bytes_per_pixel() / color.channel_count() > 1 {
        BitDepth::Sixteen
    } else {
        BitDepth::Eight
    }
}

fn reader_for<R: BufRead + Seek>(inner: R, name: &Path) -> Result<(ImageReader<R>, ImageFormat)> {
    let mut reader = ImageReader::new(inner)
        .with_guessed_format()
        .map_err(|source| DataError::Io {
            path: name.into(),
            source,
        })?;
    // The header limit is ours (pixels, checked right after); the crate's own allocation limit
    // would otherwise reject big-but-allowed images with a less helpful message.
    reader.no_limits();
    let format = match reader.format() {
        Some(f) => f,
        None => match ImageFormat::from_path(name) {
            Ok(f) => {
                reader.set_format(f);
                f
            }
            Err(_) => {
                return Err(DataError::Unsupported {
                    path: name.into(),
                    message: "neither the content nor the extension names a known image format"
                        .into(),
                });
            }
        },
    };
    Ok((reader, format))
}

fn check_pixels(name: &Path, width: u32, height: u32, max_pixels: u64) -> Result<()> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(DataError::TooLarge {
            path: name.into(),
            width: width.into(),
            height: height.into(),
            pixels,
            limit: max_pixels,
        });
    }
    if pixels == 0 {
        return Err(DataError::Decode {
            path: name.into(),
            message: "the image has no pixels".into(),
        });
    }
    Ok(())
}

fn alloc_limits(max_pixels: u64) -> Limits {
    let mut limits = Limits::default();
    // Room for the largest allowed image at RGBA 16-bit plus decoder scratch space.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(256 << 20));
    limits
}

fn image_error(name: &Path, e: ImageError) -> DataError {
    match e {
        ImageError::Unsupported(u) => DataError::Unsupported {
            path: name.into(),
            message: one_line(&u.to_string()),
        },
        ImageError::IoError(source) => {
            // The data is in memory or already open, so an i/o error here is a short read.
            DataError::Decode {
                path: name.into(),
                message: one_line(&source.to_string()),
            }
        }
        other => DataError::Decode {
            path: name.into(),
            message: one_line(&other.to_string()),
        },
    }
}

/// A decoder's message on one line: some end theirs with a line break (the JPEG decoder's
/// "Not enough bytes"), which would split an error naming the file over two lines.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn split_alpha<T: Copy>(interleaved: Vec<T>, channels_with_alpha: usize) -> (Vec<T>, Vec<T>) {
    let colour = channels_with_alpha - 1;
    let pixels = interleaved.len() / channels_with_alpha;
    let mut c = Vec::with_capacity(pixels * colour);
    let mut a = Vec::with_capacity(pixels);
    for px in interleaved.chunks_exact(channels_with_alpha) {
        c.extend_from_slice(&px[..colour]);
        a.push(px[colour]);
    }
    (c, a)
}

fn raw_from_dynamic(img: DynamicImage, format: ImageFormat) -> RawImage {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let (channels, samples, alpha) = match img {
        DynamicImage::ImageLuma8(b) => (1, Samples::U8(b.into_raw()), None),
        DynamicImage::ImageRgb8(b) => (3, Samples::U8(b.into_raw()), None),
        DynamicImage::ImageLumaA8(b) => {
            let (c, a) = split_alpha(b.into_raw(), 2);
            (1, Samples::U8(c), Some(Samples::U8(a)))
        }
        DynamicImage::ImageRgba8(b) => {
            let (c, a) = split_alpha(b.into_raw(), 4);
            (3, Samples::U8(c), Some(Samples::U8(a)))
        }
        DynamicImage::ImageLuma16(b) => (1, Samples::U16(b.into_raw()), None),
        DynamicImage::ImageRgb16(b) => (3, Samples::U16(b.into_raw()), None),
        DynamicImage::ImageLumaA16(b) => {
            let (c, a) = split_alpha(b.into_raw(), 2);
            (1, Samples::U16(c), Some(Samples::U16(a)))
        }
        DynamicImage::ImageRgba16(b) => {
            let (c, a) = split_alpha(b.into_raw(), 4);
            (3, Samples::U16(c), Some(Samples::U16(a)))
        }
        // Float (and any future) layouts: 16 bits keep far more precision than training uses.
        other => {
            let color = other.color();
            let converted = match (color.has_color(), color.has_alpha()) {
                (true, true) => DynamicImage::ImageRgba16(other.to_rgba16()),
                (true, false) => DynamicImage::ImageRgb16(other.to_rgb16()),
                (false, true) => DynamicImage::ImageLumaA16(other.to_luma_alpha16()),
                (false, false) => DynamicImage::ImageLuma16(other.to_luma16()),
            };
            return raw_from_dynamic(converted, format);
        }
    };
    RawImage {
        width,
        height,
        channels,
        samples,
        alpha,
        format,
    }
}

/// Rounds `v` (clipped to `[0, 1]`) to the nearest of `max_level + 1` levels; NaN becomes 0.
#[inline]
fn to_level(v: f32, max_level: f32) -> f32 {
    if v.is_nan() {
        0.0
    } else {
        (v.clamp(0.0, 1.0) * max_level).round()
    }
}

/// Clips to `[0, 1]` and rounds every sample to the nearest level of `depth`: what writing the
/// image at that depth and reading it back gives.
pub fn quantize(image: &Image, depth: BitDepth) -> Image {
    let max = depth.max_level();
    let mut out = image.clone();
    for v in out.data_mut() {
        *v = to_level(*v, max) / max;
    }
    out
}

/// [`quantize`] to 256 levels, as evaluation on 8-bit outputs needs.
pub fn quantize_8bit(image: &Image) -> Image {
    quantize(image, BitDepth::Eight)
}

/// The deepest samples `format` can be written with, or `None` if it cannot be written here.
pub fn max_depth(format: ImageFormat) -> Option<BitDepth> {
    match format {
        ImageFormat::Png | ImageFormat::Tiff => Some(BitDepth::Sixteen),
        ImageFormat::Jpeg | ImageFormat::Bmp | ImageFormat::WebP => Some(BitDepth::Eight),
        _ => None,
    }
}

/// Checks, before any work, that an image of `channels` colour channels (with alpha or not) and
/// `depth` can be written to `path` (its extension decides the format): the error [`save`] would
/// give, without the image.
pub fn check_output(path: &Path, channels: usize, has_alpha: bool, depth: BitDepth) -> Result<()> {
    let format = ImageFormat::from_path(path).map_err(|_| DataError::Unsupported {
        path: path.into(),
        message: "unknown extension; use .png, .tif, .bmp, .jpg or .webp".into(),
    })?;
    check_writable(path, format, channels, has_alpha, depth)
}

fn check_writable(
    name: &Path,
    format: ImageFormat,
    channels: usize,
    has_alpha: bool,
    depth: BitDepth,
) -> Result<()> {
    let unsupported = |message: String| {
        Err(DataError::Unsupported {
            path: name.into(),
            message,
        })
    };
    let Some(deepest) = max_depth(format) else {
        return unsupported(format!(
            "cannot write {format:?} files; use png, tiff, bmp, jpeg or webp"
        ));
    };
    if depth > deepest {
        return unsupported(format!(
            "{format:?} stores at most {deepest} samples, not {depth}; save as png or tiff"
        ));
    }
    if has_alpha && format == ImageFormat::Jpeg {
        return unsupported("jpeg has no alpha channel; save as png or drop the alpha".into());
    }
    // The BMP writer would drop the alpha silently; the TIFF writer refuses.
    if has_alpha && channels == 1 && matches!(format, ImageFormat::Tiff | ImageFormat::Bmp) {
        return unsupported(format!(
            "the {} writer cannot store gray+alpha; save as png",
            format!("{format:?}").to_lowercase()
        ));
    }
    Ok(())
}

fn interleave<T>(image: &Image, alpha: Option<&[f32]>, f: impl Fn(f32) -> T) -> Vec<T> {
    let planes: Vec<&[f32]> = (0..image.channels())
        .map(|c| image.plane(c))
        .chain(alpha)
        .collect();
    let mut out = Vec::with_capacity(image.pixels() * planes.len());
    for i in 0..image.pixels() {
        for p in &planes {
            out.push(f(p[i]));
        }
    }
    out
}

fn to_dynamic(
    name: &Path,
    image: &Image,
    alpha: Option<&[f32]>,
    depth: BitDepth,
) -> Result<DynamicImage> {
    let (c, h, w) = image.shape();
    let encode_err = |message: String| DataError::Encode {
        path: name.into(),
        message,
    };
    if c != 1 && c != 3 {
        return Err(encode_err(format!(
            "{c} channels; only 1 (gray) or 3 (rgb) can be written"
        )));
    }
    if let Some(a) = alpha
        && a.len() != h * w
    {
        return Err(encode_err(format!(
            "{} alpha values for a {h}x{w} image",
            a.len()
        )));
    }
    let (w, h) = match (u32::try_from(w), u32::try_from(h)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => return Err(encode_err(format!("{h}x{w} is too large to write"))),
    };
    let bad_len = || encode_err("sample count does not match the dimensions".into());
    let img = match depth {
        BitDepth::Eight => {
            let buf = interleave(image, alpha, |v| to_level(v, 255.0) as u8);
            match (c, alpha.is_some()) {
                (1, false) => {
                    DynamicImage::ImageLuma8(ImageBuffer::from_raw(w, h, buf).ok_or_else(bad_len)?)
                }
                (1, true) => {
                    DynamicImage::ImageLumaA8(ImageBuffer::from_raw(w, h, buf).ok_or_else(bad_len)?)
                }
                (_, false) => {
                    DynamicImage::ImageRgb8(ImageBuffer::from_raw(w, h, buf).ok_or_else(bad_len)?)
                }
                (_, true) => {
                    DynamicImage::ImageRgba8(ImageBuffer::from_raw(w, h, buf).ok_or_else(bad_len)?)
                }
            }
        }
        BitDepth::Sixteen => {
            let buf = interleave(image, alpha, |v| to_level(v, 65535.0) as u16);
            match (c, alpha.is_some()) {
                (1, false) => {
                    DynamicImage::ImageLuma16(ImageBuffer::from_raw(w, h, buf).ok_or_else(bad_len)?)
                }
                (1, true) => DynamicImage::ImageLumaA16(
                    ImageBuffer::from_raw(w, h, buf).ok_or_else(bad_len)?,
                ),
                (_, false) => {
                    DynamicImage::ImageRgb16(ImageBuffer::from_raw(w, h, buf).ok_or_else(bad_len)?)
                }
                (_, true) => {
                    DynamicImage::ImageRgba16(ImageBuffer::from_raw(w, h, buf).ok_or_else(bad_len)?)
                }
            }
        }
    };
    Ok(img)
}

fn encode_named(
    name: &Path,
    image: &Image,
    alpha: Option<&[f32]>,
    depth: BitDepth,
    format: ImageFormat,
) -> Result<Vec<u8>> {
    encode_named_with(name, image, alpha, depth, format, &Metadata::default())
        .map(|(bytes, _)| bytes)
}

/// Encodes with what of `meta` the format holds; returns the file and what it goes without.
fn encode_named_with(
    name: &Path,
    image: &Image,
    alpha: Option<&[f32]>,
    depth: BitDepth,
    format: ImageFormat,
    meta: &Metadata,
) -> Result<(Vec<u8>, Vec<Dropped>)> {
    check_writable(name, format, image.channels(), alpha.is_some(), depth)?;
    let img = to_dynamic(name, image, alpha, depth)?;
    // WebP and BMP store gray as RGB.
    let stored_channels = match format {
        ImageFormat::WebP | ImageFormat::Bmp => 3,
        _ => image.channels(),
    };
    let (kept, dropped) = meta.for_output(format, stored_channels);
    let bytes = match format {
        ImageFormat::Png => write_png(&img, &kept),
        ImageFormat::Jpeg => write_jpeg(&img, &kept).map_err(|e| e.to_string()),
        ImageFormat::Tiff => write_tiff(&img, &kept).map_err(|e| e.to_string()),
        ImageFormat::WebP => write_webp(&img, &kept),
        _ => {
            let mut buf = Cursor::new(Vec::new());
            img.write_to(&mut buf, format)
                .map(|()| buf.into_inner())
                .map_err(|e| e.to_string())
        }
    }
    .map_err(|message| DataError::Encode {
        path: name.into(),
        message,
    })?;
    Ok((bytes, dropped))
}

/// PNG through the `png` crate itself: unlike the `image` crate's encoder it writes a
/// resolution (pHYs) and XMP (an iTXt chunk). Compression and filter are `image`'s defaults.
fn write_png(img: &DynamicImage, meta: &Metadata) -> std::result::Result<Vec<u8>, String> {
    use png::{BitDepth as Bits, ColorType as Colour};
    let (colour, bits) = match img.color() {
        ColorType::L8 => (Colour::Grayscale, Bits::Eight),
        ColorType::La8 => (Colour::GrayscaleAlpha, Bits::Eight),
        ColorType::Rgb8 => (Colour::Rgb, Bits::Eight),
        ColorType::Rgba8 => (Colour::Rgba, Bits::Eight),
        ColorType::L16 => (Colour::Grayscale, Bits::Sixteen),
        ColorType::La16 => (Colour::GrayscaleAlpha, Bits::Sixteen),
        ColorType::Rgb16 => (Colour::Rgb, Bits::Sixteen),
        ColorType::Rgba16 => (Colour::Rgba, Bits::Sixteen),
        other => return Err(format!("cannot write {other:?} as png")),
    };
    let mut info = png::Info::with_size(img.width(), img.height());
    info.icc_profile = meta.icc.as_deref().map(Cow::Borrowed);
    info.exif_metadata = meta.exif.as_deref().map(Cow::Borrowed);
    info.pixel_dims = meta.resolution.map(Resolution::to_png);
    let mut out = Vec::new();
    let mut encoder = png::Encoder::with_info(&mut out, info).map_err(|e| e.to_string())?;
    encoder.set_color(colour);
    encoder.set_depth(bits);
    encoder.set_compression(png::Compression::Fast);
    encoder.set_filter(png::Filter::Adaptive);
    if let Some(xmp) = &meta.xmp {
        // `for_output` has kept only UTF-8.
        let text = String::from_utf8_lossy(xmp).into_owned();
        encoder
            .add_itxt_chunk(metadata::PNG_XMP_KEYWORD.into(), text)
            .map_err(|e| e.to_string())?;
    }
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    let samples: Cow<'_, [u8]> = match bits {
        // PNG stores 16-bit samples big-endian; the buffer holds them native-endian.
        Bits::Sixteen => img
            .as_bytes()
            .chunks_exact(2)
            .flat_map(|b| u16::from_ne_bytes([b[0], b[1]]).to_be_bytes())
            .collect(),
        _ => Cow::Borrowed(img.as_bytes()),
    };
    writer
        .write_image_data(&samples)
        .and_then(|()| writer.finish())
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// JPEG through the `image` crate's encoder (ICC, EXIF and JFIF density), with XMP added as
/// the segment that encoder does not write.
fn write_jpeg(img: &DynamicImage, meta: &Metadata) -> image::ImageResult<Vec<u8>> {
    let mut buf = Cursor::new(Vec::new());
    let mut encoder = JpegEncoder::new_with_quality(&mut buf, JPEG_QUALITY);
    if let Some(resolution) = meta.resolution {
        encoder.set_pixel_density(resolution.to_jfif());
    }
    if let Some(icc) = &meta.icc {
        encoder
            .set_icc_profile(icc.clone())
            .map_err(ImageError::Unsupported)?;
    }
    if let Some(exif) = &meta.exif {
        encoder
            .set_exif_metadata(exif.clone())
            .map_err(ImageError::Unsupported)?;
    }
    img.write_with_encoder(encoder)?;
    let jpeg = buf.into_inner();
    Ok(match &meta.xmp {
        Some(xmp) => metadata::with_jpeg_xmp(jpeg, xmp),
        None => jpeg,
    })
}

/// TIFF through the `tiff` crate, whose directory takes the ICC profile, XMP and resolution
/// tags (the `image` crate's encoder writes none of them).
fn write_tiff(img: &DynamicImage, meta: &Metadata) -> tiff::TiffResult<Vec<u8>> {
    use tiff::encoder::colortype::{Gray8, Gray16, RGB8, RGB16, RGBA8, RGBA16};
    let mut out = Cursor::new(Vec::new());
    let mut encoder = tiff::encoder::TiffEncoder::new(&mut out)?;
    let size = (img.width(), img.height());
    match img {
        DynamicImage::ImageLuma8(b) => tiff_image::<_, Gray8>(&mut encoder, size, b, meta),
        DynamicImage::ImageRgb8(b) => tiff_image::<_, RGB8>(&mut encoder, size, b, meta),
        DynamicImage::ImageRgba8(b) => tiff_image::<_, RGBA8>(&mut encoder, size, b, meta),
        DynamicImage::ImageLuma16(b) => tiff_image::<_, Gray16>(&mut encoder, size, b, meta),
        DynamicImage::ImageRgb16(b) => tiff_image::<_, RGB16>(&mut encoder, size, b, meta),
        DynamicImage::ImageRgba16(b) => tiff_image::<_, RGBA16>(&mut encoder, size, b, meta),
        other => Err(tiff::TiffError::IoError(std::io::Error::other(format!(
            "cannot write {:?} as tiff",
            other.color()
        )))),
    }?;
    Ok(out.into_inner())
}

fn tiff_image<W: Write + Seek, C: tiff::encoder::colortype::ColorType>(
    encoder: &mut tiff::encoder::TiffEncoder<W>,
    (width, height): (u32, u32),
    samples: &[C::Inner],
    meta: &Metadata,
) -> tiff::TiffResult<()>
where
    [C::Inner]: tiff::encoder::TiffValue,
{
    let mut image = encoder.new_image::<C>(width, height)?;
    if let Some(resolution) = meta.resolution {
        let (unit, x, y) = resolution.to_tiff();
        image.resolution_unit(unit);
        image.x_resolution(x);
        image.y_resolution(y);
    }
    if let Some(icc) = &meta.icc {
        image
            .encoder()
            .write_tag(tiff::tags::Tag::IccProfile, metadata::TiffUndefined(icc))?;
    }
    if let Some(xmp) = &meta.xmp {
        image
            .encoder()
            .write_tag(tiff::tags::Tag::Unknown(metadata::TIFF_XMP_TAG), &xmp[..])?;
    }
    image.write_data(samples)
}

/// WebP (lossless) through the `image-webp` crate, whose encoder takes XMP as well as the ICC
/// profile and EXIF (the `image` crate's passes on only those two).
fn write_webp(img: &DynamicImage, meta: &Metadata) -> std::result::Result<Vec<u8>, String> {
    let colour = match img.color() {
        ColorType::L8 => image_webp::ColorType::L8,
        ColorType::La8 => image_webp::ColorType::La8,
        ColorType::Rgb8 => image_webp::ColorType::Rgb8,
        ColorType::Rgba8 => image_webp::ColorType::Rgba8,
        other => return Err(format!("cannot write {other:?} as webp")),
    };
    let mut out = Vec::new();
    let mut encoder = image_webp::WebPEncoder::new(&mut out);
    if let Some(icc) = &meta.icc {
        encoder.set_icc_profile(icc.clone());
    }
    if let Some(exif) = &meta.exif {
        encoder.set_exif_metadata(exif.clone());
    }
    if let Some(xmp) = &meta.xmp {
        encoder.set_xmp_metadata(xmp.clone());
    }
    encoder
        .encode(img.as_bytes(), img.width(), img.height(), colour)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Encodes `image` (clipped to `[0, 1]`, rounded to the nearest level) with optional alpha
/// (`height * width` values) as a file of `format` in memory.
pub fn encode(
    image: &Image,
    alpha: Option<&[f32]>,
    depth: BitDepth,
    format: ImageFormat,
) -> Result<Vec<u8>> {
    encode_named(Path::new("<memory>"), image, alpha, depth, format)
}

/// [`encode`] with `meta` (from [`decode_with_metadata`]) written where `format` has a place
/// for it (see [`metadata::carries`]); returns the file and what of `meta` it goes without.
pub fn encode_with_metadata(
    image: &Image,
    alpha: Option<&[f32]>,
    depth: BitDepth,
    format: ImageFormat,
    meta: &Metadata,
) -> Result<(Vec<u8>, Vec<Dropped>)> {
    encode_named_with(Path::new("<memory>"), image, alpha, depth, format, meta)
}

/// [`encode`] as PNG, which holds every depth and alpha layout this crate produces.
pub fn encode_png(image: &Image, alpha: Option<&[f32]>, depth: BitDepth) -> Result<Vec<u8>> {
    encode(image, alpha, depth, ImageFormat::Png)
}

/// Writes `image` (with optional alpha) to `path`, the format chosen by the extension, clipped
/// to `[0, 1]` and rounded to the nearest level of `depth`. Atomic: see [`write_atomic`].
pub fn save(
    path: impl AsRef<Path>,
    image: &Image,
    alpha: Option<&[f32]>,
    depth: BitDepth,
) -> Result<()> {
    save_with_metadata(path, image, alpha, depth, &Metadata::default()).map(|_| ())
}

/// [`save`] with `meta` (from [`load_with_metadata`]) written where the output's format has a
/// place for it (see [`metadata::carries`]); returns what of `meta` the file goes without.
pub fn save_with_metadata(
    path: impl AsRef<Path>,
    image: &Image,
    alpha: Option<&[f32]>,
    depth: BitDepth,
    meta: &Metadata,
) -> Result<Vec<Dropped>> {
    let path = path.as_ref();
    let format = ImageFormat::from_path(path).map_err(|_| DataError::Unsupported {
        path: path.into(),
        message: "unknown extension; use .png, .tif, .bmp, .jpg or .webp".into(),
    })?;
    let (bytes, dropped) = encode_named_with(path, image, alpha, depth, format, meta)?;
    write_atomic(path, &bytes)?;
    Ok(dropped)
}

/// Writes `bytes` to a temporary file beside `path`, flushes it to disk and renames it over
/// `path`, so a crash leaves either the old file or the new one, never half of one. On any error
/// (a full disk, a folder that cannot be written) the temporary file is removed and the error
/// names `path` as a write.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| fs::File::create(tmp)?.write_all(bytes))
}

/// [`write_atomic`] for a writer that saves to a path itself (libtorch's TorchScript export):
/// `write` fills the temporary file at the path it is given, which already exists, empty, so a
/// folder that cannot be written is refused before `write` runs.
pub fn write_atomic_with(
    path: impl AsRef<Path>,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let path = path.as_ref();
    let write_err = |source| DataError::Write {
        path: path.into(),
        source,
    };
    let file_name = path.file_name().ok_or_else(|| {
        write_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file path",
        ))
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Dot-prefixed so directory scans skip it; pid and counter so concurrent writers of the same
    // file do not share a temporary.
    let tmp = dir.join(format!(
        ".{}.{}-{}.tmp",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    // `create_new`: the name is ours alone, so removing it after a failure removes nothing else.
    if let Err(source) = fs::File::create_new(&tmp) {
        return Err(write_err(source));
    }
    let result = write(&tmp)
        .and_then(|()| fs::OpenOptions::new().write(true).open(&tmp)?.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(source) = result {
        let _ = fs::remove_file(&tmp);
        return Err(write_err(source));
    }
    // Makes the rename itself durable where the platform allows syncing a directory.
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image whose samples sit exactly on `depth`'s levels, so round trips are exact.
    fn levels(channels: usize, h: usize, w: usize, depth: BitDepth) -> Image {
        let max = depth.max_level();
        let step = if depth == BitDepth::Eight {
            1.0
        } else {
            257.0 + 3.0
        };
        Image::from_fn(channels, h, w, |c, y, x| {
            (((c * 97 + y * w + x) as f32 * step) % (max + 1.0)) / max
        })
    }

    fn alpha_for(h: usize, w: usize, depth: BitDepth) -> Vec<f32> {
        let max = depth.max_level();
        (0..h * w)
            .map(|i| ((i * 37) as f32 % (max + 1.0)) / max)
            .collect()
    }

    fn round_trip(name: &str, channels: usize, with_alpha: bool, depth: BitDepth) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        let img = levels(channels, 13, 17, depth);
        let alpha = with_alpha.then(|| alpha_for(13, 17, depth));
        save(&path, &img, alpha.as_deref(), depth).unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.image, img, "{name}");
        assert_eq!(loaded.alpha, alpha, "{name}");
        assert_eq!(loaded.bit_depth, depth, "{name}");
        assert_eq!(
            Some(loaded.format),
            ImageFormat::from_path(&path).ok(),
            "{name}"
        );
    }

    #[test]
    fn png_round_trips_every_layout_and_depth() {
        for depth in [BitDepth::Eight, BitDepth::Sixteen] {
            for channels in [1, 3] {
                for alpha in [false, true] {
                    round_trip("a.png", channels, alpha, depth);
                }
            }
        }
    }

    #[test]
    fn tiff_bmp_webp_round_trip() {
        round_trip("a.tif", 3, false, BitDepth::Sixteen);
        round_trip("a.tiff", 1, false, BitDepth::Sixteen);
        round_trip("a.tif", 3, true, BitDepth::Sixteen);
        round_trip("a.tif", 1, false, BitDepth::Eight);
        round_trip("a.bmp", 3, false, BitDepth::Eight);
        round_trip("a.bmp", 3, true, BitDepth::Eight);
        round_trip("a.webp", 3, false, BitDepth::Eight);
        round_trip("a.webp", 3, true, BitDepth::Eight);
    }

    #[test]
    fn bmp_and_webp_store_gray_as_equal_rgb_and_bmp_refuses_gray_alpha() {
        let dir = tempfile::tempdir().unwrap();
        let gray = levels(1, 13, 17, BitDepth::Eight);
        let alpha = alpha_for(13, 17, BitDepth::Eight);
        let as_rgb = gray.to_channels(3).unwrap();
        for name in ["g.bmp", "g.webp"] {
            let path = dir.path().join(name);
            save(&path, &gray, None, BitDepth::Eight).unwrap();
            assert_eq!(load(&path).unwrap().image, as_rgb, "{name}");
        }
        let path = dir.path().join("ga.webp");
        save(&path, &gray, Some(&alpha), BitDepth::Eight).unwrap();
        let back = load(&path).unwrap();
        assert_eq!((back.image, back.alpha), (as_rgb, Some(alpha.clone())));
        // The BMP writer would drop the alpha without a word.
        let path = dir.path().join("ga.bmp");
        let e = save(&path, &gray, Some(&alpha), BitDepth::Eight).unwrap_err();
        assert!(e.to_string().contains("gray+alpha"), "{e}");
        assert!(check_output(&path, 1, true, BitDepth::Eight).is_err());
        assert!(!path.exists());
    }

    /// A baseline JPEG of `img` with an EXIF block (APP1) holding only `orientation`.
    fn jpeg_with_orientation(img: &Image, orientation: u16) -> Vec<u8> {
        let plain = encode_named(
            Path::new("a.jpg"),
            img,
            None,
            BitDepth::Eight,
            ImageFormat::Jpeg,
        )
        .unwrap();
        let mut tiff = b"II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0".to_vec();
        tiff.extend_from_slice(&orientation.to_le_bytes());
        tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend_from_slice(&tiff);
        let len = u16::try_from(app1.len() + 2).unwrap();
        let mut out = plain[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&app1);
        out.extend_from_slice(&plain[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied_on_load() {
        // 24 high, 40 wide; the top-left 8x8 block is bright, the rest dark.
        let img = Image::from_fn(3, 24, 40, |_, y, x| if y < 8 && x < 8 { 0.9 } else { 0.1 });
        let stored = decode_bytes(&jpeg_with_orientation(&img, 1), "a.jpg", DEFAULT_MAX_PIXELS)
            .unwrap()
            .image;
        assert_eq!(stored.shape(), (3, 24, 40));
        // 6: the camera was turned a quarter clockwise; shown upright, the image is 40 high
        // and its stored top-left corner is at the top right.
        let turned = decode_bytes(&jpeg_with_orientation(&img, 6), "a.jpg", DEFAULT_MAX_PIXELS)
            .unwrap()
            .image;
        assert_eq!(turned.shape(), (3, 40, 24));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("turned.jpg");
        std::fs::write(&path, jpeg_with_orientation(&img, 6)).unwrap();
        let info = probe(&path).unwrap();
        assert_eq!((info.width, info.height), (24, 40));
        let at = |y: usize, x: usize| turned.plane(0)[y * 24 + x];
        assert!(
            at(3, 20) > 0.8 && at(3, 3) < 0.2,
            "{} {}",
            at(3, 20),
            at(3, 3)
        );
    }

    /// The header of a lossless WebP of `width` x `height` (what the decoder reads first).
    fn webp_header(width: u32, height: u32) -> Vec<u8> {
        let bits = (width - 1) | ((height - 1) << 14);
        let mut chunk = vec![0x2f];
        chunk.extend_from_slice(&bits.to_le_bytes());
        chunk.extend_from_slice(&[0; 7]);
        let mut riff = b"WEBPVP8L".to_vec();
        riff.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
        riff.extend_from_slice(&chunk);
        let mut bytes = b"RIFF".to_vec();
        bytes.extend_from_slice(&(riff.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&riff);
        bytes
    }

    #[test]
    fn a_webp_side_of_16384_is_said_to_be_too_large_not_empty() {
        let e =
            decode_bytes(&webp_header(16384, 16384), "big.webp", DEFAULT_MAX_PIXELS).unwrap_err();
        assert!(matches!(e, DataError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("16384x16384"), "{e}");
        let e = decode_bytes(&webp_header(16384, 16), "wide.webp", DEFAULT_MAX_PIXELS).unwrap_err();
        assert!(matches!(e, DataError::Unsupported { .. }), "{e}");
        let message = e.to_string();
        assert!(
            message.contains("wide.webp") && message.contains("16384x16"),
            "{message}"
        );
    }

    #[test]
    fn a_truncated_jpeg_is_refused_naming_it() {
        let jpeg = encode(
            &levels(3, 64, 48, BitDepth::Eight),
            None,
            BitDepth::Eight,
            ImageFormat::Jpeg,
        )
        .unwrap();
        // An application segment holding the end-of-image bytes, as an EXIF thumbnail does.
        let mut with_app = vec![0xff, 0xd8, 0xff, 0xef, 0x00, 0x06, 0xff, 0xd9, 0xff, 0xd9];
        with_app.extend_from_slice(&jpeg[2..]);
        // Bytes after the end-of-image marker (a camera's trailer, padding) are no harm.
        let mut trailer = jpeg.clone();
        trailer.extend_from_slice(&[0; 16]);
        for whole in [&jpeg, &with_app, &trailer] {
            let loaded = decode_bytes(whole, "whole.jpg", DEFAULT_MAX_PIXELS).unwrap();
            assert_eq!(loaded.image.shape(), (3, 64, 48));
        }
        for bytes in [&jpeg, &with_app] {
            for cut in [bytes.len() / 2, bytes.len() - 2, bytes.len() - 1] {
                let e = decode_bytes(&bytes[..cut], "cut.jpg", DEFAULT_MAX_PIXELS).unwrap_err();
                assert!(matches!(e, DataError::Decode { .. }), "{e}");
                let message = e.to_string();
                assert!(
                    message.contains("cut.jpg") && message.contains("truncated"),
                    "{message}"
                );
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("half.jpg");
        fs::write(&path, &jpeg[..jpeg.len() / 2]).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("half.jpg") && e.contains("end-of-image"), "{e}");
    }

    #[test]
    fn a_decoder_message_is_one_line() {
        let jpeg = encode(
            &levels(3, 16, 16, BitDepth::Eight),
            None,
            BitDepth::Eight,
            ImageFormat::Jpeg,
        )
        .unwrap();
        // Cut inside the headers: the JPEG decoder's own message, which ends in a line break.
        let e = decode_bytes(&jpeg[..jpeg.len() / 2], "cut.jpg", DEFAULT_MAX_PIXELS)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cut.jpg") && !e.contains('\n'), "{e:?}");
        assert_eq!(one_line(" a\n  b\r\n"), "a b");
    }

    #[test]
    fn a_tiff_header_the_decoder_panics_on_is_refused_naming_it() {
        // Width 1, height 1, black is zero, and a SampleFormat tag with no values.
        let mut tiff = b"II*\0\x08\0\0\0\x04\0".to_vec();
        for (tag, count, value) in [(256u16, 1u32, 1u32), (257, 1, 1), (262, 1, 1), (339, 0, 0)] {
            tiff.extend_from_slice(&tag.to_le_bytes());
            tiff.extend_from_slice(&3u16.to_le_bytes());
            tiff.extend_from_slice(&count.to_le_bytes());
            tiff.extend_from_slice(&value.to_le_bytes());
        }
        tiff.extend_from_slice(&[0; 4]);
        let e = decode_bytes(&tiff, "bad.tif", DEFAULT_MAX_PIXELS).unwrap_err();
        assert!(matches!(e, DataError::Decode { .. }), "{e}");
        assert!(e.to_string().contains("bad.tif"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.tif");
        fs::write(&path, &tiff).unwrap();
        let e = probe(&path).unwrap_err().to_string();
        assert!(e.contains("bad.tif"), "{e}");
    }

    #[test]
    fn jpeg_is_close_and_refuses_alpha_and_16_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.JPG");
        let img = Image::from_fn(3, 32, 32, |c, y, x| {
            0.2 + 0.02 * (x + y) as f32 / 3.0 + 0.1 * c as f32
        });
        save(&path, &img, None, BitDepth::Eight).unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.format, ImageFormat::Jpeg);
        let err: f32 = loaded
            .image
            .data()
            .iter()
            .zip(img.data())
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / img.data().len() as f32;
        assert!(err < 0.01, "mean abs error {err}");

        let alpha = vec![1.0; 32 * 32];
        let e = save(&path, &img, Some(&alpha), BitDepth::Eight).unwrap_err();
        assert!(matches!(e, DataError::Unsupported { .. }), "{e}");
        let e = save(&path, &img, None, BitDepth::Sixteen).unwrap_err();
        assert!(e.to_string().contains("a.JPG"), "{e}");
    }

    #[test]
    fn check_output_refuses_what_save_would_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let img = Image::from_fn(3, 8, 8, |_, _, _| 0.5);
        let alpha = vec![1.0; 64];
        for (name, has_alpha, depth) in [
            ("a.png", true, BitDepth::Sixteen),
            ("a.jpg", false, BitDepth::Eight),
            ("a.jpg", true, BitDepth::Eight),
            ("a.jpg", false, BitDepth::Sixteen),
            ("a.webp", false, BitDepth::Eight),
            ("a.xyz", false, BitDepth::Eight),
            ("noext", false, BitDepth::Eight),
        ] {
            let path = dir.path().join(name);
            let checked = check_output(&path, 3, has_alpha, depth);
            let saved = save(&path, &img, has_alpha.then_some(&alpha[..]), depth);
            assert_eq!(
                checked.is_ok(),
                saved.is_ok(),
                "{name} {has_alpha} {depth:?}"
            );
            if let Err(e) = checked {
                assert!(e.to_string().contains(name), "{e}");
            }
        }
    }

    #[test]
    fn save_clips_and_rounds() {
        let img = Image::new(1, 1, 4, vec![-0.5, 1.7, 0.5 / 255.0 + 1e-4, f32::NAN]).unwrap();
        let bytes = encode_png(&img, None, BitDepth::Eight).unwrap();
        let back = decode_bytes(&bytes, "x.png", DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(back.image.data(), &[0.0, 1.0, 1.0 / 255.0, 0.0]);
        assert_eq!(quantize_8bit(&img).data(), back.image.data());
    }

    #[test]
    fn bad_files_give_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let good = encode_png(&levels(3, 40, 40, BitDepth::Eight), None, BitDepth::Eight).unwrap();

        let empty = dir.path().join("empty.png");
        fs::write(&empty, b"").unwrap();
        let e = load(&empty).unwrap_err();
        assert!(matches!(e, DataError::EmptyFile { .. }), "{e}");
        assert!(e.to_string().contains("empty.png"));
        assert!(matches!(probe(&empty), Err(DataError::EmptyFile { .. })));

        let corrupt = dir.path().join("corrupt.png");
        let mut bytes = good.clone();
        for b in &mut bytes[8..] {
            *b ^= 0x5a;
        }
        fs::write(&corrupt, &bytes).unwrap();
        let e = load(&corrupt).unwrap_err();
        assert!(matches!(e, DataError::Decode { .. }), "{e}");
        assert!(e.to_string().starts_with("failed to decode '"), "{e}");
        assert!(e.to_string().contains("corrupt.png"), "{e}");

        let truncated = dir.path().join("truncated.png");
        fs::write(&truncated, &good[..good.len() / 2]).unwrap();
        let e = load(&truncated).unwrap_err();
        assert!(matches!(e, DataError::Decode { .. }), "{e}");
        assert!(e.to_string().contains("truncated.png"), "{e}");

        let tiff = encode(
            &levels(1, 40, 40, BitDepth::Sixteen),
            None,
            BitDepth::Sixteen,
            ImageFormat::Tiff,
        )
        .unwrap();
        let truncated = dir.path().join("truncated.tif");
        fs::write(&truncated, &tiff[..tiff.len() / 2]).unwrap();
        assert!(
            load(&truncated)
                .unwrap_err()
                .to_string()
                .contains("truncated.tif")
        );

        let garbage = dir.path().join("garbage.bin");
        fs::write(&garbage, b"hello, world").unwrap();
        let e = load(&garbage).unwrap_err();
        assert!(matches!(e, DataError::Unsupported { .. }), "{e}");

        let missing = dir.path().join("missing.png");
        let e = load(&missing).unwrap_err();
        assert!(matches!(e, DataError::Io { .. }), "{e}");
        assert!(e.to_string().contains("missing.png"));

        let e = decode_bytes(&good[..100], "upload.png", DEFAULT_MAX_PIXELS).unwrap_err();
        assert!(e.to_string().contains("upload.png"), "{e}");
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn pixel_limit_refuses_before_decoding() {
        // A real 8x8 PNG whose header claims 60000x50000: decoding it would fail (the data is for
        // 8x8), so TooLarge proves the limit is checked on the header alone.
        let mut png = encode_png(&levels(1, 8, 8, BitDepth::Eight), None, BitDepth::Eight).unwrap();
        assert_eq!(&png[12..16], b"IHDR");
        png[16..20].copy_from_slice(&60_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&50_000u32.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.png");
        fs::write(&path, &png).unwrap();
        let e = load(&path).unwrap_err();
        match &e {
            DataError::TooLarge {
                width,
                height,
                limit,
                ..
            } => {
                assert_eq!(
                    (*width, *height, *limit),
                    (60_000, 50_000, DEFAULT_MAX_PIXELS)
                );
            }
            other => panic!("expected TooLarge, got {other}"),
        }
        assert!(e.to_string().contains("huge.png"));
        assert_eq!(probe(&path).unwrap().pixels(), 3_000_000_000);

        let small = encode_png(&levels(3, 20, 30, BitDepth::Eight), None, BitDepth::Eight).unwrap();
        assert!(matches!(
            decode_bytes(&small, "s.png", 599),
            Err(DataError::TooLarge { .. })
        ));
        assert!(decode_bytes(&small, "s.png", 600).is_ok());
    }

    #[test]
    fn probe_reads_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        save(
            &path,
            &levels(1, 5, 7, BitDepth::Sixteen),
            Some(&alpha_for(5, 7, BitDepth::Sixteen)),
            BitDepth::Sixteen,
        )
        .unwrap();
        let info = probe(&path).unwrap();
        assert_eq!(
            info,
            ImageInfo {
                width: 7,
                height: 5,
                channels: 1,
                has_alpha: true,
                bit_depth: BitDepth::Sixteen,
                format: ImageFormat::Png
            }
        );
    }

    #[test]
    fn raw_crop_matches_the_f32_image() {
        let img = levels(3, 12, 10, BitDepth::Eight);
        let bytes = encode_png(&img, None, BitDepth::Eight).unwrap();
        let raw = decode_raw(&bytes, "r.png", DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(raw.bytes(), 3 * 12 * 10);
        assert_eq!(raw.crop(3, 2, 5, 6).unwrap(), img.crop(3, 2, 5, 6).unwrap());
        assert!(raw.crop(8, 0, 5, 5).is_err());
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let e = write_atomic(dir.path().join("no/such/dir/x.png"), b"x").unwrap_err();
        assert!(e.to_string().starts_with("failed to write"), "{e}");
    }

    #[test]
    fn a_failed_atomic_write_names_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        fs::write(&path, b"old").unwrap();
        // The disk fills up halfway through the file.
        let e = write_atomic_with(&path, |tmp| {
            fs::write(tmp, b"half")?;
            Err(std::io::Error::from_raw_os_error(28))
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(&format!("failed to write '{}': ", path.display()))
                && e.ends_with("(os error 28)"),
            "{e}"
        );
        assert_eq!(fs::read(&path).unwrap(), b"old");
        // A folder in the file's place: the rename fails after the whole file was written.
        let blocked = dir.path().join("checkpoint.safetensors");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("kept"), b"").unwrap();
        let e = write_atomic(&blocked, b"new").unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("failed to write '{}': ", blocked.display())),
            "{e}"
        );
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["checkpoint.safetensors", "model.safetensors"]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(48))]

        #[test]
        fn png_round_trip_is_exact_on_levels(
            gray in proptest::bool::ANY,
            alpha in proptest::bool::ANY,
            sixteen in proptest::bool::ANY,
            h in 1usize..12,
            w in 1usize..12,
            seed in 0u64..1000,
        ) {
            let depth = if sixteen { BitDepth::Sixteen } else { BitDepth::Eight };
            let max = depth.max_level();
            let c = if gray { 1 } else { 3 };
            let level = |i: usize| (derive(seed, i) % (max as u64 + 1)) as f32 / max;
            let img = Image::from_fn(c, h, w, |c, y, x| level((c * h + y) * w + x));
            let a: Option<Vec<f32>> = alpha.then(|| (0..h * w).map(|i| level(i + 7919)).collect());
            let bytes = encode_png(&img, a.as_deref(), depth).unwrap();
            let back = decode_bytes(&bytes, "p.png", DEFAULT_MAX_PIXELS).unwrap();
            proptest::prop_assert_eq!(&back.image, &img);
            proptest::prop_assert_eq!(back.alpha, a);
            proptest::prop_assert_eq!(back.bit_depth, depth);
            proptest::prop_assert_eq!(quantize(&img, depth), img);
        }
    }

    fn derive(seed: u64, i: usize) -> u64 {
        crate::loader::derive_seed(seed, &[i as u64])
    }

    #[test]
    fn bit_depth_serialises_as_a_number() {
        assert_eq!(serde_json::to_string(&BitDepth::Sixteen).unwrap(), "16");
        assert_eq!(
            serde_json::from_str::<BitDepth>("8").unwrap(),
            BitDepth::Eight
        );
        assert!(serde_json::from_str::<BitDepth>("12").is_err());
    }
}
