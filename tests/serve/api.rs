//! Every route, and every bad input getting a 4xx JSON error while the server keeps serving.

use crate::{Server, client, decode, expect_error, noisy_case, png, psnr};
use denoise_data::noise::NoiseSpec;
use reqwest::multipart::{Form, Part};

/// The `X-Denoise-Sigma` level and the `LO-HI` of `X-Denoise-Sigma-Range`.
fn sigma_and_range(response: &reqwest::Response) -> (f32, (f32, f32)) {
    let sigma = header(response, "x-denoise-sigma")
        .unwrap()
        .parse()
        .unwrap();
    let range = header(response, "x-denoise-sigma-range").unwrap();
    let (lo, hi) = range.split_once('-').unwrap();
    (sigma, (lo.parse().unwrap(), hi.parse().unwrap()))
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

fn image_part(bytes: Vec<u8>, name: &str) -> Part {
    Part::bytes(bytes)
        .file_name(name.to_owned())
        .mime_str("image/png")
        .unwrap()
}

#[tokio::test]
async fn every_route_answers() {
    let server = Server::start(&["--tile", "128"]);
    let http = client();

    // The page and its assets, with a policy that forbids anything from elsewhere.
    for (path, kind) in [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
    ] {
        let r = http.get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(header(&r, "content-type").unwrap().starts_with(kind));
        assert!(
            header(&r, "content-security-policy")
                .unwrap()
                .contains("default-src 'self'")
        );
        let body = r.text().await.unwrap();
        assert!(
            !body.contains("https://") && !body.contains("http://"),
            "{path}"
        );
    }

    let health = server.get_json("/healthz").await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["workers"], 1);

    let models = server.get_json("/api/models").await;
    assert_eq!(models["default"], "default");
    let default = &models["models"][0];
    assert_eq!(default["name"], "default");
    assert_eq!(default["kind"], "ffdnet");
    assert_eq!(default["takes_sigma"], true);
    assert_eq!(default["reads_level"], true);
    let gaussian = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "gaussian");
    assert_eq!(gaussian.unwrap()["reads_level"], false);
    assert_eq!(models["limits"]["max_upload_bytes"], 20 << 20);
    assert_eq!(models["limits"]["max_ensemble"], 8);

    let samples = server.get_json("/api/samples").await;
    let names: Vec<&str> = samples["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["astronaut", "chelsea", "coffee"]);

    // A demo sample with noise added: seeded, so the same bytes twice.
    let noisy_sample = |sigma: u32| {
        let http = http.clone();
        let url = server.url(&format!("/api/samples/chelsea?sigma={sigma}"));
        async move {
            let r = http.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(header(&r, "content-type").unwrap(), "image/png");
            r.bytes().await.unwrap().to_vec()
        }
    };
    let noisy = noisy_sample(25).await;
    assert_eq!(noisy, noisy_sample(25).await);
    let clean = crate::clean_crop("chelsea", 0, 0, 300, 451);
    let noisy_psnr = psnr(&clean, &decode(&noisy));
    assert!((19.5..21.0).contains(&noisy_psnr), "{noisy_psnr}");

    // The sample back with its reference: the server reports both PSNRs, and they are right.
    let post_form = |form: Form| http.post(server.url("/api/denoise")).multipart(form).send();
    let form = Form::new()
        .text("reference", "chelsea")
        .text("sigma", "25")
        .part("image", image_part(noisy.clone(), "chelsea-noisy.png"));
    let r = post_form(form).await.unwrap();
    assert_eq!(r.status(), 200);
    let psnr_in: f64 = header(&r, "x-denoise-psnr-input").unwrap().parse().unwrap();
    let psnr_out: f64 = header(&r, "x-denoise-psnr").unwrap().parse().unwrap();
    assert_eq!(header(&r, "x-denoise-sigma").unwrap(), "25.0");
    assert!(
        header(&r, "x-denoise-sigma-range").is_none(),
        "a given level is one level"
    );
    assert_eq!(header(&r, "x-denoise-size").unwrap(), "451x300");
    let result = decode(&r.bytes().await.unwrap());
    assert!(
        (psnr_in - noisy_psnr).abs() < 0.01,
        "{psnr_in} vs {noisy_psnr}"
    );
    assert!((psnr_out - psnr(&clean, &result)).abs() < 0.01);
    assert!(psnr_out > psnr_in + 4.0, "{psnr_in} -> {psnr_out}");

    // Raw body, fields in the query; a job id whose progress is readable afterwards.
    let (clean, noisy) = noisy_case(128, 192);
    let r = http
        .post(server.url("/api/denoise?model=gaussian&sigma=blind&job=raw-1"))
        .body(noisy.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ms: f64 = header(&r, "x-denoise-ms").unwrap().parse().unwrap();
    assert!(ms > 0.0);
    // A colour photo's estimate follows its brightness; the header gives its range.
    let (estimated, (lo, hi)) = sigma_and_range(&r);
    assert!((15.0..35.0).contains(&estimated), "{estimated}");
    assert!(
        lo <= estimated && estimated <= hi && hi - lo < 15.0,
        "{lo}-{hi}"
    );
    // The Gaussian model estimates the level outside the network and reports it.
    assert_eq!(header(&r, "x-denoise-model").unwrap(), "gaussian");
    assert!(header(&r, "x-denoise-sigma-source").is_none());
    assert!(
        header(&r, "x-denoise-psnr").is_none(),
        "no reference, no PSNR"
    );
    let result = decode(&r.bytes().await.unwrap());
    assert_eq!(result.shape(), clean.shape());
    let noisy_img = decode(&noisy);
    assert!(psnr(&clean, &result) > psnr(&clean, &noisy_img) + 3.0);

    // The default model reads camera noise's level itself; the server reports that reading.
    let camera: NoiseSpec = "camera:iso=3200".parse().unwrap();
    let camera = camera.apply(&clean, 3).image;
    let r = http
        .post(server.url("/api/denoise?sigma=blind"))
        .body(png(&camera))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-denoise-sigma-source").unwrap(), "model");
    assert!(header(&r, "x-denoise-network").is_none());
    let (read, (lo, hi)) = sigma_and_range(&r);
    assert!((3.0..60.0).contains(&read), "read {read} for camera noise");
    assert!(lo <= read && read <= hi, "{lo}-{hi} around {read}");
    let result = decode(&r.bytes().await.unwrap());
    assert!(psnr(&clean, &result) > psnr(&clean, &camera) + 2.0);
    // White noise goes to its white-noise network at the classical estimate, which follows
    // brightness.
    let r = http
        .post(server.url("/api/denoise?sigma=blind"))
        .body(noisy.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(&r, "x-denoise-sigma-source").is_none());
    assert_eq!(header(&r, "x-denoise-network").unwrap(), "white-noise");
    let (estimated, (lo, hi)) = sigma_and_range(&r);
    assert!((15.0..35.0).contains(&estimated), "{estimated}");
    assert!(lo <= estimated && estimated <= hi, "{lo}-{hi}");
    let result = decode(&r.bytes().await.unwrap());
    assert!(psnr(&clean, &result) > psnr(&clean, &noisy_img) + 3.0);

    let progress = server.get_json("/api/progress/raw-1").await;
    assert_eq!(progress["state"], "done");
    let total = progress["total"].as_u64().unwrap();
    assert!(total >= 2, "a 128x192 image in 128-pixel tiles: {progress}");
    assert_eq!(progress["done"], total);
    expect_error(
        http.get(server.url("/api/progress/never-seen"))
            .send()
            .await
            .unwrap(),
        404,
        "no job",
    )
    .await;

    // Multipart with a fixed sigma: a different result from blind.
    let form = Form::new()
        .text("sigma", "50")
        .part("image", image_part(noisy.clone(), "a.png"));
    let r = post_form(form).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-denoise-sigma").unwrap(), "50.0");
    assert_eq!(header(&r, "x-denoise-ensemble").unwrap(), "1");
    let single = decode(&r.bytes().await.unwrap());
    assert_ne!(single, result);

    // The same with a self-ensemble of 4 passes: another result, said in the headers.
    let form = Form::new()
        .text("sigma", "50")
        .text("ensemble", "4")
        .part("image", image_part(noisy.clone(), "a.png"));
    let r = post_form(form).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-denoise-ensemble").unwrap(), "4");
    let four = decode(&r.bytes().await.unwrap());
    assert_eq!(four.shape(), single.shape());
    assert_ne!(four, single);

    // Unknown routes and methods are JSON too.
    expect_error(
        http.get(server.url("/nope")).send().await.unwrap(),
        404,
        "no route",
    )
    .await;
    expect_error(
        http.get(server.url("/api/denoise")).send().await.unwrap(),
        405,
        "method",
    )
    .await;
    server.assert_healthy().await;

    // SIGTERM (`kill`, a service manager, `docker stop`) is a clean stop, as Ctrl-C is.
    let status = server.terminate();
    assert!(status.success(), "{status:?}:\n{}", server.log());
    // The log is read by a thread: give it a moment to catch the last line.
    for _ in 0..50 {
        if server.log().contains("denoise-cli: stopped") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        server.log().contains("denoise-cli: stopped"),
        "{}",
        server.log()
    );
}

#[test]
fn a_client_that_never_finishes_its_headers_is_disconnected() {
    use std::io::{Read, Write};
    let server = Server::start(&["--header-timeout", "1"]);
    let addr = server.url("").trim_start_matches("http://").to_owned();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"POST /api/denoise HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    slow.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    // Whatever the server says (a 408 or nothing), it then closes the connection.
    let closed = slow.read_to_end(&mut rest).is_ok();
    let waited = started.elapsed().as_secs_f64();
    assert!(closed && waited < 5.0, "still open after {waited:.1} s");
    assert!(
        waited > 0.5,
        "closed after {waited:.2} s, before the timeout"
    );

    // So is one that sends nothing at all.
    let mut silent = std::net::TcpStream::connect(&addr).unwrap();
    silent
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    assert!(silent.read_to_end(&mut rest).is_ok());
    assert!(started.elapsed().as_secs_f64() < 5.0);

    // A trickling client does not hold up a clean stop (under the default 30 s timeout).
    let server = Server::start(&[]);
    let addr = server.url("").trim_start_matches("http://").to_owned();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    let started = std::time::Instant::now();
    assert!(server.terminate().success(), "{}", server.log());
    let waited = started.elapsed().as_secs_f64();
    assert!(waited < 8.0, "stopping took {waited:.1} s");
}

#[test]
fn a_request_hyper_cannot_parse_gets_a_json_error() {
    use std::io::{Read, Write};
    let server = Server::start(&[]);
    let addr = server.url("").trim_start_matches("http://").to_owned();
    for raw in [
        &b"GET /api/samples/<chelsea> HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"[..],
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nbad header\r\n\r\n",
    ] {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream.write_all(raw).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").expect("a response");
        assert!(head.starts_with("HTTP/1.1 400"), "{answer}");
        let error: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
        assert!(
            error["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("malformed HTTP request")),
            "{error}"
        );
    }
    // The server goes on serving.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Sends `raw` on a new connection and returns the status code and the body of the answer.
pub fn raw_exchange(addr: &str, raw: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(raw).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, body.to_owned())
}

#[test]
fn a_request_naming_two_hosts_or_another_host_in_its_request_line_is_refused() {
    let server = Server::start(&[]);
    let addr = server.url("").trim_start_matches("http://").to_owned();
    let refused = [
        // A proxy may route by one Host and the server check the other.
        format!(
            "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
        ),
        format!(
            "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        ),
        // The request line's host wins over Host for an HTTP/1.1 server.
        format!(
            "GET http://evil.example/healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        ),
        format!(
            "POST http://evil.example/api/denoise HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    ];
    for raw in &refused {
        let (status, body) = raw_exchange(&addr, raw.as_bytes());
        assert_eq!(status, 400, "{raw}: {body}");
        let error: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
        let message = error["error"].as_str().unwrap_or_default();
        assert!(message.to_lowercase().contains("host"), "{raw}: {message}");
    }
    // The request line may name this server itself.
    let own =
        format!("GET http://{addr}/healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let (status, body) = raw_exchange(&addr, own.as_bytes());
    assert_eq!(status, 200, "{body}");
    // A job id whose bytes are not UTF-8 once decoded: a JSON 400 as well.
    let bad =
        format!("GET /api/progress/%00%ff HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let (status, body) = raw_exchange(&addr, bad.as_bytes());
    assert_eq!(status, 400, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("bad path"))
    );
    let server_log = server.log();
    assert!(!server_log.contains("panicked"), "{server_log}");
}

/// Sends a `POST /api/denoise?sigma=0` of `body` on a new connection and reads the status line.
fn post_and_await_the_answer(addr: &str, body: &[u8]) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let head = format!(
        "POST /api/denoise?sigma=0 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    let mut status = [0u8; 12];
    stream.read_exact(&mut status).unwrap();
    assert_eq!(&status, b"HTTP/1.1 200");
    stream
}

#[test]
fn a_stop_lets_a_slow_reader_have_its_whole_response() {
    use denoise_data::io::{BitDepth, encode_png};
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    // A result of several MB, more than the sockets buffer: 16-bit noise kept at sigma 0.
    let grain = denoise_data::Image::from_fn(3, 1024, 1024, |c, y, x| {
        let h = (c * 1_048_576 + y * 1024 + x) as u64;
        (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as f32 / (1u64 << 24) as f32
    });
    let body = encode_png(&grain, None, BitDepth::Sixteen).unwrap();
    let server = Server::start(&["--header-timeout", "10"]);
    let addr = server.url("").trim_start_matches("http://").to_owned();
    // An idle keep-alive connection that has had its answer: a stop does not wait for it.
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut health = [0u8; 12];
    idle.read_exact(&mut health).unwrap();
    assert_eq!(&health, b"HTTP/1.1 200");

    // Once the answer has begun, the server is told to stop while this client reads nothing
    // for longer than the 2 s the server gives connections without a request in flight.
    let mut slow = post_and_await_the_answer(&addr, &body);
    std::thread::scope(|scope| {
        let started = Instant::now();
        let stopping = scope.spawn(|| server.terminate());
        std::thread::sleep(Duration::from_secs(4));
        let mut response = b"HTTP/1.1 200".to_vec();
        slow.read_to_end(&mut response).unwrap();
        let head = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head");
        let length: usize = String::from_utf8_lossy(&response[..head])
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_owned)
            })
            .expect("a content length")
            .trim()
            .parse()
            .unwrap();
        assert!(
            length > 3_000_000,
            "too small to fill the buffers: {length}"
        );
        assert_eq!(response.len() - head - 4, length, "the response was cut");
        assert!(stopping.join().unwrap().success(), "{}", server.log());
        let waited = started.elapsed().as_secs_f64();
        assert!(
            waited < 8.0,
            "the idle connection held the stop: {waited:.1} s"
        );
    });

    // A client that never reads is given the header timeout, then cut: the stop still ends.
    let server = Server::start(&["--header-timeout", "2"]);
    let addr = server.url("").trim_start_matches("http://").to_owned();
    let _stalled = post_and_await_the_answer(&addr, &body);
    let started = Instant::now();
    assert!(server.terminate().success(), "{}", server.log());
    let waited = started.elapsed().as_secs_f64();
    assert!((1.5..10.0).contains(&waited), "stopped after {waited:.1} s");
}

/// A PNG chunk with its CRC.
fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
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
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
    out
}

/// A 100 000 x 100 000 RGB PNG in under 100 bytes: a header that would need 30 GB decoded.
pub fn decompression_bomb() -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(chunk(b"IEND", &[]));
    png
}

#[tokio::test]
async fn bad_inputs_get_json_errors_and_the_server_keeps_serving() {
    let server = Server::start(&[
        "--max-upload-mb",
        "1",
        "--max-pixels",
        "1000000",
        "--max-ensemble",
        "2",
    ]);
    let http = client();
    let post_raw = |query: &str, body: Vec<u8>| {
        http.post(server.url(&format!("/api/denoise{query}")))
            .body(body)
            .send()
    };
    let (_, good) = noisy_case(64, 64);

    expect_error(post_raw("", Vec::new()).await.unwrap(), 400, "no image").await;
    expect_error(
        post_raw("", b"hello, not an image".to_vec()).await.unwrap(),
        415,
        "unsupported image format",
    )
    .await;
    let truncated = good[..good.len() * 2 / 3].to_vec();
    let status = post_raw("", truncated).await.unwrap();
    expect_error(status, 422, "failed to decode").await;
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    for b in &mut corrupt[mid..mid + 64] {
        *b ^= 0x5a;
    }
    expect_error(
        post_raw("", corrupt).await.unwrap(),
        422,
        "failed to decode",
    )
    .await;
    expect_error(
        post_raw("", decompression_bomb()).await.unwrap(),
        413,
        "over the limit of 1000000 pixels",
    )
    .await;
    // 1200 x 1000 is fine in bytes (a flat image compresses well) but over 1 MP.
    let big = png(&denoise_data::Image::zeros(3, 1000, 1200));
    assert!(big.len() < 1 << 20);
    expect_error(post_raw("", big).await.unwrap(), 413, "pixels").await;
    let noise_bytes: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    expect_error(
        post_raw("", noise_bytes.clone()).await.unwrap(),
        413,
        "larger than the limit of 1 MB",
    )
    .await;
    let form = Form::new().part("image", image_part(noise_bytes, "big.png"));
    let r = http
        .post(server.url("/api/denoise"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "larger than the limit").await;

    // Fields.
    for (query, needle) in [
        (
            "?model=nope",
            "unknown model 'nope' (known: default, gaussian, gray, method2, white)",
        ),
        ("?sigma=loud", "not a number"),
        ("?sigma=300", "0-255"),
        ("?colour=red", "unknown field"),
        ("?job=a%20b", "job ids"),
        ("?reference=nope", "unknown reference"),
        ("?reference=chelsea", "reference 'chelsea' is 451x300x3"),
        (
            "?ensemble=3",
            "ensemble must be one of [1, 2, 4, 8], got '3'",
        ),
        ("?ensemble=many", "ensemble must be one of"),
        (
            "?ensemble=4",
            "ensemble 4 is over this server's limit of 2 passes",
        ),
    ] {
        expect_error(post_raw(query, good.clone()).await.unwrap(), 400, needle).await;
    }
    let send_form = |form: Form| http.post(server.url("/api/denoise")).multipart(form).send();
    expect_error(
        send_form(Form::new().text("sigma", "10")).await.unwrap(),
        400,
        "no image in the form",
    )
    .await;
    expect_error(
        send_form(
            Form::new()
                .part("image", image_part(good.clone(), "a.png"))
                .text("strength", "9"),
        )
        .await
        .unwrap(),
        400,
        "unknown form field 'strength'",
    )
    .await;
    expect_error(
        send_form(
            Form::new()
                .part("image", image_part(good.clone(), "a.png"))
                .part("image", image_part(good.clone(), "b.png")),
        )
        .await
        .unwrap(),
        400,
        "one image",
    )
    .await;

    // JSON routes.
    let post_json = |path: &str, body: &'static str| {
        http.post(server.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    expect_error(
        post_json("/api/denoise-url", "{not json").await.unwrap(),
        400,
        "invalid JSON",
    )
    .await;
    expect_error(
        post_json("/api/denoise-url", "{}").await.unwrap(),
        400,
        "missing field `url`",
    )
    .await;
    expect_error(
        post_json(
            "/api/denoise-url",
            r#"{"url":"http://example.com/a.png","x":1}"#,
        )
        .await
        .unwrap(),
        400,
        "unknown field",
    )
    .await;
    expect_error(
        post_json(
            "/api/denoise-url",
            r#"{"url":"http://example.com/a.png","sigma":999}"#,
        )
        .await
        .unwrap(),
        400,
        "0-255",
    )
    .await;
    expect_error(
        post_json("/api/fetch-url", r#"{"url":"nope"}"#)
            .await
            .unwrap(),
        400,
        "invalid URL",
    )
    .await;

    // Samples.
    expect_error(
        http.get(server.url("/api/samples/nope"))
            .send()
            .await
            .unwrap(),
        404,
        "no sample",
    )
    .await;
    expect_error(
        http.get(server.url("/api/samples/chelsea?sigma=500"))
            .send()
            .await
            .unwrap(),
        400,
        "0-100",
    )
    .await;

    // Still serving, and still denoising.
    server.assert_healthy().await;
    let r = post_raw("?sigma=25", good).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(decode(&r.bytes().await.unwrap()).shape(), (3, 64, 64));
}

#[tokio::test]
async fn other_sites_and_unknown_host_names_are_refused() {
    let server = Server::start(&["--tile", "0"]);
    let http = client();
    let (_, noisy) = noisy_case(32, 32);
    let port = |s: &Server| s.url("").rsplit(':').next().unwrap().to_owned();
    let (named, port) = (
        Server::start(&["--tile", "0", "--allowed-host", "denoise.lan"]),
        port(&server),
    );
    // Another site's page posting a "simple" request (no preflight in a browser).
    let r = http
        .post(server.url("/api/denoise"))
        .header("origin", "https://evil.example")
        .header("content-type", "text/plain")
        .body(noisy.clone())
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "cross-site").await;
    // DNS rebinding: the attacker's name, resolved to 127.0.0.1.
    let r = http
        .get(server.url("/api/models"))
        .header("host", format!("evil.example:{port}"))
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "answers to").await;
    // The page's own requests, by each loopback name.
    for name in ["localhost", "127.0.0.1"] {
        let r = http
            .post(server.url("/api/denoise?sigma=25"))
            .header("host", format!("{name}:{port}"))
            .header("origin", format!("http://{name}:{port}"))
            .body(noisy.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
    }
    let r = http.get(server.url("/api/models")).send().await.unwrap();
    assert_eq!(header(&r, "cache-control").as_deref(), Some("no-store"));
    // --allowed-host adds a name.
    let port = named.url("").rsplit(':').next().unwrap().to_owned();
    let r = http.get(named.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the loopback names stay allowed");
    let r = http
        .get(named.url("/healthz"))
        .header("host", format!("denoise.lan:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let server = Server::start(&["--workers", "1", "--queue", "1", "--tile", "0"]);
    let (_, noisy) = noisy_case(256, 256);
    let http = client();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let (http, url, body) = (http.clone(), server.url("/api/denoise"), noisy.clone());
        tasks.spawn(async move { http.post(url).body(body).send().await.unwrap() });
    }
    let (mut ok, mut busy) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            503 => {
                let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
                assert!((1..=30).contains(&retry));
                expect_error(r, 503, "busy").await;
                busy += 1;
            }
            other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
        }
    }
    assert!(ok >= 1 && busy >= 1, "{ok} ok, {busy} busy");
    assert!(ok <= 12 - busy);
    server.assert_healthy().await;
    let r = http
        .post(server.url("/api/denoise"))
        .body(noisy)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "serves again once the queue drains");
}

#[test]
fn bad_flags_are_clean_start_up_errors() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_denoise-cli"))
            .arg("serve")
            .args(args)
            .output()
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let bad_model = dir.path().join("bad.safetensors");
    std::fs::write(&bad_model, b"not a model").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = listener.local_addr().unwrap().to_string();
    for (args, needle) in [
        (vec!["--workers", "0"], "workers must be 1-64"),
        (vec!["--queue", "0"], "queue must hold at least 1"),
        (vec!["--tile", "10"], "tile must be 0"),
        (
            vec!["--max-ensemble", "3"],
            "'3' is not one of [1, 2, 4, 8]",
        ),
        (
            vec!["--model", "/no/such/model"],
            "no model '/no/such/model'",
        ),
        (
            vec!["--model", bad_model.to_str().unwrap()],
            "not a valid model artefact",
        ),
        (vec!["--addr", taken.as_str()], "cannot listen on"),
    ] {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("denoise-cli: ") && last.contains(needle),
            "{args:?}: {err}"
        );
        // The cause appears once, not again as anyhow's chain.
        assert!(
            last.matches("not a valid model artefact").count() <= 1,
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[tokio::test]
async fn models_are_chosen_by_name_and_a_failing_model_fails_only_its_request() {
    use denoise_models::{Model, artefact};
    let dir = tempfile::tempdir().unwrap();
    let shipped = crate::samples_dir().join("../models/default.safetensors");
    std::fs::copy(&shipped, dir.path().join("default.safetensors")).unwrap();
    // An untrained gray DnCNN: blind (no sigma), and colour input goes through gray and back.
    let gray: denoise_models::ModelConfig = serde_json::from_str(
        r#"{"kind":"dncnn","channels":1,"depth":3,"features":8,"batch_norm":false}"#,
    )
    .unwrap();
    let model = Model::new(&gray, tch::Device::Cpu).unwrap();
    let path = dir.path().join("tiny-gray.safetensors");
    artefact::save(&model, &artefact::Metadata::new(model.config()), &path).unwrap();
    // A header that promises other weights than the file holds: readable, but not loadable.
    let mut lie = artefact::Metadata::new(model.config());
    lie.model = serde_json::from_str(
        r#"{"kind":"dncnn","channels":1,"depth":3,"features":16,"batch_norm":false}"#,
    )
    .unwrap();
    let broken = dir.path().join("broken.safetensors");
    artefact::save(&model, &lie, &broken).unwrap();

    let server = Server::start_with_env(&[], &[("DENOISE_MODELS", dir.path())]);
    let http = client();
    let models = server.get_json("/api/models").await;
    let names: Vec<&str> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["broken", "default", "tiny-gray"]);
    assert_eq!(models["default"], "default");

    let (_, noisy) = noisy_case(64, 80);
    let post = |query: &str| {
        http.post(server.url(&format!("/api/denoise{query}")))
            .body(noisy.clone())
            .send()
    };
    let r = post("?model=tiny-gray&sigma=25").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-denoise-model").unwrap(), "tiny-gray");
    assert!(
        header(&r, "x-denoise-sigma").is_none(),
        "a blind model uses no sigma"
    );
    let out = decode(&r.bytes().await.unwrap());
    assert_eq!(out.shape(), (3, 64, 80));
    // Gray out: the three channels are equal.
    assert_eq!(out.plane(0), out.plane(2));

    expect_error(
        post("?model=broken").await.unwrap(),
        500,
        "cannot load model 'broken'",
    )
    .await;
    server.assert_healthy().await;
    let r = post("").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-denoise-model").unwrap(), "default");
}

#[tokio::test]
async fn a_truncated_jpeg_is_refused_not_denoised_with_a_gray_half() {
    use denoise_data::io::{self, BitDepth, ImageFormat};
    let server = Server::start(&[]);
    let (clean, _) = noisy_case(64, 64);
    let jpeg = io::encode(&clean, None, BitDepth::Eight, ImageFormat::Jpeg).unwrap();
    let post = |body: Vec<u8>| client().post(server.url("/api/denoise")).body(body).send();
    let cut = jpeg[..jpeg.len() * 2 / 3].to_vec();
    expect_error(post(cut).await.unwrap(), 422, "end-of-image").await;
    let whole = post(jpeg).await.unwrap();
    assert_eq!(whole.status(), 200);
    server.assert_healthy().await;
}

#[tokio::test]
async fn path_segments_that_are_not_utf8_get_json_errors() {
    let server = Server::start(&[]);
    let http = client();
    for path in ["/api/progress/%00%ff", "/api/samples/%ff%fe"] {
        let r = http.get(server.url(path)).send().await.unwrap();
        expect_error(r, 400, "bad path").await;
    }
    server.assert_healthy().await;
}
