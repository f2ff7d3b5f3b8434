//! Minimal SVG bar charts for the perf report: horizontal bars with their
//! values, no dependencies, readable in a browser or on GitHub.

use std::fmt::Write as _;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal bar chart of `bars` (label, value), values written with `unit`.
pub fn bars(title: &str, unit: &str, bars: &[(String, f64)]) -> String {
    const LABEL_W: f64 = 260.0;
    const BAR_W: f64 = 420.0;
    const ROW_H: f64 = 22.0;
    let max = bars
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let height = 40.0 + ROW_H * bars.len() as f64 + 10.0;
    let width = LABEL_W + BAR_W + 110.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for (i, (label, value)) in bars.iter().enumerate() {
        let y = 36.0 + ROW_H * i as f64;
        let w = if value.is_finite() {
            (value.max(0.0) / max * BAR_W).max(1.0)
        } else {
            0.0
        };
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{LABEL_W}" y="{}" width="{w:.1}" height="{}" fill="#4a7ebb"/><text x="{}" y="{}">{value:.1} {}</text>"##,
            LABEL_W - 6.0,
            y + 14.0,
            escape(label),
            y + 3.0,
            ROW_H - 6.0,
            LABEL_W + w + 6.0,
            y + 14.0,
            escape(unit)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_largest_and_escape_labels() {
        let svg = bars(
            "t",
            "ns",
            &[
                ("a<b".into(), 50.0),
                ("c".into(), 100.0),
                ("nan".into(), f64::NAN),
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("a&lt;b"));
        assert!(
            svg.contains(r#"width="420.0""#),
            "largest bar is full width"
        );
        assert!(svg.contains(r#"width="210.0""#), "half value, half width");
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
