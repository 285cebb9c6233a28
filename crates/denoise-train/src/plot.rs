//! A run's history (`train.jsonl`) and its PNG plots: `loss.png` (training loss, binned means on
//! a log scale) and `psnr.png` (validation PSNR with the noisy input's PSNR beside it), drawn
//! with plotters and redrawn at every validation.
//!
//! The text is set in a subset of DejaVu Sans shipped in `assets/fonts` (plotters' `ab_glyph`
//! backend), so plotting needs no system fonts or font libraries.

use crate::{Result, TrainError};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// The file names of the plots in a run directory.
pub const LOSS_PLOT: &str = "loss.png";
pub const PSNR_PLOT: &str = "psnr.png";

const SIZE: (u32, u32) = (900, 520);
/// At most this many points on the loss curve: each is the mean loss of a bin of steps.
const LOSS_BINS: usize = 400;
const FONT: &str = "sans-serif";

/// One validation: the model's PSNR and the noisy input's, in dB.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ValPoint {
    pub step: u64,
    pub psnr: f64,
    pub noisy_psnr: f64,
    /// CPU seconds of training steps so far (absent in logs written before it was recorded).
    pub cpu_s: Option<f64>,
}

/// The curves of a run, one entry per step (a step logged twice keeps its last entry).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct History {
    loss: BTreeMap<u64, f64>,
    val: BTreeMap<u64, ValPoint>,
}

impl History {
    /// Parses the lines of a `train.jsonl` log, ignoring lines that are not JSON objects of the
    /// two known shapes (a log cut off mid-line by a crash still reads).
    pub fn parse(log: &str) -> Self {
        let mut history = Self::default();
        for line in log.lines() {
            let Ok(row) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let Some(step) = row.get("step").and_then(|s| s.as_u64()) else {
                continue;
            };
            let num = |key: &str| row.get(key).and_then(|v| v.as_f64());
            if let Some(loss) = num("loss") {
                history.push_loss(step, loss);
            } else if let (Some(psnr), Some(noisy_psnr)) = (num("val_psnr"), num("noisy_psnr")) {
                history.push_val(ValPoint {
                    step,
                    psnr,
                    noisy_psnr,
                    cpu_s: num("train_cpu_s"),
                });
            }
        }
        history
    }

    pub fn push_loss(&mut self, step: u64, loss: f64) {
        self.loss.insert(step, loss);
    }

    pub fn push_val(&mut self, point: ValPoint) {
        self.val.insert(point.step, point);
    }

    /// Forgets everything logged after `step` (a resumed run redoes those steps).
    pub fn truncate_after(&mut self, step: u64) {
        self.loss.split_off(&(step + 1));
        self.val.split_off(&(step + 1));
    }

    /// The last step logged (a loss line), if any.
    pub fn last_step(&self) -> Option<u64> {
        self.loss.keys().next_back().copied()
    }

    pub fn loss_len(&self) -> usize {
        self.loss.len()
    }

    pub fn val_points(&self) -> impl Iterator<Item = &ValPoint> {
        self.val.values()
    }

    /// Mean loss per bin of consecutive steps, at most `bins` points (non-finite losses skipped).
    pub fn binned_loss(&self, bins: usize) -> Vec<(f64, f64)> {
        let finite: Vec<(u64, f64)> = self
            .loss
            .iter()
            .filter(|(_, l)| l.is_finite() && **l > 0.0)
            .map(|(&s, &l)| (s, l))
            .collect();
        let per_bin = finite.len().div_ceil(bins.max(1)).max(1);
        finite
            .chunks(per_bin)
            .map(|c| {
                let n = c.len() as f64;
                let step = c.iter().map(|(s, _)| *s as f64).sum::<f64>() / n;
                let loss = c.iter().map(|(_, l)| l).sum::<f64>() / n;
                (step, loss)
            })
            .collect()
    }
}

/// The lines of a `train.jsonl` log up to and including `step`: what a run resumed from the
/// checkpoint of `step` keeps (later lines are redone; a torn last line is dropped).
pub fn log_up_to(log: &str, step: u64) -> String {
    let mut out = String::with_capacity(log.len());
    for line in log.lines() {
        let Ok(row) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if row
            .get("step")
            .and_then(|s| s.as_u64())
            .is_some_and(|s| s <= step)
        {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The plots' title for a run: "KIND on NOISE".
pub fn run_title(cfg: &crate::TrainConfig) -> String {
    match &cfg.model {
        Some(model) => format!("{} on {}", model.kind(), cfg.noise),
        None => cfg.noise.clone(),
    }
}

/// Draws `loss.png` and `psnr.png` into `dir` (each written atomically). `title` names the run.
pub fn write_plots(history: &History, dir: &Path, title: &str) -> Result<()> {
    register_font()?;
    let loss = history.binned_loss(LOSS_BINS);
    let png = render(|area| draw_loss(area, &loss, title))?;
    write(dir, LOSS_PLOT, &png)?;
    let vals: Vec<ValPoint> = history.val.values().copied().collect();
    let png = render(|area| draw_psnr(area, &vals, title))?;
    write(dir, PSNR_PLOT, &png)
}

fn write(dir: &Path, name: &str, png: &[u8]) -> Result<()> {
    denoise_data::io::write_atomic(dir.join(name), png).map_err(TrainError::from)
}

fn register_font() -> Result<()> {
    static FONT_BYTES: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../assets/fonts/DejaVuSans-subset.ttf"
    ));
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(plot_error("the bundled font does not parse"))
    }
}

