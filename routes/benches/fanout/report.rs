//! What the fan-out bench reports: every run's results, the Markdown
//! tables printed at the end (pasted into docs/benchmarks.md) and the plot
//! `fanout.png`. Every figure is set against the floor of the same run, as
//! the machine's own speed moves between runs.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use crate::servers::Kind;
use crate::support::streams::Via;
use crate::sweep::FanoutResult;
use crate::Options;

/// Everything one run measured.
#[derive(Default)]
pub struct RunResults {
    pub local: Vec<FanoutResult>,
    pub redis: Vec<FanoutResult>,
    pub idle: Vec<Value>,
    pub churn: Vec<Value>,
}

impl RunResults {
    fn find(&self, kind: Kind, mode: &str, rate: u64) -> Option<&FanoutResult> {
        let list = if mode == "redis" {
            &self.redis
        } else {
            &self.local
        };
        list.iter()
            .find(|f| f.server == kind.name() && f.offered as u64 == rate)
    }

    /// `what` of `kind` in `mode` at `rate`, divided by the floor's (local).
    fn ratio(
        &self,
        kind: Kind,
        mode: &str,
        rate: u64,
        what: fn(&FanoutResult) -> f64,
    ) -> Option<f64> {
        let floor = self.find(Kind::Floor, "local", rate)?;
        Some(what(self.find(kind, mode, rate)?) / what(floor))
    }

    fn idle(&self, kind: Kind, via: Via) -> Option<f64> {
        self.idle
            .iter()
            .find(|v| v["server"] == kind.name() && v["via"] == via.name())
            .and_then(|v| v["bytes_per_stream"].as_f64())
    }

    fn churn(&self, kind: Kind) -> Option<f64> {
        self.churn
            .iter()
            .find(|v| v["server"] == kind.name())
            .and_then(|v| v["cpu_us_per_open"].as_f64())
    }

    /// Losses, duplicates, stream errors and failed opens, in all.
    pub fn bad(&self) -> u64 {
        let fan: u64 = self
            .local
            .iter()
            .chain(&self.redis)
            .map(|r| r.lost + r.duplicates + r.stream_errors)
            .sum();
        let idle: u64 = self
            .idle
            .iter()
            .map(|v| v["open_failures"].as_u64().unwrap_or(0))
            .sum();
        let churn: u64 = self
            .churn
            .iter()
            .map(|v| v["failed"].as_u64().unwrap_or(0))
            .sum();
        fan + idle + churn
    }

    pub fn to_json(&self) -> Value {
        json!({
            "local": self.local.iter().map(FanoutResult::to_json).collect::<Vec<_>>(),
            "redis": self.redis.iter().map(FanoutResult::to_json).collect::<Vec<_>>(),
            "idle_memory": self.idle,
            "churn": self.churn,
        })
    }
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.2}"))
}

