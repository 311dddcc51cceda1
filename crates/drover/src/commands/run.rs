//! `drover run "REQUEST"`: submit a run, follow it live, print the outcome.

use std::process::ExitCode;
use std::time::Duration;

use drover_agents::templates;
use drover_api::wire::RunView;
use drover_config::Config;
use drover_server::Mode;
use futures::StreamExt;

use crate::cli::{GlobalArgs, RunArgs};
use crate::client::{Client, ClientError};
use crate::output::{self, Progress};
use crate::target::Target;

/// Reconnections of the event stream before giving up on a server that went away.
const MAX_RECONNECTS: u32 = 20;

pub(crate) async fn run(
    global: &GlobalArgs,
    config: &Config,
    args: &RunArgs,
) -> anyhow::Result<ExitCode> {
    if args.list {
        list_templates(global.json);
        return Ok(ExitCode::SUCCESS);
    }
    // clap guarantees a request unless --list.
    let request = args.request.as_deref().unwrap_or_default();
    let target = Target::connect(global, config, Mode::Full).await?;
    if args.serve && !target.is_embedded() {
        output::note(format!(
            "note: --serve only applies to an embedded drover; {} keeps the app running",
            target.client.base()
        ));
    }
    let outcome = submit_and_follow(global, &target, request, args).await;
    let code = match outcome {
        Ok(FollowOutcome::Finished(run)) => {
            report(global, &run, target.is_embedded(), args.serve);
            if run.status == "succeeded" && target.is_embedded() && args.serve {
                output::note("serving until Ctrl-C…");
                super::interrupted().cancelled().await;
            }
            if run.status == "succeeded" { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Ok(FollowOutcome::Detached(run)) => {
            if global.json {
                output::json(&run);
            } else {
                output::data(&run.id);
                output::note(format!("follow it with: drover runs show {}", run.id));
            }
            ExitCode::SUCCESS
        }
        Ok(FollowOutcome::Interrupted(id)) => {
            if target.is_embedded() {
                let _ = target.client.cancel_run(&id).await;
                output::note(format!("interrupted: run {id} cancelled"));
            } else {
                output::note(format!(
                    "interrupted: run {id} continues on {}; see `drover runs show {id}`",
                    target.client.base()
                ));
            }
            ExitCode::from(crate::EXIT_INTERRUPTED)
        }
        Err(err) => {
            target.close().await?;
            return Err(err);
        }
    };
    target.close().await?;
    Ok(code)
}

enum FollowOutcome {
    Finished(RunView),
    Detached(RunView),
    Interrupted(String),
}

async fn submit_and_follow(
    global: &GlobalArgs,
    target: &Target,
    request: &str,
    args: &RunArgs,
) -> anyhow::Result<FollowOutcome> {
    let client = &target.client;
    let budget = (args.budget_tokens.is_some() || args.budget_cost.is_some()).then_some(
        drover_api::wire::BudgetBody { tokens: args.budget_tokens, cost_usd: args.budget_cost },
    );
    let run =
        client.create_run(request, &args.pipeline, args.environment.as_deref(), budget).await?;
    if args.detach {
        return Ok(FollowOutcome::Detached(run));
    }
    if !global.json {
        output::note(format!("run {} queued: {} (pipeline {})", run.id, run.request, run.pipeline));
    }
    let interrupted = super::interrupted();
    let mut progress = Progress::new(global.json);
    tokio::select! {
        followed = follow(client, &run.id, &mut progress) => {
            progress.finish();
            followed?;
            Ok(FollowOutcome::Finished(client.get_run(&run.id).await?))
        }
        () = interrupted.cancelled() => {
            progress.finish();
            Ok(FollowOutcome::Interrupted(run.id))
        }
    }
}

/// Streams the run's events into `progress` until the run ends, reconnecting (with
/// `Last-Event-ID`) if the connection drops.
pub(super) async fn follow(
    client: &Client,
    id: &str,
    progress: &mut Progress,
) -> Result<(), ClientError> {
    let mut last_seen = None;
    let mut reconnects = 0;
    loop {
        match client.events(id, last_seen).await {
            Ok(events) => {
                futures::pin_mut!(events);
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { break };
                    last_seen = Some(event.seq);
                    progress.event(&event);
                    if event.kind.starts_with("run.")
                        && matches!(
                            event.kind.as_str(),
                            "run.succeeded" | "run.failed" | "run.cancelled"
                        )
                    {
                        return Ok(());
                    }
                }
            }
            Err(err @ ClientError::Api(_)) => return Err(err),
            Err(err) if reconnects >= MAX_RECONNECTS => return Err(err),
            Err(_) => {}
        }
        // The stream ended without the run ending: the run may have ended between two
        // connections, or the server restarted.
        if let Ok(run) = client.get_run(id).await
            && matches!(run.status.as_str(), "succeeded" | "failed" | "cancelled")
        {
            return Ok(());
        }
        reconnects += 1;
        if reconnects > MAX_RECONNECTS {
            return Err(ClientError::Unreachable {
                url: client.base().to_owned(),
                message: "the event stream keeps dropping".to_owned(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250 * u64::from(reconnects.min(8)))).await;
    }
}

fn report(global: &GlobalArgs, run: &RunView, embedded: bool, serve: bool) {
    if global.json {
        output::json(run);
        return;
    }
    output::note(output::run_headline(run));
    if let Some(deployment) = &run.deployment {
        output::data(&deployment.url);
        if let Some(routed) = &deployment.routed_url {
            output::note(format!("also at {routed} (through the drover proxy)"));
        }
        if embedded && !serve {
            output::note(
                "note: this drover ran embedded, so the app stops when this command ends; \
                 use `drover run --serve …` to keep it up until Ctrl-C, or run `drover up` first",
            );
        }
    }
    if run.status != "succeeded" {
        output::note(format!("logs: drover runs logs {}", run.id));
    }
}

fn list_templates(json: bool) {
    let catalog = templates::catalog();
    if json {
        let items: Vec<_> = catalog
            .iter()
            .map(|t| serde_json::json!({ "slug": t.slug, "name": t.name, "description": t.description }))
            .collect();
        output::json(&items);
        return;
    }
    let rows: Vec<Vec<String>> = catalog
        .iter()
        .map(|t| vec![t.name.to_owned(), t.slug.to_owned(), t.description.to_owned()])
        .collect();
    output::table(&["TEMPLATE", "SLUG", "DESCRIPTION"], &rows);
}
