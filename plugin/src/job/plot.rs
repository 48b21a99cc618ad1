//! Figures (PNG, plotters): the reward curve of a run and the LEAF-vs-GRPO comparison.
//!
//! Text needs a TrueType font, loaded at run time from common system paths (DejaVu Sans,
//! Liberation Sans, ...; `LEAF_FONT` names another). Without one the curves are still drawn,
//! without captions, axis labels or legends, and a warning says so.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::RunReport;
use super::JobError;

/// Where fonts are looked for (after `$LEAF_FONT`).
pub const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers the first readable font as `sans-serif` (once per process); whether text can be
/// drawn.
pub fn fonts_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let env = std::env::var_os("LEAF_FONT").map(PathBuf::from);
        let candidates = env.into_iter().chain(FONT_PATHS.iter().map(PathBuf::from));
        for path in candidates {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            // Registration keeps the bytes for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
        tracing::warn!("no TrueType font found (set LEAF_FONT); figures are drawn without text");
        eprintln!(
            "leaf: warning: no TrueType font found (looked in {} and $LEAF_FONT); figures are \
             drawn without text",
            FONT_PATHS.join(", ")
        );
        false
    })
}

fn plot_err(path: &Path) -> impl Fn(String) -> JobError + '_ {
    move |reason| JobError::Plot {
        path: path.to_path_buf(),
        reason,
    }
}

/// One line of a panel: points, and an optional band (lower, upper) around it.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// `(x, y)` points.
    pub points: Vec<(f64, f64)>,
    /// `(x, low, high)` of the band, if any.
    pub band: Vec<(f64, f64, f64)>,
    /// Colour index (0 blue, 1 red, 2 green, 3 grey).
    pub color: usize,
    /// Draw dashed-looking (points only, no line) instead of a line.
    pub markers_only: bool,
}

/// One panel: a title, axis names and series.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Caption.
    pub title: String,
    /// X axis name.
    pub x_label: String,
    /// Y axis name.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
    /// A horizontal reference line (e.g. the base model), with its label.
    pub baseline: Option<(f64, String)>,
}

