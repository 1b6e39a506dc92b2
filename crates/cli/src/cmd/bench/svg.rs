//! Charts as inline SVG: grouped bars, lines and scatter plots with ticked axes, units
//! and a legend. Every text that reaches the output is escaped.

use std::fmt::Write as _;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 380.0;
const LEFT: f64 = 86.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 56.0;
const BOTTOM: f64 = 64.0;
const COLORS: [&str; 6] = [
    "#3366aa", "#dd7733", "#44aa66", "#aa4466", "#7755aa", "#888888",
];

/// Escapes text for HTML and SVG (element content and quoted attributes).
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An axis: what it measures and in which unit (ticks are labelled with the unit).
#[derive(Debug, Clone)]
pub(crate) struct Axis {
    /// What the axis measures.
    pub label: String,
    /// The unit (`tok/s`, `MiB`, `ms`); empty for a plain number.
    pub unit: String,
}

impl Axis {
    pub(crate) fn new(label: &str, unit: &str) -> Self {
        Self {
            label: label.into(),
            unit: unit.into(),
        }
    }

    fn tick(&self, v: f64, step: f64) -> String {
        let n = number(v, step);
        if self.unit.is_empty() {
            n
        } else {
            format!("{n} {}", self.unit)
        }
    }

    fn title(&self) -> String {
        if self.unit.is_empty() {
            self.label.clone()
        } else {
            format!("{} ({})", self.label, self.unit)
        }
    }
}

/// A named series of bars, one value per group (`None`: no bar in that group).
#[derive(Debug, Clone)]
pub(crate) struct Bars {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

/// A named line through points, each with an optional label.
#[derive(Debug, Clone)]
pub(crate) struct Line {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub labels: Vec<String>,
}

/// A labelled point of a scatter plot.
#[derive(Debug, Clone)]
pub(crate) struct Point {
    pub x: f64,
    pub y: f64,
    pub label: String,
}

/// What a chart draws.
#[derive(Debug, Clone)]
pub(crate) enum Plot {
    /// Grouped bars; `notes` are printed above each group (a ratio), empty for none.
    Bars {
        groups: Vec<String>,
        series: Vec<Bars>,
        notes: Vec<String>,
    },
    /// Lines over a numeric x axis, starting at zero.
    Lines(Vec<Line>),
    /// Points, with the line y = x when `identity`.
    Scatter { points: Vec<Point>, identity: bool },
}

/// One chart: a title, two axes and a plot.
#[derive(Debug, Clone)]
pub(crate) struct Chart {
    pub title: String,
    pub x: Axis,
    pub y: Axis,
    pub plot: Plot,
}

/// `v` printed with as many decimals as the tick step needs.
fn number(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 || step <= 0.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    format!("{v:.decimals$}")
}

/// About `n` round ticks (1, 2 or 5 times a power of ten) covering `lo..=hi`.
pub(crate) fn ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, f64) {
    let span = if hi > lo { hi - lo } else { hi.abs().max(1.0) };
    let raw = span / n.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).floor() * step;
    let mut out = Vec::new();
    let mut v = first;
    while v <= hi + step * 1e-9 || out.len() < 2 {
        out.push(v);
        v += step;
        if out.len() > 50 {
            break;
        }
    }
    // One more tick so that the top value is inside the axis.
    if out.last().is_some_and(|l| *l < hi) {
        out.push(v);
    }
    (out, step)
}

/// Maps data values to pixels along one axis.
#[derive(Debug, Clone, Copy)]
struct Scale {
    lo: f64,
    hi: f64,
    from: f64,
    to: f64,
}

impl Scale {
    fn at(&self, v: f64) -> f64 {
        let span = if self.hi > self.lo {
            self.hi - self.lo
        } else {
            1.0
        };
        self.from + (v - self.lo) / span * (self.to - self.from)
    }
}

