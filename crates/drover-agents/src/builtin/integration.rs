//! The integration agent: runs the project's own test suite (its manifest's `test`, or
//! the command detection found); a static site has none, so drover checks that every
//! page's local links resolve.

use async_trait::async_trait;
use drover_bus::AgentResult;
use drover_domain::AgentType;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::project::{TestPlan, require_program, shown};
use crate::{Agent, AgentFailure, AgentTask, into_result};

/// Every `href` and `src` of every HTML page under the site's root (argv[1]) that points
/// inside the site must name a file (or a directory with an `index.html`); prints one JSON
/// report.
const LINK_CHECK_SCRIPT: &str = r#"
import html.parser, json, os, sys, urllib.parse
root = sys.argv[1]
class Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []
    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.links.append((self.getpos()[0], value))
pages, links, broken = 0, 0, []
for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "node_modules")
    for name in sorted(files):
        if not name.endswith((".html", ".htm")):
            continue
        page = os.path.join(folder, name)
        pages += 1
        parser = Links()
        with open(page, encoding="utf-8", errors="replace") as source:
            parser.feed(source.read())
        for line, link in parser.links:
            parts = urllib.parse.urlsplit(link)
            if parts.scheme or parts.netloc or not parts.path:
                continue
            links += 1
            path = urllib.parse.unquote(parts.path)
            target = os.path.join(root, path.lstrip("/")) if path.startswith("/") else os.path.join(folder, path)
            if os.path.isdir(target):
                target = os.path.join(target, "index.html")
            if not os.path.isfile(target):
                broken.append({"page": os.path.relpath(page, root), "line": line, "link": link})
print(json.dumps({"pages": pages, "links": links, "broken": broken}))
"#;

#[derive(Debug, Deserialize)]
struct LinkReport {
    pages: u32,
    links: u32,
    broken: Vec<BrokenLink>,
}

#[derive(Debug, Deserialize, Serialize)]
struct BrokenLink {
    page: String,
    line: u32,
    link: String,
}

pub struct IntegrationAgent {
    agent_type: AgentType,
}

impl IntegrationAgent {
    pub fn new() -> Self {
        Self { agent_type: super::agent_type("integration") }
    }
}

impl Default for IntegrationAgent {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Agent for IntegrationAgent {
    fn agent_type(&self) -> &AgentType {
        &self.agent_type
    }

    async fn run(&self, task: &AgentTask) -> AgentResult {
        into_result(integration(task).await)
    }
}

async fn integration(task: &AgentTask) -> Result<serde_json::Value, AgentFailure> {
    let project = super::project(task).await?;
    let argv = match project.test()? {
        TestPlan::Command(argv) => argv,
        TestPlan::LocalLinks { root } => return local_links(task, root, &project).await,
    };
    require_program(argv, "run the tests")?;
    let output = super::run_in_workspace(task, argv).await?;
    let tests_run = tests_run(&output.output_tail);
    if !output.success() {
        return Err(AgentFailure::permanent(format!(
            "`{}` failed ({}):\n{}",
            shown(argv),
            output.status,
            super::excerpt(&output.output_tail, 15)
        )));
    }
    Ok(json!({ "command": shown(argv), "tests_run": tests_run, "project": project.to_json() }))
}

async fn local_links(
    task: &AgentTask,
    root: &str,
    project: &crate::project::Project,
) -> Result<serde_json::Value, AgentFailure> {
    task.log
        .line(format!(
            "a static site has no test suite: checking the local links of its pages under {root}/"
        ))
        .await;
    let report: LinkReport = super::python_report(task, LINK_CHECK_SCRIPT, &[root]).await?;
    if !report.broken.is_empty() {
        let listed: Vec<String> = report
            .broken
            .iter()
            .map(|b| format!("{}:{}: `{}` does not resolve", b.page, b.line, b.link))
            .collect();
        for line in &listed {
            task.log.line(format!("FAIL {line}")).await;
        }
        return Err(AgentFailure::permanent(format!(
            "{} of {} local links are broken: {}",
            report.broken.len(),
            report.links,
            listed.join("; ")
        )));
    }
    task.log.line(format!("{} local links in {} pages resolve", report.links, report.pages)).await;
    Ok(json!({
        "command": "drover's local link check",
        "pages": report.pages,
        "links": report.links,
        "project": project.to_json(),
    }))
}

/// The test count from a runner's summary: unittest's `Ran 3 tests in 0.01s`, pytest's
/// `3 passed in 0.02s`, cargo's `test result: ok. 3 passed; …`, node's `# pass 3`.
fn tests_run(output: &str) -> Option<u32> {
    output.lines().rev().find_map(|line| {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Ran ") {
            return rest.split_whitespace().next()?.parse().ok();
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["#" | "ℹ", "pass", count] = words.as_slice() {
            return count.parse().ok();
        }
        words.windows(2).find_map(|pair| match pair {
            [count, word] if word.trim_end_matches([',', ';']) == "passed" => count.parse().ok(),
            _ => None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::tests_run;

    #[test]
    fn the_test_count_is_read_from_each_runners_summary() {
        let output = "test_a ... ok\n\n-----\nRan 3 tests in 0.004s\n\nOK\n";
        assert_eq!(tests_run(output), Some(3));
        assert_eq!(tests_run("no summary"), None);
        assert_eq!(tests_run("....\n4 passed in 0.02s\n"), Some(4));
        assert_eq!(tests_run("=== 2 failed, 5 passed in 1.0s ===\n"), Some(5));
        assert_eq!(tests_run("test result: ok. 6 passed; 0 failed; 0 ignored\n"), Some(6));
        assert_eq!(tests_run("# tests 2\n# pass 2\n# fail 0\n"), Some(2));
        assert_eq!(tests_run("ℹ pass 7\nℹ fail 0\n"), Some(7));
    }
}
