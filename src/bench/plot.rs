//! `refrag bench --plot FILE.png`: acceleration against full context per context length and k,
//! time to first token and throughput side by side (the paper's Figure 2).

use crate::bench::Row;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

/// DejaVu Sans (free licence, assets/DejaVuSans.LICENSE): text without system fonts.
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draw the cached REFRAG variants' speed-ups against full context.
pub fn speedups(rows: &[Row], device: &str, path: &Path) -> Result<()> {
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let mut ks: Vec<usize> = rows.iter().filter(|r| r.variant.ends_with("-cached")).map(|r| r.k).collect();
    ks.sort_unstable();
    ks.dedup();
    let series = |k: usize, f: &dyn Fn(&Row) -> Option<f64>| -> Vec<(f64, f64)> {
        rows.iter()
            .filter(|r| r.k == k && r.variant.ends_with("-cached"))
            .filter_map(|r| f(r).map(|v| (r.context_tokens as f64, v)))
            .collect()
    };
    let xs: Vec<f64> = rows.iter().map(|r| r.context_tokens as f64).collect();
    let (x0, x1) = xs.iter().fold((f64::MAX, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
    if ks.is_empty() || x1 <= 0.0 {
        return Err(anyhow!("--plot: no REFRAG rows to draw"));
    }
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let (left, right) = root.split_horizontally(600);
    type Value<'a> = &'a dyn Fn(&Row) -> Option<f64>;
    let panels: [(&str, Value, DrawingArea<_, _>); 2] = [
        ("TTFT acceleration (x)", &|r: &Row| r.speedup, left),
        ("Throughput acceleration (x)", &|r: &Row| r.throughput_speedup, right),
    ];
    for (title, f, area) in panels {
        let all: Vec<f64> = ks.iter().flat_map(|&k| series(k, f)).map(|p| p.1).collect();
        let ymax = all.iter().copied().fold(1.0f64, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(&area)
            .caption(format!("{title}, {device}"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((x0 * 0.8..x1 * 1.25).log_scale(), 0.0..ymax)
            .map_err(|e| anyhow!("plot: {e}"))?;
        chart
            .configure_mesh()
            .x_desc("context tokens")
            .y_desc("vs full context")
            .x_label_formatter(&|x| format!("{:.0}", x))
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        for (i, &k) in ks.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            let pts = series(k, f);
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(|e| anyhow!("plot: {e}"))?
                .label(format!("REFRAG k = {k}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled()))).map_err(|e| anyhow!("plot: {e}"))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
    }
    root.present().map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(())
}
