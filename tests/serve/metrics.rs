//! What a replica's watchers see: `/metrics` counters that move by exactly the requests made, in
//! the text format Prometheus parses, and `/readyz` after start-up and while the queue is full.

use crate::{Server, client, noisy_case};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Scrapes `/metrics`, checking its content type and that every line is a `# HELP` or `# TYPE`
/// comment or a `name{labels} value` sample of a family declared before it; returns each
/// series (`name{labels}`) and its value.
pub async fn scrape(server: &Server) -> BTreeMap<String, f64> {
    let r = client().get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = r.text().await.unwrap();
    let mut types = BTreeMap::new();
    let mut series = BTreeMap::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.trim_start().splitn(3, ' ').collect();
            match words[..] {
                ["TYPE", name, kind] => {
                    assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                    types.insert(name.to_owned(), kind.to_owned());
                }
                ["HELP", _, help] => assert!(!help.is_empty(), "{line}"),
                _ => panic!("a comment that is neither HELP nor TYPE: {line}"),
            }
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let (name, labels) = match name_labels.split_once('{') {
            Some((name, labels)) => (name, labels.strip_suffix('}').expect(line)),
            None => (name_labels, ""),
        };
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (key, quoted) = pair.split_once('=').expect(line);
            assert!(key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            assert!(quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"'));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            .unwrap_or(name);
        assert!(types.contains_key(family), "no TYPE before: {line}");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("{line}")),
        };
        assert!(
            series.insert(name_labels.to_owned(), value).is_none(),
            "twice: {line}"
        );
    }
    series
}

/// How much each series moved (series absent before count from 0).
fn moved(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d != 0.0)
        .collect()
}

#[tokio::test]
async fn metrics_move_by_exactly_the_requests_made() {
    let server = Server::start(&["--workers", "2", "--queue", "5"]);
    let http = client();
    let before = scrape(&server).await;
    assert_eq!(before["denoise_workers"], 2.0);
    assert_eq!(before["denoise_queue_capacity"], 5.0);
    assert_eq!(before["denoise_queue_depth"], 0.0);
    assert_eq!(before["denoise_model_loaded{model=\"default\"}"], 2.0);

    // Three small images denoised, and two requests refused: a bad field on a real route, and
    // a path that matches no route.
    let (h, w) = (48, 64);
    let (_, noisy) = noisy_case(h, w);
    for _ in 0..3 {
        let r = http
            .post(server.url("/api/denoise?sigma=25"))
            .body(noisy.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = http
        .post(server.url("/api/denoise?model=no-such-model"))
        .body(noisy.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(server.url("/no/such/page-1234"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let after = scrape(&server).await;

    // Each request counted once, under its route's pattern (the first scrape included);
    // nothing else moved.
    let requests: BTreeMap<String, f64> = moved(&before, &after)
        .into_iter()
        .filter(|(k, _)| k.starts_with("denoise_http_requests_total"))
        .collect();
    let series = |route: &str, status: u16| {
        format!("denoise_http_requests_total{{route=\"{route}\",status=\"{status}\"}}")
    };
    let expected: BTreeMap<String, f64> = [
        (series("/api/denoise", 200), 3.0),
        (series("/api/denoise", 400), 1.0),
        (series("other", 404), 1.0),
        (series("/metrics", 200), 1.0),
    ]
    .into_iter()
    .collect();
    assert_eq!(requests, expected);
    assert!(
        after.keys().all(|k| !k.contains("no/such")),
        "a raw path became a label"
    );

    // The histogram saw the same requests, its buckets are cumulative and end at the count.
    let histogram = "denoise_http_request_duration_seconds";
    for (route, n) in [("/api/denoise", 4.0), ("other", 1.0), ("/metrics", 1.0)] {
        let count = format!("{histogram}_count{{route=\"{route}\"}}");
        let sum = format!("{histogram}_sum{{route=\"{route}\"}}");
        let delta = |k: &str| after[k] - before.get(k).copied().unwrap_or(0.0);
        assert_eq!(delta(&count), n, "{route}");
        assert!(delta(&sum) > 0.0, "{route}");
        let prefix = format!("{histogram}_bucket{{route=\"{route}\",le=");
        let buckets: Vec<(f64, f64)> = after
            .iter()
            .filter_map(|(k, v)| {
                let le = k
                    .strip_prefix(&prefix)?
                    .trim_end_matches('}')
                    .trim_matches('"');
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                Some((le, *v))
            })
            .collect();
        assert!(buckets.len() > 10, "{route}: {buckets:?}");
        let mut sorted = buckets.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(sorted.windows(2).all(|p| p[0].1 <= p[1].1), "{sorted:?}");
        assert_eq!(sorted.last().unwrap(), &(f64::INFINITY, after[&count]));
    }

    // Three images of w x h denoised; the failures added none.
    let delta = |k: &str| after[k] - before[k];
    assert_eq!(delta("denoise_images_denoised_total"), 3.0);
    let megapixels = delta("denoise_megapixels_denoised_total");
    assert!(
        (megapixels - 3.0 * (w * h) as f64 / 1e6).abs() < 1e-9,
        "{megapixels}"
    );
    assert_eq!(after["denoise_queue_depth"], 0.0);
    assert!(after["denoise_workers_busy"] <= 2.0);
}

/// GETs `/readyz`: its status and JSON body.
async fn readyz(server: &Server) -> (u16, serde_json::Value) {
    let r = client().get(server.url("/readyz")).send().await.unwrap();
    let status = r.status().as_u16();
    assert_eq!(r.headers()["cache-control"], "no-store");
    (status, r.json().await.unwrap())
}

// Several threads: the requests that fill the queue go on while the test polls /readyz.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn ready_after_start_up_and_not_while_the_queue_is_full() {
    let server = Server::start(&["--workers", "1", "--queue", "1", "--tile", "0"]);
    assert_eq!(
        readyz(&server).await,
        (200, serde_json::json!({ "ready": true }))
    );
    server.assert_healthy().await;

    // One slow job running and one waiting fill the queue: not ready until it drains.
    let (_, noisy) = noisy_case(320, 320);
    let http = client();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (http, url, body) = (
            http.clone(),
            server.url("/api/denoise?sigma=25&ensemble=8"),
            noisy.clone(),
        );
        tasks.spawn(async move { http.post(url).body(body).send().await.unwrap().status() });
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let refusal = loop {
        let (status, body) = readyz(&server).await;
        if status == 503 {
            break Some(body);
        }
        assert_eq!(status, 200, "{body}");
        while tasks.try_join_next().is_some() {}
        if tasks.is_empty() || Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let refusal = refusal.expect("/readyz answered 503 while the queue was full");
    assert_eq!(refusal["ready"], false);
    let reason = refusal["reason"].as_str().unwrap();
    assert!(reason.contains("queue is full"), "{reason}");
    while let Some(status) = tasks.join_next().await {
        assert!([200, 503].contains(&status.unwrap().as_u16()));
    }
    assert_eq!(readyz(&server).await.0, 200);
}
