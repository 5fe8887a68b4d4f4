//! Hand-written SVG charts for the benchmarks: panels of bars (`tessera bench compare`) and
//! lines over time with vertical event markers (`tessera bench --svg`).
//!
//! Pure: it builds a string from numbers and never touches files or the clock. The output is
//! plain SVG 1.1 (no script, no external font or stylesheet), so browsers, image viewers and
//! repository previews draw it the same. Every text is escaped; every coordinate is finite.

use std::fmt::Write;

/// Fill colours, one per system or series, in order; chosen to stay apart for colour-blind
/// readers.
const PALETTE: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#edc948", "#9c755f",
];
/// Target number of intervals on a value axis.
const AXIS_TICKS: usize = 5;
/// Font size of labels, in px.
const FONT_PX: u32 = 12;

/// The colour of series or bar `index`.
pub fn colour(index: usize) -> &'static str {
    PALETTE[index % PALETTE.len()]
}

/// One bar: a named value, or `None` when the system has no result (drawn as "n/a").
#[derive(Debug, Clone)]
pub struct Bar {
    pub label: String,
    pub value: Option<f64>,
}

/// One panel of bars sharing a value axis that starts at zero.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    /// Unit of the axis, shown under the title (e.g. "ops/s").
    pub unit: String,
    pub bars: Vec<Bar>,
}

/// Panels laid out `columns` per row. Bars with the same position in every panel share a
/// colour, and a legend names them from the first panel's labels.
#[derive(Debug, Clone)]
pub struct BarChart {
    pub title: String,
    /// Lines under the title (what was measured, how).
    pub subtitle: Vec<String>,
    pub columns: usize,
    pub panels: Vec<Panel>,
}

/// A named line of (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A vertical line at `x`, labelled, in the colour of `series` (grey if `None`).
#[derive(Debug, Clone)]
pub struct Marker {
    pub x: f64,
    pub label: String,
    pub series: Option<usize>,
}

/// Lines over a shared x axis, with event markers.
#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub markers: Vec<Marker>,
}

// Bar chart geometry, px.
const PANEL_LEFT: f64 = 64.0;
// Room above the plot for the title, the unit and the value label of a bar that reaches the top.
const PANEL_TOP: f64 = 56.0;
const PANEL_PLOT_HEIGHT: f64 = 180.0;
const PANEL_BOTTOM: f64 = 16.0;
const BAR_WIDTH: f64 = 36.0;
const BAR_GAP: f64 = 14.0;
const PANEL_RIGHT: f64 = 16.0;
const CHART_HEADER: f64 = 44.0;
const SUBTITLE_LINE: f64 = 16.0;
const LEGEND_ROW: f64 = 26.0;
const CHART_WIDTH_MIN: f64 = 760.0;

