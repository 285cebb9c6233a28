//! The layers every request passes: the Origin/Host guard, and the security headers, log line
//! and metrics count on every response.

use crate::ServeError;
use crate::metrics;
use crate::routes::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// The page may load only what this server serves: no CDN, no external font, no inline script.
const CSP: &str = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; \
    script-src 'self'; connect-src 'self' blob:; object-src 'none'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// Refuses (403) a request whose `Host` the server does not answer to, or a POST from another
/// site's page (its `Origin` is not this server): browsers send `Origin` on every cross-site
/// POST, so no other page can queue work here or make the server fetch URLs for it.
pub(crate) async fn guard_origin(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: middleware::Next,
) -> Response {
    let host = match request_host(&request) {
        Ok(host) => host,
        Err(message) => return ServeError::BadRequest(message).into_response(),
    };
    let refusal = origin_refusal(
        host.as_deref(),
        request
            .headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok()),
        request.method() == axum::http::Method::POST,
        &state.allowed_hosts,
    );
    match refusal {
        Some(message) => ServeError::Forbidden(message).into_response(),
        None => {
            state.in_flight.fetch_add(1, Ordering::SeqCst);
            // Counted down however the handler ends (a client gone drops its future).
            let _done = InFlight(Arc::clone(&state.in_flight));
            next.run(request).await
        }
    }
}

/// Counts a request down when dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The host a request is for, lower-case: the authority of a request line in absolute form
/// (`GET http://host/path`), else the `Host` header. A request with two `Host` headers, or whose
/// request line names another host than its `Host`, is refused: a proxy in front of this server
/// and the server could each read a different one.
fn request_host(request: &Request) -> Result<Option<String>, String> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("the request has more than one Host header".into());
    }
    let host = match host {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| "the Host header is not plain ASCII text".to_owned())?
                .to_ascii_lowercase(),
        ),
        None => None,
    };
    let Some(authority) = request.uri().authority() else {
        return Ok(host);
    };
    let named = authority.as_str().to_ascii_lowercase();
    match host {
        Some(host) if host != named => Err(format!(
            "the request line names host '{named}' but the Host header names '{host}'"
        )),
        _ => Ok(Some(named)),
    }
}

/// Why a request for `host` with this `Origin` header is refused, if it is.
fn origin_refusal(
    host: Option<&str>,
    origin: Option<&str>,
    is_post: bool,
    allowed_hosts: &[String],
) -> Option<String> {
    let host = host.map(str::to_ascii_lowercase);
    if !allowed_hosts.is_empty() {
        let name = host.as_deref().map(host_name);
        if !name.is_some_and(|n| allowed_hosts.iter().any(|a| a == n)) {
            return Some(format!(
                "this server answers to {} only, not to Host '{}' (start it with --allowed-host \
                 NAME to add a name)",
                allowed_hosts.join(", "),
                host.as_deref().unwrap_or("")
            ));
        }
    }
    let origin = origin?.to_ascii_lowercase();
    if !is_post {
        return None;
    }
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    if let Some(authority) = authority {
        // The page of this server: the same authority as the request's Host, or (behind a
        // proxy that rewrites Host) a domain name the server was told to answer to. Not by
        // loopback name or IP alone: another port there is another local service's origin.
        let name = host_name(authority);
        let local = name == "localhost"
            || name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok();
        let named = !local && allowed_hosts.iter().any(|a| a == name);
        if Some(authority) == host.as_deref() || named {
            return None;
        }
    }
    Some(format!(
        "cross-site request refused: the page at '{origin}' is not this server"
    ))
}

