//! The self-ensemble: each tile is run over several views (flips and quarter turns, each on
//! its own phase of the model's 2x2 grid), and the outputs, put back, are averaged.

use crate::Result;
use tch::Tensor;

/// The self-ensemble sizes [`TileConfig::ensemble`] takes: 1 (off), 2, 4 or 8, the first views
/// of [`VIEWS`].
pub const ENSEMBLE_SIZES: [usize; 4] = [1, 2, 4, 8];

/// Reads a self-ensemble size as a user writes it (surrounding blanks allowed); `None` unless it
/// is one of [`ENSEMBLE_SIZES`].
pub fn ensemble_size(text: &str) -> Option<usize> {
    text.trim()
        .parse()
        .ok()
        .filter(|n| ENSEMBLE_SIZES.contains(n))
}

/// One pass of the self-ensemble: the tile flipped left-right (`flip`), then turned `turns`
/// quarter turns, and cut by the model's 2x2 grid (pixel-unshuffle, stride-2 layers) on
/// `phase`: the blocks pair the tile's rows `2k + phase.0, 2k + 1 + phase.0` and its columns
/// `2k + phase.1, 2k + 1 + phase.1`. Phase 1 on an axis takes a one-pixel pad at the start of
/// that axis as the model sees it (mirrored in, or repeated for a 1-pixel tile) and cropped
/// off the output; a flip or turn that reverses an odd-length axis moves its phase by itself,
/// which the pad accounts for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct View {
    pub turns: i64,
    pub flip: bool,
    pub phase: (i64, i64),
}

const fn view(turns: i64, flip: bool, phase: (i64, i64)) -> View {
    View { turns, flip, phase }
}

/// The self-ensemble's passes, in the order the sizes take them: all eight flips and quarter
/// turns of the square, with each phase of the 2x2 grid used twice and the first 2 and the
/// first 4 views on different phases, so that the passes' errors are less alike than with
/// turns alone. Measured on the 22 validation photos of BSD432 (481x321) with the shipped
/// default, sigma 15: see the README's quality section.
pub const VIEWS: [View; 8] = [
    view(0, false, (0, 0)),
    view(0, true, (1, 1)),
    view(1, false, (1, 0)),
    view(3, true, (0, 1)),
    view(2, false, (0, 1)),
    view(2, true, (1, 0)),
    view(1, true, (0, 0)),
    view(3, false, (1, 1)),
];

impl View {
    /// Which axis of the tile (0 rows, 1 columns) each axis of the turned tile runs along,
    /// and whether reversed: `[rows, columns]` as the model sees them.
    fn axes(self) -> [(usize, bool); 2] {
        let mut axes = [(0, false), (1, self.flip)];
        for _ in 0..self.turns.rem_euclid(4) {
            // A quarter turn (torch.rot90): new rows run along the old columns, reversed; new
            // columns along the old rows.
            let [rows, cols] = axes;
            axes = [(cols.0, !cols.1), rows];
        }
        axes
    }

    /// The (top, left) pad, in the turned frame, that puts an `h x w` tile on `phase`.
    fn pads(self, (h, w): (i64, i64)) -> (i64, i64) {
        let len = [h, w];
        let phase = [self.phase.0, self.phase.1];
        let [top, left] = self.axes().map(|(axis, reversed)| {
            // Reversing an axis of length L moves row r to L - 1 - r: a pad d then pairs the
            // rows from (L + d) mod 2 on.
            if reversed {
                (phase[axis] + len[axis]).rem_euclid(2)
            } else {
                phase[axis]
            }
        });
        (top, left)
    }

    /// `t` (N x C x H x W) as this pass sees it.
    fn apply(self, t: &Tensor) -> Result<Tensor> {
        let (dy, dx) = self.pads((t.size()[2], t.size()[3]));
        let t = if self.flip {
            t.f_flip([3])?
        } else {
            t.shallow_clone()
        };
        let t = t.f_rot90(self.turns, [2, 3])?;
        let (h, w) = (t.size()[2], t.size()[3]);
        if dy == 0 && dx == 0 {
            return Ok(t);
        }
        // Mirroring needs a row or column to spare: repeat the edge of a 1-pixel tile.
        Ok(if h > dy && w > dx {
            t.f_reflection_pad2d([dx, 0, dy, 0])?
        } else {
            t.f_replication_pad2d([dx, 0, dy, 0])?
        })
    }

    /// The output of a pass over [`View::apply`]'s tensor, put back where an `h x w` input was.
    fn undo(self, t: &Tensor, (h, w): (i64, i64)) -> Result<Tensor> {
        let (dy, dx) = self.pads((h, w));
        let (th, tw) = (t.size()[2], t.size()[3]);
        let t = t.f_narrow(2, dy, th - dy)?.f_narrow(3, dx, tw - dx)?;
        let t = t.f_rot90(-self.turns, [2, 3])?;
        Ok(if self.flip { t.f_flip([3])? } else { t })
    }
}