fn color(i: usize) -> RGBColor {
    match i % 4 {
        0 => RGBColor(31, 119, 180),
        1 => RGBColor(214, 39, 40),
        2 => RGBColor(44, 160, 44),
        _ => RGBColor(110, 110, 110),
    }
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    panel: &Panel,
    text: bool,
) -> Result<(), String> {
    let mut x_max: f64 = 1.0;
    let mut y_min: f64 = 0.0;
    let mut y_max: f64 = 0.0;
    for s in &panel.series {
        for &(x, y) in &s.points {
            x_max = x_max.max(x);
            y_max = y_max.max(y);
            y_min = y_min.min(y);
        }
        for &(x, lo, hi) in &s.band {
            x_max = x_max.max(x);
            y_max = y_max.max(hi);
            y_min = y_min.min(lo);
        }
    }
    if let Some((b, _)) = &panel.baseline {
        y_max = y_max.max(*b);
    }
    let y_max = if y_max <= y_min {
        y_min + 1.0
    } else {
        y_max + 0.05 * (y_max - y_min)
    };
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(&panel.title, ("sans-serif", 20))
            .x_label_area_size(40)
            .y_label_area_size(55);
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..x_max, y_min..y_max)
        .map_err(|e| e.to_string())?;
    if text {
        chart
            .configure_mesh()
            .x_desc(panel.x_label.as_str())
            .y_desc(panel.y_label.as_str())
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    for s in &panel.series {
        let c = color(s.color);
        if s.band.len() >= 2 {
            let mut poly: Vec<(f64, f64)> = s.band.iter().map(|&(x, _, hi)| (x, hi)).collect();
            poly.extend(s.band.iter().rev().map(|&(x, lo, _)| (x, lo)));
            chart
                .draw_series(std::iter::once(Polygon::new(poly, c.mix(0.18).filled())))
                .map_err(|e| e.to_string())?;
        }
        let style = ShapeStyle::from(&c).stroke_width(2);
        let anno = if s.markers_only {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, style.filled())))
                .map_err(|e| e.to_string())?
        } else {
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), style))
                .map_err(|e| e.to_string())?
        };
        if text {
            anno.label(s.label.as_str()).legend(move |(x, y)| {
                PathElement::new(
                    vec![(x, y), (x + 18, y)],
                    ShapeStyle::from(&c).stroke_width(2),
                )
            });
        }
    }
    if let Some((b, label)) = &panel.baseline {
        let c = color(3);
        let anno = chart
            .draw_series(LineSeries::new(
                vec![(0.0, *b), (x_max, *b)],
                c.stroke_width(1),
            ))
            .map_err(|e| e.to_string())?;
        if text {
            anno.label(label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Draws `panels` on a grid of `rows` x `cols` into a PNG of `size` pixels.
pub fn draw_panels(
    path: &Path,
    size: (u32, u32),
    rows: usize,
    cols: usize,
    panels: &[Panel],
) -> Result<(), JobError> {
    let err = plot_err(path);
    if rows * cols < panels.len() {
        return Err(err(format!(
            "{} panels do not fit a {rows} x {cols} grid",
            panels.len()
        )));
    }
    let text = fonts_available();
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let areas = root.split_evenly((rows, cols));
    for (area, panel) in areas.iter().zip(panels) {
        draw_panel(area, panel, text).map_err(&err)?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// `reward_curve.png` of a run: held-out reward and exact match of every check against
/// rollouts (promoted checks as the line, refused ones as markers), the training reward, and
/// the base model's held-out reward as a reference line.
pub fn reward_curve(path: &Path, report: &RunReport) -> Result<(), JobError> {
    let curve = &report.curve;
    let pts = |f: &dyn Fn(&super::report::CurvePoint) -> f64| -> Vec<(f64, f64)> {
        curve.iter().map(|p| (p.rollouts as f64, f(p))).collect()
    };
    let refused: Vec<(f64, f64)> = curve
        .iter()
        .filter(|p| !p.promoted && p.rollouts > 0)
        .map(|p| (p.rollouts as f64, p.reward))
        .collect();
    let mut series = vec![
        Series {
            label: format!(
                "held-out reward (BLEU/100, {} decoding)",
                report.eval_decoding.name()
            ),
            points: pts(&|p| p.reward),
            band: Vec::new(),
            color: 0,
            markers_only: false,
        },
        Series {
            label: "held-out exact match".into(),
            points: pts(&|p| p.exact_match),
            band: Vec::new(),
            color: 2,
            markers_only: false,
        },
        Series {
            label: "training reward".into(),
            points: curve
                .iter()
                .filter(|p| p.rollouts > 0)
                .map(|p| (p.rollouts as f64, p.train_reward))
                .collect(),
            band: Vec::new(),
            color: 1,
            markers_only: true,
        },
    ];
    if !refused.is_empty() {
        series.push(Series {
            label: "refused (rolled back)".into(),
            points: refused,
            band: Vec::new(),
            color: 3,
            markers_only: true,
        });
    }
    let panel = Panel {
        title: format!(
            "leaf run ({}): held-out reward vs rollouts, {} swaps",
            report.estimator, report.swaps
        ),
        x_label: "rollouts".into(),
        y_label: "reward".into(),
        series,
        baseline: Some((
            curve.first().map_or(report.base_reward, |p| p.reward),
            "base model".into(),
        )),
    };
    draw_panels(path, (960, 600), 1, 1, &[panel])
}

/// `diagnostics.png` of a run: per update, the policy entropy and the KL to the base model,
/// the share of informative groups and of zero-advantage tokens, the importance ratios and
/// the gradient norm, against rollouts.
pub fn diagnostics(path: &Path, report: &RunReport) -> Result<(), JobError> {
    let updates = &report.diagnostics.updates;
    let line =
        |label: &str, color: usize, f: &dyn Fn(&crate::online::UpdateRecord) -> f64| Series {
            label: label.into(),
            points: updates.iter().map(|u| (u.rollouts as f64, f(u))).collect(),
            band: Vec::new(),
            color,
            markers_only: false,
        };
    let panel = |title: &str, y_label: &str, series: Vec<Series>| Panel {
        title: title.into(),
        x_label: "rollouts".into(),
        y_label: y_label.into(),
        series,
        baseline: None,
    };
    let panels = [
        panel(
            "policy entropy (nats/token)",
            "nats",
            vec![line("entropy", 0, &|u| u.entropy)],
        ),
        panel(
            "k3 KL to the base model (per token)",
            "KL",
            vec![line("KL", 1, &|u| u.kl)],
        ),
        panel(
            "where the signal is",
            "share",
            vec![
                line("informative groups", 2, &|u| {
                    u.batch.informative_group_share
                }),
                line("zero-advantage tokens", 3, &|u| {
                    u.batch.zero_advantage_share
                }),
            ],
        ),
        panel(
            "importance ratio (policy / sampler) and gradient norm",
            "value",
            vec![
                line("ratio mean", 0, &|u| u.ratio_mean),
                line("ratio max", 1, &|u| u.ratio_max),
                line("grad norm", 2, &|u| u.grad_norm),
            ],
        ),
    ];
    draw_panels(path, (1200, 800), 2, 2, &panels)
}
