//! Batches split over processes: `infer --shard` (given, or from a Slurm array's or a
//! Kubernetes Indexed Job's variables), `--files-from`, `--skip-existing` and `--report`.

use super::{assert_clean_failure, cli, picture, stderr, tiny_ffdnet};
use denoise_data::io::{self, BitDepth};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The variables `--shard auto` reads, removed so a test run inside a Slurm job or a
/// Kubernetes pod is not steered by its own.
const SHARD_VARS: [&str; 5] = [
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_STEP",
    "JOB_COMPLETION_INDEX",
];

/// `denoise-cli infer --model MODEL ARGS...` with no shard variables but `env`.
fn infer(model: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd: Command = cli();
    cmd.args(["infer", "--model", model.to_str().unwrap()])
        .args(args);
    for var in SHARD_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("denoise-cli runs")
}

/// `n` small pictures under `dir`, some in a subfolder; their paths relative to `dir`.
pub(crate) fn batch_inputs(dir: &Path, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let rel = if i % 3 == 2 {
                PathBuf::from(format!("sub/img{i:02}.png"))
            } else {
                PathBuf::from(format!("img{i:02}.png"))
            };
            let path = dir.join(&rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let image = picture(24, 20 + i);
            io::save(&path, &image, None, BitDepth::Eight).unwrap();
            rel
        })
        .collect()
}

