//! CPU speed: channels-last memory format, bf16 precision, and the CPU features that decide
//! whether bf16 is fast here (AMX-BF16 or AVX512-BF16).

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Numeric precision of inference (training keeps fp32 master weights in `denoise-train`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    /// bfloat16 weights and activations: ~3x faster than fp32 with AMX, at a small PSNR cost.
    Bf16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = crate::ModelError;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "fp32" | "f32" | "float" => Ok(Precision::Fp32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(crate::ModelError::Config(format!(
                "unknown precision '{s}' (fp32, bf16)"
            ))),
        }
    }
}

impl Precision {
    pub fn kind(self) -> tch::Kind {
        match self {
            Precision::Fp32 => tch::Kind::Float,
            Precision::Bf16 => tch::Kind::BFloat16,
        }
    }
}

/// Memory layout of 4-D weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// NHWC order, indexed as NCHW: oneDNN's fast path for most convolutions.
    ChannelsLast,
    /// Plain contiguous NCHW.
    Nchw,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::ChannelsLast => "channels-last",
            Layout::Nchw => "nchw",
        })
    }
}

impl std::str::FromStr for Layout {
    type Err = crate::ModelError;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "channels-last" | "channels_last" | "nhwc" => Ok(Layout::ChannelsLast),
            "nchw" | "contiguous" => Ok(Layout::Nchw),
            _ => Err(crate::ModelError::Config(format!(
                "unknown layout '{s}' (channels-last, nchw)"
            ))),
        }
    }
}

impl Layout {
    /// `t` (4-D) in this layout, same shape and values.
    pub fn apply(self, t: &Tensor) -> Tensor {
        match self {
            Layout::ChannelsLast => to_channels_last(t),
            Layout::Nchw => t.contiguous(),
        }
    }

    /// The faster layout for training `kind` on `device`, from side-by-side runs of
    /// `denoise-cli bench --train --layout ...` (fp32, the bench's default batch and patch).
    /// On a 2-core AMD EPYC (AVX2, no AVX-512), patches/s channels-last vs NCHW, two sittings:
    /// RIDNet 1.66/1.52 vs 2.08/1.92, DnCNN 7.85/8.32 vs 8.63/8.74, FFDNet 19.8/18.0 vs
    /// 20.8/20.1, UNet 5.46/5.68 vs 4.70/5.66, autoencoder 45.1/47.0 vs 38.0/45.9. On an H200,
    /// FFDNet at batch 128: 12,489 vs 10,186. Plain 3x3 stacks and dilated convs backpropagate
    /// faster in NCHW on an AVX2 CPU; the encoder-decoders' strided and transposed convs, and
    /// everything on CUDA, in channels-last.
    pub fn for_training(kind: crate::ModelKind, device: tch::Device) -> Layout {
        use crate::ModelKind::{Dncnn, Ffdnet, Ridnet};
        match (kind, device) {
            (Ridnet | Dncnn | Ffdnet, tch::Device::Cpu) => Layout::Nchw,
            _ => Layout::ChannelsLast,
        }
    }
}

/// The same values in channels-last (NHWC) memory order, still indexed as NCHW: libtorch's
/// oneDNN convolutions take this layout without reordering (tch has no memory-format API).
///
/// # Shapes
/// `t`: any 4-D tensor; returned with the same shape.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Whether a 4-D tensor is laid out channels-last (channel stride 1).
pub fn is_channels_last(t: &Tensor) -> bool {
    let (size, stride) = (t.size(), t.stride());
    size.len() == 4 && (stride[1] == 1 || size[1] == 1) && stride[3] == size[1]
}

/// CPU features that matter for this workload, read from `/proc/cpuinfo` (Linux x86).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub avx512f: bool,
    pub avx512_bf16: bool,
    pub amx_bf16: bool,
}

impl CpuFeatures {
    pub fn detect() -> Self {
        let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags: Vec<&str> = text
            .lines()
            .find(|l| l.starts_with("flags"))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        let has = |f: &str| flags.contains(&f);
        Self {
            avx2: has("avx2"),
            avx512f: has("avx512f"),
            avx512_bf16: has("avx512_bf16"),
            amx_bf16: has("amx_bf16"),
        }
    }

    /// Whether bf16 convolutions run natively (otherwise they are emulated and slower than fp32).
    pub fn fast_bf16(&self) -> bool {
        self.amx_bf16 || self.avx512_bf16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn channels_last_keeps_values_and_changes_strides() {
        let _rng = crate::test_rng_lock();
        let x = Tensor::rand([2, 3, 5, 7], (Kind::Float, Device::Cpu));
        let y = to_channels_last(&x);
        assert!(!is_channels_last(&x));
        assert!(is_channels_last(&Layout::ChannelsLast.apply(&x)));
        assert!(!is_channels_last(&Layout::Nchw.apply(&y)));
        assert_eq!(Layout::Nchw.apply(&y), x);
        assert_eq!("nchw".parse::<Layout>().unwrap(), Layout::Nchw);
        assert_eq!(
            "channels-last".parse::<Layout>().unwrap(),
            Layout::ChannelsLast
        );
        assert!("nhcw".parse::<Layout>().is_err());
        assert!(is_channels_last(&y));
        assert!(x.equal(&y));
        assert_eq!(y.stride(), [105, 1, 21, 3]);
    }

    #[test]
    fn precision_parses() {
        let _rng = crate::test_rng_lock();
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert!("fp8".parse::<Precision>().is_err());
    }
}
