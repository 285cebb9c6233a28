//! The page in headless Chromium (through chromedriver): upload a noisy image, wait for the
//! result, check it decodes and beats the noisy input's PSNR; then 100% zoom, a demo sample with
//! its PSNR and tile progress shown, a pasted URL, and a drag-and-drop at phone width.
//! Screenshots go to `target/web-e2e*.png`.
//!
//! Needs the Debian packages `chromium` and `chromium-driver`. Without them the test fails when
//! `CI` is set and is skipped (saying so) otherwise.

use crate::webdriver::{Driver, find_on_path};
use crate::{Server, decode, noisy_case, psnr, target_dir};
use base64::Engine as _;
use serde_json::json;
use std::time::Duration;

/// Waits until the page has finished a run; its state is `done` or `error`.
const SETTLED: &str = "const s = document.body.dataset.state; \
    return (s === 'done' || s === 'error') ? s : null;";

/// The bytes behind the download link, as base64.
const DOWNLOAD_BYTES: &str = "const a = document.getElementById('download'); \
    return fetch(a.href).then(r => r.arrayBuffer()).then(b => { \
      const u = new Uint8Array(b); let s = ''; \
      for (let i = 0; i < u.length; i += 0x8000) s += String.fromCharCode.apply(null, u.subarray(i, i + 0x8000)); \
      return btoa(s); });";

/// Drops `arguments[0]` (base64 PNG) on the drop zone as a file named `dropped.png`.
const DROP_FILE: &str = "const bin = atob(arguments[0]); const u = new Uint8Array(bin.length); \
    for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i); \
    const dt = new DataTransfer(); \
    dt.items.add(new File([u], 'dropped.png', { type: 'image/png' })); \
    const zone = document.getElementById('drop'); \
    zone.dispatchEvent(new DragEvent('dragenter', { dataTransfer: dt, bubbles: true })); \
    zone.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true })); \
    return true;";