fn plot_error(message: impl std::fmt::Display) -> TrainError {
    TrainError::Plot(message.to_string())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult = std::result::Result<(), Box<dyn std::error::Error + 'static>>;

/// Renders with `draw` into an RGB buffer and encodes it as PNG.
fn render(draw: impl FnOnce(&Area<'_>) -> DrawResult) -> Result<Vec<u8>> {
    let (w, h) = SIZE;
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let area = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        area.fill(&WHITE).map_err(plot_error)?;
        draw(&area).map_err(plot_error)?;
        area.present().map_err(plot_error)?;
    }
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &rgb,
        w,
        h,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(plot_error)?;
    Ok(png)
}

fn draw_loss(area: &Area<'_>, points: &[(f64, f64)], title: &str) -> DrawResult {
    let x_max = points.last().map_or(1.0, |p| p.0).max(1.0);
    let (lo, hi) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let (lo, hi) = if points.is_empty() {
        (1e-4, 1.0)
    } else {
        (lo * 0.8, hi * 1.25)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{title}: training loss"), (FONT, 22))
        .margin(12)
        .margin_right(30)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("loss (mean per bin)")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .draw()?;
    chart.draw_series(LineSeries::new(
        points.iter().copied(),
        BLUE.stroke_width(2),
    ))?;
    Ok(())
}

fn draw_psnr(area: &Area<'_>, vals: &[ValPoint], title: &str) -> DrawResult {
    let x_max = vals.last().map_or(1.0, |v| v.step as f64).max(1.0);
    let all = vals.iter().flat_map(|v| [v.psnr, v.noisy_psnr]);
    let (lo, hi) = all
        .filter(|p| p.is_finite())
        .fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p), hi.max(p)));
    let (lo, hi) = if lo > hi {
        (0.0, 40.0)
    } else {
        ((lo - 1.0).floor(), (hi + 1.0).ceil())
    };
    let best = vals
        .iter()
        .map(|v| v.psnr)
        .filter(|p| p.is_finite())
        .fold(f64::NAN, f64::max);
    let caption = if best.is_finite() {
        format!("{title}: validation PSNR (best {best:.2} dB)")
    } else {
        format!("{title}: validation PSNR")
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 22))
        .margin(12)
        .margin_right(30)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("PSNR (dB)")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;
    let model = vals.iter().map(|v| (v.step as f64, v.psnr));
    chart
        .draw_series(LineSeries::new(model.clone(), BLUE.stroke_width(2)))?
        .label("denoised")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart.draw_series(model.map(|p| Circle::new(p, 3, BLUE.filled())))?;
    let noisy = vals.iter().map(|v| (v.step as f64, v.noisy_psnr));
    chart
        .draw_series(LineSeries::new(noisy, RED.stroke_width(1)))?
        .label("noisy input")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(1)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = r#"{"step":1,"loss":0.02,"lr":0.001,"patches_per_s":10.0}
{"step":2,"loss":0.01,"lr":0.001,"patches_per_s":10.0}
{"noisy_psnr":20.17,"step":2,"val_psnr":24.5,"val_ssim":0.7}
{"step":3,"loss":0.008,"lr":0.001,"patches_per_s":10.0}
{"step":3,"loss":0.009,"lr":0.001,"patches_per_s":10.0}
{"step":4,"lo"#;

    #[test]
    fn parses_a_log_keeping_the_last_entry_of_a_step_and_skipping_a_torn_line() {
        let h = History::parse(LOG);
        assert_eq!(h.loss_len(), 3);
        assert_eq!(h.loss[&3], 0.009);
        let vals: Vec<_> = h.val_points().copied().collect();
        assert_eq!(
            vals,
            [ValPoint {
                step: 2,
                psnr: 24.5,
                noisy_psnr: 20.17,
                cpu_s: None,
            }]
        );
        let with_cost = History::parse(
            r#"{"noisy_psnr":20.17,"step":5,"train_cpu_s":61.5,"train_s":31.0,"val_psnr":25.0}"#,
        );
        assert_eq!(with_cost.val_points().next().unwrap().cpu_s, Some(61.5));
    }

    #[test]
    fn truncation_drops_steps_after_the_checkpoint() {
        let mut h = History::parse(LOG);
        h.truncate_after(2);
        assert_eq!(h.loss_len(), 2);
        let kept = log_up_to(LOG, 2);
        assert_eq!(kept.lines().count(), 3);
        assert!(kept.lines().nth(2).unwrap().contains("val_ssim"));
        assert_eq!(History::parse(&kept), h);
    }

    #[test]
    fn binned_loss_means_each_bin() {
        let mut h = History::default();
        for s in 1..=10 {
            h.push_loss(s, s as f64);
        }
        h.push_loss(11, f64::NAN);
        assert_eq!(
            h.binned_loss(5),
            [(1.5, 1.5), (3.5, 3.5), (5.5, 5.5), (7.5, 7.5), (9.5, 9.5)]
        );
        assert_eq!(h.binned_loss(100).len(), 10);
    }

    #[test]
    fn writes_two_decodable_pngs_even_for_an_empty_history() {
        let dir = tempfile::tempdir().unwrap();
        for h in [History::default(), History::parse(LOG)] {
            write_plots(&h, dir.path(), "test").unwrap();
            for name in [LOSS_PLOT, PSNR_PLOT] {
                let img = image::open(dir.path().join(name)).unwrap();
                assert_eq!((img.width(), img.height()), SIZE);
                // Something besides the white background was drawn.
                let rgb = img.to_rgb8();
                let dark = rgb
                    .pixels()
                    .filter(|p| p.0.iter().all(|&c| c < 128))
                    .count();
                assert!(dark > 500, "{name}: {dark} dark pixels");
            }
        }
    }
}
