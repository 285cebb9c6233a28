//! The web app's HTTP side: a request's head (the server's own first check, then hyper's), its
//! query, and a body (raw image or multipart form), sent to a running server over loopback TCP,
//! through every route that reads nothing outside the machine.
//!
//! The head check is private to `denoise-serve`; it is reached through `App::serve`, as a client
//! reaches it. The URL routes (`/api/denoise-url`, `/api/fetch-url`) are left out: an input
//! could name any host.

use denoise_models::{Model, ModelConfig, artefact};
use denoise_serve::{App, ModelEntry, ServeConfig};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// What an input's first byte chooses: the method and path its request line starts with, and
/// whether the input's first line may add a path segment (else only a query string).
const ROUTES: [(&str, &str, bool); 12] = [
    ("GET", "/", false),
    ("GET", "/healthz", false),
    ("GET", "/readyz", false),
    ("GET", "/metrics", false),
    ("GET", "/api/models", false),
    ("GET", "/api/samples", false),
    ("GET", "/api/samples/", true),
    ("GET", "/api/progress/", true),
    ("POST", "/api/denoise", false),
    ("PUT", "/api/denoise", false),
    ("GET", "/app.js", false),
    ("POST", "/api/", true),
];

/// Longest wait for a whole answer: a request that holds the server longer is a finding.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);
/// How long a request whose body only hyper can frame is given before the client stops sending.
const UNSURE_WAIT: Duration = Duration::from_millis(500);

pub struct Http {
    address: SocketAddr,
    /// Holds the model files the server reads.
    _dir: tempfile::TempDir,
}

impl Http {
    /// Starts a server on a loopback port with two tiny models, on its own thread.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let models = [
            ("tiny", r#"{"kind":"dncnn","depth":3,"features":8}"#),
            ("level", r#"{"kind":"ffdnet","depth":3,"features":8}"#),
        ]
        .iter()
        .map(|(name, json)| {
            let config: ModelConfig = serde_json::from_str(json).expect("a model config");
            let model = Model::new(&config, tch::Device::Cpu).expect("a tiny model");
            let path = dir.path().join(format!("{name}.safetensors"));
            artefact::save(&model, &artefact::Metadata::new(&config), &path).expect("it saves");
            ModelEntry {
                name: (*name).into(),
                path,
                white: None,
            }
        })
        .collect();
        let mut config = ServeConfig::new(models);
        // Small limits keep each accepted image quick to denoise.
        config.max_pixels = 1 << 16;
        config.max_upload_bytes = 1 << 20;
        config.tile = 64;
        config.queue = 4;
        config.header_timeout = Duration::from_secs(5);
        let app = App::new(config).expect("the server starts");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback port");
        let address = listener.local_addr().expect("its address");
        std::thread::spawn(move || runtime.block_on(app.serve(listener, std::future::pending())));
        Self { address, _dir: dir }
    }

    /// Sends `request` and reads the server's answer. The server closes a connection whose
    /// client stops sending (as hyper does without half-close support), so the client stops
    /// sending only once an answer is whole, or at once when the request itself is cut short.
    fn exchange(&self, request: &[u8]) -> Vec<u8> {
        let mut stream = TcpStream::connect(self.address).expect("the server accepts");
        // The server may answer and close before reading all of a large body.
        let _ = stream.write_all(request);
        let wait = match whole(request) {
            Some(true) => ANSWER_WITHIN,
            Some(false) => Duration::ZERO,
            // A body whose end only hyper can tell (chunked, conflicting lengths).
            None => UNSURE_WAIT,
        };
        let deadline = Instant::now() + wait;
        let mut answer = Vec::new();
        let mut chunk = [0u8; 16 << 10];
        while !answered(&answer) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            stream.set_read_timeout(Some(left)).expect("a timeout");
            match stream.read(&mut chunk) {
                Ok(0) => return answer,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(_) => return answer,
            }
        }
        if answered(&answer) {
            return answer;
        }
        if wait == ANSWER_WITHIN {
            panic!(
                "no whole answer within {ANSWER_WITHIN:?} to {:?}",
                String::from_utf8_lossy(&request[..request.len().min(300)])
            );
        }
        // Cut short: the server answers what it has (or closes) once the client stops.
        let _ = stream.shutdown(Shutdown::Write);
        stream
            .set_read_timeout(Some(ANSWER_WITHIN))
            .expect("a timeout");
        match stream.read_to_end(&mut answer) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the server kept a finished connection open for {ANSWER_WITHIN:?}")
            }
            _ => answer,
        }
    }
}

