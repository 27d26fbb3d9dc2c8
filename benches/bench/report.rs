//! The results: each scenario's rows (a figure, its value and its target) and notes, the table
//! printed at the end, and the same as JSON in `target/bench/results.json`.

use crate::Mode;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::path::Path;

/// Which side of its bound a figure must stay.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target {
    /// At least this much.
    AtLeast(f64),
    /// At most this much.
    AtMost(f64),
}

impl Target {
    fn met_by(self, value: f64) -> bool {
        match self {
            Self::AtLeast(bound) => value >= bound,
            Self::AtMost(bound) => value <= bound,
        }
    }

    fn text(self, unit: &str) -> String {
        let (op, bound) = match self {
            Self::AtLeast(bound) => (">=", bound),
            Self::AtMost(bound) => ("<=", bound),
        };
        // Targets are round numbers, except the ones derived from a measurement.
        let shortest = bound.to_string();
        let bound = if shortest.len() <= 6 { shortest } else { number(bound) };
        with_unit(&format!("{op} {bound}"), unit)
    }
}

/// One line of the table: a measured figure against its target, or a scenario that failed.
#[derive(Debug)]
struct Row {
    scenario: &'static str,
    figure: String,
    measured: Result<(f64, &'static str, Target), String>,
}

impl Row {
    fn met(&self) -> bool {
        self.measured.as_ref().is_ok_and(|&(value, _, target)| target.met_by(value))
    }

    fn json(&self) -> Value {
        match &self.measured {
            Ok((value, unit, target)) => json!({
                "scenario": self.scenario,
                "figure": self.figure,
                "value": value,
                "unit": unit,
                "target": target.text(unit),
                "met": self.met(),
            }),
            Err(error) => json!({
                "scenario": self.scenario,
                "figure": self.figure,
                "value": null,
                "unit": "",
                "target": null,
                "met": false,
                "error": error,
            }),
        }
    }
}

/// What one scenario found.
#[derive(Debug)]
pub(crate) struct Findings {
    scenario: &'static str,
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Findings {
    pub(crate) fn new(scenario: &'static str) -> Self {
        Self { scenario, rows: Vec::new(), notes: Vec::new() }
    }

    /// A figure: `value` in `unit`, which must meet `target` (in the same unit).
    pub(crate) fn row(&mut self, figure: &str, value: f64, unit: &'static str, target: Target) {
        let scenario = self.scenario;
        self.rows.push(Row {
            scenario,
            figure: figure.to_owned(),
            measured: Ok((value, unit, target)),
        });
    }

    /// A line for the notes under the table, prefixed with the scenario's name.
    pub(crate) fn note(&mut self, text: impl std::fmt::Display) {
        self.notes.push(format!("{}: {text}", self.scenario));
    }

    /// The scenario could not be run (or its figures would be meaningless).
    pub(crate) fn error(&mut self, message: String) {
        let scenario = self.scenario;
        self.rows.push(Row { scenario, figure: "error".to_owned(), measured: Err(message) });
    }
}

/// Everything measured in this run.
#[derive(Debug)]
pub(crate) struct Report {
    mode: Mode,
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    pub(crate) fn new(mode: Mode) -> Self {
        Self { mode, rows: Vec::new(), notes: Vec::new() }
    }

    pub(crate) fn add(&mut self, findings: Findings) {
        self.rows.extend(findings.rows);
        self.notes.extend(findings.notes);
    }

    pub(crate) fn has_errors(&self) -> bool {
        self.rows.iter().any(|row| row.measured.is_err())
    }

    /// The table, a line on the targets missed, and the notes.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        if self.mode == Mode::Smoke {
            out.push_str("smoke run: figures are not the timed ones (targets are informational)\n");
        }
        let _ = writeln!(
            out,
            "{:<20} {:<38} {:<18} {:<18} met",
            "scenario", "figure", "measured", "target"
        );
        for row in &self.rows {
            match &row.measured {
                Ok((value, unit, target)) => {
                    let met = match (self.mode, row.met()) {
                        (Mode::Full, true) => "yes",
                        (Mode::Full, false) => "MISSED",
                        (Mode::Smoke, true) => "yes (informational)",
                        (Mode::Smoke, false) => "no (informational)",
                    };
                    let _ = writeln!(
                        out,
                        "{:<20} {:<38} {:<18} {:<18} {met}",
                        row.scenario,
                        row.figure,
                        with_unit(&number(*value), unit),
                        target.text(unit)
                    );
                }
                Err(error) => {
                    let _ = writeln!(out, "{:<20} ERROR: {error}", row.scenario);
                }
            }
        }
        let missed: Vec<String> = self
            .rows
            .iter()
            .filter(|row| row.measured.is_ok() && !row.met())
            .map(|row| format!("{} {}", row.scenario, row.figure))
            .collect();
        let measured = self.rows.iter().filter(|row| row.measured.is_ok()).count();
        let verdict = if missed.is_empty() {
            format!("every target met ({measured} of {measured})")
        } else {
            format!("MISSED {} of {measured} targets: {}", missed.len(), missed.join("; "))
        };
        match self.mode {
            Mode::Full => out.push_str(&verdict),
            Mode::Smoke => {
                let _ = write!(out, "smoke run, informational only: {verdict}");
            }
        }
        out.push('\n');
        if !self.notes.is_empty() {
            out.push_str("notes:\n");
            for note in &self.notes {
                let _ = writeln!(out, "  {note}");
            }
        }
        out
    }

    /// Writes the JSON file, creating its folder.
    pub(crate) fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let document = json!({
            "machine": {
                "cores": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
                "cpu": cpu_model(),
            },
            "date": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            "mode": match self.mode { Mode::Full => "full", Mode::Smoke => "smoke" },
            "rows": self.rows.iter().map(Row::json).collect::<Vec<_>>(),
            "notes": self.notes,
        });
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut text = serde_json::to_string_pretty(&document).map_err(std::io::Error::other)?;
        text.push('\n');
        std::fs::write(path, text)
    }
}

/// The CPU's model name from `/proc/cpuinfo`.
fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':').map(|(_, name)| name))
        .map_or_else(|| "unknown".to_owned(), |name| name.trim().to_owned())
}

/// A value with as many decimals as its size deserves; whole numbers without any.
fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else if value.abs() >= 100.0 {
        format!("{value:.1}")
    } else if value.abs() >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

fn with_unit(text: &str, unit: &str) -> String {
    if unit.is_empty() { text.to_owned() } else { format!("{text} {unit}") }
}
