//! Bad and odd inputs, made here, sent through every route: truncated, empty and mislabelled
//! images of every format, header bombs, extreme shapes, 16-bit, gray with alpha and CMYK
//! images (as a raw body, a form upload and a fetched URL), malformed forms, oversized bodies,
//! bad JSON, paths and queries. Every answer is an image or a JSON error naming the problem,
//! never a 5xx, and the server stays ready.

use crate::api::{decompression_bomb, raw_exchange};
use crate::{Server, client, fixture};
use denoise_data::Image;
use denoise_data::io::{self, BitDepth, ImageFormat};
use reqwest::multipart::{Form, Part};

const FORMATS: [(&str, ImageFormat); 5] = [
    ("png", ImageFormat::Png),
    ("jpg", ImageFormat::Jpeg),
    ("tif", ImageFormat::Tiff),
    ("webp", ImageFormat::WebP),
    ("bmp", ImageFormat::Bmp),
];

/// A colour picture with some structure, `h x w`.
fn picture(h: usize, w: usize) -> Image {
    Image::from_fn(3, h, w, |c, y, x| {
        ((x * 7 + y * 13 + c * 5) % 31) as f32 / 30.0
    })
}

fn encoded(image: &Image, depth: BitDepth, format: ImageFormat) -> Vec<u8> {
    io::encode(image, None, depth, format).unwrap()
}

/// An image that must be refused, with the words one of which its error names.
struct Bad {
    name: String,
    bytes: Vec<u8>,
    words: &'static [&'static str],
}

fn bad_images() -> Vec<Bad> {
    let mut bad = Vec::new();
    for (ext, format) in FORMATS {
        let good = encoded(&picture(24, 32), BitDepth::Eight, format);
        let mut magic = good.clone();
        magic[..4].copy_from_slice(b"XXXX");
        for (what, bytes, words) in [
            ("empty", Vec::new(), &["empty", "no image"][..]),
            (
                "truncated",
                good[..good.len() / 2].to_vec(),
                &["decode", "end", "truncated"][..],
            ),
            ("magic", magic, &["unsupported", "decode", "format"][..]),
        ] {
            bad.push(Bad {
                name: format!("{what}.{ext}"),
                bytes,
                words,
            });
        }
    }
    let too_large = &["pixels", "too large"][..];
    for (name, bytes) in [
        ("bomb.png", decompression_bomb()),
        ("bomb.jpg", jpeg_bomb()),
        ("bomb.tif", tiff_bomb()),
        ("bomb.webp", webp_bomb()),
        ("bomb.bmp", bmp_bomb()),
    ] {
        bad.push(Bad {
            name: name.into(),
            bytes,
            words: too_large,
        });
    }
    bad
}

/// Odd images that are still images: each is denoised.
fn odd_images() -> Vec<(String, Vec<u8>)> {
    let gray = Image::from_fn(1, 10, 12, |_, y, x| ((x + 2 * y) % 9) as f32 / 8.0);
    let alpha: Vec<f32> = (0..10 * 12).map(|i| (i % 5) as f32 / 4.0).collect();
    vec![
        (
            "one.png".into(),
            encoded(&picture(1, 1), BitDepth::Eight, ImageFormat::Png),
        ),
        (
            "thin.png".into(),
            encoded(&picture(100_000, 3), BitDepth::Eight, ImageFormat::Png),
        ),
        (
            "deep.png".into(),
            encoded(&picture(12, 10), BitDepth::Sixteen, ImageFormat::Png),
        ),
        (
            "gray-alpha.png".into(),
            io::encode(&gray, Some(&alpha), BitDepth::Eight, ImageFormat::Png).unwrap(),
        ),
        ("cmyk.jpg".into(), cmyk_jpeg()),
    ]
}

/// A JPEG whose frame header claims 65500 x 65500 pixels.
fn jpeg_bomb() -> Vec<u8> {
    let mut jpeg = encoded(&picture(16, 16), BitDepth::Eight, ImageFormat::Jpeg);
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xff, 0xc0])
        .expect("a baseline frame header");
    // FF C0, length (2), precision (1), height (2), width (2).
    for at in [sof + 5, sof + 7] {
        jpeg[at..at + 2].copy_from_slice(&65_500u16.to_be_bytes());
    }
    jpeg
}

