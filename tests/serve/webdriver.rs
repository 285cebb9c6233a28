//! A minimal W3C WebDriver client over reqwest, and chromedriver/Chromium discovery.
//!
//! Hand-written rather than `fantoccini`: the end-to-end test needs eight commands (session,
//! navigate, find, send keys, click, execute, window size, screenshot), each one JSON POST, and
//! reqwest is already here; fantoccini would add its own hyper client stack and TLS setup for
//! what is about a hundred lines.

use base64::Engine as _;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The key W3C WebDriver puts element references under.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The first of `names` found on `PATH`.
pub fn find_on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// A chromedriver process on a free port.
pub struct Driver {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Driver {
    pub async fn start(chromedriver: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: crate::client(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = driver
                .http
                .get(format!("{}/status", driver.base))
                .send()
                .await
            {
                if let Ok(v) = r.json::<Value>().await {
                    if v["value"]["ready"] == true {
                        return driver;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A headless Chromium session with a fresh profile in `profile`.
    pub async fn session(&self, chromium: &Path, profile: &Path) -> Session {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            "--window-size=1280,860",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": { "binary": chromium, "args": args }
                }
            }
        });
        let value = call(
            &self.http,
            reqwest::Method::POST,
            &format!("{}/session", self.base),
            Some(caps),
        )
        .await;
        let id = value["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        Session {
            http: self.http.clone(),
            base: format!("{}/session/{id}", self.base),
            closed: false,
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Value {
    let mut request = http.request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("webdriver answers");
    let status = response.status();
    let value: Value = response.json().await.expect("webdriver JSON");
    assert!(status.is_success(), "webdriver {url}: {status} {value}");
    value["value"].clone()
}

/// One browser session. Dropped without [`Session::close`] (a failed assertion), it still ends
/// the session, so chromedriver quits the browser instead of leaving it orphaned.
pub struct Session {
    http: reqwest::Client,
    base: String,
    closed: bool,
}

impl Session {
    async fn post(&self, path: &str, body: Value) -> Value {
        call(
            &self.http,
            reqwest::Method::POST,
            &format!("{}{path}", self.base),
            Some(body),
        )
        .await
    }

    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    pub async fn set_window(&self, width: u32, height: u32) {
        self.post("/window/rect", json!({ "width": width, "height": height }))
            .await;
    }

    /// The element id of the first match of a CSS selector.
    pub async fn find(&self, css: &str) -> String {
        let v = self
            .post("/element", json!({ "using": "css selector", "value": css }))
            .await;
        v[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("no element for {css}: {v}"))
            .to_owned()
    }

    pub async fn send_keys(&self, element: &str, text: &str) {
        self.post(
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    pub async fn click(&self, element: &str) {
        self.post(&format!("/element/{element}/click"), json!({}))
            .await;
    }

    /// Runs `script` (a function body; a returned promise is awaited) with `args`.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": args }))
            .await
    }

    /// Polls `script` until it returns something other than `null`/`false`, or panics.
    pub async fn wait_for(&self, script: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.execute(script, json!([])).await;
            if !v.is_null() && v != Value::Bool(false) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for: {script}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A PNG screenshot of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        let v = call(
            &self.http,
            reqwest::Method::GET,
            &format!("{}/screenshot", self.base),
            None,
        )
        .await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64"))
            .unwrap()
    }

    pub async fn close(mut self) {
        call(&self.http, reqwest::Method::DELETE, &self.base, None).await;
        self.closed = true;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        // No async in drop: a plain blocking HTTP/1.1 DELETE to chromedriver.
        let Some((host, path)) = self
            .base
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/'))
        else {
            return;
        };
        if let Ok(mut stream) = std::net::TcpStream::connect(host) {
            use std::io::{Read, Write};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
            let request = format!(
                "DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\
                 Connection: close\r\n\r\n"
            );
            if stream.write_all(request.as_bytes()).is_ok() {
                // Read the whole answer (chromedriver may keep the connection open), so the
                // browser is gone before chromedriver is killed.
                let mut answer = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    answer.extend_from_slice(&buf[..n]);
                    if complete(&answer) {
                        break;
                    }
                }
            }
        }
    }
}

/// Whether `answer` holds a whole HTTP response (headers and `Content-Length` bytes of body).
fn complete(answer: &[u8]) -> bool {
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    answer.len() >= end + 4 + length
}
