//! One module per command family; each returns the process exit code.

mod accounts;
mod bench;
mod chat;
mod dlq;
mod env;
mod routes;
mod run;
mod runs;
pub(crate) mod secrets;
mod up;
pub(crate) mod webhooks;
mod worker;

use std::process::ExitCode;

use drover_config::Config;
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command};

pub(crate) async fn dispatch(cli: Cli, config: Config) -> anyhow::Result<ExitCode> {
    let global = cli.global;
    match cli.command {
        Command::Up(args) => up::serve(&global, config, &args, true).await,
        Command::Serve(args) => up::serve(&global, config, &args, false).await,
        Command::Run(args) => run::run(&global, &config, &args).await,
        Command::Runs(command) => runs::runs(&global, &config, command).await,
        Command::Pipelines => runs::pipelines(&global, &config).await,
        Command::Agents => runs::agents(&global, &config).await,
        Command::Usage { hours } => runs::usage(&global, &config, hours).await,
        Command::Worker(args) => worker::work(&global, &config, &args).await,
        Command::Workers => worker::list(&global, &config).await,
        Command::Users(command) => accounts::users(&global, &config, command).await,
        Command::Projects(command) => accounts::projects(&global, &config, command).await,
        Command::Tokens(command) => accounts::tokens(&global, &config, command).await,
        Command::Login { user, password_stdin } => {
            accounts::login(&global, &config, user, password_stdin).await
        }
        Command::Whoami => accounts::whoami(&global, &config).await,
        Command::Audit { of_project, limit } => {
            accounts::audit(&global, &config, of_project, limit).await
        }
        Command::Dlq(command) => dlq::dlq(&global, &config, command).await,
        Command::Secrets(command) => secrets::secrets(&global, &config, command).await,
        Command::Webhooks(command) => webhooks::webhooks(&global, &config, command).await,
        Command::Chat(args) => chat::chat(&global, &config, &args).await,
        Command::Bench(command) => bench::bench(&global, &config, command).await,
        Command::Env(command) => env::env(&global, &config, command).await,
        Command::Services { resources } => env::services(&global, &config, resources).await,
        Command::Routes { hosts, apply, hosts_file } => {
            routes::routes(&global, &config, hosts, apply.then_some(hosts_file)).await
        }
        Command::Proxy(crate::cli::ProxyCommand::Trust) => routes::trust(&global, &config).await,
    }
}

/// Fires on Ctrl-C or SIGTERM.
pub(crate) fn interrupted() -> CancellationToken {
    let token = CancellationToken::new();
    let fire = token.clone();
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
        }
        fire.cancel();
    });
    token
}
