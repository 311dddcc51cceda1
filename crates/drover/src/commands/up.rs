//! `drover up` and `drover serve`: a server in the foreground until Ctrl-C or SIGTERM.
//! `[agents]` and `[pipelines]` are reloaded on SIGHUP and when the config file changes.

use std::process::ExitCode;

use anyhow::Context;
use drover_config::{Config, ConfigSource, LogFormat, Overrides};
use drover_server::{ConfigReload, Mode, Server};

use crate::cli::{GlobalArgs, LogFormatArg, ServeArgs};
use crate::output;

pub(crate) async fn serve(
    global: &GlobalArgs,
    mut config: Config,
    args: &ServeArgs,
    embedded_workers: bool,
) -> anyhow::Result<ExitCode> {
    // Every command-line value, so a reload loads the configuration the same way.
    let overrides = Overrides {
        data_dir: global.data_dir.clone(),
        listen: args.listen,
        proxy_listen: args.proxy_listen,
        proxy_tls_listen: args.proxy_tls_listen,
        log_format: global.log_format.map(|format| match format {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }),
        embedded_workers: Some(embedded_workers),
    };
    config.apply(&overrides);
    let file = global.config.clone();
    let source = tokio::task::spawn_blocking(move || ConfigSource::new(file.as_deref(), overrides))
        .await
        .context("cannot find the config file")?;
    let server = Server::build(config, Mode::Full)
        .await
        .context("cannot start drover")?
        .reload_from(ConfigReload::new(source));
    let url = server.url();
    let proxy = server.proxy_addr().map(|addr| addr.to_string());
    let proxy_tls = server.proxy_tls_addr().map(|addr| addr.to_string());
    let data_dir = server.config().data_dir.display().to_string();
    if global.json {
        output::json(&serde_json::json!({
            "url": url, "proxy": proxy, "proxy_tls": proxy_tls, "data_dir": data_dir
        }));
    } else {
        let workers = if embedded_workers { "with built-in workers" } else { "without workers" };
        output::note(format!(
            "drover is up at {url} ({workers}; data in {data_dir}); Ctrl-C stops it"
        ));
    }
    let stop = super::interrupted();
    server.run(stop).await.context("drover stopped with an error")?;
    Ok(ExitCode::SUCCESS)
}
