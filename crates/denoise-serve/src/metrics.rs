//! What `GET /metrics` says, in the Prometheus text exposition format (version 0.0.4): requests
//! by route and status with a latency histogram, images and megapixels denoised, and how many
//! workers hold each model; the queue and worker gauges are read from the pool at each scrape.
//!
//! Written by hand: the format is a few lines per family, and `prometheus-client` writes
//! OpenMetrics text instead (its own content type, a `# EOF` line, counters typed without
//! their `_total`), which is not what a plain Prometheus scrape of `text/plain` expects.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The route label of a request no route matched: the raw path would let any client create
/// series without bound.
pub const OTHER_ROUTE: &str = "other";

/// Upper bounds of the latency buckets in seconds: from an asset or a probe to a large image
/// with eight passes on a CPU.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// One route's requests: how many answered with each status, and how long they took.
#[derive(Default)]
struct RouteStats {
    statuses: BTreeMap<u16, u64>,
    /// Requests whose time fell in each bucket (not cumulative; the `+Inf` rest is implied by
    /// `count`).
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

/// The server's counters. Request statistics sit behind one mutex (a map of a few routes,
/// touched once per request); the hot counters are atomics.
pub struct Metrics {
    routes: Mutex<BTreeMap<String, RouteStats>>,
    images: AtomicU64,
    pixels: AtomicU64,
    /// Jobs dropped because their client went away.
    cancelled: AtomicU64,
    /// Workers that have loaded each configured model (the set is fixed at start).
    models: BTreeMap<String, AtomicUsize>,
}

/// What the pool says at the moment of a scrape.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gauges {
    /// Jobs waiting for a worker.
    pub queued: usize,
    /// Most jobs that may wait.
    pub capacity: usize,
    /// Workers running a job.
    pub busy: usize,
    pub workers: usize,
}

impl Metrics {
    /// Counters at zero for a server offering `models` (by name).
    pub fn new<'a>(models: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            routes: Mutex::new(BTreeMap::new()),
            images: AtomicU64::new(0),
            pixels: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            models: models
                .into_iter()
                .map(|m| (m.to_owned(), AtomicUsize::new(0)))
                .collect(),
        }
    }

    /// Counts one answered request: `route` is the matched route's pattern (or
    /// [`OTHER_ROUTE`]), never the raw path.
    pub fn record_request(&self, route: &str, status: u16, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        // A panic elsewhere while the lock was held leaves counts that are still counts.
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if !routes.contains_key(route) {
            routes.insert(route.to_owned(), RouteStats::default());
        }
        let stats = routes.get_mut(route).expect("inserted above");
        *stats.statuses.entry(status).or_default() += 1;
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&le| seconds <= le) {
            stats.buckets[i] += 1;
        }
        stats.count += 1;
        stats.sum_seconds += seconds;
    }

    /// Counts one image denoised successfully.
    pub fn record_denoised(&self, width: usize, height: usize) {
        self.images.fetch_add(1, Ordering::Relaxed);
        self.pixels
            .fetch_add((width * height) as u64, Ordering::Relaxed);
    }

    /// Counts a job dropped because its client went away (while queued or running).
    pub fn record_cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a worker that has loaded `model`.
    pub fn record_model_loaded(&self, model: &str) {
        if let Some(n) = self.models.get(model) {
            n.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Workers that have loaded `model`.
    pub fn workers_with(&self, model: &str) -> usize {
        self.models
            .get(model)
            .map_or(0, |n| n.load(Ordering::SeqCst))
    }

    /// The whole exposition, families in a fixed order and series sorted by label.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = Exposition::default();
        {
            let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            let name = "denoise_http_requests_total";
            out.family(
                name,
                "counter",
                "HTTP requests answered, by matched route pattern ('other' for none) and status.",
            );
            for (route, stats) in routes.iter() {
                for (status, n) in &stats.statuses {
                    let labels = format!("route=\"{}\",status=\"{status}\"", escape(route));
                    out.sample(name, &labels, *n as f64);
                }
            }
            let name = "denoise_http_request_duration_seconds";
            out.family(
                name,
                "histogram",
                "Time from a request's head to its response's head, by matched route pattern.",
            );
            let (bucket, sum, count) = (
                format!("{name}_bucket"),
                format!("{name}_sum"),
                format!("{name}_count"),
            );
            for (route, stats) in routes.iter() {
                let route = format!("route=\"{}\"", escape(route));
                let mut cumulative = 0;
                for (le, n) in LATENCY_BUCKETS.iter().zip(stats.buckets) {
                    cumulative += n;
                    let labels = format!("{route},le=\"{}\"", number(*le));
                    out.sample(&bucket, &labels, cumulative as f64);
                }
                out.sample(&bucket, &format!("{route},le=\"+Inf\""), stats.count as f64);
                out.sample(&sum, &route, stats.sum_seconds);
                out.sample(&count, &route, stats.count as f64);
            }
        }
        for (name, help, value) in [
            (
                "denoise_queue_depth",
                "Jobs waiting for a worker.",
                gauges.queued,
            ),
            (
                "denoise_queue_capacity",
                "Most jobs that may wait; beyond that requests get 503.",
                gauges.capacity,
            ),
            (
                "denoise_workers_busy",
                "Workers running a job.",
                gauges.busy,
            ),
            (
                "denoise_workers",
                "Inference worker threads.",
                gauges.workers,
            ),
        ] {
            out.family(name, "gauge", help);
            out.sample(name, "", value as f64);
        }
        let name = "denoise_images_denoised_total";
        out.family(name, "counter", "Images denoised successfully.");
        out.sample(name, "", self.images.load(Ordering::Relaxed) as f64);
        let name = "denoise_megapixels_denoised_total";
        out.family(
            name,
            "counter",
            "Megapixels of the images denoised successfully.",
        );
        out.sample(name, "", self.pixels.load(Ordering::Relaxed) as f64 / 1e6);
        let name = "denoise_jobs_cancelled_total";
        out.family(
            name,
            "counter",
            "Jobs dropped because their client went away: skipped while queued, or stopped at \
             the next pass over a tile while running.",
        );
        out.sample(name, "", self.cancelled.load(Ordering::Relaxed) as f64);
        let name = "denoise_model_loaded";
        out.family(
            name,
            "gauge",
            "Workers that have loaded the model: the default loads in every worker at start, \
             the others on first use.",
        );
        for (model, n) in &self.models {
            let labels = format!("model=\"{}\"", escape(model));
            out.sample(name, &labels, n.load(Ordering::SeqCst) as f64);
        }
        out.0
    }
}

