//! `denoise-cli`: denoise images, evaluate and benchmark models, and the data, metrics and
//! training tools, from one binary. Errors print as `denoise-cli: <message>` with a non-zero
//! exit, never a panic or a backtrace.

mod cmd;
mod common;

use clap::Parser as _;

fn main() {
    // Before libtorch allocates: keep freed activation memory in the process (see its doc).
    denoise_models::perf::tune_allocator();
    // Plain libtorch ops panic on errors; the library turns those into `Err` at its edges, and
    // the default hook would print a scary message first. Keep panics for real bugs brief.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        if std::env::var_os("DENOISE_DEBUG").is_some() {
            eprintln!(
                "denoise-cli: internal panic at {:?}: {msg}",
                info.location()
            );
        }
    }));
    let cli = match cmd::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => err.exit(), // --help, --version
        Err(err) => {
            let text = err.render().to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ");
            eprintln!("denoise-cli: {first} (see 'denoise-cli --help')");
            std::process::exit(2);
        }
    };
    if let Err(err) = cmd::run(cli) {
        eprintln!("denoise-cli: {}", common::describe(&err));
        std::process::exit(1);
    }
}
