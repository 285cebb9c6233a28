//! Bad and odd inputs, made here, pushed through every command that reads them: truncated,
//! empty and mislabelled images of every format, header bombs, extreme shapes, 16-bit, gray with
//! alpha and CMYK images, broken model files, configs and manifests. Each command must end
//! cleanly (never a panic or exit 101), refuse a bad file in one line that names it, and leave
//! every input as it was.

use super::{picture, run, stderr, tiny_model};
use denoise_data::io::{self, BitDepth, ImageFormat};
use denoise_models::{Model, artefact};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

const FORMATS: [(&str, ImageFormat); 5] = [
    ("png", ImageFormat::Png),
    ("jpg", ImageFormat::Jpeg),
    ("tif", ImageFormat::Tiff),
    ("webp", ImageFormat::WebP),
    ("bmp", ImageFormat::Bmp),
];

/// Images that must be refused, and images that are odd but valid (decoded, or refused for a
/// reason that names them), written into `dir`.
struct Images {
    bad: Vec<String>,
    odd: Vec<String>,
}

fn write_images(dir: &Path) -> Images {
    std::fs::create_dir_all(dir).unwrap();
    let mut bad = Vec::new();
    let put = |name: String, bytes: &[u8]| {
        std::fs::write(dir.join(&name), bytes).unwrap();
        name
    };
    for (ext, format) in FORMATS {
        let good = io::encode(&picture(16, 24), None, BitDepth::Eight, format).unwrap();
        bad.push(put(format!("empty.{ext}"), &[]));
        bad.push(put(format!("truncated.{ext}"), &good[..good.len() / 2]));
        let mut magic = good.clone();
        magic[..4].copy_from_slice(b"XXXX");
        bad.push(put(format!("magic.{ext}"), &magic));
    }
    bad.push(put("bomb.png".into(), &png_bomb()));
    bad.push(put("bomb.bmp".into(), &bmp_bomb()));
    bad.push(put("bomb.jpg".into(), &jpeg_bomb()));
    let mut odd = Vec::new();
    let one = io::encode(&picture(1, 1), None, BitDepth::Eight, ImageFormat::Png).unwrap();
    odd.push(put("one.png".into(), &one));
    let thin = io::encode(
        &picture(100_000, 3),
        None,
        BitDepth::Eight,
        ImageFormat::Png,
    )
    .unwrap();
    odd.push(put("thin.png".into(), &thin));
    let deep = io::encode(&picture(12, 10), None, BitDepth::Sixteen, ImageFormat::Png).unwrap();
    odd.push(put("deep.png".into(), &deep));
    odd.push(put("gray-alpha.png".into(), &gray_alpha_png()));
    odd.push(put("cmyk.jpg".into(), &cmyk_jpeg()));
    Images { bad, odd }
}

/// A PNG whose header claims 100000 x 100000 pixels, with no data behind it.
fn png_bomb() -> Vec<u8> {
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, 100_000, 100_000);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().unwrap();
    // A few bytes of image data (an empty zlib stream), so the header is read whole; the
    // writer ends the file when dropped.
    writer
        .write_chunk(png::chunk::IDAT, &[0x78, 0x9c, 0x03, 0, 0, 0, 0, 1])
        .unwrap();
    drop(writer);
    png
}

/// A BMP whose header claims 100000 x 100000 pixels of 24 bits, with no data behind it.
fn bmp_bomb() -> Vec<u8> {
    let mut bmp = b"BM".to_vec();
    bmp.extend_from_slice(&1000u32.to_le_bytes()); // file size
    bmp.extend_from_slice(&0u32.to_le_bytes());
    bmp.extend_from_slice(&54u32.to_le_bytes()); // pixel data offset
    bmp.extend_from_slice(&40u32.to_le_bytes()); // info header size
    bmp.extend_from_slice(&100_000i32.to_le_bytes());
    bmp.extend_from_slice(&100_000i32.to_le_bytes());
    bmp.extend_from_slice(&1u16.to_le_bytes());
    bmp.extend_from_slice(&24u16.to_le_bytes());
    bmp.extend_from_slice(&[0; 24]);
    bmp
}