/// A TIFF whose first directory claims 60000 x 60000 pixels in one strip (rows per strip made
/// to match, so the directory is consistent and only the size is wrong).
fn tiff_bomb() -> Vec<u8> {
    let mut tiff = encoded(&picture(16, 16), BitDepth::Eight, ImageFormat::Tiff);
    assert_eq!(&tiff[..4], b"II*\0", "a little-endian TIFF");
    let u16_at = |t: &[u8], at: usize| u16::from_le_bytes([t[at], t[at + 1]]);
    let ifd = u32::from_le_bytes(tiff[4..8].try_into().unwrap()) as usize;
    let mut rewritten = 0;
    for entry in 0..usize::from(u16_at(&tiff, ifd)) {
        let at = ifd + 2 + entry * 12;
        // ImageWidth, ImageLength and RowsPerStrip, stored as SHORT (3) or LONG (4) in the
        // value field.
        let tag = u16_at(&tiff, at);
        if matches!(tag, 256 | 257 | 278) {
            let value = at + 8;
            match u16_at(&tiff, at + 2) {
                3 => tiff[value..value + 2].copy_from_slice(&60_000u16.to_le_bytes()),
                _ => tiff[value..value + 4].copy_from_slice(&60_000u32.to_le_bytes()),
            }
            rewritten += usize::from(tag != 278);
        }
    }
    assert_eq!(rewritten, 2, "width and length tags");
    tiff
}

/// A lossless WebP whose header claims 16384 x 16384 pixels, the format's largest.
fn webp_bomb() -> Vec<u8> {
    let mut webp = encoded(&picture(16, 16), BitDepth::Eight, ImageFormat::WebP);
    let chunk = webp
        .windows(4)
        .position(|w| w == b"VP8L")
        .expect("a lossless bitstream");
    // Tag, chunk size, the 0x2f signature, then 14 bits of width - 1 and 14 of height - 1.
    let at = chunk + 9;
    let bits = u32::from_le_bytes(webp[at..at + 4].try_into().unwrap());
    let bits = (bits & !0x0fff_ffff) | 16_383 | (16_383 << 14);
    webp[at..at + 4].copy_from_slice(&bits.to_le_bytes());
    webp
}

/// A BMP whose header claims 100000 x 100000 pixels.
fn bmp_bomb() -> Vec<u8> {
    let mut bmp = encoded(&picture(16, 16), BitDepth::Eight, ImageFormat::Bmp);
    // The info header's width and height, signed little-endian at 18 and 22.
    for at in [18, 22] {
        bmp[at..at + 4].copy_from_slice(&100_000i32.to_le_bytes());
    }
    bmp
}

/// A CMYK JPEG, as print workflows write them (the `image` crate writes none).
fn cmyk_jpeg() -> Vec<u8> {
    let (w, h) = (16u16, 12u16);
    let inks: Vec<u8> = (0..usize::from(w) * usize::from(h))
        .flat_map(|i| [(i * 3) as u8, 60, (i / 2) as u8, 20])
        .collect();
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90)
        .encode(&inks, w, h, jpeg_encoder::ColorType::Cmyk)
        .unwrap();
    out
}

/// What an answer must be.
#[derive(Clone, Copy)]
enum Expect {
    /// A PNG.
    Image,
    /// A 4xx JSON error whose message contains one of these words (lower-case).
    Error(&'static [&'static str]),
    /// Either: an odd input the server may take or refuse.
    Either(&'static [&'static str]),
}

/// One answer, checked against `expect`; on a mismatch, `what: status body` for the report.
async fn check(response: reqwest::Response, what: &str, expect: Expect) -> Option<String> {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.bytes().await.unwrap();
    let (image, words) = match expect {
        Expect::Image => (true, &[][..]),
        Expect::Error(words) => (false, words),
        Expect::Either(words) => (status == 200, words),
    };
    if status == 200 && image {
        let decoded = io::decode_bytes(&body, "answer.png", u64::MAX);
        return match (content_type.as_str(), decoded) {
            ("image/png", Ok(_)) => None,
            (kind, decoded) => Some(format!("{what}: 200 {kind} {:?}", decoded.err())),
        };
    }
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned));
    let named = message.as_deref().is_some_and(|m| {
        let m = m.to_lowercase();
        words.iter().any(|w| m.contains(w))
    });
    let fine = (400..500).contains(&status)
        && content_type.starts_with("application/json")
        && named
        && !matches!(expect, Expect::Image);
    (!fine).then(|| {
        format!(
            "{what}: {status} {content_type} {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        )
    })
}