pub(crate) fn read_report(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no report at {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Each file line of `report` as (input, status).
pub(crate) fn statuses(report: &Value) -> Vec<(String, String)> {
    report["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["input"].as_str().unwrap().to_owned(),
                f["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn n_shards_denoise_each_file_of_a_batch_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_ffdnet(dir.path());
    let input = dir.path().join("in");
    let rels = batch_inputs(&input, 10);
    for n in [1usize, 3, 4] {
        let out = dir.path().join(format!("out{n}"));
        let mut times_done: BTreeMap<String, usize> = BTreeMap::new();
        let mut sizes = Vec::new();
        for i in 0..n {
            let report = dir.path().join(format!("report-{n}-{i}.json"));
            let shard = format!("{i}/{n}");
            let o = infer(
                &model,
                &[
                    input.to_str().unwrap(),
                    "--out-dir",
                    out.to_str().unwrap(),
                    "--sigma",
                    "20",
                    "--shard",
                    &shard,
                    "--report",
                    report.to_str().unwrap(),
                ],
                &[],
            );
            assert!(o.status.success(), "{}", stderr(&o));
            let report = read_report(&report);
            assert_eq!(report["shard"]["index"], i);
            assert_eq!(report["shard"]["count"], n);
            assert_eq!(report["shard"]["batch_files"], 10);
            let files = statuses(&report);
            assert!(
                stderr(&o).contains(&format!(
                    "shard {shard} (from --shard): {} of the batch's 10 image(s)",
                    files.len()
                )),
                "{}",
                stderr(&o)
            );
            sizes.push(files.len());
            for (file, status) in files {
                assert_eq!(status, "done");
                *times_done.entry(file).or_default() += 1;
            }
        }
        let expected: BTreeMap<String, usize> = rels
            .iter()
            .map(|r| (input.join(r).display().to_string(), 1))
            .collect();
        assert_eq!(times_done, expected, "{n} shards of sizes {sizes:?}");
        for rel in &rels {
            assert!(out.join(rel).is_file(), "{n} shards: no {}", rel.display());
        }
        let written = walk(&out).len();
        assert_eq!(written, 10, "{n} shards wrote {written} files");
    }
}

/// Every file under `dir`, recursively.
pub(crate) fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn skip_existing_redoes_only_a_deleted_output() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_ffdnet(dir.path());
    let input = dir.path().join("in");
    let rels = batch_inputs(&input, 6);
    let out = dir.path().join("out");
    let report = dir.path().join("report.json");
    let args = [
        input.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "--skip-existing",
        "--report",
        report.to_str().unwrap(),
    ];
    let first = infer(&model, &args, &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(!stderr(&first).contains("skipped"), "{}", stderr(&first));
    let modified = |rel: &PathBuf| {
        std::fs::metadata(out.join(rel))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before: Vec<_> = rels.iter().map(modified).collect();
    // A coarse file-system clock would hide a rewrite.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let gone = &rels[4];
    std::fs::remove_file(out.join(gone)).unwrap();

    let again = infer(&model, &args, &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    let err = stderr(&again);
    assert!(
        err.contains("skipped 5 image(s) whose output exists") && err.contains("denoised 1 image"),
        "{err}"
    );
    let report = read_report(&report);
    let redone: Vec<String> = statuses(&report)
        .into_iter()
        .filter(|(_, s)| s == "done")
        .map(|(f, _)| f)
        .collect();
    assert_eq!(redone, [input.join(gone).display().to_string()]);
    assert_eq!(report["totals"]["skipped"], 5);
    for (rel, time) in rels.iter().zip(&before) {
        if rel != gone {
            assert_eq!(modified(rel), *time, "{} was rewritten", rel.display());
        }
    }
    assert!(out.join(gone).is_file());
}

#[test]
fn the_report_gives_each_files_status_seconds_and_sigma_and_the_totals() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_ffdnet(dir.path());
    let input = dir.path().join("in");
    batch_inputs(&input, 2);
    std::fs::write(input.join("broken.png"), b"not a png").unwrap();
    let out = dir.path().join("out");
    let report_path = out.join("reports/run.json");
    let run = |extra: &[&str]| {
        let mut args = vec![
            input.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
            "--report",
            report_path.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = infer(&model, &args, &[]);
        // The broken file fails the run, after the others are done and the report written.
        assert_clean_failure(&o, "1 of 3 image(s) failed");
        read_report(&report_path)
    };

    let report = run(&["--sigma", "25"]);
    assert_eq!(report["model"], model.display().to_string());
    assert!(report["shard"].is_null());
    let files = report["files"].as_array().unwrap();
    assert_eq!(files.len(), 3);
    for file in files {
        let name = file["input"].as_str().unwrap();
        assert!(file["seconds"].as_f64().unwrap() >= 0.0, "{file}");
        if name.ends_with("broken.png") {
            assert_eq!(file["status"], "failed");
            assert!(file["sigma"].is_null());
            let error = file["error"].as_str().unwrap();
            assert!(error.contains("broken.png"), "{error}");
        } else {
            assert_eq!(file["status"], "done", "{file}");
            assert_eq!(file["sigma"], 25.0);
            assert_eq!(file["sigma_estimated"], false);
            assert!(file.get("error").is_none(), "{file}");
            assert!(
                file["output"]
                    .as_str()
                    .unwrap()
                    .starts_with(out.to_str().unwrap())
            );
        }
    }
    let totals = &report["totals"];
    assert_eq!(
        (
            &totals["files"],
            &totals["done"],
            &totals["skipped"],
            &totals["failed"]
        ),
        (&3.into(), &2.into(), &0.into(), &1.into())
    );
    assert!(totals["seconds"].as_f64().unwrap() > 0.0);

    // Blind: the estimated level is reported as such; the report is replaced whole.
    let report = run(&["--sigma", "auto"]);
    let done: Vec<&Value> = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["status"] == "done")
        .collect();
    assert_eq!(done.len(), 2);
    for file in done {
        assert!(file["sigma"].as_f64().unwrap() >= 0.0, "{file}");
        assert_eq!(file["sigma_estimated"], true);
    }
    let leftovers: Vec<PathBuf> = walk(&out.join("reports"))
        .into_iter()
        .filter(|p| p != &report_path)
        .collect();
    assert!(leftovers.is_empty(), "temporaries left: {leftovers:?}");
}

#[test]
fn files_from_reads_paths_relative_to_the_list_and_skips_comments() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_ffdnet(dir.path());
    let input = dir.path().join("in");
    let rels = batch_inputs(&input, 4);
    let list = input.join("todo.txt");
    let absolute = input.join(&rels[3]);
    std::fs::write(
        &list,
        format!(
            "# what is left\n{}\n\n  {}  \n{}\n",
            rels[0].display(),
            rels[2].display(),
            absolute.display()
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = infer(
        &model,
        &[
            "--files-from",
            list.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let mut written: Vec<PathBuf> = walk(&out)
        .into_iter()
        .map(|p| p.strip_prefix(&out).unwrap().to_path_buf())
        .collect();
    written.sort();
    let mut expected = vec![rels[0].clone(), rels[2].clone(), rels[3].clone()];
    expected.sort();
    assert_eq!(written, expected);

    std::fs::write(&list, "img00.png\nnot-there.png\n").unwrap();
    let o = infer(
        &model,
        &[
            "--files-from",
            list.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_failure(&o, "line 2");
}

#[test]
fn shard_auto_reads_a_slurm_array_or_a_kubernetes_indexed_job() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_ffdnet(dir.path());
    let input = dir.path().join("in");
    batch_inputs(&input, 5);
    let out = dir.path().join("out");
    let report = dir.path().join("r.json");
    let run = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            input.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
            "--sigma",
            "10",
            "--shard",
            "auto",
            "--report",
            report.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        infer(&model, &args, env)
    };
    // An array submitted as --array=3-6: task 5 is shard 2 of 4.
    let o = run(
        &[],
        &[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(
            "shard 2/4 (from SLURM_ARRAY_TASK_ID=5, SLURM_ARRAY_TASK_MIN=3, \
             SLURM_ARRAY_TASK_COUNT=4)"
        ),
        "{}",
        stderr(&o)
    );
    let r = read_report(&report);
    assert_eq!(
        (&r["shard"]["index"], &r["shard"]["count"]),
        (&2.into(), &4.into())
    );
    assert!(
        r["shard"]["from"]
            .as_str()
            .unwrap()
            .starts_with("SLURM_ARRAY_TASK_ID=5")
    );

    let o = run(&["--shards", "3"], &[("JOB_COMPLETION_INDEX", "1")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("shard 1/3 (from JOB_COMPLETION_INDEX=1, --shards 3)"),
        "{}",
        stderr(&o)
    );
    assert_eq!(read_report(&report)["shard"]["index"], 1);

    for (extra, env, needle) in [
        (&[][..], &[][..], "found neither SLURM_ARRAY_TASK_ID"),
        (
            &[],
            &[("JOB_COMPLETION_INDEX", "0")][..],
            "give --shards N, the Job's completions",
        ),
        (
            &["--shards", "3"],
            &[("JOB_COMPLETION_INDEX", "3")],
            "JOB_COMPLETION_INDEX=3 is out of range for --shards 3",
        ),
        (
            &[],
            &[
                ("SLURM_ARRAY_TASK_ID", "4"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
            "not one of 4 evenly spaced indices",
        ),
        (
            &[],
            &[("SLURM_ARRAY_TASK_ID", "1")],
            "SLURM_ARRAY_TASK_COUNT is not",
        ),
    ] {
        let o = run(extra, env);
        assert_clean_failure(&o, needle);
        assert_eq!(o.status.code(), Some(1), "{env:?}: {}", stderr(&o));
    }
}

#[test]
fn bad_shard_values_are_refused_as_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_ffdnet(dir.path());
    let input = dir.path().join("in");
    batch_inputs(&input, 1);
    let out = dir.path().join("out");
    let base = [input.to_str().unwrap(), "--out-dir", out.to_str().unwrap()];
    for (extra, needle) in [
        (
            &["--shard", "4/4"][..],
            "shard 4 is out of range for 4 shard(s)",
        ),
        (&["--shard", "0/0"], "at least 1"),
        (&["--shard", "2"], "'2' is not I/N"),
        (&["--shard", "one/two"], "is not I/N"),
        (
            &["--shard", "auto", "--shards", "0"],
            "'0' is not a shard count",
        ),
        (&["--shards", "2"], "--shard"),
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let o = infer(&model, &args, &[]);
        assert_clean_failure(&o, needle);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
    }
    // A shard of one output file means nothing.
    let one = input.join("img00.png");
    let o = infer(
        &model,
        &[one.to_str().unwrap(), "-o", "x.png", "--shard", "0/2"],
        &[],
    );
    assert_clean_failure(&o, "cannot be used with");
    let mut args = base.to_vec();
    args.extend_from_slice(&["--shard", "0/2", "--shards", "2"]);
    assert_clean_failure(
        &infer(&model, &args, &[]),
        "--shards goes with --shard auto",
    );
    assert!(!out.exists(), "a refused run wrote {}", out.display());
}
