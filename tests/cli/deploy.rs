//! The Kubernetes manifests of `docs/deploy/k8s`, read as YAML: their shape (an Indexed Job
//! whose `--shards` is its completions; a Deployment listening on all addresses with `/readyz`
//! and `/healthz` probes, behind a Service), and each container's command line put to
//! `denoise-cli`'s own parser. No cluster runs them here: each command runs on this machine
//! with the paths under its volume mounts moved into an empty temporary folder and no models,
//! where an accepted command line fails for want of data (exit 1), while one the parser refuses
//! exits 2.

use super::stderr;
use serde::Deserialize as _;
use serde_norway::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const K8S: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/deploy/k8s");

/// Every document of every manifest, with the file it came from.
fn documents() -> Vec<(PathBuf, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(K8S)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", file.display()));
            docs.push((file.clone(), value));
        }
    }
    docs
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("not a list: {value:?}"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("not a string: {v:?}"))
                .to_owned()
        })
        .collect()
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).map(String::as_str)
}

/// Runs `denoise-cli ARGS` as the container would, but with each argument under one of
/// `mounts` moved into `root`, `$(JOB_COMPLETION_INDEX)` as 0 and no models; its exit code and
/// stderr.
fn run_here(args: &[String], mounts: &[String], root: &Path) -> (Option<i32>, String) {
    let args: Vec<String> = args
        .iter()
        .map(|arg| {
            let arg = arg.replace("$(JOB_COMPLETION_INDEX)", "0");
            if mounts.iter().any(|m| arg.starts_with(m.as_str())) {
                format!("{}{arg}", root.display())
            } else {
                arg
            }
        })
        .collect();
    let models = root.join("no-models");
    std::fs::create_dir_all(&models).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_denoise-cli"));
    cmd.args(&args)
        .env("DENOISE_MODELS", &models)
        .env("JOB_COMPLETION_INDEX", "0")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("denoise-cli runs");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("{args:?} ran on: the check expects it to stop for want of data");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), stderr(&out))
}

#[test]
fn the_kubernetes_manifests_hold_command_lines_denoise_cli_accepts() {
    let root = tempfile::tempdir().unwrap();
    let docs = documents();
    let mut kinds = Vec::new();
    let mut container_ports = Vec::new();
    for (file, doc) in &docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        let name = format!("{} ({kind})", file.display());
        kinds.push(kind.clone());
        let Some(containers) = doc["spec"]["template"]["spec"]["containers"].as_sequence() else {
            continue;
        };
        for container in containers {
            assert_eq!(strings(&container["command"]), ["denoise-cli"], "{name}");
            let args = strings(&container["args"]);
            let mounts: Vec<String> = container["volumeMounts"]
                .as_sequence()
                .map(|m| {
                    m.iter()
                        .map(|m| m["mountPath"].as_str().unwrap().to_owned())
                        .collect()
                })
                .unwrap_or_default();
            let (code, err) = run_here(&args, &mounts, root.path());
            assert_eq!(
                code,
                Some(1),
                "{name}: {args:?} should fail for want of data, not as usage: {err}"
            );
            assert!(!err.contains("see 'denoise-cli --help'"), "{name}: {err}");
            match kind.as_str() {
                "Job" => {
                    let spec = &doc["spec"];
                    assert_eq!(spec["completionMode"].as_str(), Some("Indexed"), "{name}");
                    let completions = spec["completions"].as_u64().unwrap();
                    assert_eq!(spec["parallelism"].as_u64(), Some(completions), "{name}");
                    assert_eq!(flag(&args, "--shard"), Some("auto"), "{name}");
                    assert_eq!(
                        flag(&args, "--shards"),
                        Some(completions.to_string().as_str()),
                        "{name}: --shards must be the Job's completions"
                    );
                    assert!(args.iter().any(|a| a == "--skip-existing"), "{name}");
                    assert!(flag(&args, "--report").is_some(), "{name}");
                    assert!(err.contains("does not exist"), "{name}: {err}");
                }
                "Deployment" => {
                    let addr = flag(&args, "--addr").unwrap();
                    assert!(addr.starts_with("0.0.0.0:"), "{name}: --addr {addr}");
                    let port = &container["ports"][0];
                    assert_eq!(
                        port["containerPort"].as_u64().map(|p| p.to_string()),
                        addr.rsplit(':').next().map(str::to_owned),
                        "{name}"
                    );
                    container_ports.extend(port["name"].as_str().map(str::to_owned));
                    for (probe, path) in
                        [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]
                    {
                        assert_eq!(
                            container[probe]["httpGet"]["path"].as_str(),
                            Some(path),
                            "{name}: {probe}"
                        );
                    }
                    assert!(err.contains("no default model"), "{name}: {err}");
                }
                other => panic!("{name}: a container in a {other}, which this test knows not"),
            }
            for resource in ["cpu", "memory"] {
                assert!(
                    !container["resources"]["requests"][resource].is_null(),
                    "{name}: no {resource} request"
                );
            }
        }
    }
    kinds.sort();
    assert_eq!(kinds, ["Deployment", "Job", "Service"]);
    let service = &docs.iter().find(|(_, d)| d["kind"] == "Service").unwrap().1;
    let target = service["spec"]["ports"][0]["targetPort"].as_str().unwrap();
    assert!(
        container_ports.iter().any(|p| p == target),
        "the Service's targetPort {target} is none of {container_ports:?}"
    );
}