fn form_with(name: &str, bytes: Vec<u8>) -> Form {
    Form::new()
        .text("sigma", "25")
        .part("image", Part::bytes(bytes).file_name(name.to_owned()))
}

#[tokio::test]
async fn every_route_answers_bad_and_odd_inputs_with_an_image_or_a_json_error() {
    let server = Server::start(&["--max-upload-mb", "2", "--allow-private-urls"]);
    let http = client();
    let mut failures = Vec::new();

    // Images, through every route that reads one.
    let bad = bad_images();
    let odd = odd_images();
    let cases = bad
        .iter()
        .map(|b| (&b.name, &b.bytes, Expect::Error(b.words)))
        .chain(odd.iter().map(|(n, b)| (n, b, Expect::Image)));
    for (name, bytes, expect) in cases {
        let raw = http
            .post(server.url("/api/denoise"))
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        failures.extend(check(raw, &format!("{name} as the body"), expect).await);
        let form = http
            .post(server.url("/api/denoise"))
            .multipart(form_with(name, bytes.clone()))
            .send()
            .await
            .unwrap();
        failures.extend(check(form, &format!("{name} in a form"), expect).await);
        let origin = fixture::start(bytes.clone());
        for route in ["/api/denoise-url", "/api/fetch-url"] {
            let r = http
                .post(server.url(route))
                .json(&serde_json::json!({ "url": format!("{origin}/img.png") }))
                .send()
                .await
                .unwrap();
            failures.extend(check(r, &format!("{name} by URL to {route}"), expect).await);
        }
    }

    // Malformed multipart forms.
    let good = encoded(&picture(16, 16), BitDepth::Eight, ImageFormat::Png);
    let part = |headers: &str, body: &[u8]| {
        let mut out = format!("--XyZ\r\n{headers}\r\n\r\n").into_bytes();
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n");
        out
    };
    let image_part = part(
        "Content-Disposition: form-data; name=\"image\"; filename=\"a.png\"",
        &good,
    );
    let whole = |parts: &[&[u8]]| {
        let mut out = parts.concat();
        out.extend_from_slice(b"--XyZ--\r\n");
        out
    };
    let forms: Vec<(&str, &str, Vec<u8>, Expect)> = vec![
        (
            "no boundary",
            "multipart/form-data",
            whole(&[&image_part]),
            Expect::Error(&["boundary", "multipart"]),
        ),
        (
            "an empty boundary",
            "multipart/form-data; boundary=\"\"",
            whole(&[&image_part]),
            Expect::Error(&["boundary", "multipart"]),
        ),
        (
            "no parts, only text",
            "multipart/form-data; boundary=XyZ",
            b"hello".to_vec(),
            Expect::Error(&["multipart", "no image"]),
        ),
        (
            "no closing boundary",
            "multipart/form-data; boundary=XyZ",
            image_part[..image_part.len() - 40].to_vec(),
            Expect::Error(&["multipart", "incomplete", "stream"]),
        ),
        (
            "a part without a name",
            "multipart/form-data; boundary=XyZ",
            whole(&[&part("Content-Disposition: form-data", b"25")]),
            Expect::Error(&["form field", "name"]),
        ),
        (
            "a part without headers",
            "multipart/form-data; boundary=XyZ",
            whole(&[b"--XyZ\r\n\r\n25\r\n"]),
            Expect::Error(&["multipart", "form field", "name", "header"]),
        ),
        (
            "a field that is not UTF-8",
            "multipart/form-data; boundary=XyZ",
            whole(&[
                &part(
                    "Content-Disposition: form-data; name=\"sigma\"",
                    b"\xff\xfe",
                ),
                &image_part,
            ]),
            Expect::Error(&["utf-8", "multipart", "sigma"]),
        ),
        (
            "a sigma of NaN",
            "multipart/form-data; boundary=XyZ",
            whole(&[
                &part("Content-Disposition: form-data; name=\"sigma\"", b"NaN"),
                &image_part,
            ]),
            Expect::Error(&["sigma"]),
        ),
        (
            "ten thousand part headers",
            "multipart/form-data; boundary=XyZ",
            whole(&[&part(
                &std::iter::once(
                    "Content-Disposition: form-data; name=\"image\"; filename=\"a.png\"".to_owned(),
                )
                .chain((0..10_000).map(|i| format!("X-Filler-{i}: {i}")))
                .collect::<Vec<_>>()
                .join("\r\n"),
                &good,
            )]),
            // Within the byte limit, so taking it is as fine as refusing it.
            Expect::Either(&["multipart", "header"]),
        ),
    ];
    for (what, content_type, body, expect) in forms {
        let r = http
            .post(server.url("/api/denoise"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        failures.extend(check(r, &format!("a form with {what}"), expect).await);
    }

    // Oversized bodies, on every route that takes one.
    let over = vec![b'x'; 3 << 20];
    for (route, content_type) in [
        ("/api/denoise", "image/png"),
        ("/api/denoise", "multipart/form-data; boundary=XyZ"),
        ("/api/denoise-url", "application/json"),
        ("/api/fetch-url", "application/json"),
    ] {
        let r = http
            .post(server.url(route))
            .header("content-type", content_type)
            .body(over.clone())
            .send()
            .await
            .unwrap();
        let what = format!("3 MB of {content_type} to {route}");
        failures.extend(check(r, &what, Expect::Error(&["larger than the limit"])).await);
    }
    // A declared length far past the limit is refused before the body is read.
    let addr = server.url("").trim_start_matches("http://").to_owned();
    for route in ["/api/denoise", "/api/denoise-url", "/api/fetch-url"] {
        let head = format!(
            "POST {route} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 10000000000\r\n\
             Connection: close\r\n\r\n0123456789"
        );
        let (status, body) = raw_exchange(&addr, head.as_bytes());
        if status != 413 || !body.contains("larger than the limit") {
            failures.push(format!("10 GB declared to {route}: {status} {body}"));
        }
    }

    // Bad JSON, on both JSON routes.
    // Deeper than the parser recurses, within the byte limit.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let jsons: Vec<(Vec<u8>, &'static [&'static str])> = vec![
        (Vec::new(), &["json", "eof"]),
        (b"{not json".to_vec(), &["json"]),
        (b"[]".to_vec(), &["json"]),
        (b"null".to_vec(), &["json"]),
        (b"\"http://example.com/a.png\"".to_vec(), &["json"]),
        (b"\xff\xfe{}".to_vec(), &["json"]),
        (deep.into_bytes(), &["json", "recursion"]),
        (br#"{"url": 5}"#.to_vec(), &["json", "url"]),
        (br#"{"url": null}"#.to_vec(), &["json", "url"]),
        (
            br#"{"url": "http://example.com/a.png", "url": "http://example.com/b.png"}"#.to_vec(),
            &["duplicate"],
        ),
        (br#"{"url": "\ud800"}"#.to_vec(), &["json", "surrogate"]),
        (
            br#"{"url": "http://example.com/a.png"} trailing"#.to_vec(),
            &["json", "trailing"],
        ),
        (
            br#"{"url": "http://example.com/a.png", "colour": "red"}"#.to_vec(),
            &["unknown field"],
        ),
    ];
    for (body, words) in &jsons {
        for route in ["/api/denoise-url", "/api/fetch-url"] {
            let r = http
                .post(server.url(route))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let shown = String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned();
            let what = format!("JSON {shown:?} to {route}");
            failures.extend(check(r, &what, Expect::Error(words)).await);
        }
    }
    let url = "http://example.com/a.png";
    for (fields, words) in [
        (serde_json::json!({ "sigma": "loud" }), &["sigma"][..]),
        (serde_json::json!({ "sigma": 1e300 }), &["sigma", "json"]),
        (serde_json::json!({ "sigma": -1 }), &["sigma"]),
        (serde_json::json!({ "ensemble": [1] }), &["ensemble"]),
        (serde_json::json!({ "ensemble": 3 }), &["ensemble"]),
        (serde_json::json!({ "ensemble": -8 }), &["ensemble"]),
        (serde_json::json!({ "model": "nope" }), &["unknown model"]),
        (serde_json::json!({ "model": 7 }), &["json", "model"]),
        (serde_json::json!({ "job": "a b" }), &["job ids"]),
        (
            serde_json::json!({ "reference": "nope" }),
            &["unknown reference"],
        ),
    ] {
        let mut body = fields.clone();
        body["url"] = url.into();
        let r = http
            .post(server.url("/api/denoise-url"))
            .json(&body)
            .send()
            .await
            .unwrap();
        failures.extend(
            check(
                r,
                &format!("denoise-url with {fields}"),
                Expect::Error(words),
            )
            .await,
        );
    }

    // Paths and queries, on the GET routes and the fields of /api/denoise.
    let long_id = "a".repeat(4000);
    let gets: Vec<(String, &'static [&'static str])> = vec![
        ("/api/samples/%ff%fe".into(), &["bad path"]),
        ("/api/samples/..%2f..%2fCargo.toml".into(), &["no sample"]),
        ("/api/samples/chelsea?sigma=nan".into(), &["sigma"]),
        ("/api/samples/chelsea?sigma=-1".into(), &["sigma"]),
        ("/api/samples/chelsea?sigma=1e999".into(), &["sigma"]),
        ("/api/samples/chelsea?sigma=".into(), &["sigma"]),
        (
            "/api/samples/chelsea?sigma=1&sigma=2".into(),
            &["sigma", "duplicate"],
        ),
        ("/api/samples/chelsea?colour=red".into(), &["unknown field"]),
        ("/api/progress/%00%ff".into(), &["bad path"]),
        (format!("/api/progress/{long_id}"), &["no job"]),
        ("/api/progress/..%2fmetrics".into(), &["no job"]),
        ("/api/nope".into(), &["no route"]),
        ("/%ff".into(), &["no route"]),
    ];
    for (path, words) in &gets {
        let r = http.get(server.url(path)).send().await.unwrap();
        failures.extend(check(r, &format!("GET {path}"), Expect::Error(words)).await);
    }
    for (query, words) in [
        ("sigma=nan", &["sigma"][..]),
        ("sigma=inf", &["sigma"]),
        ("sigma=%ff", &["sigma", "utf-8", "invalid"]),
        ("ensemble=%00", &["ensemble"]),
        ("ensemble=99999999999999999999", &["ensemble"]),
        ("model=..%2fdefault", &["unknown model"]),
        ("job=", &[]),
        ("sigma=1&sigma=2", &["sigma", "duplicate"]),
    ] {
        let r = http
            .post(server.url(&format!("/api/denoise?{query}")))
            .body(good.clone())
            .send()
            .await
            .unwrap();
        // An empty job id is no job: the image is denoised.
        let expect = if words.is_empty() {
            Expect::Image
        } else {
            Expect::Error(words)
        };
        failures.extend(check(r, &format!("/api/denoise?{query}"), expect).await);
    }
    for (method, path) in [
        ("PUT", "/"),
        ("DELETE", "/api/denoise"),
        ("GET", "/api/denoise"),
        ("POST", "/healthz"),
        ("PATCH", "/api/progress/x"),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = http
            .request(method.clone(), server.url(path))
            .send()
            .await
            .unwrap();
        let what = format!("{method} {path}");
        failures.extend(check(r, &what, Expect::Error(&["method not allowed"])).await);
    }
    for path in [
        "/",
        "/app.js",
        "/style.css",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        let r = http
            .get(server.url(&format!("{path}?x=%ff&&=")))
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            failures.push(format!("GET {path} with an odd query: {}", r.status()));
        }
    }

    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let ready = server.get_json("/readyz").await;
    assert_eq!(ready["ready"], true, "{ready}");
    server.assert_healthy().await;
    let r = http
        .post(server.url("/api/denoise?sigma=25"))
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