impl Chart {
    /// The chart as an `<svg>` element.
    pub(crate) fn to_svg(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{}">"#,
            esc(&self.title)
        );
        let _ = write!(
            s,
            r#"<text x="{}" y="20" class="title" text-anchor="middle">{}</text>"#,
            WIDTH / 2.0,
            esc(&self.title)
        );
        let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP);
        match &self.plot {
            Plot::Bars {
                groups,
                series,
                notes,
            } => self.bars(&mut s, groups, series, notes),
            Plot::Lines(lines) => self.lines(&mut s, lines),
            Plot::Scatter { points, identity } => self.scatter(&mut s, points, *identity),
        }
        // The axes and their titles, drawn last so that they sit above the grid.
        let _ = write!(
            s,
            r#"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" class="axis"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" class="axis"/>"#
        );
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" class="axis-title">{}</text>"#,
            (x0 + x1) / 2.0,
            HEIGHT - 12.0,
            esc(&self.x.title())
        );
        let _ = write!(
            s,
            r#"<text x="16" y="{}" text-anchor="middle" class="axis-title" transform="rotate(-90 16 {})">{}</text>"#,
            (y0 + y1) / 2.0,
            (y0 + y1) / 2.0,
            esc(&self.y.title())
        );
        s.push_str("</svg>");
        s
    }

    /// Horizontal grid lines and tick labels of the y axis; returns its scale.
    fn y_axis(&self, s: &mut String, lo: f64, hi: f64) -> Scale {
        let (ticks, step) = ticks(lo, hi, 5);
        let scale = Scale {
            lo: ticks.first().copied().unwrap_or(lo),
            hi: ticks.last().copied().unwrap_or(hi),
            from: HEIGHT - BOTTOM,
            to: TOP,
        };
        for t in ticks {
            let y = scale.at(t);
            let _ = write!(
                s,
                r#"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" class="grid"/><text x="{}" y="{:.1}" text-anchor="end" class="tick">{}</text>"#,
                WIDTH - RIGHT,
                LEFT - 6.0,
                y + 4.0,
                esc(&self.y.tick(t, step))
            );
        }
        scale
    }

    /// Vertical grid lines and tick labels of a numeric x axis; returns its scale.
    fn x_axis(&self, s: &mut String, lo: f64, hi: f64) -> Scale {
        let (ticks, step) = ticks(lo, hi, 6);
        let scale = Scale {
            lo: ticks.first().copied().unwrap_or(lo),
            hi: ticks.last().copied().unwrap_or(hi),
            from: LEFT,
            to: WIDTH - RIGHT,
        };
        for t in ticks {
            let x = scale.at(t);
            let _ = write!(
                s,
                r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" class="grid"/><text x="{x:.1}" y="{}" text-anchor="middle" class="tick">{}</text>"#,
                HEIGHT - BOTTOM,
                HEIGHT - BOTTOM + 16.0,
                esc(&self.x.tick(t, step))
            );
        }
        scale
    }

    fn legend(s: &mut String, names: &[&str]) {
        let mut x = WIDTH - RIGHT;
        // Right-aligned: lay out from the last name backwards.
        for (i, name) in names.iter().enumerate().rev() {
            let w = 7.0 * name.chars().count() as f64 + 22.0;
            x -= w;
            let _ = write!(
                s,
                r#"<rect x="{x:.1}" y="32" width="12" height="12" fill="{}"/><text x="{:.1}" y="42" class="legend">{}</text>"#,
                COLORS[i % COLORS.len()],
                x + 16.0,
                esc(name)
            );
        }
    }

    fn bars(&self, s: &mut String, groups: &[String], series: &[Bars], notes: &[String]) {
        let max = series
            .iter()
            .flat_map(|b| b.values.iter().flatten())
            .copied()
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        let y = self.y_axis(s, 0.0, max * 1.12);
        let n = groups.len().max(1) as f64;
        let group_w = (WIDTH - LEFT - RIGHT) / n;
        let bar_w = group_w * 0.8 / series.len().max(1) as f64;
        for (g, group) in groups.iter().enumerate() {
            let gx = LEFT + g as f64 * group_w;
            let mut top = HEIGHT - BOTTOM;
            for (k, b) in series.iter().enumerate() {
                let Some(v) = b.values.get(g).copied().flatten() else {
                    continue;
                };
                if !v.is_finite() {
                    continue;
                }
                let bx = gx + group_w * 0.1 + k as f64 * bar_w;
                let by = y.at(v);
                top = top.min(by);
                let _ = write!(
                    s,
                    r#"<rect x="{bx:.1}" y="{by:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect><text x="{:.1}" y="{:.1}" text-anchor="middle" class="value">{}</text>"#,
                    bar_w - 2.0,
                    (HEIGHT - BOTTOM - by).max(0.0),
                    COLORS[k % COLORS.len()],
                    esc(&format!("{} {group}", b.name)),
                    esc(&format!("{v:.1}")),
                    bx + bar_w / 2.0 - 1.0,
                    by - 3.0,
                    esc(&short(v))
                );
            }
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle" class="tick">{}</text>"#,
                gx + group_w / 2.0,
                HEIGHT - BOTTOM + 16.0,
                esc(group)
            );
            if let Some(note) = notes.get(g).filter(|n| !n.is_empty()) {
                let _ = write!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="note">{}</text>"#,
                    gx + group_w / 2.0,
                    top - 16.0,
                    esc(note)
                );
            }
        }
        if series.len() > 1 {
            let names: Vec<&str> = series.iter().map(|b| b.name.as_str()).collect();
            Self::legend(s, &names);
        }
    }

    fn lines(&self, s: &mut String, lines: &[Line]) {
        let all = || lines.iter().flat_map(|l| l.points.iter());
        let xmax = all().map(|p| p.0).fold(0.0, f64::max);
        let ymax = all().map(|p| p.1).fold(0.0, f64::max);
        let y = self.y_axis(s, 0.0, ymax * 1.1);
        let x = self.x_axis(s, 0.0, xmax);
        for (k, line) in lines.iter().enumerate() {
            let color = COLORS[k % COLORS.len()];
            let path: Vec<String> = line
                .points
                .iter()
                .map(|&(px, py)| format!("{:.1},{:.1}", x.at(px), y.at(py)))
                .collect();
            let _ = write!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                path.join(" ")
            );
            for (i, &(px, py)) in line.points.iter().enumerate() {
                let label = line.labels.get(i).map_or("", String::as_str);
                let _ = write!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}"><title>{}</title></circle>"#,
                    x.at(px),
                    y.at(py),
                    esc(&format!("{}: {px}, {py:.1}", line.name))
                );
                if !label.is_empty() {
                    let _ = write!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="value">{}</text>"#,
                        x.at(px),
                        y.at(py) - 9.0,
                        esc(label)
                    );
                }
            }
        }
        let names: Vec<&str> = lines.iter().map(|l| l.name.as_str()).collect();
        Self::legend(s, &names);
    }

    fn scatter(&self, s: &mut String, points: &[Point], identity: bool) {
        let values = || points.iter().flat_map(|p| [p.x, p.y]);
        let lo = values().fold(f64::INFINITY, f64::min);
        let hi = values().fold(0.0, f64::max);
        let lo = if lo.is_finite() { lo * 0.9 } else { 0.0 };
        let hi = hi * 1.05;
        let y = self.y_axis(s, lo, hi);
        let x = self.x_axis(s, lo, hi);
        if identity {
            let (a, b) = (x.lo.max(y.lo), x.hi.min(y.hi));
            let _ = write!(
                s,
                r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" class="identity"/><text x="{:.1}" y="{:.1}" class="legend" text-anchor="end">y = x</text>"#,
                x.at(a),
                y.at(a),
                x.at(b),
                y.at(b),
                x.at(b) - 4.0,
                y.at(b) + 14.0
            );
        }
        for (i, p) in points.iter().enumerate() {
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="5" fill="{}"><title>{}</title></circle><text x="{:.1}" y="{:.1}" class="value">{}</text>"#,
                x.at(p.x),
                y.at(p.y),
                COLORS[0],
                esc(&format!("{}: {:.1}, {:.1}", p.label, p.x, p.y)),
                x.at(p.x) + 7.0,
                y.at(p.y) + if i % 2 == 0 { -6.0 } else { 12.0 },
                esc(&p.label)
            );
        }
    }
}

