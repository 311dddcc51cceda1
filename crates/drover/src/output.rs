//! How results look: data on stdout (tables, JSON, URLs), progress and notes on stderr.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, SystemTime};

use drover_api::wire::{AttemptView, EventView, RunView};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;

/// Prints one line of data on stdout. A reader that went away (`drover … | head`) ends
/// the command quietly, as it does for other Unix tools, instead of a panic.
pub(crate) fn data(line: impl AsRef<str>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = writeln!(stdout, "{}", line.as_ref())
        && err.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// Prints a value as pretty JSON on stdout.
pub(crate) fn json(value: &impl serde::Serialize) {
    data(serde_json::to_string_pretty(value).unwrap_or_default());
}

/// Prints a note for humans on stderr (dropped if stderr is gone).
pub(crate) fn note(line: impl AsRef<str>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{}", line.as_ref());
}

pub(crate) fn parse_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(text).ok()
}

pub(crate) fn seconds(duration: Duration) -> String {
    format!("{:.2}s", duration.as_secs_f64())
}

/// Time between two RFC 3339 instants, if both parse.
pub(crate) fn between(start: Option<&str>, end: Option<&str>) -> Option<Duration> {
    let start = parse_time(start?)?;
    let end = parse_time(end?)?;
    end.duration_since(start).ok()
}

/// A one-line summary of what a stage produced: what a built-in stage checked, the project
/// it detected (when no `drover.json` said it all), and what the agent did (`summary`: files
/// and lines changed, tools, tokens, cost).
pub(crate) fn stage_summary(stage: &str, output: &Value) -> String {
    let count = |key: &str| output.get(key).and_then(Value::as_u64);
    let list = |key: &str| output.get(key).and_then(Value::as_array).map_or(0, Vec::len);
    let checked = match stage {
        "scaffold" if output.get("template").is_some() => {
            let name = output.get("template_name").and_then(Value::as_str).unwrap_or("template");
            let lines = match (
                output.pointer("/summary/lines_added").and_then(Value::as_u64),
                output.pointer("/summary/lines_removed").and_then(Value::as_u64),
            ) {
                (Some(added), Some(removed)) => format!(" (+{added} −{removed})"),
                _ => String::new(),
            };
            return format!("{name} template, {} files{lines}", list("files"));
        }
        "validate" => count("checked")
            .map(|n| {
                let mut line = format!("{n} files valid");
                if list("ran") > 0 {
                    line.push_str(&format!(", {} toolchain checks passed", list("ran")));
                }
                if list("skipped") > 0 {
                    line.push_str(&format!(", {} skipped", list("skipped")));
                }
                line
            })
            .unwrap_or_default(),
        "e2e" => output
            .get("checks")
            .and_then(Value::as_array)
            .map(|checks| format!("{} checks passed", checks.len()))
            .unwrap_or_default(),
        "integration" => match (count("tests_run"), count("links")) {
            (Some(n), _) => format!("{n} tests passed"),
            (None, Some(links)) => format!("{links} local links resolve"),
            (None, None) => output
                .get("command")
                .and_then(Value::as_str)
                .map(|command| format!("`{command}` passed"))
                .unwrap_or_default(),
        },
        "deploy" => output.get("url").and_then(Value::as_str).unwrap_or_default().to_owned(),
        _ => String::new(),
    };
    let project = output.get("project").and_then(|project| {
        let source = project.get("source").and_then(Value::as_str)?;
        if source == "drover.json" {
            return None;
        }
        let kind = project.get("kind").and_then(Value::as_str).unwrap_or("project");
        Some(format!("{kind} ({source})"))
    });
    let did = output.pointer("/summary/text").and_then(Value::as_str).map(str::to_owned);
    [project, Some(checked), did]
        .into_iter()
        .flatten()
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" · ")
}

/// Live per-stage progress of a run: spinners on a terminal, plain lines otherwise,
/// nothing with `--json`.
pub(crate) struct Progress {
    style: Style,
    started: HashMap<String, SystemTime>,
}

enum Style {
    Quiet,
    Lines,
    Spinners { bars: MultiProgress, stages: HashMap<String, ProgressBar> },
}

