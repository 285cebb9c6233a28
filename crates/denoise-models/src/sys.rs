//! The C library calls: glibc's allocator tuning for libtorch's way of allocating, and the CPU
//! time the process has used. The only `unsafe` code of the crate lives here.

/// Tunes glibc's malloc for libtorch's pattern of freeing and re-allocating the same large
/// activation buffers every step: without it, glibc returns freed memory at the top of the heap
/// to the OS and maps big blocks afresh, so every step pays page faults and zeroing again.
/// Sets the trim threshold to 1 GiB and the mmap threshold to 32 MiB (glibc's maximum), which
/// made CPU training steps measurably faster. Call once, at the start of a binary, before
/// libtorch allocates. Returns whether glibc took both settings (false on other C libraries,
/// where it does nothing).
#[allow(unsafe_code)]
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets malloc parameters; it takes plain integers, touches no
        // memory of ours, and glibc serialises it with the allocator's own lock.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// CPU seconds (user + system, all threads) this process has used so far, or `None` where
/// `getrusage` is unavailable. Training records it to compare models by PSNR per CPU second.
#[allow(unsafe_code)]
pub fn process_cpu_seconds() -> Option<f64> {
    #[cfg(unix)]
    {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes one `rusage` into the buffer we own and reads nothing else;
        // the buffer is only read after it reports success.
        let usage = unsafe {
            if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
                return None;
            }
            usage.assume_init()
        };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        Some(secs(usage.ru_utime) + secs(usage.ru_stime))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Ignores SIGPIPE, as the Rust runtime does before an ordinary `main`: a program without one
/// (a libFuzzer driver) would otherwise be killed when a socket's peer has gone, where a
/// write should fail with an error instead.
#[allow(unsafe_code)]
pub fn ignore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler of ours, and
    // takes and returns plain values.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_allocator_settings() {
        assert!(tune_allocator());
    }

    #[test]
    #[cfg(unix)]
    fn cpu_seconds_grow_with_work() {
        // Busy-loop until the process has used 0.1 CPU seconds more: a stuck clock never gets
        // there. The wall-clock deadline is generous because a loaded machine may starve us.
        let before = process_cpu_seconds().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        let used = loop {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            let used = process_cpu_seconds().unwrap() - before;
            if used >= 0.1 || start.elapsed() > std::time::Duration::from_secs(60) {
                break used;
            }
        };
        assert!(
            used >= 0.1,
            "only {used} CPU seconds counted in 60 s of busy looping"
        );
    }
}