/// A value for a bar label: three significant digits at most.
fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let (t, step) = ticks(0.0, 224.0, 5);
        assert_eq!(step, 50.0);
        assert_eq!(t.first().copied(), Some(0.0));
        assert!(t.last().is_some_and(|l| *l >= 224.0), "{t:?}");
        let (t, step) = ticks(0.0, 0.9, 5);
        assert!((step - 0.2).abs() < 1e-12, "{step}");
        assert_eq!(number(t[1], step), "0.2");
    }

    #[test]
    fn text_is_escaped_everywhere() {
        let chart = Chart {
            title: "<script>".into(),
            x: Axis::new("a&b", ""),
            y: Axis::new("y", "ms"),
            plot: Plot::Bars {
                groups: vec!["\"g\"".into()],
                series: vec![Bars {
                    name: "<b>".into(),
                    values: vec![Some(1.0)],
                }],
                notes: vec!["x<y".into()],
            },
        };
        let svg = chart.to_svg();
        assert!(!svg.contains("<script>") && !svg.contains("<b>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;") && svg.contains("a&amp;b"));
        assert!(svg.contains("&quot;g&quot;") && svg.contains("x&lt;y"));
        assert!(svg.contains("1 ms") || svg.contains("0 ms"), "{svg}");
    }
}