impl Progress {
    pub(crate) fn new(quiet: bool) -> Self {
        let style = if quiet {
            Style::Quiet
        } else if std::io::stderr().is_terminal() {
            Style::Spinners { bars: MultiProgress::new(), stages: HashMap::new() }
        } else {
            Style::Lines
        };
        Self { style, started: HashMap::new() }
    }

    pub(crate) fn event(&mut self, event: &EventView) {
        let payload = &event.payload;
        let stage = payload.get("stage").and_then(Value::as_str).unwrap_or_default().to_owned();
        let attempt = payload.get("attempt").and_then(Value::as_u64).unwrap_or(1);
        let at = parse_time(&event.created_at);
        let line = match event.kind.as_str() {
            "stage.pending" if attempt > 1 => Some(format!("retrying (attempt {attempt})")),
            "stage.pending" if payload.get("approved_by").is_some() => Some(format!(
                "approved by {}",
                payload["approved_by"].as_str().unwrap_or("someone")
            )),
            "stage.pending" => Some("waiting".to_owned()),
            "stage.waiting_approval" => Some(format!(
                "waiting for approval: drover runs approve {} {stage}  (or: drover runs reject {} {stage} --reason …)",
                event.run_id.as_deref().unwrap_or("RUN"),
                event.run_id.as_deref().unwrap_or("RUN"),
            )),
            "stage.skipped" => Some(format!(
                "skipped: {}",
                payload.get("reason").and_then(Value::as_str).unwrap_or("condition did not hold")
            )),
            "stage.running" => {
                if let Some(at) = at {
                    self.started.insert(stage.clone(), at);
                }
                Some(format!("running (attempt {attempt})"))
            }
            "stage.succeeded" => {
                let took = self.took(&stage, at);
                let summary =
                    payload.get("output").map(|o| stage_summary(&stage, o)).unwrap_or_default();
                Some(format!(
                    "succeeded{took}{}",
                    if summary.is_empty() { String::new() } else { format!(" — {summary}") }
                ))
            }
            "stage.failed" | "stage.timed_out" | "stage.dead_lettered" | "stage.cancelled" => {
                let took = self.took(&stage, at);
                let status = event.kind.trim_start_matches("stage.");
                let error = payload
                    .get("error")
                    .and_then(Value::as_str)
                    .or_else(|| payload.get("reason").and_then(Value::as_str));
                Some(format!(
                    "{status}{took}{}",
                    error.map(|e| format!(": {}", first_line(e))).unwrap_or_default()
                ))
            }
            _ => None,
        };
        let Some(line) = line else { return };
        match &mut self.style {
            Style::Quiet => {}
            // Plain output skips the noise of a stage merely becoming due.
            Style::Lines
                if event.kind == "stage.pending"
                    && attempt == 1
                    && payload.get("approved_by").is_none() => {}
            Style::Lines => note(format!("{stage:<12} {line}")),
            Style::Spinners { bars, stages } => {
                let bar = stages.entry(stage.clone()).or_insert_with(|| {
                    let bar = bars.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template("{spinner:.cyan} {prefix:<12} {wide_msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.set_prefix(stage.clone());
                    bar.enable_steady_tick(Duration::from_millis(100));
                    bar
                });
                match event.kind.as_str() {
                    "stage.succeeded" => {
                        bar.set_style(
                            ProgressStyle::with_template("✓ {prefix:<12} {wide_msg}")
                                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                        );
                        bar.finish_with_message(line);
                    }
                    "stage.dead_lettered" | "stage.cancelled" => {
                        bar.set_style(
                            ProgressStyle::with_template("✗ {prefix:<12} {wide_msg}")
                                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                        );
                        bar.finish_with_message(line);
                    }
                    "stage.skipped" => {
                        bar.set_style(
                            ProgressStyle::with_template("- {prefix:<12} {wide_msg}")
                                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                        );
                        bar.finish_with_message(line);
                    }
                    "stage.failed" | "stage.timed_out" => bar.set_message(line),
                    _ => bar.set_message(line),
                }
            }
        }
    }

    /// Stops every spinner still turning (the run ended).
    pub(crate) fn finish(&mut self) {
        if let Style::Spinners { stages, .. } = &mut self.style {
            for bar in stages.values().filter(|bar| !bar.is_finished()) {
                bar.abandon();
            }
        }
    }

    fn took(&self, stage: &str, at: Option<SystemTime>) -> String {
        match (self.started.get(stage), at) {
            (Some(start), Some(end)) => end
                .duration_since(*start)
                .map(|d| format!(" in {}", seconds(d)))
                .unwrap_or_default(),
            _ => String::new(),
        }
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// A table with left-aligned columns sized to their content.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let render = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    data(render(headers.iter().map(|h| (*h).to_owned()).collect()));
    for row in rows {
        data(render(row.clone()));
    }
}

/// A run's attempts as a table.
pub(crate) fn attempts_table(attempts: &[AttemptView]) {
    let rows: Vec<Vec<String>> = attempts
        .iter()
        .map(|a| {
            let took = between(a.started_at.as_deref(), a.finished_at.as_deref())
                .map(seconds)
                .unwrap_or_default();
            let detail = match (&a.error, &a.output) {
                (Some(error), _) => first_line(error).to_owned(),
                (None, Some(output)) => stage_summary(&a.stage, output),
                _ => String::new(),
            };
            vec![
                a.stage.clone(),
                a.attempt.to_string(),
                a.status.clone(),
                took,
                truncate(&detail, 70),
            ]
        })
        .collect();
    table(&["STAGE", "ATTEMPT", "STATUS", "TIME", "DETAIL"], &rows);
}

pub(crate) fn truncate(text: &str, max: usize) -> String {
    let single = text.replace('\n', " ");
    if single.chars().count() <= max {
        single
    } else {
        format!("{}…", single.chars().take(max.saturating_sub(1)).collect::<String>())
    }
}

/// The headline of a finished run.
pub(crate) fn run_headline(run: &RunView) -> String {
    let took = between(run.created_at.as_str().into(), run.finished_at.as_deref())
        .map(|d| format!(" in {}", seconds(d)))
        .unwrap_or_default();
    match run.status.as_str() {
        "succeeded" => format!("✓ run {} succeeded{took}", run.id),
        status => format!(
            "✗ run {} {status}{took}{}",
            run.id,
            run.error.as_deref().map(|e| format!(": {}", first_line(e))).unwrap_or_default()
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::stage_summary;

    #[test]
    fn a_scaffold_by_an_agent_says_what_it_did_not_which_template() {
        let template = json!({ "template": "hello-world-api", "template_name": "Hello World API",
            "files": ["app.py", "drover.json"],
            "summary": { "text": "2 files changed (+40 −0)" } });
        assert_eq!(stage_summary("scaffold", &template), "Hello World API template, 2 files");
        let counted = json!({ "template": "t", "template_name": "Todo API", "files": ["a"],
            "summary": { "lines_added": 40, "lines_removed": 0, "text": "1 file changed (+40 −0)" } });
        assert_eq!(stage_summary("scaffold", &counted), "Todo API template, 1 files (+40 −0)");
        let agent = json!({ "agent": "coder", "exit_code": 0,
            "summary": { "text": "3 files changed (+42 −0), 1234 tokens, $0.0200" } });
        assert_eq!(
            stage_summary("scaffold", &agent),
            "3 files changed (+42 −0), 1234 tokens, $0.0200"
        );
        assert_eq!(stage_summary("scaffold", &json!({ "agent": "coder" })), "");
    }

    #[test]
    fn the_checking_stages_say_what_they_detected() {
        let validate = json!({ "checked": 3, "ran": ["node --check server.js"], "skipped": [],
            "project": { "kind": "node", "source": "detected" } });
        assert_eq!(
            stage_summary("validate", &validate),
            "node (detected) · 3 files valid, 1 toolchain checks passed"
        );
        let links = json!({ "links": 4, "project": { "kind": "static", "source": "detected" } });
        assert_eq!(
            stage_summary("integration", &links),
            "static (detected) · 4 local links resolve"
        );
        let manifest =
            json!({ "tests_run": 2, "project": { "kind": "python", "source": "drover.json" } });
        assert_eq!(stage_summary("integration", &manifest), "2 tests passed");
    }
}
