//! `POST /api/denoise-url` and `POST /api/fetch-url`: refusals without `--allow-private-urls`,
//! and with it (against a loopback fixture) redirects, byte caps, timeouts and non-images.

use crate::{Server, client, decode, expect_error, fixture, noisy_case};

async fn post(server: &Server, path: &str, body: serde_json::Value) -> reqwest::Response {
    client()
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn private_and_metadata_addresses_are_refused_by_default() {
    let (_, image) = noisy_case(64, 64);
    let origin = fixture::start(image);
    let port = origin.rsplit(':').next().unwrap().to_owned();
    let server = Server::start(&[]);
    for (url, needle) in [
        (
            format!("{origin}/img.png"),
            "loopback addresses are not allowed",
        ),
        // A host name goes through the filtering resolver.
        (format!("http://localhost:{port}/img.png"), "loopback"),
        (format!("http://[::1]:{port}/img.png"), "loopback"),
        (format!("http://2130706433:{port}/img.png"), "loopback"),
        ("http://10.0.0.1/a.png".into(), "private"),
        (
            "http://169.254.169.254/latest/meta-data/".into(),
            "cloud-metadata",
        ),
        (
            "http://[fd00:ec2::254]/latest/meta-data/".into(),
            "cloud-metadata",
        ),
        ("http://0.0.0.0/".into(), "unspecified"),
    ] {
        for path in ["/api/denoise-url", "/api/fetch-url"] {
            let r = post(&server, path, serde_json::json!({ "url": url })).await;
            expect_error(r, 403, needle).await;
        }
    }
    for (url, needle) in [
        ("ftp://example.com/a.png", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("not a url", "invalid URL"),
    ] {
        let r = post(
            &server,
            "/api/denoise-url",
            serde_json::json!({ "url": url }),
        )
        .await;
        expect_error(r, 400, needle).await;
    }
    // Fields are checked before the fetch: a bad ensemble is named, not the address. A number
    // or a string is taken, as for sigma.
    let private = format!("{origin}/img.png");
    for (ensemble, status, needle) in [
        (
            serde_json::json!(3),
            400,
            "ensemble must be one of [1, 2, 4, 8], got '3'",
        ),
        (serde_json::json!("many"), 400, "got 'many'"),
        (serde_json::json!(2), 403, "loopback"),
        (serde_json::json!(" 4 "), 403, "loopback"),
    ] {
        let body = serde_json::json!({ "url": private, "ensemble": ensemble });
        let r = post(&server, "/api/denoise-url", body).await;
        expect_error(r, status, needle).await;
    }
    server.assert_healthy().await;
}

#[tokio::test]
async fn allowed_urls_are_fetched_with_redirect_size_and_time_limits() {
    let (clean, image) = noisy_case(64, 64);
    let origin = fixture::start(image.clone());
    let server = Server::start(&[
        "--allow-private-urls",
        "--fetch-timeout",
        "1",
        "--max-upload-mb",
        "1",
    ]);

    let r = post(
        &server,
        "/api/denoise-url",
        serde_json::json!({ "url": format!("{origin}/img.png"), "sigma": 25, "model": "default" }),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-denoise-ms"));
    let result = decode(&r.bytes().await.unwrap());
    assert!(crate::psnr(&clean, &result) > crate::psnr(&clean, &decode(&image)) + 3.0);

    // Bad fields are refused before fetching: /slow would take 5 s to answer (and time out).
    let started = std::time::Instant::now();
    let r = post(
        &server,
        "/api/denoise-url",
        serde_json::json!({ "url": format!("{origin}/slow"), "model": "zzz" }),
    )
    .await;
    expect_error(r, 400, "unknown model").await;
    // A fetch first would take 5 s (or time out after the 1 s fetch timeout, with a 504).
    assert!(
        started.elapsed().as_secs_f64() < 3.0,
        "{:?}",
        started.elapsed()
    );

    // fetch-url gives back the image itself, as PNG.
    let r = post(
        &server,
        "/api/fetch-url",
        serde_json::json!({ "url": format!("{origin}/redirect/2") }),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(decode(&r.bytes().await.unwrap()), decode(&image));

    // Three redirects are followed, a fourth is not.
    let r = post(
        &server,
        "/api/denoise-url",
        serde_json::json!({ "url": format!("{origin}/redirect/3"), "sigma": "blind" }),
    )
    .await;
    assert_eq!(r.status(), 200);
    for (path, status, needle) in [
        ("/redirect/4", 502, "more than 3 redirects"),
        ("/big", 413, "larger than the limit"),
        ("/big-chunked", 413, "larger than the limit"),
        ("/slow", 504, "timed out"),
        ("/text", 415, "unsupported image format"),
        ("/missing", 502, "HTTP 404"),
    ] {
        let r = post(
            &server,
            "/api/denoise-url",
            serde_json::json!({ "url": format!("{origin}{path}") }),
        )
        .await;
        expect_error(r, status, needle).await;
    }
    // Cloud metadata stays refused even here.
    let r = post(
        &server,
        "/api/denoise-url",
        serde_json::json!({ "url": "http://169.254.169.254/" }),
    )
    .await;
    expect_error(r, 403, "cloud-metadata").await;
    server.assert_healthy().await;
}
