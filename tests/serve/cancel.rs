//! A request whose client goes away: its job stops at the next pass over a tile, the only worker
//! takes the next request, and the progress and `/metrics` say the job was cancelled.

use crate::metrics::scrape;
use crate::{Server, client, noisy_case};
use std::io::Write;
use std::time::{Duration, Instant};

/// `POST /api/denoise` of `body` with `query`, answered 200; returns how long the answer took.
async fn denoise(server: &Server, query: &str, body: Vec<u8>) -> Duration {
    let started = Instant::now();
    let r = client()
        .post(server.url(&format!("/api/denoise?{query}")))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    r.bytes().await.unwrap();
    started.elapsed()
}

#[tokio::test]
async fn a_job_whose_client_has_gone_stops_and_the_worker_takes_the_next_request() {
    // One worker, small tiles and eight passes: a long job made of many short steps.
    let server = Server::start(&["--workers", "1", "--tile", "64"]);
    let addr = server.url("").trim_start_matches("http://").to_owned();
    let (_, large) = noisy_case(128, 128);
    let (_, small) = noisy_case(32, 32);
    let long = "sigma=25&ensemble=8";

    // How long the long job takes when its client waits, and a small one alone.
    let alone = denoise(&server, "sigma=25", small.clone()).await;
    let whole = denoise(&server, &format!("{long}&job=whole"), large.clone()).await;
    let total = server.get_json("/api/progress/whole").await["total"]
        .as_u64()
        .unwrap();
    assert!(total >= 64, "{total} passes: too few to stop between");

    // The same job again, its client gone once the job is running.
    let mut abandoned = std::net::TcpStream::connect(&addr).unwrap();
    let head = format!(
        "POST /api/denoise?{long}&job=gone HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: image/png\r\nContent-Length: {}\r\n\r\n",
        large.len()
    );
    abandoned.write_all(head.as_bytes()).unwrap();
    abandoned.write_all(&large).unwrap();
    let deadline = Instant::now() + whole;
    loop {
        let p = server.get_json("/api/progress/gone").await;
        if p["state"] == "running" && p["done"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the job never started: {p}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(abandoned);
    let gone_at = Instant::now();
    denoise(&server, "sigma=25", small).await;
    let next = gone_at.elapsed();
    eprintln!(
        "whole job {whole:?} ({total} passes); the next request {next:?} after the client went"
    );
    assert!(
        next < whole / 4,
        "the next request took {next:?} after the client went, the whole job {whole:?} \
         (a small request alone: {alone:?})"
    );

    let p = server.get_json("/api/progress/gone").await;
    assert_eq!(p["state"], "cancelled", "{p}");
    assert!(p["done"].as_u64().unwrap() < total / 2, "{p}");
    let metrics = scrape(&server).await;
    assert_eq!(metrics["denoise_jobs_cancelled_total"], 1.0);
    assert_eq!(metrics["denoise_images_denoised_total"], 3.0);
    server.assert_healthy().await;
}
