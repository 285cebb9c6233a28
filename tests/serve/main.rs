//! Web app tests: the built `denoise-cli serve` on a free loopback port, driven over HTTP (every
//! route and every bad input, the server staying up), under load, and through its page in
//! headless Chromium. Each test starts its own server and kills it when done.

mod api;
mod cancel;
mod corpus;
mod e2e;
mod fixture;
mod load;
mod metrics;
mod url;
mod webdriver;

use denoise_data::noise::NoiseSpec;
use denoise_data::{Image, io};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

/// A running `denoise-cli serve`.
pub struct Server {
    child: Mutex<Child>,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts the server on a free port with `extra` flags and waits until it listens.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_with_env(extra, &[])
    }

    /// [`Server::start`] with environment variables set for the server.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &Path)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_denoise-cli"))
            .args(["serve", "--addr", "127.0.0.1:0", "--device", "cpu"])
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("denoise-cli starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = Arc::clone(&log);
        // Keeps reading after start-up, so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("serving http://").nth(1) {
                    let addr = rest.split('/').next().unwrap_or_default().to_owned();
                    let _ = tx.send(addr);
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not start:\n{}", log.lock().unwrap());
            }
        };
        Server {
            child: Mutex::new(child),
            base: format!("http://{addr}"),
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    /// Sends SIGTERM and waits (at most 30 s) for the server to exit; returns its status.
    pub fn terminate(&self) -> std::process::ExitStatus {
        let pid = self.pid().to_string();
        let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(kill.success(), "kill -TERM {pid} failed");
        let mut child = self.child.lock().unwrap();
        for _ in 0..300 {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the server did not exit within 30 s of SIGTERM:\n{}",
            self.log()
        );
    }

    /// Everything the server printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// GETs `path` and parses the answer as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = client().get(self.url(path)).send().await.unwrap();
        response.json().await.unwrap()
    }

    /// Asserts the process is alive, answers `/healthz`, and never panicked.
    pub async fn assert_healthy(&self) {
        let exited = self.child.lock().unwrap().try_wait().unwrap();
        assert!(exited.is_none(), "server exited:\n{}", self.log());
        let response = client().get(self.url("/healthz")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["status"], "ok");
        let log = self.log();
        assert!(!log.contains("panicked"), "{log}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// An HTTP client that ignores proxies (tests talk to loopback only).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

pub fn samples_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/samples"))
}

/// A clean `h x w` crop of a shipped sample, as stored in 8 bits.
pub fn clean_crop(sample: &str, y: usize, x: usize, h: usize, w: usize) -> Image {
    let img = io::load(samples_dir().join(format!("{sample}.png")))
        .unwrap()
        .image;
    img.crop(y, x, h, w).unwrap()
}

/// `clean` with seeded Gaussian noise (sigma on the 0-255 scale), clipped and 8-bit.
pub fn add_noise(clean: &Image, sigma: f32, seed: u64) -> Image {
    let spec: NoiseSpec = format!("gaussian:{sigma}+clip").parse().unwrap();
    io::quantize_8bit(&spec.apply(clean, seed).image)
}

pub fn png(image: &Image) -> Vec<u8> {
    io::encode_png(image, None, io::BitDepth::Eight).unwrap()
}

pub fn decode(bytes: &[u8]) -> Image {
    io::decode_bytes(bytes, "response.png", u64::MAX)
        .unwrap()
        .image
}

pub fn psnr(a: &Image, b: &Image) -> f64 {
    denoise_metrics::psnr(a.data(), b.data(), 1.0).unwrap()
}

/// The clean crop, and its noisy version as PNG bytes.
pub fn noisy_case(h: usize, w: usize) -> (Image, Vec<u8>) {
    let clean = clean_crop("astronaut", 40, 180, h, w);
    let noisy = add_noise(&clean, 25.0, 7);
    (clean, png(&noisy))
}

/// The workspace's target directory (where screenshots go).
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is <target>/tmp")
        .to_path_buf()
}

/// Asserts `response` is an error with `status` and a JSON `{"error": "..."}` containing
/// `needle` (case-insensitive); returns the message.
pub async fn expect_error(response: reqwest::Response, status: u16, needle: &str) -> String {
    let got = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = response.text().await.unwrap();
    assert_eq!(got, status, "body: {text}");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    let message = body["error"].as_str().expect("an error message").to_owned();
    assert!(
        message.to_lowercase().contains(&needle.to_lowercase()),
        "'{needle}' not in '{message}'"
    );
    message
}
