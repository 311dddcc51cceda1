//! `drover secrets set|ls|rm|rotate-key`: the project's secrets, which agents receive as
//! environment variables. `set`, `ls` and `rm` go through the API (a running server, or an
//! embedded one on the data directory). A value is read from standard input (not echoed
//! on a terminal) so it stays out of shell history and process listings; `--value` exists
//! for scripts that have no better way. `rotate-key` works on this machine's data directory
//! and its key, with the server stopped: it takes the data directory's lock, so it cannot
//! race a server that is using the key.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;
use drover_api::secrets::{SecretList, SecretView, SetSecretBody};
use drover_config::Config;
use drover_server::{DataDirLock, Mode};
use serde_json::json;

use crate::cli::GlobalArgs;
use crate::client::encode;
use crate::output;
use crate::target::Target;

#[derive(Debug, Subcommand)]
pub(crate) enum SecretsCommand {
    /// Set a secret (created or replaced); the value is read from standard input.
    Set {
        /// Its name, the variable agents read: `[A-Z_][A-Z0-9_]*`, e.g. `GITHUB_TOKEN`.
        name: String,
        /// The value on the command line instead (discouraged: it lands in shell history
        /// and is visible to other users in the process list).
        #[arg(long)]
        value: Option<String>,
    },
    /// List the project's secrets: names and times, never values.
    Ls,
    /// Delete a secret.
    Rm { name: String },
    /// Make a new master key and re-seal every secret under it (server stopped; with
    /// DROVER_MASTER_KEY, re-seal under it from DROVER_MASTER_KEY_OLD instead).
    RotateKey,
}

pub(crate) async fn secrets(
    global: &GlobalArgs,
    config: &Config,
    command: SecretsCommand,
) -> anyhow::Result<ExitCode> {
    if let SecretsCommand::RotateKey = command {
        return rotate_key(global, config).await;
    }
    let value = match &command {
        SecretsCommand::Set { name, value: None } => {
            let name = name.clone();
            Some(tokio::task::spawn_blocking(move || read_value(&name)).await??)
        }
        SecretsCommand::Set { value: Some(value), .. } => Some(value.clone()),
        _ => None,
    };
    let target = Target::connect(global, config, Mode::Inspect).await?;
    let result = run(global, &target, command, value).await;
    target.close().await?;
    result
}

async fn run(
    global: &GlobalArgs,
    target: &Target,
    command: SecretsCommand,
    value: Option<String>,
) -> anyhow::Result<ExitCode> {
    let client = &target.client;
    match command {
        SecretsCommand::Set { name, .. } => {
            let body = SetSecretBody { value: value.unwrap_or_default() };
            let path = format!("/secrets/{}", encode(&name));
            let secret: SecretView = client.send_json(reqwest::Method::PUT, &path, &body).await?;
            if global.json {
                output::json(&secret);
            } else {
                output::note(format!(
                    "secret {} set; runs dispatched from now on get it as ${}",
                    secret.name, secret.name
                ));
            }
        }
        SecretsCommand::Ls => {
            let list: SecretList = client.get("/secrets", &[]).await?;
            if global.json {
                output::json(&list);
            } else {
                let rows: Vec<Vec<String>> = list
                    .items
                    .iter()
                    .map(|s| vec![s.name.clone(), s.created_at.clone(), s.updated_at.clone()])
                    .collect();
                output::table(&["NAME", "CREATED", "UPDATED"], &rows);
            }
        }
        SecretsCommand::Rm { name } => {
            client.delete(&format!("/secrets/{}", encode(&name))).await?;
            if global.json {
                output::json(&json!({ "deleted": name }));
            } else {
                output::note(format!("secret {name} deleted"));
            }
        }
        SecretsCommand::RotateKey => anyhow::bail!("rotate-key does not go through a server"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The value on standard input: typed without echo on a terminal (one line), else all of
/// it, less one final line break.
fn read_value(name: &str) -> anyhow::Result<String> {
    use std::io::{IsTerminal, Read};
    let stdin = std::io::stdin();
    let value = if stdin.is_terminal() {
        output::note(format!("value of {name} (not shown; Enter to finish):"));
        read_line_unechoed(&stdin)?
    } else {
        let mut text = String::new();
        stdin.lock().read_to_string(&mut text).context("cannot read the value")?;
        let text =
            text.strip_suffix('\n').map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
        text.to_owned()
    };
    anyhow::ensure!(!value.is_empty(), "the value on standard input is empty");
    Ok(value)
}

/// One line from the terminal with echo turned off (and back on, whatever happens).
fn read_line_unechoed(stdin: &std::io::Stdin) -> anyhow::Result<String> {
    use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
    let saved = tcgetattr(stdin).context("cannot read the terminal's settings")?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(stdin, SetArg::TCSANOW, &quiet).context("cannot turn off echo")?;
    let mut line = String::new();
    let read = stdin.read_line(&mut line);
    let _ = tcsetattr(stdin, SetArg::TCSANOW, &saved);
    output::note("");
    read.context("cannot read the value")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

async fn rotate_key(global: &GlobalArgs, config: &Config) -> anyhow::Result<ExitCode> {
    if global.server.is_some() {
        anyhow::bail!("rotate-key works on this machine's data directory; --server does not apply");
    }
    let lock = DataDirLock::acquire(&config.data_dir).context(
        "rotate-key needs the server stopped (it re-seals every secret and replaces the key file)",
    )?;
    let options =
        drover_store::StoreOptions { max_connections: 1, ..drover_server::store_options(config) };
    let store = drover_store::open(&options).await?;
    let source = drover_server::key_source(config);
    let rotation = drover_secrets::rotate(Arc::new(store.clone()), &source, "cli:rotate-key").await;
    store.close().await;
    drop(lock);
    let rotation = rotation.context("the key rotation failed; the secrets are unchanged")?;
    let old: Vec<String> = rotation.old_keys.iter().map(ToString::to_string).collect();
    if global.json {
        output::json(&json!({
            "new_key_id": rotation.new_key.to_string(),
            "old_key_ids": old,
            "resealed": rotation.resealed,
            "resealed_webhook_secrets": rotation.resealed_webhook_secrets,
            "finished_interrupted": rotation.finished_interrupted,
            "key": rotation.origin.to_string(),
        }));
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(count) = rotation.finished_interrupted {
        output::data(format!("finished an interrupted rotation first: {count} values re-sealed"));
    }
    output::data(format!(
        "re-sealed {} secrets and {} webhook signing secrets under key {} (was {}); the key is in {}",
        rotation.resealed,
        rotation.resealed_webhook_secrets,
        rotation.new_key,
        old.join(", "),
        rotation.origin
    ));
    if rotation.origin == drover_secrets::KeyOrigin::Env {
        output::note(format!(
            "{} is no longer needed; keep {} as the key",
            drover_secrets::OLD_MASTER_KEY_ENV,
            drover_secrets::MASTER_KEY_ENV
        ));
    }
    Ok(ExitCode::SUCCESS)
}
