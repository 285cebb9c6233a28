//! Devices as users name them (`--device`, a training config's `device`): `auto`, `cpu`,
//! `cuda` (or `gpu`) and `cuda:N`.

use crate::{ModelError, Result};
use tch::Device;

/// `auto` (CUDA when libtorch sees a CUDA device, else the CPU), `cpu`, `cuda` / `gpu` (the first
/// CUDA device) or `cuda:N`. A CUDA device that libtorch does not see is refused here, not at the
/// first tensor put on it.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => cuda(0, tch::Cuda::device_count()),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => cuda(n, tch::Cuda::device_count()),
            None => Err(ModelError::Input(format!(
                "unknown device '{s}' (auto, cpu, cuda, cuda:N)"
            ))),
        },
    }
}

/// CUDA device `n` where libtorch sees `seen` of them.
fn cuda(n: usize, seen: i64) -> Result<Device> {
    if usize::try_from(seen).is_ok_and(|seen| seen > n) {
        Ok(Device::Cuda(n))
    } else {
        Err(ModelError::Input(format!(
            "cuda:{n} requested but libtorch sees {seen} CUDA device(s)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_device_parses_and_others_are_refused_naming_the_choices() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(
            parse_device("auto").unwrap(),
            Device::cuda_if_available(),
            "auto is the CPU only where no CUDA device is seen"
        );
        for bad in ["tpu", "cuda:x", "cuda:-1", "CPU", ""] {
            let err = parse_device(bad).unwrap_err().to_string();
            assert_eq!(
                err,
                format!("invalid input: unknown device '{bad}' (auto, cpu, cuda, cuda:N)")
            );
        }
    }

    #[test]
    fn a_cuda_device_is_taken_only_when_libtorch_sees_it() {
        assert_eq!(cuda(0, 1).unwrap(), Device::Cuda(0));
        assert_eq!(cuda(3, 4).unwrap(), Device::Cuda(3));
        let err = cuda(1, 1).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid input: cuda:1 requested but libtorch sees 1 CUDA device(s)"
        );
        assert!(cuda(0, 0).is_err());
        // What this machine has decides `cuda` itself.
        let seen = tch::Cuda::device_count();
        assert_eq!(parse_device("cuda").is_ok(), seen > 0);
        assert_eq!(parse_device("gpu").is_ok(), seen > 0);
    }
}