/// Whether `request` holds a whole head and as much body as its `content-length` says; `None`
/// when its framing is for hyper to judge.
fn whole(request: &[u8]) -> Option<bool> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Request::new(&mut headers);
    let head = match parsed.parse(request) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Some(false),
        // Refused from the head alone, without waiting for a body.
        Err(_) => return Some(true),
    };
    let mut length = None;
    for h in parsed.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        }
    }
    Some(request.len() - head >= length.unwrap_or(0))
}

/// Whether `answer` holds a whole final response (a `100 Continue` before it is skipped).
fn answered(answer: &[u8]) -> bool {
    let mut at = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(n)) = response.parse(&answer[at..]) else {
            return false;
        };
        if response.code.is_some_and(|c| (100..200).contains(&c)) {
            at += n;
            continue;
        }
        let body = &answer[at + n..];
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
        };
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            return body.ends_with(b"0\r\n\r\n");
        }
        return match header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            Some(len) => body.len() >= len,
            // Ends when the server closes.
            None => false,
        };
    }
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl super::Target for Http {
    fn run(&self, data: &[u8]) {
        let Some((path, request)) = request(data) else {
            return;
        };
        let answer = self.exchange(&request);
        check(&path, &answer);
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        seeds()
    }
}

/// The request an input stands for, and its path: the route its first byte picks, its first
/// line appended to that route's path (a segment or a query), and the rest sent verbatim as
/// header lines and body.
fn request(data: &[u8]) -> Option<(String, Vec<u8>)> {
    let (&pick, rest) = data.split_first()?;
    let (method, base, segment) = ROUTES[usize::from(pick) % ROUTES.len()];
    let (tail, rest) = match rest.iter().position(|&b| b == b'\n') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    let tail = String::from_utf8_lossy(tail);
    let stays_on_route = if segment {
        !tail.contains('/')
    } else {
        tail.is_empty() || tail.starts_with('?')
    };
    // No other route may be reached by a path the input writes, in this request or one
    // pipelined after it: the routes that fetch from outside have `url` in their names.
    let names_url = data.windows(3).any(|w| w.eq_ignore_ascii_case(b"url"));
    if !stays_on_route || names_url || tail.contains('%') {
        return None;
    }
    let path = format!("{base}{tail}");
    let mut request = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
    request.extend_from_slice(rest);
    Some((path, request))
}

/// The server's answer: never an internal error, and an API error is JSON with an `error`.
fn check(path: &str, answer: &[u8]) {
    if answer.is_empty() {
        // The connection closed without a response: a head cut short, or hyper refusing it.
        return;
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(head_len)) = response.parse(answer) else {
        panic!(
            "a malformed response: {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
    };
    let status = response.code.expect("a status code");
    assert_ne!(
        status,
        500,
        "an internal error for {path}: {}",
        String::from_utf8_lossy(&answer[head_len..])
    );
    let chunked = response.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value).contains("chunked")
    });
    // Only the first response is judged: bytes after its body answer a pipelined request.
    let length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let rest = &answer[head_len..];
    let body = length.map_or(rest, |n| &rest[..n.min(rest.len())]);
    if status >= 400 && path.starts_with("/api") && !body.is_empty() && !chunked {
        let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "error {status} for {path} is not JSON ({e}): {}",
                String::from_utf8_lossy(body)
            )
        });
        assert!(
            json.get("error").is_some(),
            "error {status} for {path}: {json}"
        );
    }
}

