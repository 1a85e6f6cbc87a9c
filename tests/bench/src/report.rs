//! Figures of one scenario run, printed as a table and as JSON.

use serde::Serialize;

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable key for machines (`connect_s`).
    pub key: String,
    /// What it is, for people.
    pub label: String,
    /// The value.
    pub value: f64,
    /// Its unit (`s`, `ms`, `KiB`, `%`, `/s`, …).
    pub unit: String,
    /// The target, when it has one (`< 1 s`).
    pub target: Option<String>,
}

/// The figures of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// The parameters it ran with.
    pub params: serde_json::Value,
    /// The machine: cores, memory, kernel, open-files limit.
    pub machine: serde_json::Value,
    /// What was measured.
    pub figures: Vec<Figure>,
    /// Anything a reader must know (a target not met, a projection).
    pub notes: Vec<String>,
}

impl Report {
    /// An empty report of `scenario`.
    pub fn new(scenario: &str, params: serde_json::Value) -> Self {
        Self {
            scenario: scenario.into(),
            params,
            machine: machine(),
            figures: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds a figure.
    pub fn add(&mut self, key: &str, label: &str, value: f64, unit: &str, target: Option<&str>) {
        self.figures.push(Figure {
            key: key.into(),
            label: label.into(),
            value,
            unit: unit.into(),
            target: target.map(Into::into),
        });
    }

    /// The value of figure `key`.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.figures.iter().find(|f| f.key == key).map(|f| f.value)
    }

    /// The table people read.
    pub fn table(&self) -> String {
        let mut out = format!("scenario {}  {}\n", self.scenario, self.params);
        let w = self
            .figures
            .iter()
            .map(|f| f.label.len())
            .max()
            .unwrap_or(10)
            .max(10);
        out.push_str(&format!(
            "{:<w$}  {:>14}  {:<6}  {}\n",
            "figure", "value", "unit", "target"
        ));
        for f in &self.figures {
            let v = if f.value.fract() == 0.0 && f.value.abs() < 1e15 {
                format!("{}", f.value as i64)
            } else {
                format!("{:.3}", f.value)
            };
            out.push_str(&format!(
                "{:<w$}  {:>14}  {:<6}  {}\n",
                f.label,
                v,
                f.unit,
                f.target.as_deref().unwrap_or("")
            ));
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }
}

/// What the machine is: cores, memory, kernel, open-files limits.
pub fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let nofile = read("/proc/self/limits")
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| {
            l.split_whitespace()
                .skip(3)
                .take(2)
                .collect::<Vec<_>>()
                .join("/")
        })
        .unwrap_or_default();
    serde_json::json!({
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": model,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "open_files_soft_hard": nofile,
    })
}