fn text_of(id: &str) -> String {
    format!("return document.getElementById('{id}').textContent;")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_denoises_an_upload_a_sample_and_a_drop() {
    let chromium = find_on_path(&["chromium", "chromium-browser", "google-chrome"]);
    let chromedriver = find_on_path(&["chromedriver"]);
    let (Some(chromium), Some(chromedriver)) = (chromium, chromedriver) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but chromium or chromedriver is not on PATH: \
             apt-get install -y chromium chromium-driver"
        );
        eprintln!(
            "SKIPPED the_page_denoises_an_upload_a_sample_and_a_drop: chromium or chromedriver \
             not on PATH (apt-get install -y chromium chromium-driver)"
        );
        return;
    };
    let server = Server::start(&["--tile", "128", "--allow-private-urls"]);
    let dir = tempfile::tempdir().unwrap();
    let (clean, noisy) = noisy_case(192, 192);
    let noisy_path = dir.path().join("noisy.png");
    std::fs::write(&noisy_path, &noisy).unwrap();

    let driver = Driver::start(&chromedriver).await;
    let page = driver.session(&chromium, &dir.path().join("profile")).await;
    page.set_window(1280, 860).await;
    page.goto(&server.url("/")).await;
    page.wait_for(
        "return document.body.dataset.state === 'ready';",
        Duration::from_secs(60),
    )
    .await;

    // Upload through the file picker; the page denoises at once.
    let input = page.find("#file").await;
    page.send_keys(&input, noisy_path.to_str().unwrap()).await;
    let state = page.wait_for(SETTLED, Duration::from_secs(180)).await;
    assert_eq!(
        state,
        "done",
        "page error: {}",
        page.execute(&text_of("error"), json!([])).await
    );
    let b64 = page.execute(DOWNLOAD_BYTES, json!([])).await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.as_str().unwrap())
        .unwrap();
    let result = decode(&bytes);
    assert_eq!(result.shape(), clean.shape());
    let (before, after) = (psnr(&clean, &decode(&noisy)), psnr(&clean, &result));
    assert!(after > before + 3.0, "PSNR {before:.2} -> {after:.2} dB");
    // White noise, blind, on the default model: the page says its white-noise network ran.
    let hint = page
        .execute(
            "const h = document.getElementById('hint'); return h.hidden ? null : h.textContent;",
            json!([]),
        )
        .await;
    assert!(
        hint.as_str()
            .is_some_and(|h| h.contains("white-noise network")),
        "{hint}"
    );
    let time = page.execute(&text_of("stat-time"), json!([])).await;
    assert!(time.as_str().unwrap().ends_with(" ms"), "{time}");
    let name = page
        .execute(
            "return document.getElementById('download').download;",
            json!([]),
        )
        .await;
    assert_eq!(name, "noisy-denoised.png");
    std::fs::write(target_dir().join("web-e2e.png"), page.screenshot().await).unwrap();

    // 100%: one image pixel per screen pixel (the session's scale factor is 1).
    page.click(&page.find("#zoom-1").await).await;
    let width = page
        .execute(
            "return document.getElementById('stage').getBoundingClientRect().width;",
            json!([]),
        )
        .await;
    assert_eq!(width.as_f64().unwrap(), 192.0);
    page.click(&page.find("#zoom-fit").await).await;

    // A demo sample: the server knows the clean image, so the page shows the PSNR gain.
    page.execute(
        "document.body.dataset.state = 'idle'; return true;",
        json!([]),
    )
    .await;
    page.click(&page.find("button[data-sample='chelsea']").await)
        .await;
    let state = page.wait_for(SETTLED, Duration::from_secs(180)).await;
    assert_eq!(
        state,
        "done",
        "page error: {}",
        page.execute(&text_of("error"), json!([])).await
    );
    // 451x300 in 128-pixel tiles is 15 tiles; the page polled and showed some of them.
    let tiles = page
        .execute("return document.body.dataset.tiles || null;", json!([]))
        .await;
    assert!(
        tiles.as_str().is_some_and(|t| t.ends_with("/15")),
        "the page showed no tile progress: {tiles}"
    );
    let psnr_text = page.execute(&text_of("stat-psnr"), json!([])).await;
    let psnr_text = psnr_text.as_str().unwrap();
    assert!(
        psnr_text.contains("→") && psnr_text.contains("dB (+"),
        "{psnr_text}"
    );
    std::fs::write(
        target_dir().join("web-e2e-sample.png"),
        page.screenshot().await,
    )
    .unwrap();

    // A pasted URL (the server may fetch from loopback here): fetched, shown, denoised.
    let (_, remote) = noisy_case(64, 96);
    let origin = crate::fixture::start(remote);
    page.execute(
        "document.body.dataset.state = 'idle'; return true;",
        json!([]),
    )
    .await;
    // Typed into the number box, a sigma beyond the slider's 75 is what the server is sent.
    page.execute(
        "document.getElementById('sigma-num').value = ''; return true;",
        json!([]),
    )
    .await;
    page.send_keys(&page.find("#sigma-num").await, "150").await;
    let url_box = page.find("#url").await;
    page.send_keys(&url_box, &format!("{origin}/redirect/1"))
        .await;
    page.click(&page.find("#url-form button").await).await;
    let state = page.wait_for(SETTLED, Duration::from_secs(180)).await;
    assert_eq!(
        state,
        "done",
        "page error: {}",
        page.execute(&text_of("error"), json!([])).await
    );
    assert_eq!(
        page.execute(&text_of("stat-size"), json!([])).await,
        "96 × 64"
    );
    assert_eq!(
        page.execute(&text_of("stat-sigma"), json!([])).await,
        "150.0"
    );
    // A level given by hand: the default itself.
    assert_eq!(
        page.execute("return document.getElementById('hint').hidden;", json!([]))
            .await,
        true
    );

    // Phone width, drag and drop.
    page.set_window(390, 844).await;
    page.execute(
        "document.body.dataset.state = 'idle'; return true;",
        json!([]),
    )
    .await;
    let (_, small) = noisy_case(96, 128);
    page.execute(
        DROP_FILE,
        json!([base64::engine::general_purpose::STANDARD.encode(&small)]),
    )
    .await;
    let state = page.wait_for(SETTLED, Duration::from_secs(180)).await;
    assert_eq!(
        state,
        "done",
        "page error: {}",
        page.execute(&text_of("error"), json!([])).await
    );
    assert_eq!(
        page.execute(&text_of("input-name"), json!([])).await,
        "dropped.png"
    );
    let fits = page
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth;",
            json!([]),
        )
        .await;
    assert_eq!(fits, true, "the page scrolls sideways at phone width");
    page.execute(
        "document.querySelector('.viewer').scrollIntoView(); return true;",
        json!([]),
    )
    .await;
    std::fs::write(
        target_dir().join("web-e2e-phone.png"),
        page.screenshot().await,
    )
    .unwrap();

    page.close().await;
    server.assert_healthy().await;
}
