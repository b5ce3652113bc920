//! The chart `make bench` draws (target/bench/start.png), kept apart from the bench binary.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark aborts on a broken setup

use std::path::Path;

use serde_json::Value;

/// start.png: cold-start distributions per runtime (box plots) and Cocoon's phases as a
/// stacked bar beside the bare boot floor.
pub fn chart(
    path: &Path,
    cold: &[(&str, Vec<f64>)],
    phases: &Value,
    floor_ms: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .map_err(|e| format!("DejaVuSans.ttf ({e}); install fonts-dejavu-core"))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| "DejaVuSans.ttf is not a usable font")?;
    let root = BitMapBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);

    let names: Vec<String> = cold.iter().map(|(n, _)| (*n).to_owned()).collect();
    let n = i32::try_from(names.len()).unwrap_or(0);
    let xmax = cold
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max)
        * 1.1;
    let mut c = ChartBuilder::on(&left)
        .caption("cold `ctr run --rm … true` (ms)", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(80)
        .build_cartesian_2d(0f32..xmax as f32, (0..n).into_segmented())?;
    c.configure_mesh()
        .disable_y_mesh()
        .x_desc("milliseconds")
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    for (i, (_, v)) in (0..n).zip(cold.iter()) {
        let q = Quartiles::new(v);
        c.draw_series([Boxplot::new_horizontal(SegmentValue::CenterOf(i), &q)
            .width(24)
            .style(BLUE)])?;
        let label = format!("median {:.0}", q.median());
        c.draw_series([Text::new(
            label,
            (q.median() as f32, SegmentValue::Exact(i)),
            ("sans-serif", 14),
        )])?;
    }

    let parts: Vec<(String, f64)> = phases
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v["median"].as_f64().unwrap_or(0.0)))
        .collect();
    let total: f64 = parts.iter().map(|p| p.1).sum();
    let ymax = total.max(floor_ms) * 1.15;
    let mut c = ChartBuilder::on(&right)
        .caption("Cocoon phases vs bare boot (median ms)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..2f64, 0f64..ymax)?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("milliseconds")
        .draw()?;
    let mut acc = 0.0;
    for (i, (name, v)) in parts.iter().enumerate() {
        let color = Palette99::pick(i).filled();
        let (lo, hi) = (acc, acc + v);
        c.draw_series([Rectangle::new([(0.2, lo), (0.8, hi)], color)])?
            .label(format!("{name}: {v:.0}"))
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 10, y + 5)], Palette99::pick(i).filled())
            });
        acc = hi;
    }
    c.draw_series([Rectangle::new(
        [(1.2, 0.0), (1.8, floor_ms)],
        BLACK.mix(0.35).filled(),
    )])?
    .label(format!("bare boot-to-init floor: {floor_ms:.0}"))
    .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], BLACK.mix(0.35).filled()));
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .label_font(("sans-serif", 12))
        .draw()?;
    root.present()?;
    Ok(())
}
