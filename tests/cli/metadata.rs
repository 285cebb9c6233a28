//! `infer` keeps what a file carries besides its pixels (ICC profile, EXIF, XMP, resolution):
//! inputs made with the `image` and `png` crates, outputs read back with them.

use super::{infer_ok, picture, tiny_model};
use denoise_data::io;
use image::metadata::Orientation;
use image::{ImageDecoder, ImageEncoder, ImageReader};
use std::path::Path;

const XMP: &str = r#"<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:format="image/jpeg"/></rdf:RDF></x:xmpmeta>"#;

/// What the camera's EXIF says besides the orientation.
const MAKE: &[u8] = b"denoise-test\0";

/// An RGB display profile's header and a few bytes of body (nothing here reads further).
fn icc_profile() -> Vec<u8> {
    let mut icc = vec![0u8; 160];
    icc[..4].copy_from_slice(&160u32.to_be_bytes());
    icc[12..16].copy_from_slice(b"mntr");
    icc[16..20].copy_from_slice(b"RGB ");
    icc[20..24].copy_from_slice(b"XYZ ");
    icc[36..40].copy_from_slice(b"acsp");
    icc[128..].fill(0x5a);
    icc
}

/// Big-endian EXIF whose IFD0 holds Orientation and Make.
fn exif(orientation: u16) -> Vec<u8> {
    let mut exif = b"MM\0*\0\0\0\x08\0\x02".to_vec();
    exif.extend_from_slice(&[0x01, 0x0f, 0, 2, 0, 0, 0, MAKE.len() as u8, 0, 0, 0, 38]);
    exif.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1]);
    exif.extend_from_slice(&orientation.to_be_bytes());
    exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    exif.extend_from_slice(MAKE);
    exif
}

fn rgb8(h: usize, w: usize) -> Vec<u8> {
    let img = picture(h, w);
    (0..h * w)
        .flat_map(|i| (0..3).map(move |c| (c, i)))
        .map(|(c, i)| (img.plane(c)[i] * 255.0).round() as u8)
        .collect()
}

/// A 24-high, 40-wide JPEG at 300 dpi with an ICC profile, EXIF (`orientation`) and XMP.
fn jpeg_input(path: &Path, orientation: u16) {
    let mut jpeg = Vec::new();
    let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90);
    encoder.set_pixel_density(image::codecs::jpeg::PixelDensity::dpi(300));
    encoder.set_icc_profile(icc_profile()).unwrap();
    encoder.set_exif_metadata(exif(orientation)).unwrap();
    encoder
        .write_image(&rgb8(24, 40), 40, 24, image::ExtendedColorType::Rgb8)
        .unwrap();
    // XMP as an APP1 segment after JFIF's APP0 (the encoder writes none).
    let app0_end = 4 + usize::from(u16::from_be_bytes([jpeg[4], jpeg[5]]));
    let mut segment = b"http://ns.adobe.com/xap/1.0/\0".to_vec();
    segment.extend_from_slice(XMP.as_bytes());
    let len = u16::try_from(segment.len() + 2).unwrap();
    let mut out = jpeg[..app0_end].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&segment);
    out.extend_from_slice(&jpeg[app0_end..]);
    std::fs::write(path, out).unwrap();
}

/// A 24x28 PNG with iCCP, eXIf, pHYs (2835 per metre, 72 dpi) and XMP in an iTXt chunk.
fn png_input(path: &Path) {
    let mut info = png::Info::with_size(28, 24);
    let icc = icc_profile();
    let exif = exif(1);
    info.icc_profile = Some(icc.as_slice().into());
    info.exif_metadata = Some(exif.as_slice().into());
    info.pixel_dims = Some(png::PixelDimensions {
        xppu: 2835,
        yppu: 2835,
        unit: png::Unit::Meter,
    });
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::with_info(&mut bytes, info).unwrap();
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .add_itxt_chunk("XML:com.adobe.xmp".into(), XMP.into())
        .unwrap();
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(&rgb8(24, 28)).unwrap();
    writer.finish().unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// What the `image` crate's decoder of `path` reports: (width, height), ICC, EXIF, XMP.
type Found = (
    (u32, u32),
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
);

fn read_back(path: &Path) -> Found {
    let mut decoder = ImageReader::open(path)
        .unwrap()
        .with_guessed_format()
        .unwrap()
        .into_decoder()
        .unwrap();
    (
        decoder.dimensions(),
        decoder.icc_profile().unwrap(),
        decoder.exif_metadata().unwrap(),
        decoder.xmp_metadata().unwrap(),
    )
}

/// PNG's pHYs: pixels per unit, x and y, and the unit.
fn png_phys(path: &Path) -> Option<(u32, u32, png::Unit)> {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let reader = png::Decoder::new(file).read_info().unwrap();
    let dims = reader.info().pixel_dims?;
    Some((dims.xppu, dims.yppu, dims.unit))
}

/// JFIF's (unit, x density, y density).
fn jfif_density(path: &Path) -> (u8, u16, u16) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..4], [0xFF, 0xD8, 0xFF, 0xE0]);
    assert_eq!(&bytes[6..11], b"JFIF\0");
    let density = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
    (bytes[13], density(14), density(16))
}

