//! A small load test on loopback: rounds of 50 concurrent denoise requests all succeed within a
//! time bound, and the server's resident memory does not keep growing from round to round.

use crate::{Server, client, decode, noisy_case};
use std::time::{Duration, Instant};

const CONCURRENT: usize = 50;

/// Resident set size of `pid` in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

async fn round(server: &Server, body: &[u8]) -> Duration {
    let start = Instant::now();
    let http = client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONCURRENT {
        let (http, body) = (http.clone(), body.to_vec());
        let url = server.url(&format!("/api/denoise?sigma=25&job=load-{i}"));
        tasks.spawn(async move {
            let r = http.post(url).body(body).send().await.unwrap();
            let status = r.status();
            let bytes = r.bytes().await.unwrap();
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
            assert_eq!(decode(&bytes).shape(), (3, 64, 64));
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("request task");
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_succeed_without_memory_growth() {
    // The queue holds every request of a round, so none is turned away.
    let server = Server::start(&["--workers", "2", "--queue", "64", "--tile", "0"]);
    let (_, noisy) = noisy_case(64, 64);
    let pid = server.pid();
    let before = rss_kib(pid);
    let warm = round(&server, &noisy).await;
    let after_first = rss_kib(pid);
    let mut times = vec![warm];
    for _ in 0..2 {
        times.push(round(&server, &noisy).await);
    }
    let after_last = rss_kib(pid);
    eprintln!(
        "load: {} rounds of {CONCURRENT} concurrent 64x64 requests in {:?}; \
         RSS {} MiB at start, {} MiB after round 1, {} MiB after round {}",
        times.len(),
        times,
        before / 1024,
        after_first / 1024,
        after_last / 1024,
        times.len()
    );
    for t in &times {
        assert!(*t < Duration::from_secs(120), "a round took {t:?}");
    }
    // Allocator caches and libtorch's pools settle in the first round; after that, 100 more
    // requests may not add more than a quarter plus 64 MiB.
    assert!(
        after_last <= after_first + after_first / 4 + 64 * 1024,
        "RSS grew from {after_first} KiB to {after_last} KiB"
    );
    server.assert_healthy().await;
}
