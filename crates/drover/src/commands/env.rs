//! `drover env …` and `drover services`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use drover_api::environments::{CreateEnvironmentBody, EnvironmentPage, EnvironmentView};
use drover_config::Config;
use drover_server::Mode;
use futures::StreamExt;

use crate::cli::{EnvCommand, GlobalArgs};
use crate::output;
use crate::target::Target;

pub(crate) async fn env(
    global: &GlobalArgs,
    config: &Config,
    command: EnvCommand,
) -> anyhow::Result<ExitCode> {
    // Without a server, changes are recorded for when one starts: environments run
    // inside `drover up`, not inside a one-shot command.
    let target = Target::connect(global, config, Mode::Inspect).await?;
    let result = run(global, &target, command).await;
    target.close().await?;
    result
}

async fn run(
    global: &GlobalArgs,
    target: &Target,
    command: EnvCommand,
) -> anyhow::Result<ExitCode> {
    let client = &target.client;
    let note_offline = || {
        if target.is_embedded() {
            output::note(
                "no drover server is running: the change takes effect when `drover up` starts",
            );
        }
    };
    match command {
        EnvCommand::Create { name, repo, base } => {
            let repo = repo
                .map(|path| {
                    std::path::absolute(&path)
                        .with_context(|| format!("cannot resolve {}", path.display()))
                })
                .transpose()?;
            let body = CreateEnvironmentBody {
                name,
                repo: repo.map(|r| r.display().to_string()),
                base,
                reason: None,
            };
            let env = client.create_environment(&body).await?;
            print_env(global, &env, false);
            note_offline();
        }
        EnvCommand::Ls { all } => print_env_list(global, &client.environments(all).await?),
        EnvCommand::Show { env } => print_env(global, &client.environment(&env).await?, true),
        EnvCommand::Start { env } => {
            print_env(global, &client.environment_action(&env, "start").await?, false);
            note_offline();
        }
        EnvCommand::Stop { env } => {
            print_env(global, &client.environment_action(&env, "stop").await?, false);
            note_offline();
        }
        EnvCommand::Rm { env, force } => {
            let env = client.delete_environment(&env, force).await?;
            if global.json {
                output::json(&env);
            } else {
                output::note(format!("environment {} is being deleted", env.name));
            }
            note_offline();
        }
        EnvCommand::Logs { env, service, follow } => {
            let chunks = client.service_log(&env, &service, follow).await?;
            futures::pin_mut!(chunks);
            let interrupted = super::interrupted();
            let mut stdout = std::io::stdout();
            loop {
                let chunk = tokio::select! {
                    chunk = chunks.next() => chunk,
                    () = interrupted.cancelled() => break,
                };
                let Some(chunk) = chunk else { break };
                stdout.write_all(&chunk?)?;
                stdout.flush()?;
            }
        }
        EnvCommand::Exec { env, command } => {
            let env = client.environment(&env).await?;
            let (program, args) = command.split_first().context("name a command to run")?;
            let status = tokio::process::Command::new(program)
                .args(args)
                .current_dir(&env.workspace)
                .envs(env.variables.clone().unwrap_or_default())
                .status()
                .await
                .with_context(|| format!("cannot run `{program}`"))?;
            if !status.success() {
                let code = status.code().unwrap_or(1);
                return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn print_env_list(global: &GlobalArgs, page: &EnvironmentPage) {
    if global.json {
        output::json(page);
        return;
    }
    let rows: Vec<Vec<String>> = page
        .items
        .iter()
        .map(|e| {
            vec![
                e.name.clone(),
                e.status.clone(),
                e.desired.clone(),
                format!("{}-{}", e.ports.base, e.ports.base + e.ports.size - 1),
                e.branch.clone().unwrap_or_default(),
                e.id.clone(),
            ]
        })
        .collect();
    output::table(&["NAME", "STATUS", "DESIRED", "PORTS", "BRANCH", "ID"], &rows);
}

pub(super) fn print_env(global: &GlobalArgs, env: &EnvironmentView, detailed: bool) {
    if global.json {
        output::json(env);
        return;
    }
    output::data(format!("environment  {} ({})", env.name, env.id));
    output::data(format!("status       {} (desired {})", env.status, env.desired));
    output::data(format!(
        "ports        {}-{}",
        env.ports.base,
        env.ports.base + env.ports.size - 1
    ));
    output::data(format!("workspace    {}", env.workspace));
    if let Some(branch) = &env.branch {
        output::data(format!("branch       {branch}"));
    }
    if let Some(error) = &env.error {
        output::data(format!("error        {error}"));
    }
    if !detailed {
        return;
    }
    if let Some(services) = &env.services {
        output::data("");
        let rows: Vec<Vec<String>> = services
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.status.clone(),
                    s.pid.map(|p| p.to_string()).unwrap_or_default(),
                    s.restarts.to_string(),
                    s.ports.values().map(ToString::to_string).collect::<Vec<_>>().join(","),
                    s.hostname.clone(),
                    output::truncate(s.reason.as_deref().unwrap_or_default(), 50),
                ]
            })
            .collect();
        output::table(
            &["SERVICE", "STATUS", "PID", "RESTARTS", "PORTS", "HOSTNAME", "REASON"],
            &rows,
        );
    }
}

pub(crate) async fn services(
    global: &GlobalArgs,
    config: &Config,
    resources: bool,
) -> anyhow::Result<ExitCode> {
    let target = Target::connect(global, config, Mode::Inspect).await?;
    let overview = target.client.services_overview().await;
    target.close().await?;
    let overview = overview?;
    if global.json {
        output::json(&overview);
        return Ok(ExitCode::SUCCESS);
    }
    let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0));
    let rows: Vec<Vec<String>> = overview
        .items
        .iter()
        .map(|s| {
            let mut row = vec![
                s.name.clone(),
                s.environment_id.clone().unwrap_or_else(|| "(shared)".to_owned()),
                s.status.clone(),
                s.hostname.clone(),
            ];
            if resources {
                row.push(mib(s.rss_bytes));
            }
            row
        })
        .collect();
    if resources {
        output::table(&["SERVICE", "ENVIRONMENT", "STATUS", "HOSTNAME", "RSS"], &rows);
        output::data(format!(
            "total {}; sharing saves {}",
            mib(overview.total_rss_bytes),
            mib(overview.saved_by_sharing_bytes)
        ));
    } else {
        output::table(&["SERVICE", "ENVIRONMENT", "STATUS", "HOSTNAME"], &rows);
    }
    Ok(ExitCode::SUCCESS)
}