/// A whole JPEG whose frame header is rewritten to claim 65500 x 65500 pixels.
fn jpeg_bomb() -> Vec<u8> {
    let mut jpeg = io::encode(&picture(16, 16), None, BitDepth::Eight, ImageFormat::Jpeg).unwrap();
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xff, 0xc0])
        .expect("a baseline frame header");
    // FF C0, length (2), precision (1), height (2), width (2).
    jpeg[sof + 5..sof + 7].copy_from_slice(&65_500u16.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&65_500u16.to_be_bytes());
    jpeg
}

fn gray_alpha_png() -> Vec<u8> {
    let pixels: Vec<u8> = (0..8 * 6)
        .flat_map(|i| [(i * 5) as u8, 255 - i as u8])
        .collect();
    let img = image::GrayAlphaImage::from_raw(8, 6, pixels).unwrap();
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn cmyk_jpeg() -> Vec<u8> {
    let pixels: Vec<u8> = (0..16 * 12)
        .flat_map(|i| [(i * 3) as u8, 40, 200 - (i / 2) as u8, 10])
        .collect();
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90)
        .encode(&pixels, 16, 12, jpeg_encoder::ColorType::Cmyk)
        .unwrap();
    out
}

/// Broken model files in `dir`, by name.
fn write_models(dir: &Path) -> Vec<PathBuf> {
    let good = tiny_model(dir);
    let bytes = std::fs::read(&good).unwrap();
    let mut made = Vec::new();
    let mut put = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        made.push(path);
    };
    put("empty.safetensors", &[]);
    put("truncated.safetensors", &bytes[..bytes.len() / 2]);
    put("text.safetensors", b"this is not a model\n");
    // The tiny model's weights under a header that claims layers a million wide.
    let cfg = serde_json::from_str(r#"{"kind":"dncnn","depth":3,"features":1048576}"#).unwrap();
    let model = Model::new(
        &serde_json::from_str(r#"{"kind":"dncnn","depth":3,"features":8,"batch_norm":false}"#)
            .unwrap(),
        tch::Device::Cpu,
    )
    .unwrap();
    let named: Vec<_> = model.var_store().variables().into_iter().collect();
    let meta = serde_json::to_string(&artefact::Metadata::new(&cfg)).unwrap();
    put(
        "wide.safetensors",
        &artefact::serialize_named(&named, "denoise", meta).unwrap(),
    );
    // A model whose training diverged: one weight is NaN.
    tch::no_grad(|| {
        let mut vars = model.var_store().variables();
        let first = vars.keys().min().unwrap().clone();
        let _ = vars.get_mut(&first).unwrap().fill_(f64::NAN);
    });
    let nan = dir.join("nan.safetensors");
    artefact::save(&model, &artefact::Metadata::new(model.config()), &nan).unwrap();
    made.push(nan);
    made
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// A clean end: an exit status (no signal), not the panic exit 101, no panic text, no stack
/// frames, no error chain spread over lines.
fn assert_clean(out: &Output, what: &str) {
    let err = stderr(out);
    assert!(out.status.code().is_some(), "{what}: killed: {err}");
    assert_ne!(out.status.code(), Some(101), "{what}: {err}");
    for sign in [
        "panicked",
        "internal error",
        "frame #",
        "Caused by",
        "RUST_BACKTRACE",
    ] {
        assert!(!err.contains(sign), "{what}: '{sign}' in: {err}");
    }
}

/// A refusal: a clean failure whose last line is the error, naming `name`.
fn assert_refused(out: &Output, name: &str, what: &str) {
    assert_clean(out, what);
    let err = stderr(out);
    assert!(!out.status.success(), "{what}: accepted: {err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("denoise-cli: "), "{what}: {err}");
    assert!(
        last.contains(name),
        "{what}: '{name}' not in the error: {err}"
    );
}

/// Whether an error line of `err` names `name`.
fn named_in_an_error(err: &str, name: &str) -> bool {
    err.lines()
        .any(|l| l.starts_with("denoise-cli: ") && l.contains(name))
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn infer_metrics_eval_and_prepare_data_refuse_each_bad_image_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("inputs");
    let images = write_images(&inputs);
    let model = tiny_model(tmp.path());
    let before = snapshot(&inputs);
    let out_dir = tmp.path().join("out");

    let infer = run(&[
        "infer",
        "--model",
        s(&model),
        "--threads",
        "1",
        "--sigma",
        "25",
        s(&inputs),
        "--out-dir",
        s(&out_dir),
    ]);
    assert_clean(&infer, "infer");
    let err = stderr(&infer);
    for name in &images.bad {
        assert!(
            named_in_an_error(&err, name),
            "infer: {name} not refused: {err}"
        );
        assert!(
            !out_dir.join(name).exists(),
            "infer wrote a result for {name}"
        );
    }
    // An odd image is denoised into a readable file, or refused by name.
    for name in &images.odd {
        let result = out_dir.join(name);
        assert!(
            named_in_an_error(&err, name) || io::load(&result).is_ok(),
            "infer: {name} neither refused nor written: {err}"
        );
    }
    // What a model of any kind reads: 16 bits, alpha, CMYK, a thin strip.
    for name in ["deep.png", "gray-alpha.png", "cmyk.jpg", "thin.png"] {
        assert!(
            !named_in_an_error(&err, name),
            "infer refused {name}: {err}"
        );
    }

    let metrics = run(&["metrics", s(&inputs), s(&inputs)]);
    assert_clean(&metrics, "metrics");
    let err = stderr(&metrics);
    for name in &images.bad {
        assert!(named_in_an_error(&err, name), "metrics: {name}: {err}");
    }

    let eval = run(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&inputs),
        "--noise",
        "gaussian:25",
        "--threads",
        "1",
    ]);
    assert_clean(&eval, "eval");
    let err = stderr(&eval);
    for name in &images.bad {
        assert!(named_in_an_error(&err, name), "eval: {name}: {err}");
    }

    let prepared = tmp.path().join("prepared");
    let prepare = run(&["prepare-data", "--src", s(&inputs), "--out", s(&prepared)]);
    assert_clean(&prepare, "prepare-data");
    assert!(prepare.status.success(), "{}", stderr(&prepare));
    let manifest = denoise_data::manifest::Manifest::load(prepared.join("manifest.json")).unwrap();
    for name in &images.bad {
        assert!(
            manifest.rejected.iter().any(|r| &r.path == name),
            "prepare-data kept {name}"
        );
    }
    assert_eq!(snapshot(&inputs), before, "an input changed");
}

#[test]
fn noise_refuses_each_bad_image_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("inputs");
    let images = write_images(&inputs);
    let before = snapshot(&inputs);
    for name in images.bad.iter().chain(&images.odd) {
        let output = tmp.path().join("noisy").join(format!("{name}.png"));
        let out = run(&[
            "noise",
            "--kind",
            "gaussian:25",
            s(&inputs.join(name)),
            "-o",
            s(&output),
        ]);
        if images.bad.contains(name) {
            assert_refused(&out, name, &format!("noise {name}"));
        } else {
            assert_clean(&out, &format!("noise {name}"));
            assert!(
                out.status.success() || named_in_an_error(&stderr(&out), name),
                "noise {name}: {}",
                stderr(&out)
            );
        }
    }
    assert_eq!(snapshot(&inputs), before, "an input changed");
}

