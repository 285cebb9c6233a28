//! CLI integration tests: the built `denoise-cli` run as a user runs it, on files made in a
//! temporary directory (no data set needed).

use denoise_data::Image;
use denoise_data::io::{self, BitDepth};
use denoise_models::{Model, artefact};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod batch;
mod corpus;
mod deploy;
mod metadata;
mod slurm;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_denoise-cli"))
}

fn run(args: &[&str]) -> Output {
    cli().args(args).output().expect("denoise-cli runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A tiny (untrained) FFDNet artefact in `dir`: a model that takes a noise level.
fn tiny_ffdnet(dir: &Path) -> PathBuf {
    tch::manual_seed(0);
    let cfg = serde_json::from_str(r#"{"kind":"ffdnet","depth":3,"features":8}"#).unwrap();
    let model = Model::new(&cfg, tch::Device::Cpu).unwrap();
    let path = dir.join("ffdnet.safetensors");
    artefact::save(&model, &artefact::Metadata::new(model.config()), &path).unwrap();
    path
}

/// `infer --model MODEL INPUT -o OUTPUT EXTRA...`, which must succeed; its stderr (the notes).
fn infer_ok(model: &Path, input: &Path, output: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "infer",
        "--model",
        model.to_str().unwrap(),
        input.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    stderr(&out)
}

/// A smooth colour test image with some texture, in [0, 1].
fn picture(h: usize, w: usize) -> Image {
    Image::from_fn(3, h, w, |c, y, x| {
        let (fy, fx) = (y as f32 / h as f32, x as f32 / w as f32);
        (0.5 + 0.35 * ((6.0 * fx + c as f32).sin() * (4.0 * fy).cos())).clamp(0.0, 1.0)
    })
}

/// A tiny (untrained) DnCNN artefact: enough to exercise every path of infer and eval.
fn tiny_model(dir: &Path) -> PathBuf {
    tch::manual_seed(0);
    let cfg = serde_json::from_str(r#"{"kind":"dncnn","depth":3,"features":8,"batch_norm":false}"#)
        .unwrap();
    let model = Model::new(&cfg, tch::Device::Cpu).unwrap();
    let path = dir.join("tiny.safetensors");
    artefact::save(&model, &artefact::Metadata::new(model.config()), &path).unwrap();
    path
}

fn assert_clean_failure(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    assert!(
        err.lines()
            .last()
            .is_some_and(|l| l.starts_with("denoise-cli: ")),
        "{err}"
    );
    assert!(err.contains(needle), "'{needle}' not in: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn help_lists_the_commands() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "infer",
        "eval",
        "bench",
        "metrics",
        "noise",
        "models",
        "doctor",
        "prepare-data",
        "train",
        "serve",
    ] {
        assert!(text.contains(cmd), "--help lacks {cmd}: {text}");
    }
}

#[test]
fn unknown_commands_and_missing_files_are_clean_errors() {
    assert_clean_failure(&run(&["frobnicate"]), "unrecognized subcommand");
    let missing = run(&["metrics", "/no/such/a.png", "/no/such/b.png"]);
    assert_clean_failure(&missing, "/no/such/a.png");
    // The OS reason is said once, not once by the error and again by its source.
    let err = stderr(&missing);
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    assert_clean_failure(
        &run(&["noise", "--kind", "gaussian:-3", "a.png", "-o", "b.png"]),
        "gaussian:-3",
    );
}

#[test]
fn runs_from_another_directory_with_only_path_and_home() {
    let dir = tempfile::tempdir().unwrap();
    let out = cli()
        .arg("doctor")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("libtorch"));
}

#[test]
fn models_json_lists_every_kind() {
    let out = run(&["models", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let ridnet = rows
        .iter()
        .find(|r| r["name"] == "ridnet")
        .expect("ridnet listed");
    assert_eq!(ridnet["params"], 1_499_347);
    assert!(
        rows.iter()
            .all(|r| r["flops_per_pixel"].as_f64().unwrap() > 0.0)
    );
}

#[test]
fn noise_is_reproducible_and_metrics_report_json() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.png");
    io::save(&clean, &picture(40, 50), None, BitDepth::Eight).unwrap();
    let noisy = |name: &str, seed: &str| {
        let path = dir.path().join(name);
        let out = run(&[
            "noise",
            "--kind",
            "gaussian:25",
            "--seed",
            seed,
            clean.to_str().unwrap(),
            "-o",
            path.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        std::fs::read(path).unwrap()
    };
    assert_eq!(noisy("a.png", "3"), noisy("b.png", "3"));
    assert_ne!(noisy("a.png", "3"), noisy("c.png", "4"));
    // A missing folder is made; the input itself is never the output.
    noisy("new/d.png", "3");
    let before = std::fs::read(&clean).unwrap();
    let spelled = dir.path().join("new/../clean.png");
    let out = run(&[
        "noise",
        "--kind",
        "gaussian:25",
        clean.to_str().unwrap(),
        "-o",
        spelled.to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "would overwrite the input");
    assert_eq!(std::fs::read(&clean).unwrap(), before);
    // An export named as an image is refused before anything is written.
    let model = tiny_model(dir.path());
    let out = run(&[
        "export",
        model.to_str().unwrap(),
        "-o",
        clean.to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "is named as an image");
    assert_eq!(std::fs::read(&clean).unwrap(), before);

    let out = run(&[
        "metrics",
        clean.to_str().unwrap(),
        dir.path().join("a.png").to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let psnr = v["psnr"].as_f64().unwrap();
    assert!(
        (18.0..23.0).contains(&psnr),
        "sigma 25 gives about 20 dB, got {psnr}"
    );
    for key in ["ssim", "mse", "mae"] {
        assert!(v[key].is_number(), "{key} missing: {v}");
    }
    let same = run(&[
        "metrics",
        clean.to_str().unwrap(),
        clean.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&same.stdout).unwrap();
    assert_eq!(v["psnr"], "inf");
}

#[test]
fn infer_a_file_a_directory_and_a_16_bit_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let input = dir.path().join("in");
    std::fs::create_dir_all(input.join("sub")).unwrap();
    io::save(input.join("a.png"), &picture(30, 41), None, BitDepth::Eight).unwrap();
    io::save(
        input.join("sub/b16.png"),
        &picture(33, 20),
        None,
        BitDepth::Sixteen,
    )
    .unwrap();
    std::fs::write(input.join("sub/broken.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();

    let single = dir.path().join("single.png");
    let m = model.to_str().unwrap();
    let out = run(&[
        "infer",
        "--model",
        m,
        input.join("a.png").to_str().unwrap(),
        "-o",
        single.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(io::load(&single).unwrap().image.shape(), (3, 30, 41));

    // A directory batch goes on past the broken file, names it, and fails at the end.
    let outdir = dir.path().join("out");
    let out = run(&[
        "infer",
        "--model",
        m,
        input.to_str().unwrap(),
        "--out-dir",
        outdir.to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "broken.png");
    assert!(outdir.join("a.png").is_file());
    let b16 = io::load(outdir.join("sub/b16.png")).unwrap();
    assert_eq!(b16.bit_depth, BitDepth::Sixteen, "16-bit in, 16-bit out");
    assert_eq!(b16.image.shape(), (3, 33, 20));
    // A format that holds 8 bits says so.
    let jpeg = dir.path().join("b16.jpg");
    let out = run(&[
        "infer",
        "--model",
        m,
        input.join("sub/b16.png").to_str().unwrap(),
        "-o",
        jpeg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the 16-bit input was written at 8"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn infer_never_overwrites_an_input_or_one_result_with_another() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let m = model.to_str().unwrap();
    for sub in ["d1", "d2"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        io::save(
            dir.path().join(sub).join("a.png"),
            &picture(20, 24),
            None,
            BitDepth::Eight,
        )
        .unwrap();
    }
    let a = dir.path().join("d1/a.png");
    let before = std::fs::read(&a).unwrap();
    // The same file under another spelling.
    let again = dir.path().join("d2/../d1/a.png");
    let out = run(&[
        "infer",
        "--model",
        m,
        a.to_str().unwrap(),
        "-o",
        again.to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "would overwrite the input");
    // ...and through a directory that does not exist yet.
    let detour = dir.path().join("new/../d1/a.png");
    let out = run(&[
        "infer",
        "--model",
        m,
        a.to_str().unwrap(),
        "-o",
        detour.to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "would overwrite the input");
    let d1 = dir.path().join("d1");
    let out = run(&[
        "infer",
        "--model",
        m,
        d1.to_str().unwrap(),
        "--out-dir",
        d1.to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "would overwrite the input");
    assert_eq!(std::fs::read(&a).unwrap(), before, "the input is untouched");

    let outdir = dir.path().join("out");
    let out = run(&[
        "infer",
        "--model",
        m,
        a.to_str().unwrap(),
        dir.path().join("d2/a.png").to_str().unwrap(),
        "--out-dir",
        outdir.to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "would both be written to");
    assert!(!outdir.exists(), "refused before any work");
}

#[test]
fn infer_checks_its_arguments_and_the_output_format_before_denoising() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let m = model.to_str().unwrap();
    let input = dir.path().join("rgba.png");
    let alpha = vec![0.5; 20 * 24];
    io::save(&input, &picture(20, 24), Some(&alpha), BitDepth::Eight).unwrap();
    let i = input.to_str().unwrap();
    let jpg = dir.path().join("out.jpg");
    assert_clean_failure(
        &run(&["infer", "--model", m, i, "-o", jpg.to_str().unwrap()]),
        "jpeg has no alpha",
    );
    assert!(!jpg.exists());
    let o = dir.path().join("o.png");
    let o = o.to_str().unwrap();
    assert_clean_failure(
        &run(&["infer", "--model", m, i, "-o", o, "--sigma", "-5"]),
        "sigma must be in 0-255",
    );
    assert_clean_failure(
        &run(&["infer", "--model", m, i, "-o", o, "--tile", "8"]),
        "--tile must be 0",
    );
    assert_clean_failure(
        &run(&[
            "infer",
            "--model",
            m,
            i,
            "-o",
            o,
            "--tile",
            "64",
            "--overlap",
            "40",
        ]),
        "more than half",
    );
    assert_clean_failure(&run(&["infer", "--model", m, i]), "--out-dir");
    assert_clean_failure(
        &run(&["infer", "--model", m, i, "--out-dir", i]),
        "is a file, not a directory",
    );
    assert_clean_failure(
        &run(&["--threads", "2147483648", "infer", "--model", m, i, "-o", o]),
        "--threads must be in",
    );
    assert!(!Path::new(o).exists());
    // A model without a noise-level input says that --sigma does nothing for it.
    let out = run(&["infer", "--model", m, i, "-o", o, "--sigma", "25"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--sigma is ignored"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bench_prints_the_documented_json_and_refuses_what_it_cannot_do() {
    let out = run(&[
        "--threads",
        "1",
        "bench",
        "--model",
        "ffdnet",
        "--size",
        "32",
        "--warmup",
        "0",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["model"].as_str().unwrap().starts_with("ffdnet"), "{v}");
    assert_eq!(v["size"], 32);
    assert_eq!(v["runs"], 5);
    assert!(v["precision"].is_string(), "{v}");
    assert!(v["mp_per_s"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    let two = run(&["bench", "--model", "ffdnet", "--size", "32", "--runs", "2"]);
    assert_clean_failure(&two, "--runs");
    let huge = run(&["bench", "--model", "ffdnet", "--size", "100000"]);
    assert_clean_failure(&huge, "--size must be in");
}

#[test]
fn tiled_inference_matches_untiled_within_a_hundredth_of_a_db() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let clean = picture(150, 170);
    let noisy = denoise_data::noise::NoiseSpec::Gaussian { lo: 25.0, hi: 25.0 }
        .apply(&clean, 1)
        .image;
    let input = dir.path().join("noisy.png");
    io::save(&input, &noisy, None, BitDepth::Sixteen).unwrap();
    let denoise = |name: &str, extra: &[&str]| {
        let path = dir.path().join(name);
        infer_ok(&model, &input, &path, extra);
        let img = io::load(&path).unwrap().image;
        denoise_metrics::psnr(clean.data(), img.data(), 1.0).unwrap()
    };
    let whole = denoise("whole.png", &["--tile", "4096"]);
    let tiled = denoise("tiled.png", &["--tile", "64", "--overlap", "16"]);
    assert!(
        (whole - tiled).abs() < 0.01,
        "untiled {whole:.4} dB vs tiled {tiled:.4} dB"
    );
    // The self-ensemble runs per tile and blends the same way.
    let whole8 = denoise("whole8.png", &["--tile", "4096", "--ensemble", "8"]);
    let tiled8 = denoise(
        "tiled8.png",
        &["--tile", "64", "--overlap", "16", "--ensemble", "8"],
    );
    assert!(
        (whole8 - tiled8).abs() < 0.01,
        "untiled {whole8:.4} dB vs tiled {tiled8:.4} dB, ensemble of 8"
    );
    assert!((whole8 - whole).abs() > 1e-4, "--ensemble changed nothing");
}

#[test]
fn eval_prints_the_documented_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("clean");
    std::fs::create_dir_all(&data).unwrap();
    io::save(data.join("1.png"), &picture(32, 40), None, BitDepth::Eight).unwrap();
    io::save(data.join("2.png"), &picture(36, 28), None, BitDepth::Eight).unwrap();
    let out = eval_json(&model, &data, "gaussian:15,method2", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["model"].as_str().unwrap().ends_with("tiny.safetensors"));
    assert_eq!(v["ensemble"], 1);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["noise"], "gaussian:15");
    for r in results {
        assert_eq!(r["images"], 2);
        for key in ["mean_psnr", "mean_ssim", "noisy_psnr", "seconds_per_mp"] {
            assert!(r[key].as_f64().is_some_and(f64::is_finite), "{key}: {r}");
        }
    }
    let noisy15 = results[0]["noisy_psnr"].as_f64().unwrap();
    assert!(
        (23.5..25.5).contains(&noisy15),
        "sigma 15 noisy PSNR ~24.6 dB, got {noisy15}"
    );
}

/// `eval --json` of `model` on `data` with `noise`, and `extra` flags.
fn eval_json(model: &Path, data: &Path, noise: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--noise",
        noise,
        "--json",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn blind_eval_reports_each_images_estimated_sigma() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_ffdnet(dir.path());
    let data = dir.path().join("clean");
    std::fs::create_dir_all(&data).unwrap();
    io::save(data.join("1.png"), &picture(48, 64), None, BitDepth::Eight).unwrap();
    let eval = |extra: &[&str]| {
        let out = eval_json(
            &path,
            &data,
            "gaussian:25",
            &[&["--per-image"], extra].concat(),
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["results"][0]["per_image"][0].clone()
    };
    let blind = eval(&["--blind"]);
    let estimate = blind["sigma_estimate"].as_f64().unwrap();
    assert!((estimate - 25.0).abs() < 1.5, "{blind}");
    assert_eq!(blind["read_by_model"], false, "{blind}");
    // Given the true level, there is no estimate to report.
    assert!(eval(&[]).get("sigma_estimate").is_none());
}

#[test]
fn eval_reports_on_stdout_and_refuses_a_set_it_cannot_evaluate_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("clean");
    std::fs::create_dir_all(&data).unwrap();
    io::save(data.join("1.png"), &picture(24, 28), None, BitDepth::Eight).unwrap();
    let args = |data: &Path| {
        vec![
            "eval".to_owned(),
            "--model".into(),
            model.to_str().unwrap().into(),
            "--data".into(),
            data.to_str().unwrap().into(),
            "--noise".into(),
            "gaussian:25".into(),
        ]
    };
    let out = cli().args(args(&data)).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("gaussian:25") && text.contains("s/MP"),
        "{text}"
    );

    let gray = Image::from_fn(1, 16, 16, |_, y, x| ((x + y) % 7) as f32 / 7.0);
    io::save(data.join("2-gray.png"), &gray, None, BitDepth::Eight).unwrap();
    std::fs::write(data.join("3-broken.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
    // A file whose header reads but whose pixels stop short is named too.
    let whole = io::encode_png(&picture(24, 28), None, BitDepth::Eight).unwrap();
    std::fs::write(data.join("4-cut.png"), &whole[..whole.len() / 2]).unwrap();
    let out = cli().args(args(&data)).output().unwrap();
    assert_clean_failure(&out, "3 of 4 file(s) cannot be evaluated");
    let err = stderr(&out);
    assert!(
        err.contains("2-gray.png") && err.contains("3-broken.png") && err.contains("4-cut.png"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "no results for a set that was refused"
    );
}

#[test]
fn eval_records_the_bf16_loss_in_the_model_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("clean");
    std::fs::create_dir_all(&data).unwrap();
    io::save(data.join("1.png"), &picture(24, 20), None, BitDepth::Eight).unwrap();
    let model_arg = model.to_str().unwrap();
    let out = run(&[
        "eval",
        "--model",
        model_arg,
        "--data",
        data.to_str().unwrap(),
        "--noise",
        "gaussian:25",
        "--record-bf16",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let meta = artefact::load(&model, tch::Device::Cpu).unwrap().metadata;
    let loss = meta.bf16_psnr_loss_db.expect("bf16 loss recorded");
    // bf16 keeps 8 mantissa bits: on an untrained tiny net the loss is small but not huge.
    assert!(loss.abs() < 1.0, "bf16 loss {loss} dB");
    assert!(meta.bf16_measured_on.unwrap().contains("gaussian:25"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("recorded bf16 PSNR loss"));
    // Recording measures the non-blind protocol only.
    let out = run(&[
        "eval",
        "--model",
        model_arg,
        "--data",
        data.to_str().unwrap(),
        "--noise",
        "gaussian:25",
        "--record-bf16",
        "--blind",
    ]);
    assert_clean_failure(&out, "cannot be used with");
}

#[test]
fn eval_takes_a_gray_set_through_a_colour_model_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("gray");
    std::fs::create_dir_all(&data).unwrap();
    io::save(
        data.join("1.png"),
        &picture(24, 20).to_gray(),
        None,
        BitDepth::Eight,
    )
    .unwrap();
    let eval = |extra: &[&str]| eval_json(&model, &data, "gaussian:25", extra);
    assert_clean_failure(&eval(&[]), "--gray-through-colour evaluates a gray set");
    let out = eval(&["--gray-through-colour"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["gray_through_colour"], true);
    assert_eq!(report["results"][0]["images"], 1);
    assert!(
        report["results"][0]["mean_psnr"]
            .as_f64()
            .unwrap()
            .is_finite()
    );
    // A colour set is not what the flag takes.
    io::save(data.join("2.png"), &picture(24, 20), None, BitDepth::Eight).unwrap();
    assert_clean_failure(
        &eval(&["--gray-through-colour"]),
        "--gray-through-colour takes gray images",
    );
}

#[test]
fn plot_redraws_a_runs_curves() {
    let dir = tempfile::tempdir().unwrap();
    let log: String = (1..=50)
        .map(|s| format!("{{\"step\":{s},\"loss\":{}}}\n", 0.02 / s as f64))
        .chain(["{\"step\":50,\"val_psnr\":27.0,\"noisy_psnr\":20.2,\"val_ssim\":0.7}\n".into()])
        .collect();
    std::fs::write(dir.path().join("train.jsonl"), log).unwrap();
    let out = run(&["plot", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("50 steps, 1 validations"));
    for name in ["loss.png", "psnr.png"] {
        let img = io::load(dir.path().join(name)).unwrap().image;
        assert_eq!(img.shape(), (3, 520, 900), "{name}");
    }
    assert_clean_failure(&run(&["plot", "/nonexistent/run"]), "cannot read");
}

/// `n` colour pictures of slightly different sizes, `0.png`..., in `dir/images`.
fn training_images(dir: &Path, n: usize) -> PathBuf {
    training_pictures(dir, n, 3)
}

/// `n` pictures with `channels` channels, `0.png`..., in `dir/images`.
fn training_pictures(dir: &Path, n: usize, channels: usize) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for i in 0..n {
        let picture = picture(40 + 4 * i, 48).to_channels(channels).unwrap();
        io::save(
            images.join(format!("{i}.png")),
            &picture,
            None,
            BitDepth::Eight,
        )
        .unwrap();
    }
    images
}

/// A manifest (`dir/data/manifest.json`) of `n` training pictures with `channels` channels,
/// `val_fraction` of them held out.
fn prepared(dir: &Path, n: usize, channels: usize, val_fraction: &str) -> PathBuf {
    let images = training_pictures(dir, n, channels);
    let data = dir.join("data");
    let out = run(&[
        "prepare-data",
        "--src",
        images.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
        "--val-fraction",
        val_fraction,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    data.join("manifest.json")
}

#[test]
fn a_gray_model_says_that_a_colour_picture_comes_back_gray() {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(0);
    let cfg =
        serde_json::from_str(r#"{"kind":"dncnn","channels":1,"depth":3,"features":8}"#).unwrap();
    let gray = Model::new(&cfg, tch::Device::Cpu).unwrap();
    let model = dir.path().join("gray.safetensors");
    artefact::save(&gray, &artefact::Metadata::new(gray.config()), &model).unwrap();
    let colour = dir.path().join("colour.png");
    io::save(&colour, &picture(24, 20), None, BitDepth::Eight).unwrap();
    let flat = dir.path().join("flat.png");
    io::save(
        &flat,
        &picture(24, 20).to_gray().to_rgb(),
        None,
        BitDepth::Eight,
    )
    .unwrap();
    let infer = |input: &Path| infer_ok(&model, input, &dir.path().join("out.png"), &[]);
    assert!(infer(&colour).contains("a gray model: the result is gray"));
    // A gray picture stored as RGB loses nothing.
    assert!(!infer(&flat).contains("the result is gray"));
}

#[test]
fn blind_infer_says_how_it_read_the_noise() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_ffdnet(dir.path());
    let (h, w) = (96, 128);
    let clean = picture(h, w);
    let field = denoise_data::noise::NoiseSpec::Gaussian { lo: 20.0, hi: 20.0 };
    // Independent noise in each channel, and one noise field added to all three (as a JPEG
    // with subsampled colour leaves it, in part).
    let white = field.apply(&clean, 1).image;
    let common = field.apply(&Image::zeros(1, h, w), 2).image;
    let shared = Image::from_fn(3, h, w, |c, y, x| {
        clean.plane(c)[y * w + x] + common.plane(0)[y * w + x]
    });
    let infer = |name: &str, image: &Image| {
        let input = dir.path().join(name);
        io::save(&input, image, None, BitDepth::Sixteen).unwrap();
        infer_ok(&path, &input, &dir.path().join(format!("out-{name}")), &[])
    };
    let said = infer("white.png", &white);
    assert!(said.contains("with brightness"), "{said}");
    assert!(!said.contains("share their noise"), "{said}");
    let said = infer("shared.png", &shared);
    assert!(said.contains("share their noise"), "{said}");
    assert!(!said.contains("with brightness"), "{said}");
}

#[test]
fn the_default_gives_blind_white_noise_to_its_white_noise_model() {
    let dir = tempfile::tempdir().unwrap();
    // Shipped models: a default that reads the level itself, and a white-noise model.
    let shipped = dir.path().join("models");
    std::fs::create_dir(&shipped).unwrap();
    tch::manual_seed(0);
    let reader = r#"{"kind":"ffdnet","depth":3,"features":8,"estimator":{"depth":2,"features":4,"smooth":3}}"#;
    let model = Model::new(&serde_json::from_str(reader).unwrap(), tch::Device::Cpu).unwrap();
    let meta = artefact::Metadata::new(model.config());
    let default = shipped.join("default.safetensors");
    artefact::save(&model, &meta, &default).unwrap();
    // Another network than the default's body, which blind white noise would get alone too.
    tch::manual_seed(9);
    let plain = r#"{"kind":"ffdnet","depth":3,"features":8}"#;
    let model = Model::new(&serde_json::from_str(plain).unwrap(), tch::Device::Cpu).unwrap();
    let white_model = shipped.join("white.safetensors");
    let meta = artefact::Metadata::new(model.config());
    artefact::save(&model, &meta, &white_model).unwrap();
    let (h, w) = (96, 128);
    let clean = picture(h, w);
    let white = denoise_data::noise::NoiseSpec::Gaussian { lo: 20.0, hi: 20.0 }
        .apply(&clean, 1)
        .image;
    let camera: denoise_data::noise::NoiseSpec = "camera:iso=3200".parse().unwrap();
    let camera = camera.apply(&clean, 1).image;
    for (name, image) in [("white.png", &white), ("camera.png", &camera)] {
        io::save(dir.path().join(name), image, None, BitDepth::Sixteen).unwrap();
    }
    io::save(
        dir.path().join("clean-8-bit.png"),
        &clean,
        None,
        BitDepth::Eight,
    )
    .unwrap();
    // The notes and the output of `infer NAME` with `extra` flags.
    let infer = |name: &str, extra: &[&str]| {
        let output = dir
            .path()
            .join(format!("out-{}-{name}", extra.join("_").replace('/', "")));
        let out = cli()
            .env("DENOISE_MODELS", &shipped)
            .args(["infer", dir.path().join(name).to_str().unwrap(), "-o"])
            .arg(&output)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        (stderr(&out), io::load(&output).unwrap().image)
    };
    let note = "denoised by the default's network for white noise";
    let (default_path, white_path) = (default.to_str().unwrap(), white_model.to_str().unwrap());
    // White noise goes to the white-noise model at the classical level, by the default's
    // name or none; a model named by its file is not paired.
    let (said, paired) = infer("white.png", &[]);
    assert!(
        said.contains("its noise is white") && said.contains(note),
        "{said}"
    );
    assert!(said.contains("with brightness"), "{said}");
    let (_, by_white) = infer("white.png", &["--model", white_path]);
    assert!(paired.data() == by_white.data());
    for name in ["default", "photo"] {
        let (said, by_name) = infer("white.png", &["--model", name]);
        let same = by_name.data() == paired.data();
        assert!(said.contains(note) && same, "{name}: {said}");
    }
    let (said, alone) = infer("white.png", &["--model", default_path]);
    assert!(
        !said.contains(note) && alone.data() != paired.data(),
        "{said}"
    );
    // Camera noise, and a level given by hand: the default itself.
    let (said, out) = infer("camera.png", &[]);
    assert!(
        said.contains("read by the model") && !said.contains(note),
        "{said}"
    );
    assert!(out.data() == infer("camera.png", &["--model", default_path]).1.data());
    let (said, out) = infer("white.png", &["--sigma", "20"]);
    assert!(!said.contains(note), "{said}");
    let given = infer("white.png", &["--sigma", "20", "--model", default_path]).1;
    assert!(out.data() == given.data());
    // A clean 8-bit file: its rounding is white, but not noise to tell of.
    let (said, _) = infer("clean-8-bit.png", &[]);
    assert!(!said.contains(note), "{said}");
    // eval says which images the model read itself, and which went to the white-noise model.
    let data = dir.path().join("clean");
    std::fs::create_dir(&data).unwrap();
    io::save(data.join("1.png"), &clean, None, BitDepth::Sixteen).unwrap();
    let eval = |extra: &[&str]| {
        let out = cli()
            .env("DENOISE_MODELS", &shipped)
            .args(["eval", "--data", data.to_str().unwrap()])
            .args([
                "--noise",
                "camera:iso=3200,gaussian:20",
                "--blind",
                "--per-image",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        out
    };
    let v: serde_json::Value = serde_json::from_slice(&eval(&["--json"]).stdout).unwrap();
    let field = |k: usize, key: &str| v["results"][k]["per_image"][0][key].clone();
    assert_eq!(
        (field(0, "read_by_model"), field(1, "read_by_model")),
        (true.into(), false.into()),
        "{v}"
    );
    assert_eq!(
        (field(0, "white_noise_model"), field(1, "white_noise_model")),
        (false.into(), true.into()),
        "{v}"
    );
    let text = String::from_utf8_lossy(&eval(&[]).stdout).into_owned();
    assert!(
        text.contains("across the image, read by the model"),
        "{text}"
    );
    assert!(
        text.contains("white noise: the white-noise network"),
        "{text}"
    );
    // A white-noise model that does not fit (this one reads the level itself) is left out,
    // with a warning, rather than failing every run.
    std::fs::copy(&default, &white_model).unwrap();
    let (said, out) = infer("white.png", &[]);
    assert!(
        said.contains("does not fit as the white-noise model"),
        "{said}"
    );
    assert!(!said.contains(note) && out.data() == alone.data(), "{said}");
}

#[test]
fn a_gray_model_trains_from_a_colour_ffdnet() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = prepared(dir.path(), 4, 1, "0.25");
    tch::manual_seed(0);
    let cfg = serde_json::from_str(r#"{"kind":"ffdnet","depth":3,"features":8}"#).unwrap();
    let colour = Model::new(&cfg, tch::Device::Cpu).unwrap();
    let init = dir.path().join("colour.safetensors");
    artefact::save(&colour, &artefact::Metadata::new(colour.config()), &init).unwrap();
    let train = |init: &Path, out: &str| {
        run(&[
            "--threads",
            "1",
            "train",
            "--init",
            init.to_str().unwrap(),
            "--channels",
            "1",
            "--data",
            manifest.to_str().unwrap(),
            "--out",
            dir.path().join(out).to_str().unwrap(),
            "--noise",
            "gaussian:25",
            "--batch",
            "2",
            "--patch",
            "16",
            "--steps",
            "2",
        ])
    };
    let out = train(&init, "gray");
    assert!(out.status.success(), "{}", stderr(&out));
    let meta = artefact::read_metadata(&dir.path().join("gray")).unwrap();
    assert_eq!(meta.model.kind().to_string(), "ffdnet");
    assert_eq!(meta.model.channels(), 1);
    // Only a colour FFDNet or DRUNet has a gray twin.
    let out = train(&tiny_model(dir.path()), "dncnn");
    assert_clean_failure(&out, "only a colour ffdnet or drunet turns into a gray one");
}

#[test]
fn sigterm_stops_training_with_a_checkpoint_that_resumes() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let manifest = prepared(dir.path(), 6, 3, "0.34");
    let run_dir = dir.path().join("run");
    let train = |extra: &[&str]| {
        let mut cmd = cli();
        cmd.args([
            "--threads",
            "1",
            "train",
            "--model",
            "dncnn",
            "--channels",
            "3",
        ])
        .args(["--data", manifest.to_str().unwrap()])
        .args(["--out", run_dir.to_str().unwrap()])
        .args(["--batch", "2", "--patch", "16", "--val-every", "1000000"])
        .args(extra);
        cmd
    };
    let mut child = train(&["--steps", "1000000"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the run has started, then let it take a few steps.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("training in"));
    assert!(started.is_some(), "the run did not start");
    std::thread::sleep(std::time::Duration::from_secs(3));
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    let rest = rest.join("\n");
    assert!(status.success(), "{status:?}: {rest}");
    let stopped = rest
        .lines()
        .find_map(|l| l.strip_prefix("stopped at step "))
        .unwrap_or_else(|| panic!("no 'stopped at step' line in: {rest}"));
    let step: u64 = stopped.split(':').next().unwrap().parse().unwrap();
    assert!(step >= 1, "{rest}");
    assert!(run_dir.join("checkpoint.safetensors").is_file());

    // The checkpoint resumes where the run stopped.
    let out = train(&["--resume", "--steps", &(step + 2).to_string()])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("from step {step}")),
        "resumed elsewhere: {err}"
    );
    assert!(
        err.contains(&format!("finished at step {}", step + 2)),
        "{err}"
    );

    // `runs` reads the run back, with its cost; a spent CPU budget stops a resume at once.
    let out = run(&["runs", "--json", run_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary[0]["model"], "dncnn");
    assert_eq!(summary[0]["steps"], step + 2);
    assert!(summary[0]["best_val_psnr"].is_f64(), "{summary}");
    assert!(
        summary[0]["cpu_minutes"].as_f64().is_some_and(|m| m > 0.0),
        "{summary}"
    );
    let out = train(&["--resume", "--steps", "1000000", "--cpu-budget", "1e-6"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("stopped at step {}", step + 2)),
        "{err}"
    );

    // A fine-tune starts a new run from the run's best model, taking its architecture.
    let tuned = dir.path().join("tuned");
    let out = run(&[
        "--threads",
        "1",
        "train",
        "--init",
        run_dir.to_str().unwrap(),
        "--data",
        manifest.to_str().unwrap(),
        "--out",
        tuned.to_str().unwrap(),
        "--noise",
        "method2",
        "--batch",
        "2",
        "--patch",
        "16",
        "--steps",
        "2",
        "--profile",
    ]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("time: ")
            && err.contains("% of the time waiting for patches")
            && err.contains("mean ms per step, device synchronised: copy "),
        "{err}"
    );
    assert!(
        err.contains("from step 0 of 2")
            && err.contains("starting from the weights of")
            && err.contains("fine-tuning on method2 at a peak learning rate of 1e-4")
            // Judged on the noise it is tuned for, not on the default's Gaussian sigma 25.
            && err.contains("on method2 noise"),
        "{err}"
    );
    let meta = artefact::read_metadata(&tuned).unwrap();
    assert_eq!(meta.model.kind().to_string(), "dncnn");
    assert_eq!(meta.noise.as_deref(), Some("method2"));
    let out = train(&["--resume", "--init", run_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success() && stderr(&out).contains("--init"));
}

#[test]
fn prepare_data_names_what_it_left_out_and_train_names_a_gray_file_in_a_colour_set() {
    let dir = tempfile::tempdir().unwrap();
    let images = training_images(dir.path(), 4);
    std::fs::copy(images.join("0.png"), images.join("copy.png")).unwrap();
    std::fs::write(images.join("broken.png"), b"not a png").unwrap();
    let gray = picture(44, 44).to_channels(1).unwrap();
    io::save(images.join("gray.png"), &gray, None, BitDepth::Eight).unwrap();
    let data = dir.path().join("data");
    let out = run(&[
        "prepare-data",
        "--src",
        images.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("left out 1 unusable file(s):") && err.contains("broken.png"),
        "{err}"
    );
    assert!(
        err.contains("left out 1 duplicate(s):") && err.contains("copy.png (same bytes as 0.png)"),
        "{err}"
    );

    let out = run(&[
        "--threads",
        "1",
        "train",
        "--model",
        "dncnn",
        "--channels",
        "3",
        "--data",
        data.join("manifest.json").to_str().unwrap(),
        "--out",
        dir.path().join("run").to_str().unwrap(),
        "--patch",
        "16",
        "--steps",
        "1",
    ]);
    assert_clean_failure(&out, "gray.png");
    assert!(
        stderr(&out).contains("has 1 channel(s) but 3"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn prepare_data_splits_each_of_several_sources() {
    let dir = tempfile::tempdir().unwrap();
    let (photos, more) = (dir.path().join("photos"), dir.path().join("more"));
    for (folder, n, w) in [(&photos, 8, 48), (&more, 2, 52)] {
        std::fs::create_dir_all(folder).unwrap();
        for i in 0..n {
            let name = folder.join(format!("{i}.png"));
            io::save(name, &picture(40 + 4 * i, w), None, BitDepth::Eight).unwrap();
        }
    }
    let data = dir.path().join("data");
    let out = run(&[
        "prepare-data",
        "--src",
        photos.to_str().unwrap(),
        "--src",
        more.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    // One validation file of ten at the default 0.05, but one from each source.
    assert!(err.contains("8 training and 2 validation images"), "{err}");
    for line in [
        format!("  {}: 7 training, 1 validation", photos.display()),
        format!("  {}: 1 training, 1 validation", more.display()),
    ] {
        assert!(err.contains(&line), "'{line}' not in: {err}");
    }
    let manifest = denoise_data::manifest::Manifest::load(data.join("manifest.json")).unwrap();
    assert_eq!(manifest.sources, ["photos", "more"]);

    let nested = run(&[
        "prepare-data",
        "--src",
        dir.path().to_str().unwrap(),
        "--src",
        more.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
    ]);
    assert_clean_failure(&nested, "holds the source");
}

#[test]
fn metrics_over_directories_go_on_past_a_bad_pair_and_say_what_was_left() {
    let dir = tempfile::tempdir().unwrap();
    let (refs, tests) = (dir.path().join("ref"), dir.path().join("test"));
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::create_dir_all(&tests).unwrap();
    for (name, h, w) in [("a.png", 24, 30), ("b.png", 20, 20), ("tiny.png", 8, 8)] {
        io::save(refs.join(name), &picture(h, w), None, BitDepth::Eight).unwrap();
        io::save(tests.join(name), &picture(h, w + 1), None, BitDepth::Eight).unwrap();
    }
    // a.png matches; b.png's test copy is broken; tiny.png is under SSIM's window; only.png
    // has no test copy.
    io::save(tests.join("a.png"), &picture(24, 30), None, BitDepth::Eight).unwrap();
    io::save(
        tests.join("tiny.png"),
        &picture(8, 8),
        None,
        BitDepth::Eight,
    )
    .unwrap();
    std::fs::write(tests.join("b.png"), b"broken").unwrap();
    io::save(
        refs.join("only.png"),
        &picture(16, 16),
        None,
        BitDepth::Eight,
    )
    .unwrap();
    let out = run(&[
        "metrics",
        refs.to_str().unwrap(),
        tests.to_str().unwrap(),
        "--json",
    ]);
    assert_clean_failure(&out, "1 of 3 pair(s) could not be compared: b.png");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a.png", "tiny.png"]);
    assert_eq!(v["files"][1]["ssim"], serde_json::Value::Null);
    assert_eq!(v["files"][1]["psnr"], "inf");
    assert_eq!(v["mean"]["ssim"], 1.0);
    assert_eq!(v["unmatched"], serde_json::json!(["only.png"]));
    assert_eq!(v["failed"][0]["name"], "b.png");
}

#[test]
fn a_truncated_jpeg_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let jpeg = io::encode(
        &picture(48, 40),
        None,
        BitDepth::Eight,
        io::ImageFormat::Jpeg,
    )
    .unwrap();
    let whole = dir.path().join("whole.jpg");
    std::fs::write(&whole, &jpeg).unwrap();
    let cut = dir.path().join("cut.jpg");
    std::fs::write(&cut, &jpeg[..jpeg.len() * 2 / 3]).unwrap();
    let output = dir.path().join("out.png");
    let out = run(&[
        "infer",
        "--model",
        model.to_str().unwrap(),
        cut.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "cut.jpg");
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));
    assert!(!output.exists());
    let out = run(&["metrics", whole.to_str().unwrap(), cut.to_str().unwrap()]);
    assert_clean_failure(&out, "cut.jpg");
}

#[test]
fn export_refuses_to_replace_the_model_it_exports() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let before = std::fs::read(&model).unwrap();
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let in_run = run_dir.join("model.safetensors");
    std::fs::copy(&model, &in_run).unwrap();
    let spelled = run_dir.join("../tiny.safetensors");
    let linked = dir.path().join("linked.pt");
    std::fs::hard_link(&model, &linked).unwrap();
    for (spec, output, named) in [
        (&model, &model, "tiny.safetensors"),
        (&model, &spelled, "tiny.safetensors"),
        (&model, &linked, "tiny.safetensors"),
        (&run_dir, &in_run, "model.safetensors"),
    ] {
        let out = run(&[
            "export",
            spec.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
        ]);
        assert_clean_failure(&out, "is the model being exported");
        assert!(stderr(&out).contains(named), "{}", stderr(&out));
    }
    assert_eq!(std::fs::read(&model).unwrap(), before);
    assert_eq!(std::fs::read(&in_run).unwrap(), before);
    // Elsewhere, it exports.
    let pt = run_dir.join("model.pt");
    let out = run(&[
        "export",
        run_dir.to_str().unwrap(),
        "-o",
        pt.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(pt.is_file());
}

#[test]
fn outputs_that_are_not_regular_files_are_refused_before_any_work() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let clean = dir.path().join("clean.png");
    io::save(&clean, &picture(24, 28), None, BitDepth::Eight).unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let fifos = [
        dir.path().join("pipe.png"),
        dir.path().join("pipe.pt"),
        out_dir.join("clean.png"),
    ];
    for fifo in &fifos {
        let made = Command::new("mkfifo").arg(fifo).status().unwrap();
        assert!(made.success());
    }
    let [pipe_png, pipe_pt, in_out_dir] = fifos.each_ref().map(|p| p.to_str().unwrap());
    let (model, clean) = (model.to_str().unwrap(), clean.to_str().unwrap());
    for (args, named) in [
        (
            vec!["infer", "--model", model, clean, "-o", pipe_png],
            pipe_png,
        ),
        (
            vec!["infer", "--model", model, clean, "--out-dir"],
            in_out_dir,
        ),
        (
            vec!["noise", "--kind", "gaussian:25", clean, "-o", pipe_png],
            pipe_png,
        ),
        (vec!["export", model, "-o", pipe_pt], pipe_pt),
    ] {
        let mut args = args;
        if args.last() == Some(&"--out-dir") {
            args.push(out_dir.to_str().unwrap());
        }
        let out = run(&args);
        assert_clean_failure(&out, "is not a regular file");
        let err = stderr(&out);
        assert!(err.contains(named), "{err}");
        assert!(!err.contains("denoised"), "refused after the work: {err}");
    }
    for fifo in &fifos {
        let kind = std::fs::symlink_metadata(fifo).unwrap().file_type();
        assert!(kind.is_fifo(), "{} was replaced", fifo.display());
    }
}

#[test]
fn eval_refuses_an_image_smaller_than_the_ssim_window_up_front_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("clean");
    std::fs::create_dir_all(&data).unwrap();
    io::save(data.join("1.png"), &picture(24, 28), None, BitDepth::Eight).unwrap();
    io::save(
        data.join("2-thin.png"),
        &picture(8, 40),
        None,
        BitDepth::Eight,
    )
    .unwrap();
    let out = run(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--noise",
        "gaussian:25",
    ]);
    assert_clean_failure(&out, "1 of 2 file(s) cannot be evaluated");
    let err = stderr(&out);
    assert!(
        err.contains("2-thin.png") && err.contains("40x8") && err.contains("SSIM"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "no results for a set that was refused"
    );
}

#[test]
fn resuming_a_run_whose_config_is_empty_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::write(run_dir.join("config.toml"), "").unwrap();
    let out = run(&["train", "--resume", "--out", run_dir.to_str().unwrap()]);
    assert_clean_failure(&out, "config.toml");
    let err = stderr(&out);
    assert!(err.contains("is empty") && !err.contains("''"), "{err}");
}

#[test]
fn eval_pairs_scores_real_noisy_photos_by_name_and_names_unmatched_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let pairs = dir.path().join("pairs");
    for side in ["noisy", "clean"] {
        std::fs::create_dir_all(pairs.join(side)).unwrap();
    }
    let clean = picture(24, 28);
    let noisy = "gaussian:10+round"
        .parse::<denoise_data::noise::NoiseSpec>()
        .unwrap()
        .apply(&clean, 3)
        .image;
    for name in ["a", "b"] {
        // The two sides may be in different formats: pairs match by name alone.
        io::save(
            pairs.join(format!("clean/{name}.png")),
            &clean,
            None,
            BitDepth::Eight,
        )
        .unwrap();
        io::save(
            pairs.join(format!("noisy/{name}.tif")),
            &noisy,
            None,
            BitDepth::Eight,
        )
        .unwrap();
    }
    let dir_arg = pairs.to_str().unwrap();
    let out = run(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--pairs",
        dir_arg,
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &json["results"][0];
    assert_eq!(row["noise"], "real");
    assert_eq!(row["images"], 2);
    let noisy_psnr = row["noisy_psnr"].as_f64().unwrap();
    let (c, n) = (
        io::load(pairs.join("clean/a.png")).unwrap().image,
        io::load(pairs.join("noisy/a.tif")).unwrap().image,
    );
    let want = denoise_metrics::psnr(c.data(), n.data(), 1.0).unwrap();
    assert!((noisy_psnr - want).abs() < 1e-6, "{noisy_psnr} vs {want}");

    io::save(pairs.join("noisy/c.png"), &noisy, None, BitDepth::Eight).unwrap();
    let out = run(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--pairs",
        dir_arg,
    ]);
    assert_clean_failure(&out, "unmatched");
    assert!(stderr(&out).contains("c.png"), "{}", stderr(&out));

    // A clean photo paired with itself (how "clean photos stay clean" is measured): its noisy
    // PSNR is infinite, and says so rather than NaN.
    let same = dir.path().join("same");
    for side in ["noisy", "clean"] {
        std::fs::create_dir_all(same.join(side)).unwrap();
        io::save(same.join(side).join("a.png"), &clean, None, BitDepth::Eight).unwrap();
    }
    let out = run(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--pairs",
        same.to_str().unwrap(),
        "--per-image",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(noisy    inf dB)"), "{text}");
    assert!(!text.contains("NaN"), "{text}");
}

#[test]
fn a_copied_binary_denoises_with_its_built_in_default_model_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let exe = bin.join("denoise-cli");
    std::fs::copy(env!("CARGO_BIN_EXE_denoise-cli"), &exe).unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let input = dir.path().join("in.png");
    io::save(&input, &picture(24, 32), None, BitDepth::Eight).unwrap();
    let output = dir.path().join("out.png");
    let command = || {
        let mut c = Command::new(&exe);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &home)
            .current_dir(&bin);
        c
    };
    let out = command()
        .args(["infer", input.to_str().unwrap(), "-o"])
        .arg(&output)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(io::load(&output).unwrap().image.shape(), (3, 24, 32));
    let unpacked = home.join(".local/share/denoise/models/default.safetensors");
    assert!(unpacked.is_file(), "{}", unpacked.display());
    // By name too; an unknown name lists the built-in ones.
    let gaussian = dir.path().join("gaussian.png");
    let out = command()
        .args([
            "infer",
            "--model",
            "gaussian",
            input.to_str().unwrap(),
            "-o",
        ])
        .arg(&gaussian)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = command()
        .args(["infer", "--model", "nosuch", input.to_str().unwrap(), "-o"])
        .arg(dir.path().join("x.png"))
        .output()
        .unwrap();
    assert!(stderr(&out).contains("gaussian"), "{}", stderr(&out));
}
