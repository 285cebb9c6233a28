//! Building blocks shared by the networks: convolutions that also count their FLOPs, and the
//! padding that lets every network take any height and width.

use tch::{Tensor, nn};

/// Multiply-adds per input pixel, summed while a network is built (each conv adds
/// `2 * cin * cout * k * k * scale`, `scale` being its resolution relative to the input).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Flops(pub f64);

/// A convolution's shape: `k x k`, dilation, bias, and the resolution it runs at.
#[derive(Clone, Copy, Debug)]
pub struct ConvSpec {
    pub cin: i64,
    pub cout: i64,
    pub k: i64,
    pub dilation: i64,
    pub bias: bool,
    /// Pixels this conv sees per input pixel (1 at full resolution, 1/4 after a 2x2 pool).
    pub scale: f64,
}

impl ConvSpec {
    /// A biased `k x k` conv at full resolution.
    pub fn new(cin: i64, cout: i64, k: i64) -> Self {
        Self {
            cin,
            cout,
            k,
            dilation: 1,
            bias: true,
            scale: 1.0,
        }
    }
    pub fn dilation(self, dilation: i64) -> Self {
        Self { dilation, ..self }
    }
    pub fn bias(self, bias: bool) -> Self {
        Self { bias, ..self }
    }
    pub fn scale(self, scale: f64) -> Self {
        Self { scale, ..self }
    }
}

/// A "same"-padded conv (padding = dilation * (k / 2)) that adds its FLOPs to `flops`.
pub fn conv(p: nn::Path<'_>, spec: ConvSpec, flops: &mut Flops) -> nn::Conv2D {
    flops.0 += 2.0 * (spec.cin * spec.cout * spec.k * spec.k) as f64 * spec.scale;
    let cfg = nn::ConvConfig {
        padding: spec.dilation * (spec.k / 2),
        dilation: spec.dilation,
        bias: spec.bias,
        ..Default::default()
    };
    nn::conv2d(p, spec.cin, spec.cout, spec.k, cfg)
}

/// Pads the bottom and right of `x` (N x C x H x W) by edge replication up to multiples of `m`,
/// returning the padded tensor. Replication works for any size (reflection needs pad < size).
pub fn pad_to_multiple(x: &Tensor, m: i64) -> Tensor {
    let (h, w) = (x.size()[2], x.size()[3]);
    let ph = (m - h % m) % m;
    let pw = (m - w % m) % m;
    if ph == 0 && pw == 0 {
        x.shallow_clone()
    } else {
        x.replication_pad2d([0, pw, 0, ph])
    }
}

/// Nearest-neighbour 2x upsampling by scale factor (not by output size, so a TorchScript trace
/// of the network stays valid for every input size).
pub fn upsample2(x: &Tensor) -> Tensor {
    x.upsample_nearest2d_vec(None::<&[i64]>, [2.0, 2.0].as_slice())
}

/// Crops `x` (N x C x H' x W') back to its top-left `h x w`.
pub fn crop_to(x: &Tensor, h: i64, w: i64) -> Tensor {
    let s = x.size();
    if s[2] == h && s[3] == w {
        x.shallow_clone()
    } else {
        x.narrow(2, 0, h).narrow(3, 0, w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn padding_round_trips_any_size() {
        let _rng = crate::test_rng_lock();
        let x = Tensor::rand([1, 3, 33, 47], (Kind::Float, Device::Cpu));
        let p = pad_to_multiple(&x, 16);
        assert_eq!(p.size(), [1, 3, 48, 48]);
        assert!(crop_to(&p, 33, 47).equal(&x));
        let tiny = Tensor::rand([1, 1, 3, 2], (Kind::Float, Device::Cpu));
        assert_eq!(pad_to_multiple(&tiny, 16).size(), [1, 1, 16, 16]);
    }

    #[test]
    fn conv_counts_flops() {
        let _rng = crate::test_rng_lock();
        let vs = nn::VarStore::new(Device::Cpu);
        let mut flops = Flops::default();
        let _ = conv(vs.root() / "c", ConvSpec::new(3, 64, 3), &mut flops);
        let _ = conv(
            vs.root() / "d",
            ConvSpec::new(64, 64, 3).scale(0.25),
            &mut flops,
        );
        assert_eq!(
            flops.0,
            2.0 * 3.0 * 64.0 * 9.0 + 2.0 * 64.0 * 64.0 * 9.0 / 4.0
        );
    }
}