/// The Markdown summary pasted into docs/benchmarks.md.
pub fn summary(runs: &[RunResults], opts: &Options, cg: &[Value]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n| run | server | mode | streams | offered/s | delivered/s | CPU µs/delivery | ÷ floor | p50 ms | p99 ms | p99 ÷ floor | lost | dup |");
    let _ = writeln!(
        out,
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (i, r) in runs.iter().enumerate() {
        for f in r.local.iter().chain(&r.redis) {
            let kind = Kind::named(f.server).unwrap_or(Kind::Product);
            let rate = f.offered as u64;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.0} | {:.2} | {} | {:.2} | {:.2} | {} | {} | {} |",
                i + 1,
                f.server,
                f.mode,
                f.streams,
                rate,
                f.deliveries_per_sec,
                f.cpu_us_per_delivery,
                fmt_ratio(r.ratio(kind, f.mode, rate, |x| x.cpu_us_per_delivery)),
                f.p50_ms,
                f.p99_ms,
                fmt_ratio(r.ratio(kind, f.mode, rate, |x| x.p99_ms)),
                f.lost,
                f.duplicates
            );
        }
    }
    let _ = writeln!(out, "\nTargets per run (sse-scale ÷ floor unless noted):\n");
    let _ = writeln!(out, "| run | CPU/delivery ÷ floor at {} | p99 ÷ floor at {} | Redis ÷ local CPU at {} | Redis p99 ms | idle B/stream fresh / keep-alive / h2c (floor fresh, axum fresh) | churn µs/open (÷ floor) |",
        opts.rates.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" / "),
        opts.rates.last().copied().unwrap_or(0),
        opts.rates.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" / "));
    let _ = writeln!(out, "|---:|---|---|---|---|---|---|");
    for (i, r) in runs.iter().enumerate() {
        let high = opts.rates.last().copied().unwrap_or(0);
        let cpu: Vec<String> = opts
            .rates
            .iter()
            .map(|&rate| {
                fmt_ratio(r.ratio(Kind::Product, "local", rate, |f| f.cpu_us_per_delivery))
            })
            .collect();
        let redis: Vec<String> = opts
            .rates
            .iter()
            .map(|&rate| {
                fmt_ratio(
                    r.find(Kind::Product, "redis", rate)
                        .zip(r.find(Kind::Product, "local", rate))
                        .map(|(a, b)| a.cpu_us_per_delivery / b.cpu_us_per_delivery),
                )
            })
            .collect();
        let redis_p99: Vec<String> = opts
            .rates
            .iter()
            .map(|&rate| {
                r.find(Kind::Product, "redis", rate)
                    .map_or("–".to_owned(), |f| format!("{:.2}", f.p99_ms))
            })
            .collect();
        let b = |k, v| r.idle(k, v).map_or("–".to_owned(), |b| format!("{b:.0}"));
        let churn = r.churn(Kind::Product).map_or("–".to_owned(), |c| {
            format!(
                "{c:.1} ({})",
                fmt_ratio(r.churn(Kind::Floor).map(|f| c / f))
            )
        });
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} / {} / {} ({}, {}) | {} |",
            i + 1,
            cpu.join(" / "),
            fmt_ratio(r.ratio(Kind::Product, "local", high, |f| f.p99_ms)),
            redis.join(" / "),
            redis_p99.join(" / "),
            b(Kind::Product, Via::Fresh),
            b(Kind::Product, Via::KeepAlive),
            b(Kind::Product, Via::H2c),
            b(Kind::Floor, Via::Fresh),
            b(Kind::Axum, Via::Fresh),
            churn
        );
    }
    if !runs.iter().all(|r| r.idle.is_empty()) {
        let _ = writeln!(
            out,
            "\n| run | server | via | streams open | failed | RSS before → after KiB | B/stream |"
        );
        let _ = writeln!(out, "|---:|---|---|---:|---:|---|---:|");
        for (i, r) in runs.iter().enumerate() {
            for v in &r.idle {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} → {} | {:.0} |",
                    i + 1,
                    v["server"].as_str().unwrap_or(""),
                    v["via"].as_str().unwrap_or(""),
                    v["streams_open"],
                    v["open_failures"],
                    v["rss_before_kib"],
                    v["rss_after_kib"],
                    v["bytes_per_stream"].as_f64().unwrap_or(0.0)
                );
            }
        }
    }
    if !runs.iter().all(|r| r.churn.is_empty()) {
        let _ = writeln!(out, "\n| run | server | opens/s | opened | failed | CPU µs/open | ÷ floor | connect p50 ms | p99 ms |");
        let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for (i, r) in runs.iter().enumerate() {
            for v in &r.churn {
                let kind = v["server"]
                    .as_str()
                    .and_then(Kind::named)
                    .unwrap_or(Kind::Product);
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {} | {} | {:.1} | {} | {:.2} | {:.2} |",
                    i + 1,
                    v["server"].as_str().unwrap_or(""),
                    v["opens_per_sec"].as_f64().unwrap_or(0.0),
                    v["opened"],
                    v["failed"],
                    v["cpu_us_per_open"].as_f64().unwrap_or(0.0),
                    fmt_ratio(r.churn(kind).zip(r.churn(Kind::Floor)).map(|(a, b)| a / b)),
                    v["connect_ms"]["p50"].as_f64().unwrap_or(0.0),
                    v["connect_ms"]["p99"].as_f64().unwrap_or(0.0),
                );
            }
        }
    }
    if !cg.is_empty() {
        let floor = cg
            .iter()
            .find(|v| v["server"] == "floor")
            .and_then(|v| v["instructions_per_delivery"].as_f64());
        let floor_open = cg
            .iter()
            .find(|v| v["server"] == "floor")
            .and_then(|v| v["instructions_per_open"].as_f64());
        let _ = writeln!(out, "\n| callgrind | deliveries | instructions/delivery | ÷ floor | instructions/open | ÷ floor |");
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
        for v in cg {
            let d = v["instructions_per_delivery"].as_f64().unwrap_or(0.0);
            let o = v["instructions_per_open"].as_f64().unwrap_or(0.0);
            let _ = writeln!(
                out,
                "| {} | {} | {d:.0} | {} | {o:.0} | {} |",
                v["server"].as_str().unwrap_or(""),
                v["deliveries"],
                fmt_ratio(floor.map(|f| d / f)),
                fmt_ratio(floor_open.map(|f| o / f)),
            );
        }
    }
    out
}