/// The text being written.
#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", help.replace('\\', r"\\"));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {}", number(value));
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {}", number(value));
        }
    }
}

/// A label value as the format quotes it.
fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// A sample value or bound as the format writes it (Rust's `inf` is `+Inf` there).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges() -> Gauges {
        Gauges {
            queued: 2,
            capacity: 16,
            busy: 1,
            workers: 3,
        }
    }

    /// `name{labels}` -> value, checking that every line is a comment or `name{labels} value`
    /// and that every sample belongs to a family declared before it.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut types = BTreeMap::new();
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if let Some(comment) = line.strip_prefix("# ") {
                let mut words = comment.splitn(3, ' ');
                let (kind, name, rest) = (words.next(), words.next(), words.next());
                match kind {
                    Some("TYPE") => {
                        types.insert(name.unwrap().to_owned(), rest.unwrap().to_owned());
                    }
                    Some("HELP") => assert!(rest.is_some_and(|h| !h.is_empty()), "{line}"),
                    _ => panic!("unexpected comment: {line}"),
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect(line);
            let name = series.split('{').next().unwrap();
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "{line}"
            );
            if series.contains('{') {
                assert!(series.ends_with('}'), "{line}");
            }
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(name);
            assert!(types.contains_key(family), "no TYPE before {line}");
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse::<f64>().expect(line),
            };
            assert!(samples.insert(series.to_owned(), value).is_none(), "{line}");
        }
        samples
    }

    #[test]
    fn a_fresh_server_renders_every_family_at_zero() {
        let metrics = Metrics::new(["default", "gray"]);
        let text = metrics.render(&gauges());
        let samples = parse(&text);
        assert!(text.contains("# TYPE denoise_http_requests_total counter\n"));
        assert!(text.contains("# TYPE denoise_http_request_duration_seconds histogram\n"));
        assert_eq!(samples["denoise_queue_depth"], 2.0);
        assert_eq!(samples["denoise_queue_capacity"], 16.0);
        assert_eq!(samples["denoise_workers_busy"], 1.0);
        assert_eq!(samples["denoise_workers"], 3.0);
        assert_eq!(samples["denoise_images_denoised_total"], 0.0);
        assert_eq!(samples["denoise_megapixels_denoised_total"], 0.0);
        assert_eq!(samples["denoise_jobs_cancelled_total"], 0.0);
        assert_eq!(samples["denoise_model_loaded{model=\"default\"}"], 0.0);
        assert_eq!(samples["denoise_model_loaded{model=\"gray\"}"], 0.0);
        assert!(!text.contains("denoise_http_requests_total{"));
    }

    #[test]
    fn requests_are_counted_by_route_and_status_with_cumulative_buckets() {
        let metrics = Metrics::new(["default"]);
        let ms = Duration::from_millis;
        metrics.record_request("/api/denoise", 200, ms(300));
        metrics.record_request("/api/denoise", 200, ms(1500));
        metrics.record_request("/api/denoise", 400, ms(2));
        metrics.record_request(OTHER_ROUTE, 404, ms(1));
        // A bound is inclusive: 5 ms falls in le="0.005".
        metrics.record_request("/healthz", 200, ms(5));
        // Past the last bound: only +Inf and the count.
        metrics.record_request("/healthz", 200, Duration::from_secs(200));
        let samples = parse(&metrics.render(&gauges()));
        let requests = |route: &str, status: u16| {
            samples
                [&format!("denoise_http_requests_total{{route=\"{route}\",status=\"{status}\"}}")]
        };
        assert_eq!(requests("/api/denoise", 200), 2.0);
        assert_eq!(requests("/api/denoise", 400), 1.0);
        assert_eq!(requests("other", 404), 1.0);
        assert_eq!(requests("/healthz", 200), 2.0);
        let bucket = |route: &str, le: &str| {
            samples[&format!(
                "denoise_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{le}\"}}"
            )]
        };
        assert_eq!(bucket("/api/denoise", "0.005"), 1.0);
        assert_eq!(bucket("/api/denoise", "0.25"), 1.0);
        assert_eq!(bucket("/api/denoise", "0.5"), 2.0);
        assert_eq!(bucket("/api/denoise", "1"), 2.0);
        assert_eq!(bucket("/api/denoise", "2.5"), 3.0);
        assert_eq!(bucket("/api/denoise", "120"), 3.0);
        assert_eq!(bucket("/api/denoise", "+Inf"), 3.0);
        assert_eq!(bucket("/healthz", "0.005"), 1.0);
        assert_eq!(bucket("/healthz", "120"), 1.0);
        assert_eq!(bucket("/healthz", "+Inf"), 2.0);
        let per_route = |suffix: &str, route: &str| {
            samples[&format!("denoise_http_request_duration_seconds_{suffix}{{route=\"{route}\"}}")]
        };
        assert_eq!(per_route("count", "/api/denoise"), 3.0);
        assert!((per_route("sum", "/api/denoise") - 1.802).abs() < 1e-9);
        assert_eq!(per_route("count", "/healthz"), 2.0);
        assert_eq!(per_route("count", "other"), 1.0);
        // Buckets never decrease along a route.
        let le = LATENCY_BUCKETS.map(number);
        for route in ["/api/denoise", "other", "/healthz"] {
            let counts: Vec<f64> = le.iter().map(|l| bucket(route, l)).collect();
            assert!(
                counts.windows(2).all(|w| w[0] <= w[1]),
                "{route}: {counts:?}"
            );
        }
    }

    #[test]
    fn images_megapixels_cancelled_jobs_and_model_loads_add_up() {
        let metrics = Metrics::new(["default", "gray"]);
        metrics.record_denoised(64, 48);
        metrics.record_denoised(1000, 1000);
        metrics.record_cancelled();
        metrics.record_model_loaded("default");
        metrics.record_model_loaded("default");
        // Not a configured model: ignored, not a new series.
        metrics.record_model_loaded("elsewhere");
        assert_eq!(metrics.workers_with("default"), 2);
        assert_eq!(metrics.workers_with("gray"), 0);
        let text = metrics.render(&gauges());
        let samples = parse(&text);
        assert_eq!(samples["denoise_images_denoised_total"], 2.0);
        assert_eq!(samples["denoise_jobs_cancelled_total"], 1.0);
        assert_eq!(samples["denoise_megapixels_denoised_total"], 1.003072);
        assert!(text.contains("\ndenoise_megapixels_denoised_total 1.003072\n"));
        assert_eq!(samples["denoise_model_loaded{model=\"default\"}"], 2.0);
        assert_eq!(samples["denoise_model_loaded{model=\"gray\"}"], 0.0);
        assert!(!text.contains("elsewhere"));
    }

    #[test]
    fn label_values_and_numbers_are_written_as_the_format_reads_them() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("a\nb"), r"a\nb");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(0.005), "0.005");
        assert_eq!(number(120.0), "120");
        let metrics = Metrics::new([]);
        metrics.record_request("/odd\"route", 200, Duration::ZERO);
        let text = metrics.render(&Gauges::default());
        assert!(
            text.contains(
                "denoise_http_requests_total{route=\"/odd\\\"route\",status=\"200\"} 1\n"
            )
        );
        parse(&text);
    }
}