/// Renders a [`BarChart`] as an SVG document.
pub fn bar_chart(chart: &BarChart) -> String {
    let columns = chart.columns.max(1);
    let bars_max = chart
        .panels
        .iter()
        .map(|panel| panel.bars.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let plot_width = bars_max as f64 * (BAR_WIDTH + BAR_GAP) + BAR_GAP;
    let panel_width = PANEL_LEFT + plot_width + PANEL_RIGHT;
    let panel_height = PANEL_TOP + PANEL_PLOT_HEIGHT + PANEL_BOTTOM;
    let rows = chart.panels.len().div_ceil(columns).max(1);
    let width = (panel_width * columns.min(chart.panels.len().max(1)) as f64).max(CHART_WIDTH_MIN);
    let legend_y = CHART_HEADER + SUBTITLE_LINE * chart.subtitle.len() as f64;
    let header = legend_y + LEGEND_ROW;
    let height = header + panel_height * rows as f64;
    let mut svg = Svg::new(width, height);
    svg.text(width / 2.0, 22.0, "middle", 16, true, &chart.title);
    for (index, line) in chart.subtitle.iter().enumerate() {
        let y = CHART_HEADER + SUBTITLE_LINE * index as f64;
        svg.text(width / 2.0, y, "middle", FONT_PX, false, line);
    }
    if let Some(first) = chart.panels.first() {
        let labels: Vec<&str> = first.bars.iter().map(|bar| bar.label.as_str()).collect();
        svg.legend(16.0, legend_y + 4.0, &labels);
    }
    for (index, panel) in chart.panels.iter().enumerate() {
        let x = (index % columns) as f64 * panel_width;
        let y = header + (index / columns) as f64 * panel_height;
        draw_panel(&mut svg, panel, x, y, plot_width);
    }
    svg.finish()
}

fn draw_panel(svg: &mut Svg, panel: &Panel, x: f64, y: f64, plot_width: f64) {
    let left = x + PANEL_LEFT;
    let top = y + PANEL_TOP;
    let bottom = top + PANEL_PLOT_HEIGHT;
    svg.text(
        left + plot_width / 2.0,
        y + 16.0,
        "middle",
        13,
        true,
        &panel.title,
    );
    svg.text(
        left + plot_width / 2.0,
        y + 32.0,
        "middle",
        FONT_PX - 1,
        false,
        &panel.unit,
    );
    let largest = panel
        .bars
        .iter()
        .filter_map(|bar| bar.value)
        .filter(|value| value.is_finite())
        .fold(0.0_f64, f64::max);
    let (step, axis_top) = axis(largest);
    value_axis(
        svg,
        left,
        top,
        plot_width,
        PANEL_PLOT_HEIGHT,
        step,
        axis_top,
    );
    for (index, bar) in panel.bars.iter().enumerate() {
        let bar_left = left + BAR_GAP + index as f64 * (BAR_WIDTH + BAR_GAP);
        let centre = bar_left + BAR_WIDTH / 2.0;
        match bar.value.filter(|value| value.is_finite() && *value >= 0.0) {
            Some(value) => {
                let height = value / axis_top * PANEL_PLOT_HEIGHT;
                svg.bar(
                    bar_left,
                    bottom - height,
                    BAR_WIDTH,
                    height,
                    colour(index),
                    value,
                    &format!("{}: {}", bar.label, format_value(value)),
                );
                svg.text(
                    centre,
                    bottom - height - 4.0,
                    "middle",
                    FONT_PX - 2,
                    false,
                    &format_value(value),
                );
            }
            None => svg.text(centre, bottom - 4.0, "middle", FONT_PX - 2, false, "n/a"),
        }
    }
}

// Line chart geometry, px.
const LINE_WIDTH: f64 = 900.0;
const LINE_HEIGHT: f64 = 420.0;
const LINE_LEFT: f64 = 80.0;
const LINE_RIGHT: f64 = 24.0;
const LINE_TOP: f64 = 84.0;
const LINE_BOTTOM: f64 = 56.0;

/// Renders a [`LineChart`] as an SVG document. Both axes start at zero.
pub fn line_chart(chart: &LineChart) -> String {
    let mut svg = Svg::new(LINE_WIDTH, LINE_HEIGHT);
    let plot_width = LINE_WIDTH - LINE_LEFT - LINE_RIGHT;
    let plot_height = LINE_HEIGHT - LINE_TOP - LINE_BOTTOM;
    let bottom = LINE_TOP + plot_height;
    svg.text(LINE_WIDTH / 2.0, 22.0, "middle", 16, true, &chart.title);
    let names: Vec<&str> = chart
        .series
        .iter()
        .map(|series| series.name.as_str())
        .collect();
    svg.legend(LINE_LEFT, 38.0, &names);
    let finite = |value: &f64| value.is_finite() && *value >= 0.0;
    let points = || chart.series.iter().flat_map(|series| series.points.iter());
    let x_largest = points()
        .map(|point| point.0)
        .chain(chart.markers.iter().map(|marker| marker.x))
        .filter(finite)
        .fold(0.0_f64, f64::max);
    let y_largest = points()
        .map(|point| point.1)
        .filter(finite)
        .fold(0.0_f64, f64::max);
    let (x_step, x_top) = axis(x_largest);
    let (y_step, y_top) = axis(y_largest);
    value_axis(
        &mut svg,
        LINE_LEFT,
        LINE_TOP,
        plot_width,
        plot_height,
        y_step,
        y_top,
    );
    let to_x = |x: f64| LINE_LEFT + x / x_top * plot_width;
    let to_y = |y: f64| bottom - y / y_top * plot_height;
    let mut tick = 0.0;
    while tick <= x_top + x_step / 2.0 {
        svg.line(
            to_x(tick),
            bottom,
            to_x(tick),
            bottom + 4.0,
            "#333333",
            None,
        );
        svg.text(
            to_x(tick),
            bottom + 17.0,
            "middle",
            FONT_PX - 1,
            false,
            &format_value(tick),
        );
        tick += x_step;
    }
    svg.text(
        LINE_LEFT + plot_width / 2.0,
        LINE_HEIGHT - 14.0,
        "middle",
        FONT_PX,
        false,
        &chart.x_label,
    );
    svg.vertical_text(18.0, LINE_TOP + plot_height / 2.0, &chart.y_label);
    for (index, series) in chart.series.iter().enumerate() {
        let points: Vec<(f64, f64)> = series
            .points
            .iter()
            .filter(|(x, y)| finite(x) && finite(y))
            .map(|&(x, y)| (to_x(x), to_y(y)))
            .collect();
        svg.polyline(&points, colour(index), &series.name);
    }
    for (index, marker) in chart.markers.iter().enumerate() {
        if !finite(&marker.x) {
            continue;
        }
        let x = to_x(marker.x);
        let stroke = marker.series.map_or("#777777", colour);
        svg.line(x, LINE_TOP, x, bottom, stroke, Some("5,4"));
        // Staggered so the labels of close events stay readable.
        let label_y = LINE_TOP - 6.0 - (index % 3) as f64 * 13.0;
        svg.text(x + 3.0, label_y, "start", FONT_PX - 2, false, &marker.label);
    }
    svg.finish()
}

/// Draws the y axis of a plot area: gridlines and labels every `step` up to `top`.
fn value_axis(svg: &mut Svg, left: f64, top: f64, width: f64, height: f64, step: f64, max: f64) {
    let bottom = top + height;
    let mut tick = 0.0;
    while tick <= max + step / 2.0 {
        let y = bottom - tick / max * height;
        svg.line(left, y, left + width, y, "#e0e0e0", None);
        svg.text(
            left - 6.0,
            y + 4.0,
            "end",
            FONT_PX - 1,
            false,
            &format_value(tick),
        );
        tick += step;
    }
    svg.line(left, top, left, bottom, "#333333", None);
    svg.line(left, bottom, left + width, bottom, "#333333", None);
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) and the axis top (a multiple of the
/// step at or above `largest`), for about [`AXIS_TICKS`] intervals. An empty or zero range
/// gets the axis 0..1.
pub fn axis(largest: f64) -> (f64, f64) {
    if !(largest.is_finite() && largest > 0.0) {
        return (0.2, 1.0);
    }
    let rough = largest / AXIS_TICKS as f64;
    let magnitude = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|factor| factor * magnitude)
        .find(|step| *step >= rough)
        .unwrap_or(10.0 * magnitude);
    let top = (largest / step).ceil() * step;
    (step, top.max(step))
}

/// A short label: 1.23M, 77.1k, 50k, 950, 12.5, 0.58, 0.023.
pub fn format_value(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1e6 {
        trim_zero_decimals(format!("{:.2}", value / 1e6)) + "M"
    } else if magnitude >= 1e4 {
        trim_zero_decimals(format!("{:.1}", value / 1e3)) + "k"
    } else if magnitude >= 100.0 || value == value.trunc() {
        // Halves away from zero, as the tables round (formatting would round them to even).
        format!("{:.0}", value.round())
    } else if magnitude >= 1.0 {
        format!("{value:.1}")
    } else {
        // Two significant digits.
        let decimals = (1 - magnitude.log10().floor() as i32).clamp(2, 6) as usize;
        format!("{value:.decimals$}")
    }
}

/// "50.0" → "50", "1.20" → "1.20": round axis ticks read better without zero decimals.
fn trim_zero_decimals(number: String) -> String {
    match number.split_once('.') {
        Some((whole, decimals)) if decimals.bytes().all(|digit| digit == b'0') => whole.into(),
        _ => number,
    }
}

/// Text with the five XML special characters escaped.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            // XML 1.0 allows no other control characters.
            control if control < ' ' && !matches!(control, '\t' | '\n' | '\r') => {}
            other => escaped.push(other),
        }
    }
    escaped
}

