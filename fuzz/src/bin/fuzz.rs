//! The libFuzzer driver: `DENOISE_FUZZ_TARGET` names the target (see `denoise_fuzz::TARGETS`);
//! with `DENOISE_FUZZ_SEEDS` set to a folder, the target's seeds are written there first. Built
//! and run by `cargo xtask fuzz`.
//!
//! A crash is a panic that reaches the caller of our code. libfuzzer-sys's own hook aborts on
//! every panic, also one our code catches on purpose (the image decoders run inside
//! `catch_unwind`, and a decoder that panics on a hostile file is refused cleanly), so the hook
//! here only remembers the message, and the target aborts when a panic escapes.

#![no_main]

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

static TARGET: OnceLock<Box<dyn denoise_fuzz::Target>> = OnceLock::new();

thread_local! {
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

libfuzzer_sys::fuzz_target!(
    init: {
        let name = std::env::var("DENOISE_FUZZ_TARGET").unwrap_or_default();
        let Some(target) = denoise_fuzz::target(&name) else {
            eprintln!(
                "fuzz: DENOISE_FUZZ_TARGET must be one of {}",
                denoise_fuzz::TARGETS.join(", ")
            );
            std::process::exit(2);
        };
        if let Some(dir) = std::env::var_os("DENOISE_FUZZ_SEEDS") {
            if let Err(e) = denoise_fuzz::write_seeds(target.as_ref(), dir.as_ref()) {
                eprintln!("fuzz: cannot write seeds: {e}");
                std::process::exit(2);
            }
        }
        let _ = TARGET.set(target);
        // The `http` target's server writes to sockets whose client may have gone.
        denoise_models::sys::ignore_sigpipe();
        std::panic::set_hook(Box::new(|info| {
            LAST_PANIC.with(|last| *last.borrow_mut() = info.to_string());
        }));
    },
    |data: &[u8]| {
        let target = TARGET.get().expect("set at start");
        if catch_unwind(AssertUnwindSafe(|| target.run(data))).is_err() {
            LAST_PANIC.with(|last| eprintln!("fuzz: a panic escaped: {}", last.borrow()));
            std::process::abort();
        }
    }
);
