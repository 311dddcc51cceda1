//! The offline scaffold agent: picks a template by the request and writes it into the
//! run's workspace.

use async_trait::async_trait;
use drover_bus::AgentResult;
use drover_domain::AgentType;
use serde_json::json;

use crate::templates::{self, Template};
use crate::{Agent, AgentFailure, AgentTask, into_result};

pub struct ScaffoldAgent {
    agent_type: AgentType,
}

impl ScaffoldAgent {
    pub fn new() -> Self {
        Self { agent_type: super::agent_type("scaffold") }
    }

    /// The same scaffolder under another agent type (`kind = "template"` in `[agents]`).
    pub fn named(agent_type: AgentType) -> Self {
        Self { agent_type }
    }
}

impl Default for ScaffoldAgent {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Agent for ScaffoldAgent {
    fn agent_type(&self) -> &AgentType {
        &self.agent_type
    }

    async fn run(&self, task: &AgentTask) -> AgentResult {
        into_result(scaffold(task).await)
    }
}

async fn scaffold(task: &AgentTask) -> Result<serde_json::Value, AgentFailure> {
    let request = task.envelope.payload.get("request").and_then(|r| r.as_str()).unwrap_or("");
    let selection = templates::select(request);
    let template: &Template = selection.template;
    let reason = if selection.matched {
        format!("request \"{request}\" matches the {} template", template.name)
    } else {
        format!("no template matches \"{request}\"; using the default, {}", template.name)
    };
    task.log.line(&reason).await;

    let mut written = Vec::with_capacity(template.files.len());
    for (relative, contents) in template.files {
        let path = task.workspace.join(relative);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(|err| {
                AgentFailure::transient(format!("cannot create {}: {err}", parent.display()))
            })?;
        }
        tokio::fs::write(&path, contents).await.map_err(|err| {
            AgentFailure::transient(format!("cannot write {}: {err}", path.display()))
        })?;
        task.log.line(format!("wrote {relative} ({} bytes)", contents.len())).await;
        written.push(*relative);
    }
    Ok(json!({
        "template": template.slug,
        "template_name": template.name,
        "reason": reason,
        "files": written,
        "workspace": task.workspace.display().to_string(),
    }))
}
