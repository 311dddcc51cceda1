//! The `drover` binary: parses the command line, loads the configuration, sets up logging,
//! and hands off to a command. Thin by design: everything it does is in library crates.

mod allocator;
mod cli;
mod client;
mod commands;
mod http_bus;
mod output;
mod sse;
mod target;

use std::process::ExitCode;

use clap::Parser;
use drover_config::{Config, LogFormat, Overrides};
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, LogFormatArg};

/// Exit code when the user interrupted the command.
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    allocator::settle();
    let cli = Cli::parse();
    let overrides = Overrides {
        data_dir: cli.global.data_dir.clone(),
        log_format: cli.global.log_format.map(|format| match format {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }),
        ..Overrides::default()
    };
    let config = match Config::load(cli.global.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("drover: {err}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config, &cli.command);

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("drover: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::dispatch(cli, config)) {
        Ok(code) => code,
        // A reader that went away (`drover runs logs -f … | head`) ends the command
        // quietly, as it does for other Unix tools.
        Err(err)
            if err.downcast_ref::<std::io::Error>().map(std::io::Error::kind)
                == Some(std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("drover: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line: `what failed: because: root cause`.
fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|seen| seen.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// Servers log at the configured level; one-shot commands only warn unless asked
/// (`DROVER_LOG__LEVEL` or `RUST_LOG`), so their own output stays readable.
fn init_logging(config: &Config, command: &Command) {
    let serving = matches!(command, Command::Up(_) | Command::Serve(_));
    let level_set = std::env::var_os("DROVER_LOG__LEVEL").is_some() || config.log.level != "info";
    let default = if serving || level_set { config.log.level.as_str() } else { "warn" };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
}