fn says_upright_with_the_make(exif: Option<Vec<u8>>) {
    let exif = exif.expect("EXIF kept");
    assert_eq!(
        Orientation::from_exif_chunk(&exif),
        Some(Orientation::NoTransforms)
    );
    assert!(exif.windows(MAKE.len()).any(|w| w == MAKE), "{exif:?}");
}

#[test]
fn infer_keeps_a_jpegs_profile_exif_xmp_and_resolution_with_the_turn_applied() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = dir.path().join("turned.jpg");
    // 6: stored sideways; decoding turns it upright, so the output says 1.
    jpeg_input(&input, 6);

    let out = dir.path().join("out.jpg");
    let notes = infer_ok(&model, &input, &out, &[]);
    assert!(!notes.contains("cannot carry"), "{notes}");
    let (size, icc, exif, xmp) = read_back(&out);
    assert_eq!(size, (24, 40));
    assert_eq!(icc, Some(icc_profile()));
    says_upright_with_the_make(exif);
    assert_eq!(xmp.as_deref(), Some(XMP.as_bytes()));
    assert_eq!(jfif_density(&out), (1, 300, 300));

    // Across formats: PNG has a place for each.
    let out = dir.path().join("out.png");
    let notes = infer_ok(&model, &input, &out, &[]);
    assert!(!notes.contains("cannot carry"), "{notes}");
    let (size, icc, exif, xmp) = read_back(&out);
    assert_eq!(size, (24, 40));
    assert_eq!(icc, Some(icc_profile()));
    says_upright_with_the_make(exif);
    assert_eq!(xmp.as_deref(), Some(XMP.as_bytes()));
    assert_eq!(png_phys(&out), Some((11811, 11811, png::Unit::Meter)));
}

#[test]
fn infer_keeps_a_pngs_profile_exif_xmp_and_resolution_and_names_what_a_format_drops() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = dir.path().join("in.png");
    png_input(&input);

    let out = dir.path().join("out.png");
    let notes = infer_ok(&model, &input, &out, &[]);
    assert!(!notes.contains("cannot carry"), "{notes}");
    let (size, icc, exif, xmp) = read_back(&out);
    assert_eq!(size, (28, 24));
    assert_eq!(icc, Some(icc_profile()));
    assert_eq!(exif, Some(self::exif(1)));
    assert_eq!(xmp.as_deref(), Some(XMP.as_bytes()));
    assert_eq!(png_phys(&out), Some((2835, 2835, png::Unit::Meter)));

    // JPEG: 2835 per metre is 72 per inch.
    let out = dir.path().join("out.jpg");
    infer_ok(&model, &input, &out, &[]);
    let (_, icc, exif, xmp) = read_back(&out);
    assert_eq!(icc, Some(icc_profile()));
    assert_eq!(exif, Some(self::exif(1)));
    assert_eq!(xmp.as_deref(), Some(XMP.as_bytes()));
    assert_eq!(jfif_density(&out), (1, 72, 72));

    // WebP has no field for a resolution.
    let out = dir.path().join("out.webp");
    let notes = infer_ok(&model, &input, &out, &[]);
    let line = format!(
        "note: {} cannot carry the input's resolution; it was dropped",
        out.display()
    );
    assert_eq!(notes.matches(&line).count(), 1, "{notes}");
    let (_, icc, exif, xmp) = read_back(&out);
    assert_eq!(icc, Some(icc_profile()));
    assert_eq!(exif, Some(self::exif(1)));
    assert_eq!(xmp.as_deref(), Some(XMP.as_bytes()));

    // TIFF keeps the profile, XMP and resolution, not EXIF.
    let out = dir.path().join("out.tif");
    let notes = infer_ok(&model, &input, &out, &[]);
    let line = format!(
        "note: {} cannot carry the input's EXIF; it was dropped",
        out.display()
    );
    assert_eq!(notes.matches(&line).count(), 1, "{notes}");
    let (_, meta) = io::load_with_metadata(&out, io::DEFAULT_MAX_PIXELS).unwrap();
    assert_eq!(meta.icc, Some(icc_profile()));
    assert_eq!(meta.xmp.as_deref(), Some(XMP.as_bytes()));
    let (x, y) = meta.resolution.unwrap().per_inch();
    assert!(
        (x - 72.0).abs() < 0.01 && (y - 72.0).abs() < 0.01,
        "{x} {y}"
    );

    // BMP keeps none of it, and says so in one line.
    let out = dir.path().join("out.bmp");
    let notes = infer_ok(&model, &input, &out, &[]);
    let line = format!(
        "note: {} cannot carry the input's ICC profile, EXIF, XMP, resolution; they were dropped",
        out.display()
    );
    assert_eq!(notes.matches("cannot carry").count(), 1, "{notes}");
    assert!(notes.contains(&line), "{notes}");
}