/// The name part of a `Host` header value: `[::1]:8080` -> `[::1]`, `localhost:8080` ->
/// `localhost`.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// Security headers on every response, one log line per API call (not progress polls), and
/// every answered request counted in the metrics (refusals, errors and `/metrics` itself
/// included) by its route's pattern.
pub(crate) async fn headers_and_log(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: middleware::Next,
) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    // The pattern, never the path: label values stay as few as the routes.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let mut response = next.run(request).await;
    state.metrics.record_request(
        route.as_deref().unwrap_or(metrics::OTHER_ROUTE),
        response.status().as_u16(),
        start.elapsed(),
    );
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // API answers (JSON, errors included) describe one moment: never cache them.
    let probe = matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics");
    if (path.starts_with("/api/") || probe) && !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if path.starts_with("/api/") && !path.starts_with("/api/progress/") {
        eprintln!(
            "{method} {path} {} ({:.0} ms)",
            response.status().as_u16(),
            start.elapsed().as_secs_f64() * 1e3
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_from_other_sites_and_other_host_names_are_refused() {
        let local: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .map(String::from)
            .to_vec();
        let refused = |host, origin, post, allowed: &[String]| {
            origin_refusal(host, origin, post, allowed).is_some()
        };
        // The page's own requests, and tools that send no Origin (curl, scripts).
        assert!(!refused(
            Some("localhost:8080"),
            Some("http://localhost:8080"),
            true,
            &local
        ));
        assert!(!refused(
            Some("[::1]:8080"),
            Some("http://[::1]:8080"),
            true,
            &local
        ));
        assert!(!refused(Some("127.0.0.1:8080"), None, true, &local));
        assert!(!refused(Some("LOCALHOST:8080"), None, false, &local));
        // DNS rebinding: a name of the attacker's that resolves to 127.0.0.1.
        assert!(refused(Some("evil.example:8080"), None, false, &local));
        assert!(refused(None, None, false, &local));
        // Another site's page posting here (a simple request needs no preflight).
        assert!(refused(
            Some("localhost:8080"),
            Some("https://evil.example"),
            true,
            &local
        ));
        assert!(refused(
            Some("localhost:8080"),
            Some("http://localhost:9999"),
            true,
            &local
        ));
        assert!(refused(Some("localhost:8080"), Some("null"), true, &local));
        // A GET from another origin only reads public, same-origin-protected answers.
        assert!(!refused(
            Some("localhost:8080"),
            Some("https://evil.example"),
            false,
            &local
        ));
        // Behind a proxy that rewrites Host, a page at an allowed name may still post.
        let proxied: Vec<String> = vec!["denoise.example.org".into(), "127.0.0.1".into()];
        assert!(!refused(
            Some("127.0.0.1:8080"),
            Some("https://denoise.example.org"),
            true,
            &proxied
        ));
        // No host list (a server on a LAN address): any Host, same Origin rule.
        assert!(!refused(
            Some("box.lan:8080"),
            Some("http://box.lan:8080"),
            true,
            &[]
        ));
        assert!(refused(
            Some("box.lan:8080"),
            Some("http://evil.example"),
            true,
            &[]
        ));
        assert_eq!(host_name("[::1]:80"), "[::1]");
        assert_eq!(host_name("example.org"), "example.org");
    }

    #[test]
    fn a_request_names_one_host_or_is_refused() {
        let request = |uri: &str, hosts: &[&str]| {
            let mut builder = Request::builder().uri(uri);
            for host in hosts {
                builder = builder.header(header::HOST, *host);
            }
            request_host(&builder.body(axum::body::Body::empty()).unwrap())
        };
        assert_eq!(
            request("/healthz", &["LocalHost:8080"]),
            Ok(Some("localhost:8080".into()))
        );
        assert_eq!(request("/healthz", &[]), Ok(None));
        let two = request("/healthz", &["localhost:8080", "evil.example"]);
        assert!(two.unwrap_err().contains("more than one Host"));
        assert!(request("/", &["a", "a"]).is_err(), "even the same twice");
        // The request line in absolute form names the host, and must agree with Host.
        let foreign = request("http://evil.example/", &["127.0.0.1:8080"]);
        assert!(foreign.unwrap_err().contains("'evil.example'"));
        assert_eq!(
            request("http://127.0.0.1:8080/healthz", &["127.0.0.1:8080"]),
            Ok(Some("127.0.0.1:8080".into()))
        );
        assert_eq!(
            request("http://Evil.Example/", &[]),
            Ok(Some("evil.example".into())),
            "then judged as Host would be"
        );
    }
}
