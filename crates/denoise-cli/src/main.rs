//! `denoise-cli`: denoise images, evaluate and benchmark models, and the data, metrics and
//! training tools, from one binary. Errors print as `denoise-cli: <message>` with a non-zero
//! exit, never a panic or a backtrace.

mod batch;
mod cmd;
mod lookup;
mod outputs;
mod report;
mod runner;

use clap::Parser as _;

fn main() {
    // Before libtorch allocates: keep freed activation memory in the process (see its doc).
    denoise_models::sys::tune_allocator();
    // Plain libtorch ops panic on errors; the library turns those into `Err` at its edges
    // (`catch_unwind`), where the default hook's message would only alarm. So the hook keeps the
    // last panic's text, and a panic that reaches `main` (a bug) is reported from it in one line.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        let first = msg.lines().next().unwrap_or_default().to_owned();
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(first);
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
            // clap's message without its usage block, on one line ("the following required
            // arguments were not provided: ..." names them on the lines after the first).
            let text = err.render().to_string();
            let lines: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
                .collect();
            let message = lines.join(" ");
            let message = message.trim_start_matches("error: ");
            eprintln!("denoise-cli: {message} (see 'denoise-cli --help')");
            std::process::exit(2);
        }
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cmd::run(cli))) {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            eprintln!("denoise-cli: {}", report::describe(&err));
            std::process::exit(1);
        }
        Err(_) => {
            let msg = LAST_PANIC
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or_else(|| "unknown panic".into());
            eprintln!(
                "denoise-cli: internal error (a bug, please report it; DENOISE_DEBUG=1 shows where): {msg}"
            );
            std::process::exit(101);
        }
    }
}

/// The first line of the last panic's message, for the report in `main`.
static LAST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
