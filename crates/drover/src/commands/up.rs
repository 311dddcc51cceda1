//! `drover up` and `drover serve`: a server in the foreground until Ctrl-C or SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use drover_config::Config;
use drover_server::{Mode, Server};

use crate::cli::{GlobalArgs, ServeArgs};
use crate::output;

pub(crate) async fn serve(
    global: &GlobalArgs,
    mut config: Config,
    args: &ServeArgs,
    embedded_workers: bool,
) -> anyhow::Result<ExitCode> {
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(listen) = args.proxy_listen {
        config.proxy.listen = listen;
    }
    if let Some(listen) = args.proxy_tls_listen {
        config.proxy.tls_listen = Some(listen);
    }
    config.workers.embedded = embedded_workers;
    let server = Server::build(config, Mode::Full).await.context("cannot start drover")?;
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