/// CPU per delivery and p99 latency against offered load, each as a ratio
/// to the floor of the same run (one point per run and load).
pub fn plot(runs: &[RunResults], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    // Text needs a TrueType font; use DejaVu Sans when the system has it
    // (fonts-dejavu-core), otherwise draw the plot without labels.
    let font = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]
        .iter()
        .find_map(|p| std::fs::read(p).ok());
    let text = match font {
        Some(bytes) => {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        }
        None => false,
    };
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let halves = root.split_horizontally(600);
    // The lines of each half (label, colour, which server in which mode),
    // each a ratio to the floor of what the half shows.
    let lines: [(&str, RGBColor, Kind, &str); 3] = [
        ("axum Sse", RED, Kind::Axum, "local"),
        ("sse-scale local", BLUE, Kind::Product, "local"),
        (
            "sse-scale Redis (2 instances)",
            MAGENTA,
            Kind::Product,
            "redis",
        ),
    ];
    type What = fn(&FanoutResult) -> f64;
    let cpu: What = |f| f.cpu_us_per_delivery;
    let p99: What = |f| f.p99_ms;
    let rates: Vec<u64> = runs
        .first()
        .map(|r| {
            let mut v: Vec<u64> = r.local.iter().map(|f| f.offered as u64).collect();
            v.sort_unstable();
            v.dedup();
            v
        })
        .unwrap_or_default();
    let max_x = rates.iter().copied().max().unwrap_or(1) as f64 * 1.1;
    for ((area, what), (title, target)) in [halves.0, halves.1].iter().zip([cpu, p99]).zip([
        ("server CPU per delivery ÷ floor", 1.05_f64),
        ("p99 latency ÷ floor", 1.2_f64),
    ]) {
        let mut max_y: f64 = target * 1.5;
        for r in runs {
            for &rate in &rates {
                for &(_, _, kind, mode) in &lines {
                    max_y = r
                        .ratio(kind, mode, rate, what)
                        .map_or(max_y, |v| max_y.max(v * 1.1));
                }
            }
        }
        let mut chart = ChartBuilder::on(area);
        chart.margin(15).x_label_area_size(40).y_label_area_size(55);
        if text {
            chart.caption(title, ("sans-serif", 18));
        }
        let mut c = chart.build_cartesian_2d(0f64..max_x, 0f64..max_y)?;
        if text {
            c.configure_mesh()
                .x_desc("offered deliveries/s (2,000 streams, fan-out 100)")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_desc("× floor")
                .draw()?;
        } else {
            c.configure_mesh().x_labels(0).y_labels(0).draw()?;
        }
        for (label, color, kind, mode) in lines {
            let f = |r: &RunResults, rate: u64| r.ratio(kind, mode, rate, what);
            // One line through the runs' median, a dot per run.
            let median: Vec<(f64, f64)> = rates
                .iter()
                .filter_map(|&rate| {
                    let mut v: Vec<f64> = runs.iter().filter_map(|r| f(r, rate)).collect();
                    v.sort_by(f64::total_cmp);
                    v.get(v.len() / 2).map(|m| (rate as f64, *m))
                })
                .collect();
            let s = c.draw_series(LineSeries::new(median, color.stroke_width(2)))?;
            if text {
                s.label(label).legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                });
            }
            for r in runs {
                c.draw_series(rates.iter().filter_map(|&rate| {
                    f(r, rate).map(|v| Circle::new((rate as f64, v), 3, color.filled()))
                }))?;
            }
        }
        let floor = c.draw_series(LineSeries::new([(0.0, 1.0), (max_x, 1.0)], BLACK))?;
        if text {
            floor
                .label("floor")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK));
        }
        let goal = c.draw_series(LineSeries::new(
            [(0.0, target), (max_x, target)],
            BLACK.mix(0.4),
        ))?;
        if text {
            goal.label(format!("target {target}×"))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.mix(0.4)));
            c.configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}