#[test]
fn every_command_that_loads_a_model_refuses_a_broken_one_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let broken = write_models(&models);
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let photo = images.join("photo.png");
    // As large as a training patch, so train gets as far as the model.
    io::save(&photo, &picture(64, 64), None, BitDepth::Eight).unwrap();
    // A manifest for train --init, prepared from that folder.
    let data = tmp.path().join("data");
    let prepare = run(&["prepare-data", "--src", s(&images), "--out", s(&data)]);
    assert!(prepare.status.success(), "{}", stderr(&prepare));
    let manifest = data.join("manifest.json");
    let before = (snapshot(&models), snapshot(&images));
    let out = tmp.path().join("out");
    for model in &broken {
        let name = model.file_name().unwrap().to_str().unwrap();
        let result = out.join(format!("{name}.png"));
        let run_dir = out.join(format!("run-{name}"));
        let export = out.join(format!("{name}.pt"));
        let commands: [Vec<&str>; 4] = [
            vec!["infer", "--model", s(model), s(&photo), "-o", s(&result)],
            vec![
                "eval",
                "--model",
                s(model),
                "--data",
                s(&images),
                "--noise",
                "gaussian:25",
            ],
            vec!["export", s(model), "-o", s(&export)],
            vec![
                "train",
                "--init",
                s(model),
                "--data",
                s(&manifest),
                "--out",
                s(&run_dir),
                "--steps",
                "1",
                "--device",
                "cpu",
            ],
        ];
        for args in commands {
            let what = format!("{} with {name}", args[0]);
            assert_refused(&run(&args), name, &what);
        }
        assert!(
            !result.exists() && !export.exists(),
            "{name}: a result was written"
        );
    }
    assert_eq!(
        (snapshot(&models), snapshot(&images)),
        before,
        "an input changed"
    );
}