/// The mean of `run`'s outputs over the first `n` [`VIEWS`], each put back:
/// `mean_k V_k^-1(run(V_k x, V_k map))`, calling `on_pass` after each. Fallible ops throughout
/// (`f_`): the sum lives on the model's device, where it can run out of memory like the model.
pub(crate) fn average_views(
    run: &mut dyn FnMut(&Tensor, Option<&Tensor>) -> Result<Tensor>,
    x: &Tensor,
    map: Option<&Tensor>,
    n: usize,
    on_pass: &mut dyn FnMut(),
) -> Result<Tensor> {
    if n == 1 {
        let out = run(x, map)?;
        on_pass();
        return Ok(out);
    }
    let size = (x.size()[2], x.size()[3]);
    let mut sum: Option<Tensor> = None;
    for &view in &VIEWS[..n] {
        let map = map.map(|m| view.apply(m)).transpose()?;
        let out = view.undo(&run(&view.apply(x)?, map.as_ref())?, size)?;
        on_pass();
        sum = Some(match sum {
            Some(s) => s.f_add(&out)?,
            None => out,
        });
    }
    let sum = sum.expect("n >= 2 views were run");
    Ok(sum.f_div_scalar(n as f64)?.f_contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn every_view_is_put_back_where_it_came_from() {
        let opts = (Kind::Float, Device::Cpu);
        // All eight flips and turns, each phase of the 2x2 grid twice, and the first 2 and 4
        // views on different phases.
        let turns: std::collections::BTreeSet<_> =
            VIEWS.iter().map(|v| (v.turns, v.flip)).collect();
        assert_eq!(turns.len(), 8);
        for phase in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            assert_eq!(VIEWS.iter().filter(|v| v.phase == phase).count(), 2);
        }
        let phases = |n: usize| {
            VIEWS[..n]
                .iter()
                .map(|v| v.phase)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        };
        assert_eq!((phases(2), phases(4)), (2, 4));
        // The phase the model really cuts, read off a tile whose pixels hold their own row and
        // column: rows 2 and 3 (and columns 2 and 3) of what the model sees share a 2x2 block,
        // whatever the flip, turn and tile size (odd sides move the phase of a reversed axis).
        for (h, w) in [(6, 8), (7, 5), (5, 9), (9, 9), (8, 7)] {
            let rows = Tensor::arange(h, opts)
                .view([1, 1, h, 1])
                .expand([1, 1, h, w], false);
            let cols = Tensor::arange(w, opts)
                .view([1, 1, 1, w])
                .expand([1, 1, h, w], false);
            let coords = Tensor::cat(&[rows, cols], 1);
            for view in VIEWS {
                let seen = view.apply(&coords).unwrap();
                let at = |y: i64, x: i64| -> [i64; 2] {
                    [0, 1].map(|c| seen.double_value(&[0, c, y, x]) as i64)
                };
                let mut cut = [None, None];
                for (a, b) in [(at(2, 2), at(3, 2)), (at(2, 2), at(2, 3))] {
                    let axis = if a[0] != b[0] { 0 } else { 1 };
                    assert_eq!((a[axis] - b[axis]).abs(), 1, "{view:?} on {h}x{w}");
                    cut[axis] = Some(a[axis].min(b[axis]) % 2);
                }
                assert_eq!(
                    cut,
                    [Some(view.phase.0), Some(view.phase.1)],
                    "{view:?} on {h}x{w}"
                );
            }
        }
        for (h, w) in [(12, 16), (7, 5), (1, 1), (1, 4)] {
            let x = Tensor::rand([1, 3, h, w], opts);
            let map = Tensor::rand([1, 1, h, w], opts);
            for view in VIEWS {
                let seen = view.apply(&x).unwrap();
                // A quarter turn swaps the sides; the pad adds at most a row and a column.
                let (sh, sw) = if view.turns % 2 == 1 { (w, h) } else { (h, w) };
                let (dy, dx) = view.pads((h, w));
                assert_eq!(seen.size(), [1, 3, sh + dy, sw + dx], "{view:?}");
                assert_eq!(view.undo(&seen, (h, w)).unwrap(), x, "{view:?} on {h}x{w}");
            }
            // A per-pixel function of the image and map gives the same result through any views
            // when each is put back rightly, the map moved with the image.
            let mut pointwise = |x: &Tensor, map: Option<&Tensor>| Ok(x * 2.0 + map.unwrap());
            let direct = pointwise(&x, Some(&map)).unwrap();
            for n in [2, 4, 8] {
                let mut passes = 0;
                let out =
                    average_views(&mut pointwise, &x, Some(&map), n, &mut || passes += 1).unwrap();
                assert_eq!(passes, n);
                let gap = (&out - &direct).abs().max().double_value(&[]);
                assert!(gap < 1e-6, "{n} views on {h}x{w}: {gap}");
            }
        }
        // The same check fails for a function that depends on where a pixel is (it has teeth).
        let x = Tensor::rand([1, 3, 12, 16], opts);
        let mut positional = |x: &Tensor, _: Option<&Tensor>| {
            let w = x.size()[3];
            Ok(x + Tensor::arange(w, opts).view([1, 1, 1, w]) / 16.0)
        };
        let direct = positional(&x, None).unwrap();
        let out = average_views(&mut positional, &x, None, 2, &mut || {}).unwrap();
        assert!((&out - &direct).abs().max().double_value(&[]) > 1e-3);
    }
}
