//! `drover runs ls|show|cancel|approve|reject|artifacts|logs`, `drover pipelines`,
//! `drover agents` and `drover usage`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;

use drover_config::Config;
use drover_server::Mode;
use futures::StreamExt;

use crate::cli::{GlobalArgs, RunsCommand};
use crate::output;
use crate::target::Target;

pub(crate) async fn runs(
    global: &GlobalArgs,
    config: &Config,
    command: RunsCommand,
) -> anyhow::Result<ExitCode> {
    // Without a server, read the data directory through a short-lived instance that runs
    // no engine and no workers: looking must not resume anything.
    let target = Target::connect(global, config, Mode::Inspect).await?;
    let result = runs_with(global, &target, command).await;
    target.close().await?;
    result
}

async fn runs_with(
    global: &GlobalArgs,
    target: &Target,
    command: RunsCommand,
) -> anyhow::Result<ExitCode> {
    let client = &target.client;
    match command {
        RunsCommand::Ls { status, limit, cursor } => {
            let page = client.list_runs(status.as_deref(), limit, cursor.as_deref()).await?;
            if global.json {
                output::json(&page);
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = page
                .items
                .iter()
                .map(|run| {
                    vec![
                        run.id.clone(),
                        run.status.clone(),
                        run.pipeline.clone(),
                        run.created_at.clone(),
                        output::truncate(&run.request, 40),
                        run.deployment.as_ref().map(|d| d.url.clone()).unwrap_or_default(),
                    ]
                })
                .collect();
            output::table(&["ID", "STATUS", "PIPELINE", "CREATED", "REQUEST", "URL"], &rows);
            if let Some(cursor) = page.next_cursor {
                output::note(format!("more: drover runs ls --cursor {cursor}"));
            }
        }
        RunsCommand::Show { id } => {
            let run = client.get_run(&id).await?;
            if global.json {
                output::json(&run);
                return Ok(ExitCode::SUCCESS);
            }
            output::data(format!("run       {}", run.id));
            output::data(format!("request   {}", run.request));
            output::data(format!("pipeline  {}", run.pipeline));
            output::data(format!("status    {}", run.status));
            if let Some(error) = &run.error {
                output::data(format!("error     {error}"));
            }
            output::data(format!("created   {}", run.created_at));
            if let Some(finished) = &run.finished_at {
                output::data(format!("finished  {finished}"));
            }
            if let Some(deployment) = &run.deployment {
                let live = if deployment.live { "live" } else { "stopped" };
                output::data(format!("url       {} ({live})", deployment.url));
                if let Some(routed) = &deployment.routed_url {
                    output::data(format!("routed    {routed}"));
                }
            }
            output::data("");
            output::attempts_table(run.attempts.as_deref().unwrap_or_default());
        }
        RunsCommand::Cancel { id } => {
            let run = client.cancel_run(&id).await?;
            if global.json {
                output::json(&run);
            } else {
                output::note(format!("run {} cancelled", run.id));
            }
        }
        RunsCommand::Approve { id, stage, reason } => {
            let run = client.decide_stage(&id, &stage, true, reason.as_deref()).await?;
            if global.json {
                output::json(&run);
            } else {
                output::note(format!(
                    "stage `{stage}` of run {} approved; run {}",
                    run.id, run.status
                ));
            }
        }
        RunsCommand::Reject { id, stage, reason } => {
            let run = client.decide_stage(&id, &stage, false, Some(&reason)).await?;
            if global.json {
                output::json(&run);
            } else {
                output::note(format!(
                    "stage `{stage}` of run {} rejected; run {}",
                    run.id, run.status
                ));
            }
        }
        RunsCommand::Artifacts { id, stage, out } => {
            let list = client.artifacts(&id, stage.as_deref()).await?;
            if let Some(dir) = out {
                tokio::fs::create_dir_all(&dir)
                    .await
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                for item in &list.items {
                    let path = dir.join(&item.name);
                    if let Some(parent) = path.parent() {
                        tokio::fs::create_dir_all(parent)
                            .await
                            .with_context(|| format!("cannot create {}", parent.display()))?;
                    }
                    let mut file = tokio::fs::File::create(&path)
                        .await
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    let chunks = client.artifact(&id, &item.name).await?;
                    futures::pin_mut!(chunks);
                    while let Some(chunk) = chunks.next().await {
                        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk?).await?;
                    }
                }
                output::note(format!(
                    "{} artifacts written to {}",
                    list.items.len(),
                    dir.display()
                ));
            } else if global.json {
                output::json(&list);
            } else {
                let rows: Vec<Vec<String>> = list
                    .items
                    .iter()
                    .map(|a| {
                        vec![
                            a.stage.clone(),
                            a.attempt.map(|n| n.to_string()).unwrap_or_default(),
                            a.kind.clone(),
                            a.size_bytes.to_string(),
                            a.name.clone(),
                        ]
                    })
                    .collect();
                output::table(&["STAGE", "ATTEMPT", "KIND", "BYTES", "NAME"], &rows);
            }
        }
        RunsCommand::Logs { id, stage, attempt, follow } => {
            let chunks = client.logs(&id, stage.as_deref(), attempt, follow).await?;
            futures::pin_mut!(chunks);
            let mut stdout = std::io::stdout().lock();
            while let Some(chunk) = chunks.next().await {
                stdout.write_all(&chunk?)?;
            }
            stdout.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn agents(global: &GlobalArgs, config: &Config) -> anyhow::Result<ExitCode> {
    let target = Target::connect(global, config, Mode::Inspect).await?;
    let list = target.client.agents().await;
    target.close().await?;
    let list = list?;
    if global.json {
        output::json(&list);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = list
        .items
        .iter()
        .map(|a| {
            let command = a.command.as_ref().map(|c| c.join(" ")).unwrap_or_default();
            vec![a.name.clone(), a.kind.clone(), command, a.description.clone()]
        })
        .collect();
    output::table(&["AGENT", "KIND", "COMMAND", "DESCRIPTION"], &rows);
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn pipelines(global: &GlobalArgs, config: &Config) -> anyhow::Result<ExitCode> {
    let target = Target::connect(global, config, Mode::Inspect).await?;
    let list = target.client.pipelines().await;
    target.close().await?;
    let list = list?;
    if global.json {
        output::json(&list);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = list
        .items
        .iter()
        .map(|p| vec![p.name.clone(), describe_stages(&p.stages), p.description.clone()])
        .collect();
    output::table(&["PIPELINE", "STAGES", "DESCRIPTION"], &rows);
    Ok(ExitCode::SUCCESS)
}

/// A pipeline's stages in one line: `a → b → c` when each needs the one before, else
/// each stage with what it needs (`b<-a`); agents, gates and conditions in brackets.
fn describe_stages(stages: &[drover_api::wire::StageView]) -> String {
    let sequential = stages.iter().enumerate().all(|(i, stage)| match i {
        0 => stage.needs.is_empty(),
        _ => stage.needs == [stages[i - 1].name.clone()],
    });
    let parts: Vec<String> = stages
        .iter()
        .map(|s| {
            let mut notes = Vec::new();
            if s.agent != s.name {
                notes.push(s.agent.clone());
            }
            if s.approval {
                notes.push("approval".to_owned());
            }
            if let Some(when) = &s.when {
                notes.push(format!("when {when}"));
            }
            let mut text = s.name.clone();
            if !sequential && !s.needs.is_empty() {
                text = format!("{text}<-{}", s.needs.join("+"));
            }
            if !notes.is_empty() {
                text = format!("{text} ({})", notes.join(", "));
            }
            text
        })
        .collect();
    parts.join(if sequential { " → " } else { "  " })
}

pub(crate) async fn usage(
    global: &GlobalArgs,
    config: &Config,
    hours: u64,
) -> anyhow::Result<ExitCode> {
    let target = Target::connect(global, config, Mode::Inspect).await?;
    let report = target.client.usage(hours).await;
    target.close().await?;
    let report = report?;
    if global.json {
        output::json(&report);
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![vec![
        "total".to_owned(),
        String::new(),
        report.total.tokens.to_string(),
        format!("{:.4}", report.total.cost_usd),
    ]];
    for (scope, items) in
        [("user", &report.by_user), ("stage", &report.by_stage), ("run", &report.by_run)]
    {
        rows.extend(items.iter().map(|row| {
            vec![
                scope.to_owned(),
                row.key.clone(),
                row.tokens.to_string(),
                format!("{:.4}", row.cost_usd),
            ]
        }));
    }
    output::table(&["SCOPE", "KEY", "TOKENS", "COST_USD"], &rows);
    output::note(format!("runs created in the last {} hours", report.hours));
    Ok(ExitCode::SUCCESS)
}
