//! `denoise-cli serve`: the web app and its HTTP API (`denoise-serve`), on one address.

use crate::lookup::{
    DEFAULT_MODEL, resolve_model, samples_dir, shipped_model, shipped_models, white_noise_model,
};
use anyhow::{Context, Result};
use denoise_serve::fetch::FetchConfig;
use denoise_serve::{App, ModelEntry, ServeConfig};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on; port 0 picks a free port (the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Default model: a shipped name, an artefact file or a training run directory (default:
    /// the shipped default). The shipped models are offered too.
    #[arg(long)]
    model: Option<String>,
    /// Largest upload (or fetched URL) in MiB.
    #[arg(long, default_value_t = 20)]
    max_upload_mb: usize,
    /// Largest image in pixels, checked from the header before decoding.
    #[arg(long, default_value_t = 40_000_000)]
    max_pixels: u64,
    /// Most self-ensemble passes a request may ask for (1, 2, 4 or 8; the page offers them as
    /// "passes"): each pass holds a worker as long as a plain request.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = crate::runner::parse_ensemble)]
    max_ensemble: usize,
    /// Inference worker threads, each with its own copy of the models.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Requests that may wait for a worker; beyond that they get 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// Allow image URLs on loopback, private and link-local addresses (cloud-metadata
    /// addresses stay refused). For local testing only.
    #[arg(long)]
    allow_private_urls: bool,
    /// Seconds to wait for a URL's server: connect (at most 5 s) and each read; the whole fetch
    /// gets three times this.
    #[arg(long, default_value_t = 10)]
    fetch_timeout: u64,
    /// auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Tile side in pixels (0: whole images). Bounds memory per job and gives the page its
    /// progress bar on large images.
    #[arg(long, default_value_t = 512)]
    tile: usize,
    /// A host name requests may address (the `Host` header), repeatable, added to localhost,
    /// 127.0.0.1, [::1] and the --addr IP. With none given, a loopback --addr answers to those
    /// only, which stops other web pages from reaching the server through a name of theirs that
    /// resolves to 127.0.0.1 (DNS rebinding); other addresses answer to any name.
    #[arg(long, value_name = "NAME")]
    allowed_host: Vec<String>,
    /// Seconds a connection has to send its request headers before it is closed (slow
    /// clients cannot hold connections open); at a stop, also how long a client still reading
    /// its response is waited for.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    header_timeout: u64,
}

pub fn run(args: &Args) -> Result<()> {
    anyhow::ensure!(args.fetch_timeout > 0, "--fetch-timeout must be at least 1");
    let (models, default_model) = model_entries(args.model.as_deref())?;
    let timeout = Duration::from_secs(args.fetch_timeout);
    let config = ServeConfig {
        default_model,
        samples_dir: samples_dir(),
        max_upload_bytes: args
            .max_upload_mb
            .checked_mul(1 << 20)
            .context("--max-upload-mb is too large")?,
        max_pixels: args.max_pixels,
        max_ensemble: args.max_ensemble,
        workers: args.workers,
        queue: args.queue,
        device: denoise_models::parse_device(&args.device).context("--device")?,
        tile: args.tile,
        fetch: FetchConfig {
            allow_private: args.allow_private_urls,
            connect_timeout: timeout.min(Duration::from_secs(5)),
            read_timeout: timeout,
            total_timeout: timeout * 3,
            ..FetchConfig::default()
        },
        header_timeout: Duration::from_secs(args.header_timeout),
        allowed_hosts: allowed_hosts(args),
        ..ServeConfig::new(models)
    };
    let names: Vec<&str> = config.models.iter().map(|m| m.name.as_str()).collect();
    let summary = format!(
        "{} worker(s), queue {}, models: {}; default: {}",
        config.workers,
        config.queue,
        names.join(", "),
        config.default_model
    );
    let app = App::new(config).context("cannot start the server")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("denoise-http")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("cannot listen on {}", args.addr))?;
        let addr = listener.local_addr()?;
        // Ctrl-C or SIGTERM (`kill`, a service manager, `docker stop`): stop accepting, finish
        // the requests in flight, exit 0. Both handlers are installed before the "serving" line,
        // so a signal sent as soon as it appears is not fatal.
        use tokio::signal::unix::{SignalKind, signal};
        let mut term =
            signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
        let mut int =
            signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
        eprintln!("denoise-cli: serving http://{addr}/ ({summary}); Ctrl-C or SIGTERM stops");
        let shutdown = async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        };
        denoise_serve::serve(app, listener, shutdown).await?;
        eprintln!("denoise-cli: stopped");
        Ok(())
    })
}

/// The `Host` names to answer to (empty: any); see `--allowed-host`.
fn allowed_hosts(args: &Args) -> Vec<String> {
    if args.allowed_host.is_empty() && !args.addr.ip().is_loopback() {
        return Vec::new();
    }
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
        .map(String::from)
        .to_vec();
    let ip = args.addr.ip();
    if !ip.is_unspecified() {
        names.push(match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        });
    }
    names.extend(args.allowed_host.iter().cloned());
    names.sort();
    names.dedup();
    names
}

/// The shipped models, plus `--model` when it names a file or directory; and the default's name.
fn model_entries(spec: Option<&str>) -> Result<(Vec<ModelEntry>, String)> {
    // `photo` names the default, unless a file or folder of that name is meant.
    let spec = spec.map(|s| match s {
        "photo" if !Path::new(s).exists() => DEFAULT_MODEL,
        other => other,
    });
    let mut entries = Vec::new();
    for name in shipped_models().unwrap_or_default() {
        if let Some(path) = shipped_model(&name)? {
            let white = match name.as_str() {
                DEFAULT_MODEL => white_noise_model(None)?,
                _ => None,
            };
            entries.push(ModelEntry { path, name, white });
        }
    }
    let default = match spec {
        Some(name) if entries.iter().any(|e| e.name == name) => name.to_owned(),
        Some(_) => {
            let path = resolve_model(spec)?;
            let mut name = sanitise(&path);
            if entries.iter().any(|e| e.name == name) {
                name = format!("custom-{name}");
            }
            entries.insert(
                0,
                ModelEntry {
                    name: name.clone(),
                    path,
                    white: None,
                },
            );
            name
        }
        None => {
            resolve_model(None)?;
            "default".to_owned()
        }
    };
    Ok((entries, default))
}

/// A model name from a path: the file stem (or directory name) in URL-safe characters.
fn sanitise(path: &Path) -> String {
    let stem = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    let name: String = stem
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    if name.is_empty() {
        "custom".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_offered_with_its_white_noise_model_by_either_name() {
        for spec in [None, Some("default"), Some("photo")] {
            let (entries, default) = model_entries(spec).unwrap();
            assert_eq!(default, DEFAULT_MODEL, "{spec:?}");
            let entry = entries.iter().find(|e| e.name == DEFAULT_MODEL).unwrap();
            assert!(entry.white.is_some(), "{spec:?}: {entry:?}");
            assert_eq!(entries.iter().filter(|e| e.white.is_some()).count(), 1);
        }
    }
}
