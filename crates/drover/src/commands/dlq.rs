//! `drover dlq ls|redrive|discard`.

use std::process::ExitCode;

use drover_config::Config;
use drover_server::Mode;

use crate::cli::{DlqCommand, GlobalArgs};
use crate::output;
use crate::target::Target;

pub(crate) async fn dlq(
    global: &GlobalArgs,
    config: &Config,
    command: DlqCommand,
) -> anyhow::Result<ExitCode> {
    // Without a server, the data directory is changed through an instance that runs no
    // engine: a redriven stage then runs when a server next starts.
    let target = Target::connect(global, config, Mode::Inspect).await?;
    let result = run(global, &target, command).await;
    target.close().await?;
    result
}

async fn run(
    global: &GlobalArgs,
    target: &Target,
    command: DlqCommand,
) -> anyhow::Result<ExitCode> {
    let client = &target.client;
    match command {
        DlqCommand::Ls { limit, cursor } => {
            let page = client.dead_letters(limit, cursor.as_deref()).await?;
            if global.json {
                output::json(&page);
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = page
                .items
                .iter()
                .map(|d| {
                    vec![
                        d.id.clone(),
                        d.run_id.clone(),
                        d.stage.clone(),
                        d.attempt.to_string(),
                        d.dead_lettered_at.clone().unwrap_or_default(),
                        output::truncate(d.error.as_deref().unwrap_or_default(), 60),
                    ]
                })
                .collect();
            output::table(&["ID", "RUN", "STAGE", "ATTEMPT", "DEAD-LETTERED", "ERROR"], &rows);
            if let Some(cursor) = page.next_cursor {
                output::note(format!("more: drover dlq ls --cursor {cursor}"));
            }
        }
        DlqCommand::Redrive { id } => {
            let retry = client.redrive(&id).await?;
            if global.json {
                output::json(&retry);
            } else {
                output::note(format!(
                    "redriven: stage {} runs again as attempt {} ({})",
                    retry.stage, retry.attempt, retry.id
                ));
                if target.is_embedded() {
                    output::note("no server is running: the run resumes with `drover up`");
                }
            }
        }
        DlqCommand::Discard { id } => {
            let letter = client.discard(&id).await?;
            if global.json {
                output::json(&letter);
            } else {
                output::note(format!(
                    "discarded dead letter {} (stage {} of run {})",
                    letter.id, letter.stage, letter.run_id
                ));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