/// A coordinate with one decimal (enough at screen resolution); a non-finite one (which no
/// caller should produce) becomes 0 rather than breaking the document.
fn px(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.1}")
    } else {
        "0".into()
    }
}

/// An SVG document being written.
struct Svg {
    body: String,
    width: f64,
    height: f64,
}

impl Svg {
    fn new(width: f64, height: f64) -> Svg {
        Svg {
            body: String::new(),
            width,
            height,
        }
    }

    fn text(&mut self, x: f64, y: f64, anchor: &str, size: u32, bold: bool, text: &str) {
        let weight = if bold { " font-weight=\"bold\"" } else { "" };
        let _ = writeln!(
            self.body,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"{anchor}\" font-size=\"{size}\"{weight}>{}</text>",
            px(x),
            px(y),
            escape(text)
        );
    }

    fn vertical_text(&mut self, x: f64, y: f64, text: &str) {
        let _ = writeln!(
            self.body,
            "<text x=\"{0}\" y=\"{1}\" text-anchor=\"middle\" font-size=\"{FONT_PX}\" \
             transform=\"rotate(-90 {0} {1})\">{2}</text>",
            px(x),
            px(y),
            escape(text)
        );
    }

    fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str, dash: Option<&str>) {
        let dash = dash.map_or_else(String::new, |dash| format!(" stroke-dasharray=\"{dash}\""));
        let _ = writeln!(
            self.body,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{stroke}\"{dash}/>",
            px(x1),
            px(y1),
            px(x2),
            px(y2)
        );
    }

    /// A bar; `value` is kept in `data-value` so tests (and readers of the file) can check
    /// heights against values.
    #[allow(clippy::too_many_arguments)] // A rectangle plus what it shows.
    fn bar(&mut self, x: f64, y: f64, width: f64, height: f64, fill: &str, value: f64, tip: &str) {
        let _ = writeln!(
            self.body,
            "<rect class=\"bar\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{height:.3}\" \
             fill=\"{fill}\" data-value=\"{value}\"><title>{}</title></rect>",
            px(x),
            px(y),
            px(width),
            escape(tip)
        );
    }

    fn polyline(&mut self, points: &[(f64, f64)], stroke: &str, name: &str) {
        let mut coordinates = String::new();
        for (x, y) in points {
            let _ = write!(coordinates, "{},{} ", px(*x), px(*y));
        }
        let _ = writeln!(
            self.body,
            "<polyline class=\"series\" fill=\"none\" stroke=\"{stroke}\" stroke-width=\"1.5\" \
             points=\"{}\"><title>{}</title></polyline>",
            coordinates.trim_end(),
            escape(name)
        );
    }

    /// A row of colour swatches with names, from (x, y).
    fn legend(&mut self, x: f64, y: f64, names: &[&str]) {
        let mut left = x;
        for (index, name) in names.iter().enumerate() {
            let _ = writeln!(
                self.body,
                "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/>",
                px(left),
                px(y - 10.0),
                colour(index)
            );
            self.text(left + 16.0, y, "start", FONT_PX, false, name);
            // Wide enough for a name in the default sans-serif at 12 px.
            left += 16.0 + 7.0 * name.chars().count() as f64 + 18.0;
        }
    }

    fn finish(self) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" \
             viewBox=\"0 0 {0} {1}\" font-family=\"sans-serif\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{2}</svg>\n",
            px(self.width),
            px(self.height),
            self.body
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart() -> BarChart {
        let panel = |title: &str, values: [Option<f64>; 3]| Panel {
            title: title.into(),
            unit: "ops/s".into(),
            bars: ["redis", "etcd <3>", "tessera & co"]
                .iter()
                .zip(values)
                .map(|(label, value)| Bar {
                    label: label.to_string(),
                    value,
                })
                .collect(),
        };
        BarChart {
            title: "SET \"compare\"".into(),
            subtitle: vec!["2 cores".into(), "one machine".into()],
            columns: 2,
            panels: vec![
                panel("SET -c 50", [Some(77_000.0), Some(5_000.0), Some(20_000.0)]),
                panel("SET -c 1", [Some(20_000.0), None, Some(0.0)]),
                panel("GET", [Some(1.5), Some(0.25), Some(3.0)]),
            ],
        }
    }

    /// (value, height) of every bar, panel by panel, from the parsed document.
    fn bars(document: &roxmltree::Document) -> Vec<(f64, f64)> {
        document
            .descendants()
            .filter(|node| node.has_tag_name("rect") && node.attribute("class") == Some("bar"))
            .map(|node| {
                let number = |name| node.attribute(name).unwrap().parse::<f64>().unwrap();
                (number("data-value"), number("height"))
            })
            .collect()
    }

    #[test]
    fn bar_chart_is_well_formed_xml_with_heights_proportional_to_values() {
        let svg = bar_chart(&chart());
        let document = roxmltree::Document::parse(&svg).expect("well-formed XML");
        assert_eq!(document.root_element().tag_name().name(), "svg");
        let bars = bars(&document);
        // The missing value draws no bar; a zero draws an empty one.
        assert_eq!(bars.len(), 8, "{svg}");
        for panel in [&bars[..3], &bars[3..5], &bars[5..]] {
            let (largest_value, largest_height) = panel.iter().copied().fold(
                (0.0, 0.0),
                |best, bar| if bar.0 > best.0 { bar } else { best },
            );
            assert!(largest_height > 0.0, "{panel:?}");
            for &(value, height) in panel {
                let expected = value / largest_value * largest_height;
                assert!((height - expected).abs() < 0.01, "{panel:?}");
            }
        }
        // The tallest bar reaches at least half the plot: the axis is not wildly too high.
        assert!(bars[0].1 >= PANEL_PLOT_HEIGHT / 2.0);
        assert!(svg.contains("n/a"));
        // Labels are escaped, not dropped.
        let texts: Vec<&str> = document
            .descendants()
            .filter(|node| node.has_tag_name("text"))
            .filter_map(|node| node.text())
            .collect();
        assert!(texts.contains(&"etcd <3>"), "{texts:?}");
        assert!(texts.contains(&"tessera & co"), "{texts:?}");
        assert!(texts.contains(&"SET \"compare\""), "{texts:?}");
    }

    #[test]
    fn line_chart_draws_every_series_and_marker() {
        let chart = LineChart {
            title: "throughput".into(),
            x_label: "seconds".into(),
            y_label: "ops/s".into(),
            series: vec![
                Series {
                    name: "unreplicated".into(),
                    points: (0..50)
                        .map(|i| (i as f64 * 0.1, 1000.0 + i as f64))
                        .collect(),
                },
                Series {
                    name: "minbft".into(),
                    points: vec![(0.0, 10.0), (1.0, f64::NAN), (2.0, 300.0)],
                },
            ],
            markers: vec![
                Marker {
                    x: 2.0,
                    label: "warm-up ends".into(),
                    series: None,
                },
                Marker {
                    x: 3.5,
                    label: "minbft: view 1 (primary 1)".into(),
                    series: Some(1),
                },
            ],
        };
        let svg = line_chart(&chart);
        let document = roxmltree::Document::parse(&svg).expect("well-formed XML");
        let lines: Vec<_> = document
            .descendants()
            .filter(|node| node.has_tag_name("polyline"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].attribute("points").unwrap().split(' ').count(), 50);
        // The NaN point is left out rather than written into the document.
        assert_eq!(lines[1].attribute("points").unwrap().split(' ').count(), 2);
        let dashed = document
            .descendants()
            .filter(|node| node.attribute("stroke-dasharray").is_some())
            .count();
        assert_eq!(dashed, 2);
        assert!(svg.contains("minbft: view 1 (primary 1)"));
    }

    #[test]
    fn empty_charts_are_still_valid_documents() {
        let empty_bars = BarChart {
            title: String::new(),
            subtitle: Vec::new(),
            columns: 0,
            panels: Vec::new(),
        };
        roxmltree::Document::parse(&bar_chart(&empty_bars)).expect("well-formed");
        let empty_lines = LineChart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: Vec::new(),
            markers: Vec::new(),
        };
        roxmltree::Document::parse(&line_chart(&empty_lines)).expect("well-formed");
    }

    #[test]
    fn axes_use_round_steps_and_cover_the_largest_value() {
        assert_eq!(axis(0.0), (0.2, 1.0));
        assert_eq!(axis(f64::NAN), (0.2, 1.0));
        assert_eq!(axis(77_000.0), (20_000.0, 80_000.0));
        assert_eq!(axis(1_000_000.0), (200_000.0, 1_000_000.0));
        assert_eq!(axis(4.2), (1.0, 5.0));
        let (step, top) = axis(0.58);
        assert!(
            (step - 0.2).abs() < 1e-12 && (top - 0.6).abs() < 1e-9,
            "{step} {top}"
        );
    }

    #[test]
    fn values_are_shortened_for_labels() {
        assert_eq!(format_value(1_234_567.0), "1.23M");
        assert_eq!(format_value(77_142.0), "77.1k");
        assert_eq!(format_value(50_000.0), "50k");
        assert_eq!(format_value(2_000_000.0), "2M");
        assert_eq!(format_value(950.4), "950");
        assert_eq!(format_value(850.5), "851");
        assert_eq!(format_value(12.54), "12.5");
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(0.58), "0.58");
        assert_eq!(format_value(0.023), "0.023");
        assert_eq!(escape("a<b & \"c\"\u{1}"), "a&lt;b &amp; &quot;c&quot;");
    }
}
