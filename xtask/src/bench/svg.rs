//! Line charts written by hand as SVG: cost versus N, one line per series, min–max bars at each point.

use std::fmt::Write as _;

/// One line: (x, median, min, max) points.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64, f64, f64)>,
}

const W: f64 = 780.0;
const H: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 240.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" label for an axis value.
fn label(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

/// At most six decimals, trailing zeros dropped (0.001, 0.25, 2.5, 10).
fn trim(v: f64) -> String {
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

/// A step of 1, 2 or 5 × 10^k giving about `target` ticks over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    let raw = span / target;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// The chart; x on a log10 scale when `log_x` (all x > 0), y linear from 0 or log10 when `log_y`.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
    log_y: bool,
) -> String {
    let pts = || series.iter().flat_map(|s| s.points.iter());
    let tx = |x: f64| if log_x { x.max(1e-9).log10() } else { x };
    let ty = |y: f64| if log_y { y.max(1e-9).log10() } else { y };
    let xs: Vec<f64> = pts().map(|p| tx(p.0)).collect();
    let (mut x0, mut x1) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min),
        xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if (x1 - x0).abs() < 1e-12 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let ymax = pts()
        .map(|p| ty(p.3.max(p.1)))
        .fold(f64::NEG_INFINITY, f64::max);
    let ymin_data = pts()
        .map(|p| ty(p.2.min(p.1)))
        .fold(f64::INFINITY, f64::min);
    let (y0, y1) = if log_y {
        let lo = if ymin_data.is_finite() {
            ymin_data.floor()
        } else {
            0.0
        };
        let hi = if ymax.is_finite() { ymax.ceil() } else { 1.0 };
        (lo, if hi > lo { hi } else { lo + 1.0 })
    } else {
        let hi = if ymax.is_finite() && ymax > 0.0 {
            ymax * 1.1
        } else {
            1.0
        };
        (0.0, hi)
    };
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (tx(x) - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + ph - (ty(y) - y0) / (y1 - y0) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
         font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(s, "<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>",
        LEFT + pw / 2.0,
        esc(title)
    );
    // Axes.
    let _ = writeln!(
        s,
        "<line x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        TOP + ph,
        LEFT + pw,
        TOP + ph
    );
    let _ = writeln!(
        s,
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{}\" stroke=\"black\"/>",
        TOP + ph
    );
    // X ticks at the data's x values.
    let mut xticks: Vec<f64> = pts().map(|p| p.0).collect();
    xticks.sort_by(f64::total_cmp);
    xticks.dedup();
    for x in xticks {
        let px = sx(x);
        let _ = writeln!(
            s,
            "<line x1=\"{px:.1}\" y1=\"{}\" x2=\"{px:.1}\" y2=\"{}\" stroke=\"black\"/>\
             <text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            TOP + ph,
            TOP + ph + 5.0,
            TOP + ph + 20.0,
            label(x)
        );
    }
    // Y ticks.
    let yticks: Vec<f64> = if log_y {
        (y0 as i32..=y1 as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        let step = nice_step(y1 - y0, 5.0);
        (0..=((y1 - y0) / step).floor() as usize)
            .map(|i| y0 + i as f64 * step)
            .collect()
    };
    for y in yticks {
        let py = sy(y);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{}\" y2=\"{py:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + pw,
            LEFT - 6.0,
            py + 4.0,
            label(y)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        LEFT + pw / 2.0,
        H - 15.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        "<text x=\"18\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {})\">{}</text>",
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(y_label)
    );
    for (i, series) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut pts: Vec<(f64, f64, f64, f64)> = series.points.clone();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> = pts
            .iter()
            .map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
            path.join(" ")
        );
        for p in &pts {
            let (px, py) = (sx(p.0), sy(p.1));
            let _ = writeln!(
                s,
                "<line x1=\"{px:.1}\" y1=\"{:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"{color}\"/>\
                 <circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"3.5\" fill=\"{color}\"/>",
                sy(p.2),
                sy(p.3)
            );
        }
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let lx = LEFT + pw + 15.0;
        let _ = writeln!(
            s,
            "<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            esc(&series.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_a_line_per_series_and_escapes_text() {
        let svg = line_chart(
            "a < b",
            "N",
            "ns",
            &[
                Series {
                    name: "x".into(),
                    points: vec![(1.0, 10.0, 9.0, 11.0), (1000.0, 12.0, 11.0, 13.0)],
                },
                Series {
                    name: "y".into(),
                    points: vec![(1.0, 5.0, 5.0, 5.0)],
                },
            ],
            true,
            false,
        );
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &lt; b"));
        assert!(svg.contains(">1k<"));
        assert_eq!(
            (trim(0.001), trim(0.25), trim(2.5), trim(10.0)),
            ("0.001".into(), "0.25".into(), "2.5".into(), "10".into())
        );
        let log = line_chart("t", "N", "s", &[], true, true);
        assert!(log.ends_with("</svg>\n"));
    }
}
