//! The libFuzzer driver: `DENOISE_FUZZ_TARGET` names the target (see `denoise_fuzz::TARGETS`);
//! with `DENOISE_FUZZ_SEEDS` set to a folder, the target's seeds are written there first. Built
//! and run by `cargo xtask fuzz`.

#![no_main]

use std::sync::OnceLock;

static TARGET: OnceLock<Box<dyn denoise_fuzz::Target>> = OnceLock::new();

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
    },
    |data: &[u8]| {
        TARGET.get().expect("set at start").run(data);
    }
);
