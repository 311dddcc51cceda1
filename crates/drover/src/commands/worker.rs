//! `drover worker` (run agents for a server) and `drover workers` (who is serving).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use drover_agents::{Agent, WorkerPool, WorkerPoolConfig, builtin};
use drover_bus::{Bus, BusOptions};
use drover_config::Config;
use drover_domain::WorkerId;
use drover_env::Deployments;
use drover_server::Mode;

use crate::cli::{GlobalArgs, WorkerArgs};
use crate::http_bus::{ApiSecrets, HttpBus};
use crate::output;
use crate::target::Target;

pub(crate) async fn work(
    global: &GlobalArgs,
    config: &Config,
    args: &WorkerArgs,
) -> anyhow::Result<ExitCode> {
    let target = Target::connect_existing(global, config).await?;
    let client = target.client.clone();
    let bootstrap = client.worker_bootstrap().await.context("cannot ask the server how to join")?;

    let deployments = Deployments::new();
    let definitions = config.agent_definitions()?;
    let agents =
        select_agents(&args.agent, &definitions, Arc::new(deployments.clone()), &config.data_dir)?;
    let heartbeat = Duration::from_millis(bootstrap.heartbeat_interval_ms.max(100));
    let options = BusOptions {
        capacity: config.bus.capacity,
        batch_size: bootstrap.batch_size,
        block_time: Duration::from_millis(bootstrap.block_time_ms),
        claim_idle: Duration::from_millis(bootstrap.claim_idle_ms),
        namespace: bootstrap.namespace.clone(),
    };
    let (bus, via): (Arc<dyn Bus>, String) = if config.bus.url != "embedded" {
        (drover_bus::connect(&config.bus.url, options).await?, config.bus.url.clone())
    } else if bootstrap.bus == "embedded" {
        (Arc::new(HttpBus::new(client.clone())), format!("{} (leasing over HTTP)", client.base()))
    } else if let Some(url) = &bootstrap.bus_url {
        (drover_bus::connect(url, options).await?, url.to_string())
    } else {
        bail!(
            "the server uses {} but does not advertise its URL; give this worker the broker with DROVER_BUS__URL",
            bootstrap.bus
        );
    };

    let worker_id = WorkerId::new(format!("{}-{}", hostname(), std::process::id()));
    let names: Vec<String> = agents.iter().map(|a| a.agent_type().to_string()).collect();
    let pool = WorkerPool::start(
        bus,
        agents,
        WorkerPoolConfig {
            worker_id: worker_id.clone(),
            concurrency: args.concurrency.unwrap_or(config.workers.concurrency).max(1),
            heartbeat_interval: heartbeat,
            kind: "external".to_owned(),
            secrets: Some(Arc::new(ApiSecrets(client.clone()))),
        },
    );
    if global.json {
        output::json(&serde_json::json!({ "worker_id": worker_id, "agents": names, "bus": via }));
    } else {
        output::note(format!(
            "worker {worker_id} serving {} via {via}; Ctrl-C stops it",
            names.join(", ")
        ));
    }
    super::interrupted().cancelled().await;
    output::note("stopping: finishing or handing back running stages…");
    pool.shutdown(config.server.shutdown_grace).await;
    deployments.stop_all(Duration::from_secs(5)).await;
    Ok(ExitCode::SUCCESS)
}

/// The agents (built-in and from `[agents]`) named on the command line (`all` for every
/// one).
fn select_agents(
    wanted: &[String],
    definitions: &[drover_domain::AgentDefinition],
    apps: Arc<dyn drover_env::apps::AppHost>,
    data_dir: &std::path::Path,
) -> anyhow::Result<Vec<Arc<dyn Agent>>> {
    let available = builtin::configured_agents(definitions, apps, data_dir);
    if wanted.iter().any(|w| w == "all") {
        return Ok(available);
    }
    let known: Vec<String> = available.iter().map(|a| a.agent_type().to_string()).collect();
    for name in wanted {
        if !known.contains(name) {
            bail!("unknown agent type `{name}`; this worker can run: {}", known.join(", "));
        }
    }
    Ok(available
        .into_iter()
        .filter(|a| wanted.iter().any(|w| w == a.agent_type().as_str()))
        .collect())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

pub(crate) async fn list(global: &GlobalArgs, config: &Config) -> anyhow::Result<ExitCode> {
    let target = Target::connect(global, config, Mode::Inspect).await?;
    let workers = target.client.workers().await;
    target.close().await?;
    let workers = workers?;
    if global.json {
        output::json(&workers);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = workers
        .items
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                w.status.clone(),
                w.kind.clone(),
                w.agents.join(","),
                w.concurrency.to_string(),
                w.hostname.clone(),
                w.last_seen_at.clone(),
            ]
        })
        .collect();
    output::table(
        &["WORKER", "STATUS", "KIND", "AGENTS", "CONCURRENCY", "HOST", "LAST SEEN"],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}