#[test]
fn train_refuses_a_malformed_config_or_manifest_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    let configs = [
        ("syntax.toml", "noise = [\"gaussian:25\"\nsteps = 3\n"),
        ("types.toml", "steps = \"many\"\n"),
        ("unknown.toml", "stepz = 3\n"),
        ("binary.toml", "\u{0}\u{1}\u{2}\u{fffd}"),
    ];
    for (name, text) in configs {
        std::fs::write(inputs.join(name), text).unwrap();
    }
    let manifests = [
        ("empty.json", ""),
        ("syntax.json", "{\"schema_version\": 1,"),
        ("version.json", "{\"schema_version\": 99}"),
        ("shape.json", "{\"schema_version\": 1, \"files\": 3}"),
        ("list.json", "[]"),
    ];
    for (name, text) in manifests {
        std::fs::write(inputs.join(name), text).unwrap();
    }
    // A run directory whose saved config was emptied (outside `inputs`: a run takes a lock
    // file in its directory).
    let run_dir = tmp.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::write(run_dir.join("config.toml"), "").unwrap();
    let before = snapshot(&inputs);
    let out = tmp.path().join("out");
    for (name, _) in configs {
        let (config, run_out) = (inputs.join(name), out.join(name));
        let args = ["train", "--config", s(&config), "--out", s(&run_out)];
        assert_refused(&run(&args), name, &format!("train --config {name}"));
    }
    for (name, _) in manifests {
        let (manifest, run_out) = (inputs.join(name), out.join(name));
        let args = [
            "train",
            "--model",
            "dncnn",
            "--data",
            s(&manifest),
            "--out",
            s(&run_out),
            "--device",
            "cpu",
        ];
        assert_refused(&run(&args), name, &format!("train --data {name}"));
    }
    let resume = run(&["train", "--resume", "--out", s(&run_dir)]);
    assert_refused(
        &resume,
        "config.toml",
        "train --resume on an emptied config",
    );
    assert_eq!(std::fs::read(run_dir.join("config.toml")).unwrap(), b"");
    assert_eq!(snapshot(&inputs), before, "an input changed");
}

#[test]
fn export_to_a_folder_that_cannot_be_written_is_one_line_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    // Root writes anywhere a folder exists; /proc takes no new files, and a regular file is
    // no folder.
    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, b"mine").unwrap();
    let mut outputs = vec![(file.join("model.pt"), file.clone())];
    if cfg!(target_os = "linux") {
        let proc_file = PathBuf::from("/proc/denoise-export.pt");
        outputs.push((proc_file.clone(), proc_file));
    }
    for (output, named) in outputs {
        let out = run(&["export", s(&model), "-o", s(&output)]);
        assert_refused(&out, s(&named), &format!("export -o {}", output.display()));
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"mine");
}
