//! The Slurm array script, `docs/deploy/slurm/denoise-array.sbatch`, on a real one-node Slurm
//! started for the test: its own slurm.conf, munge key, ports, state, spool, pid and log files
//! in a temporary directory, daemons stopped by PID at the end (also when the test fails).
//!
//! Needs Debian's `slurmctld`, `slurmd` and `munge` (`cargo xtask ci` installs them) and root
//! (slurmd starts each job as its user). Without them the test fails when `CI` is set and is
//! skipped (saying so) otherwise.

use super::batch::{batch_inputs, read_report, statuses, walk};
use super::tiny_ffdnet;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The script under test, as the docs give it.
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../docs/deploy/slurm/denoise-array.sbatch"
);

/// Array tasks, and images over them.
const TASKS: usize = 4;
const IMAGES: usize = 20;

/// An executable named `name` on `PATH` or in the sbin folders (often off a user's `PATH`).
fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            == Some("0")
    })
}

/// A one-node Slurm cluster in a temporary directory; dropping it stops its daemons.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
    /// (name, process), in start order.
    daemons: Vec<(&'static str, Child)>,
    bin: BTreeMap<&'static str, PathBuf>,
}

impl Cluster {
    fn start(dir: &Path, bin: BTreeMap<&'static str, PathBuf>) -> Self {
        for sub in ["state", "spool", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            conf: dir.join("slurm.conf"),
            daemons: Vec::new(),
            bin,
        };
        // munge, with a key of its own: slurm signs every message with it.
        let key = dir.join("munge.key");
        let mut bytes = vec![0u8; 1024];
        use std::io::Read as _;
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut bytes)
            .unwrap();
        std::fs::write(&key, &bytes).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let socket = dir.join("munge.sock");
        let munged = cluster.bin["munged"].clone();
        cluster.spawn(
            "munged",
            Command::new(munged).args([
                "--foreground".into(),
                format!("--socket={}", socket.display()),
                format!("--key-file={}", key.display()),
                format!("--pid-file={}", dir.join("munged.pid").display()),
                format!("--seed-file={}", dir.join("munged.seed").display()),
                format!("--log-file={}", dir.join("log/munged.log").display()),
            ]),
        );
        cluster.wait_for("munged's socket", |_| socket.exists());

        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let host = host.trim().split('.').next().unwrap().to_owned();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let ctld_port = free_port();
        let d_port = std::iter::repeat_with(free_port)
            .find(|&p| p != ctld_port)
            .unwrap();
        let conf = format!(
            "ClusterName=denoisetest\n\
             SlurmctldHost={host}(127.0.0.1)\n\
             SlurmctldPort={ctld_port}\n\
             SlurmdPort={d_port}\n\
             AuthType=auth/munge\n\
             CredType=cred/munge\n\
             AuthInfo=socket={socket}\n\
             SlurmUser=root\n\
             SlurmdUser=root\n\
             StateSaveLocation={dir}/state\n\
             SlurmdSpoolDir={dir}/spool\n\
             SlurmctldPidFile={dir}/slurmctld.pid\n\
             SlurmdPidFile={dir}/slurmd.pid\n\
             SlurmctldLogFile={dir}/log/slurmctld.log\n\
             SlurmdLogFile={dir}/log/slurmd.log\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             JobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\n\
             JobCompType=jobcomp/none\n\
             MpiDefault=none\n\
             SchedulerType=sched/builtin\n\
             SelectType=select/cons_tres\n\
             SelectTypeParameters=CR_Core\n\
             ReturnToService=2\n\
             NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN\n\
             PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP\n",
            socket = socket.display(),
            dir = dir.display(),
        );
        std::fs::write(&cluster.conf, conf).unwrap();
        let conf = cluster.conf.clone();
        let slurmctld = cluster.bin["slurmctld"].clone();
        cluster.spawn(
            "slurmctld",
            Command::new(slurmctld).arg("-D").arg("-f").arg(&conf),
        );
        let slurmd = cluster.bin["slurmd"].clone();
        cluster.spawn(
            "slurmd",
            Command::new(slurmd)
                .arg("-D")
                .arg("-f")
                .arg(&conf)
                .args(["-N", &host]),
        );
        cluster.wait_for("the node to be idle", |cluster| {
            cluster
                .client("sinfo")
                .args(["-h", "-N", "-o", "%t"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle")
        });
        cluster
    }

    /// Starts a daemon in the foreground, its output in `log/NAME.out`.
    fn spawn(&mut self, name: &'static str, cmd: &mut Command) {
        let log = std::fs::File::create(self.dir.join(format!("log/{name}.out"))).unwrap();
        let child = cmd
            .env("SLURM_CONF", &self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.daemons.push((name, child));
    }

    /// A Slurm client command (`sbatch`, `sinfo`, `scancel`) talking to this cluster.
    fn client(&self, name: &'static str) -> Command {
        let mut cmd = Command::new(&self.bin[name]);
        cmd.env("SLURM_CONF", &self.conf);
        for var in [
            "SLURM_ARRAY_TASK_ID",
            "SLURM_JOB_ID",
            "JOB_COMPLETION_INDEX",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    fn wait_for(&mut self, what: &str, ready: impl Fn(&Cluster) -> bool) {
        let start = Instant::now();
        while !ready(self) {
            let exited = self
                .daemons
                .iter_mut()
                .find_map(|(name, child)| Some((*name, child.try_wait().ok()??)));
            if let Some((name, status)) = exited {
                panic!("{name} exited ({status}) before {what}:\n{}", self.logs());
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!("no {what} after 30 s:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `sbatch --wait` of the script over `input` into `out`, at most 3 minutes (it takes
    /// seconds; the margin is for a machine busy with other tests).
    fn run_array(&self, input: &Path, out: &Path, model: &Path) {
        let mut sbatch = self
            .client("sbatch")
            .arg("--wait")
            .arg(format!("--array=0-{}", TASKS - 1))
            .arg("--cpus-per-task=1")
            .arg(format!("--output={}/log/task-%a.out", self.dir.display()))
            .arg(SCRIPT)
            .arg(input)
            .arg(out)
            .args(["--model", model.to_str().unwrap(), "--sigma", "20"])
            .env("DENOISE_CLI", env!("CARGO_BIN_EXE_denoise-cli"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sbatch runs");
        let start = Instant::now();
        let status = loop {
            if let Some(status) = sbatch.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > Duration::from_secs(180) {
                let _ = sbatch.kill();
                panic!("the array did not finish in 3 minutes:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let output = sbatch.wait_with_output().unwrap();
        assert!(
            status.success(),
            "sbatch: {status}: {}{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.logs()
        );
    }

    /// Every log of the cluster and its tasks, for a failure's message.
    fn logs(&self) -> String {
        let mut text = String::new();
        let mut files = walk(&self.dir.join("log"));
        files.sort();
        for file in files {
            let body = std::fs::read_to_string(&file).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(30).collect();
            text += &format!("--- {}\n", file.display());
            for line in tail.into_iter().rev() {
                text += line;
                text.push('\n');
            }
        }
        text
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Jobs first (a failed test may leave one running), then the daemons, newest first:
        // SIGTERM, and SIGKILL for one still there after 5 seconds.
        if self.daemons.len() == 3 {
            let _ = self
                .client("scancel")
                .args(["--quiet", "--user=root"])
                .output();
        }
        for (_, child) in self.daemons.iter_mut().rev() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let start = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tools the test needs, or why it cannot run here.
fn tools() -> Result<BTreeMap<&'static str, PathBuf>, String> {
    let mut found = BTreeMap::new();
    for name in [
        "munged",
        "slurmctld",
        "slurmd",
        "sbatch",
        "sinfo",
        "scancel",
    ] {
        let path = find(name).ok_or_else(|| {
            format!("{name} is not installed (apt-get install -y slurmctld slurmd munge)")
        })?;
        found.insert(name, path);
    }
    if !is_root() {
        return Err("slurmd must run as root".into());
    }
    Ok(found)
}

/// Each input's number of "done" lines over the reports in `reports`, and every status seen.
fn tally(reports: &Path) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let mut done = BTreeMap::new();
    let mut seen = BTreeMap::new();
    for task in 0..TASKS {
        let report = read_report(&reports.join(format!("shard-{task}.json")));
        assert_eq!(report["shard"]["index"], task);
        assert_eq!(report["shard"]["count"], TASKS);
        let from = report["shard"]["from"].as_str().unwrap();
        assert!(
            from.starts_with(&format!("SLURM_ARRAY_TASK_ID={task}")),
            "{from}"
        );
        for (input, status) in statuses(&report) {
            if status == "done" {
                *done.entry(input.clone()).or_default() += 1;
            }
            *seen.entry(status).or_default() += 1;
        }
    }
    (done, seen)
}

#[test]
fn the_slurm_array_script_denoises_a_folder_once_and_a_rerun_redoes_only_the_missing() {
    let bin = match tools() {
        Ok(bin) => bin,
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set but the Slurm test cannot run: {why}"
            );
            eprintln!("SKIPPED the Slurm array test: {why}");
            return;
        }
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&dir.path().join("slurm"), bin);
    let model = tiny_ffdnet(dir.path());
    let input = dir.path().join("in");
    let rels = batch_inputs(&input, IMAGES);
    let out = dir.path().join("out");

    cluster.run_array(&input, &out, &model);
    let (done, seen) = tally(&out.join("reports"));
    let every_input_once: BTreeMap<String, usize> = rels
        .iter()
        .map(|r| (input.join(r).display().to_string(), 1))
        .collect();
    assert_eq!(done, every_input_once, "{}", cluster.logs());
    assert_eq!(seen.get("done"), Some(&IMAGES), "{seen:?}");
    let images: Vec<PathBuf> = walk(&out)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    assert_eq!(images.len(), IMAGES, "{images:?}");
    for rel in &rels {
        assert!(out.join(rel).is_file(), "no output for {}", rel.display());
    }

    // A lost output: the same array again redoes that one and leaves the others alone.
    let modified = |rel: &PathBuf| {
        std::fs::metadata(out.join(rel))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before: Vec<_> = rels.iter().map(modified).collect();
    let lost = &rels[7];
    std::fs::remove_file(out.join(lost)).unwrap();
    cluster.run_array(&input, &out, &model);
    let (done, seen) = tally(&out.join("reports"));
    assert_eq!(
        done.into_keys().collect::<Vec<_>>(),
        [input.join(lost).display().to_string()],
        "{}",
        cluster.logs()
    );
    assert_eq!(seen.get("skipped"), Some(&(IMAGES - 1)), "{seen:?}");
    for (rel, time) in rels.iter().zip(&before) {
        if rel != lost {
            assert_eq!(modified(rel), *time, "{} was rewritten", rel.display());
        }
    }
    assert!(out.join(lost).is_file());
    drop(cluster);
    eprintln!(
        "the Slurm array test took {:.0} s",
        started.elapsed().as_secs_f64()
    );
}
