//! Which server a command talks to: `--server` if given; else the server that owns the
//! data directory (its `server.json`); else the configured address if something answers
//! there; else an embedded instance started for the duration of the command.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use drover_config::Config;
use drover_server::{Mode, Server, ServerError, ServerInfo};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::GlobalArgs;
use crate::client::Client;

/// A connection to a server, possibly one this command started itself.
pub(crate) struct Target {
    pub(crate) client: Client,
    embedded: Option<Embedded>,
}

struct Embedded {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Target {
    /// Finds a server or starts an embedded one running `mode`.
    pub(crate) async fn connect(
        global: &GlobalArgs,
        config: &Config,
        mode: Mode,
    ) -> anyhow::Result<Self> {
        let mut target = match Self::find(global, config).await? {
            Some(target) => target,
            None => Self::embedded(config, mode, global.token.clone()).await?,
        };
        target.client.set_project(global.project.clone());
        Ok(target)
    }

    /// Finds a running server; never starts one (a worker needs a server to work for).
    pub(crate) async fn connect_existing(
        global: &GlobalArgs,
        config: &Config,
    ) -> anyhow::Result<Self> {
        Self::find(global, config).await?.ok_or_else(|| {
            anyhow::anyhow!(
                "no drover server to work for: start one with `drover serve` or `drover up`, \
                 or pass --server"
            )
        })
    }

    /// `--server` (which must answer), else the data directory's server, else the
    /// configured address if something answers there.
    async fn find(global: &GlobalArgs, config: &Config) -> anyhow::Result<Option<Self>> {
        let token = global.token.clone();
        if let Some(url) = &global.server {
            let client = Client::new(url, token);
            if !client.is_up(Duration::from_secs(3)).await {
                anyhow::bail!("cannot reach the drover server at {url} (is it running?)");
            }
            return Ok(Some(Self { client, embedded: None }));
        }
        if let Some(info) = ServerInfo::read(&config.data_dir) {
            let client = Client::new(&info.url, token.clone());
            if client.is_up(Duration::from_secs(2)).await {
                return Ok(Some(Self { client, embedded: None }));
            }
        }
        let configured = Client::new(&format!("http://{}", config.server.listen), token);
        if config.server.listen.port() != 0 && configured.is_up(Duration::from_millis(300)).await {
            return Ok(Some(Self { client: configured, embedded: None }));
        }
        Ok(None)
    }

    async fn embedded(config: &Config, mode: Mode, token: Option<String>) -> anyhow::Result<Self> {
        let mut config = config.clone();
        config.server.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        // An embedded instance lives as long as one command: no proxy to route to it.
        config.proxy.enabled = false;
        // The instance is this command's own: it trusts a secret only this command holds,
        // whatever users exist (a given --token still speaks for its user).
        let trusted = drover_auth::random_secret("local_");
        let server = Server::build(config, mode)
            .await
            .context("cannot start an embedded drover")?
            .trust_token(trusted.clone());
        let client = Client::new(&server.url(), Some(token.unwrap_or(trusted)));
        tracing::debug!(url = client.base(), "embedded drover started");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Ok(Self { client, embedded: Some(Embedded { shutdown, task }) })
    }

    pub(crate) fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// Stops the embedded instance, if this command started one, and waits for it.
    pub(crate) async fn close(self) -> anyhow::Result<()> {
        if let Some(embedded) = self.embedded {
            embedded.shutdown.cancel();
            embedded.task.await.context("the embedded drover crashed")??;
        }
        Ok(())
    }
}
