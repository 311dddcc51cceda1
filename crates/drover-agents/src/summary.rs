//! A stage's summary of what its agent did, whatever the agent: the files it changed and
//! the lines it added and removed (from [`crate::changes`]), the tools it ran, the tokens
//! it used and what they cost (as the agent reported them in its output: `usage`, and
//! `tools_run` as a count or a list). The worker adds it to a successful attempt's output
//! as `summary`, so the CLI and the API show it, and writes its line into the log.
//! A field is left out when nothing reported it; new ones (cache tokens, …) add here.

use serde::Serialize;
use serde_json::Value;

use crate::changes::{Changes, FileChange};

/// Changed files listed in a summary at most (the counts cover them all).
const MAX_LISTED_FILES: usize = 50;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct StageSummary {
    /// One line for a person: `3 files changed (+42 −1), 2 tools run, 1234 tokens, $0.0200`.
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files_changed: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lines_added: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lines_removed: Option<u64>,
    /// The first changed files, with their counts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileChange>,
    /// False when the workspace was too large to count everything.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools_run: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

/// The summary of an attempt whose agent reported `output` and changed `changes`; `None`
/// when there is nothing to tell (no file changed, nothing reported), as for the checks
/// of the built-in stages.
pub(crate) fn summarize(output: &Value, changes: Option<&Changes>) -> Option<StageSummary> {
    let usage = drover_domain::Usage::reported_in(output);
    let tokens = (usage.tokens > 0).then_some(usage.tokens);
    let cost_usd = (usage.cost_usd > 0.0).then_some(usage.cost_usd);
    let tools_run = match output.get("tools_run") {
        Some(Value::Number(count)) => count.as_u64(),
        Some(Value::Array(tools)) => u64::try_from(tools.len()).ok(),
        _ => None,
    };
    let changed = changes.filter(|c| !c.files.is_empty());
    if changed.is_none() && tokens.is_none() && cost_usd.is_none() && tools_run.is_none() {
        return None;
    }
    let mut parts = Vec::new();
    match changed {
        Some(changes) => {
            let count = changes.files.len();
            let files = if count == 1 { "file" } else { "files" };
            let partly = if changes.complete { "" } else { ", counted in part" };
            parts.push(format!(
                "{count} {files} changed (+{} −{}{partly})",
                changes.lines_added(),
                changes.lines_removed()
            ));
        }
        None if changes.is_some() => parts.push("no files changed".to_owned()),
        None => {}
    }
    if let Some(tools) = tools_run {
        parts.push(format!("{tools} {} run", if tools == 1 { "tool" } else { "tools" }));
    }
    if let Some(tokens) = tokens {
        parts.push(format!("{tokens} tokens"));
    }
    if let Some(cost) = cost_usd {
        parts.push(format!("${cost:.4}"));
    }
    Some(StageSummary {
        text: parts.join(", "),
        files_changed: changes.map(|c| c.files.len()),
        lines_added: changes.map(Changes::lines_added),
        lines_removed: changes.map(Changes::lines_removed),
        files: changed
            .map(|c| c.files.iter().take(MAX_LISTED_FILES).cloned().collect())
            .unwrap_or_default(),
        partial: changes.is_some_and(|c| !c.complete),
        tools_run,
        tokens,
        cost_usd,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::changes::Change;

    fn changes(files: &[(&str, u64, u64)]) -> Changes {
        Changes {
            files: files
                .iter()
                .map(|(path, added, removed)| FileChange {
                    path: (*path).to_owned(),
                    change: Change::Added,
                    added: Some(*added),
                    removed: Some(*removed),
                })
                .collect(),
            complete: true,
        }
    }

    #[test]
    fn the_summary_tells_files_lines_tools_tokens_and_cost() {
        let output =
            json!({ "usage": { "tokens": 1234, "cost_usd": 0.02 }, "tools_run": ["Edit", "Bash"] });
        let summary =
            summarize(&output, Some(&changes(&[("app.py", 40, 0), ("README.md", 2, 1)]))).unwrap();
        assert_eq!(summary.text, "2 files changed (+42 −1), 2 tools run, 1234 tokens, $0.0200");
        assert_eq!(
            (summary.files_changed, summary.lines_added, summary.lines_removed),
            (Some(2), Some(42), Some(1))
        );
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(
            json["files"][0],
            json!({ "path": "app.py", "change": "added", "added": 40, "removed": 0 })
        );
        assert!(json.get("partial").is_none());

        let one = summarize(&json!({ "tools_run": 1 }), Some(&changes(&[("a", 1, 0)]))).unwrap();
        assert_eq!(one.text, "1 file changed (+1 −0), 1 tool run");
    }

    #[test]
    fn nothing_to_tell_is_no_summary_and_usage_alone_says_no_files_changed() {
        assert_eq!(summarize(&json!({ "checked": 3 }), Some(&Changes::default())), None);
        assert_eq!(summarize(&json!({}), None), None);
        let usage = summarize(
            &json!({ "usage": { "input_tokens": 10, "output_tokens": 5 } }),
            Some(&Changes::default()),
        )
        .unwrap();
        assert_eq!(usage.text, "no files changed, 15 tokens");
        let unknown = summarize(&json!({ "usage": { "tokens": 7 } }), None).unwrap();
        assert_eq!(unknown.text, "7 tokens");
        assert_eq!(unknown.files_changed, None);
    }

    #[test]
    fn a_partial_count_says_so() {
        let mut partial = changes(&[("big.log", 0, 0)]);
        partial.complete = false;
        let summary = summarize(&json!({}), Some(&partial)).unwrap();
        assert_eq!(summary.text, "1 file changed (+0 −0, counted in part)");
        assert!(summary.partial);
    }
}