/// A request for each route, and uploads of a small PNG as a form and as a raw body.
pub fn seeds() -> Vec<Vec<u8>> {
    let png = crate::image::seeds().remove(0);
    let form = |fields: &str| {
        let mut body = Vec::new();
        body.extend_from_slice(
            b"--XyZ\r\ncontent-disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\
              content-type: image/png\r\n\r\n",
        );
        body.extend_from_slice(&png);
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(fields.as_bytes());
        body.extend_from_slice(b"--XyZ--\r\n");
        let mut input = format!(
            "\nhost: localhost\r\ncontent-type: multipart/form-data; boundary=XyZ\r\n\
             content-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        input.extend_from_slice(&body);
        input
    };
    let pick = |route: &str, method: &str| {
        ROUTES
            .iter()
            .position(|&(m, p, _)| m == method && p == route)
            .expect("a listed route") as u8
    };
    let get = |route: &str, tail: &str| {
        let mut input = vec![pick(route, "GET")];
        input.extend_from_slice(format!("{tail}\nhost: localhost\r\n\r\n").as_bytes());
        input
    };
    let mut out: Vec<Vec<u8>> = ROUTES
        .iter()
        .filter(|r| r.0 == "GET" && !r.2)
        .map(|r| get(r.1, ""))
        .collect();
    out.push(get("/api/progress/", "job-1"));
    out.push(get("/api/samples/", "flower?sigma=25"));
    let denoise = pick("/api/denoise", "POST");
    let mut upload = vec![denoise];
    upload.extend_from_slice(&form(""));
    out.push(upload);
    let mut with_fields = vec![denoise];
    with_fields.extend_from_slice(b"?sigma=25");
    with_fields.extend_from_slice(&form(
        "--XyZ\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\nlevel\r\n\
         --XyZ\r\ncontent-disposition: form-data; name=\"ensemble\"\r\n\r\n2\r\n",
    ));
    out.push(with_fields);
    let mut raw = vec![denoise];
    raw.extend_from_slice(
        format!(
            "?model=tiny&sigma=auto\nhost: 127.0.0.1\r\norigin: http://127.0.0.1\r\n\
             content-type: image/png\r\ncontent-length: {}\r\n\r\n",
            png.len()
        )
        .as_bytes(),
    );
    raw.extend_from_slice(&png);
    out.push(raw);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Target;

    #[test]
    fn inputs_stay_on_the_listed_routes() {
        let denoise = ROUTES.iter().position(|r| r.1 == "/api/denoise").unwrap() as u8;
        assert!(request(&[denoise, b'-', b'u', b'r', b'l']).is_none());
        assert!(request(&[denoise, b'?', b'x']).is_some());
        let progress = ROUTES.iter().position(|r| r.1 == "/api/progress/").unwrap() as u8;
        assert!(request(&[progress, b'a', b'/', b'b']).is_none());
        assert!(request(&[progress, b'%', b'7', b'5']).is_none());
        let (path, _) = request(&[progress, b'j', b'\n', b'x']).unwrap();
        assert_eq!(path, "/api/progress/j");
    }

    #[test]
    fn seeds_are_answered_and_their_mutations_run_clean() {
        let target = Http::new();
        for seed in target.seeds() {
            let (path, request) = request(&seed).expect("a seed stays on its route");
            let answer = target.exchange(&request);
            let text = String::from_utf8_lossy(&answer);
            assert!(text.starts_with("HTTP/1.1 "), "{path}: {text}");
            check(&path, &answer);
            if path.starts_with("/api/denoise") {
                assert!(text.starts_with("HTTP/1.1 200"), "{path}: {text}");
            }
        }
        for input in crate::mutations(&target.seeds()) {
            target.run(&input);
        }
    }
}
