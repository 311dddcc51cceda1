//! `drover webhooks add|ls|rm|test|deliveries|redeliver|enable`: the project's webhook
//! endpoints through the API. `add` prints the signing secret once (Standard Webhooks
//! `whsec_…`; it is never shown again). Deliveries are sent by a running server
//! (`drover up`/`serve`); without one, the commands work on the data directory through an
//! embedded instance, and what they queue is sent when a server next runs.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use drover_api::webhooks::{
    CreatedWebhookView, WebhookDeliveryPage, WebhookDeliveryView, WebhookList, WebhookView,
};
use drover_config::Config;
use drover_server::Mode;
use serde_json::json;

use crate::cli::GlobalArgs;
use crate::client::encode;
use crate::output;
use crate::target::Target;

#[derive(Debug, Subcommand)]
pub(crate) enum WebhooksCommand {
    /// Add an endpoint: the project's events are `POST`ed to URL, signed; prints the
    /// signing secret, once.
    Add {
        /// `http://` or `https://` URL.
        url: String,
        /// Only these kinds (`run.succeeded`) or families (`stage`), comma-separated
        /// (default: every kind).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// What it is for.
        #[arg(long)]
        description: Option<String>,
    },
    /// List the project's endpoints.
    Ls,
    /// Delete an endpoint and its delivery log.
    Rm { id: String },
    /// Send an endpoint a `webhook.test` delivery and wait for its answer.
    Test {
        id: String,
        /// How long to wait for the answer, in seconds.
        #[arg(long, default_value_t = 15)]
        wait: u64,
    },
    /// An endpoint's deliveries, newest first: status, attempts, last answer, latency.
    Deliveries {
        id: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Send a delivery again, now, under the same id.
    Redeliver { id: String, delivery: String },
    /// Enable an endpoint again (after it was disabled); its failure count starts over.
    Enable { id: String },
}

pub(crate) async fn webhooks(
    global: &GlobalArgs,
    config: &Config,
    command: WebhooksCommand,
) -> anyhow::Result<ExitCode> {
    let target = Target::connect(global, config, Mode::Inspect).await?;
    let result = run(global, &target, command).await;
    target.close().await?;
    result
}

fn state(webhook: &WebhookView) -> String {
    match (webhook.enabled, &webhook.breaker_open_until) {
        (false, _) => "disabled".to_owned(),
        (true, Some(until)) => format!("paused until {until}"),
        (true, None) => "enabled".to_owned(),
    }
}

fn kinds(webhook: &WebhookView) -> String {
    if webhook.kinds.is_empty() { "*".to_owned() } else { webhook.kinds.join(",") }
}

/// `HTTP 200 in 12 ms`, or why there was no answer.
fn answer(delivery: &WebhookDeliveryView) -> String {
    match (delivery.last_status_code, &delivery.last_error) {
        (Some(code), _) => format!(
            "HTTP {code}{}",
            delivery.latency_ms.map(|ms| format!(" in {ms} ms")).unwrap_or_default()
        ),
        (None, Some(error)) => error.clone(),
        (None, None) => String::new(),
    }
}

async fn run(
    global: &GlobalArgs,
    target: &Target,
    command: WebhooksCommand,
) -> anyhow::Result<ExitCode> {
    let client = &target.client;
    match command {
        WebhooksCommand::Add { url, kinds, description } => {
            let body = json!({ "url": url, "kinds": kinds, "description": description });
            let created: CreatedWebhookView =
                client.send_json(reqwest::Method::POST, "/webhooks", &body).await?;
            if global.json {
                output::json(&created);
            } else {
                output::data(&created.secret);
                output::note(format!(
                    "webhook {} added; the line above is its signing secret, shown this once: \
                     verify deliveries with it (Standard Webhooks)",
                    created.webhook.id
                ));
            }
        }
        WebhooksCommand::Ls => {
            let list: WebhookList = client.get("/webhooks", &[]).await?;
            if global.json {
                output::json(&list);
            } else {
                let rows: Vec<Vec<String>> = list
                    .items
                    .iter()
                    .map(|w| {
                        vec![
                            w.id.clone(),
                            state(w),
                            kinds(w),
                            w.consecutive_failures.to_string(),
                            output::truncate(&w.url, 60),
                            w.description.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                output::table(&["ID", "STATE", "KINDS", "FAILURES", "URL", "DESCRIPTION"], &rows);
                for w in list.items.iter().filter(|w| !w.enabled) {
                    if let Some(reason) = &w.disabled_reason {
                        output::note(format!("{}: {reason}", w.id));
                    }
                }
            }
        }
        WebhooksCommand::Rm { id } => {
            client.delete(&format!("/webhooks/{}", encode(&id))).await?;
            if global.json {
                output::json(&json!({ "deleted": id }));
            } else {
                output::note(format!("webhook {id} deleted"));
            }
        }
        WebhooksCommand::Test { id, wait } => return test(global, target, &id, wait).await,
        WebhooksCommand::Deliveries { id, limit } => {
            let path = format!("/webhooks/{}/deliveries", encode(&id));
            let page: WebhookDeliveryPage =
                client.get(&path, &[("limit", limit.to_string())]).await?;
            if global.json {
                output::json(&page);
            } else {
                let rows: Vec<Vec<String>> = page
                    .items
                    .iter()
                    .map(|d| {
                        vec![
                            d.id.clone(),
                            d.kind.clone(),
                            d.status.clone(),
                            d.attempts.to_string(),
                            output::truncate(&answer(d), 50),
                            d.next_attempt_at.clone().unwrap_or_default(),
                            d.created_at.clone(),
                        ]
                    })
                    .collect();
                output::table(
                    &["ID", "KIND", "STATUS", "ATTEMPTS", "LAST ANSWER", "NEXT", "CREATED"],
                    &rows,
                );
            }
        }
        WebhooksCommand::Redeliver { id, delivery } => {
            let path =
                format!("/webhooks/{}/deliveries/{}/redeliver", encode(&id), encode(&delivery));
            let queued: WebhookDeliveryView =
                client.send_json(reqwest::Method::POST, &path, &json!({})).await?;
            if global.json {
                output::json(&queued);
            } else {
                output::note(format!("delivery {} queued again", queued.id));
            }
        }
        WebhooksCommand::Enable { id } => {
            let path = format!("/webhooks/{}/enable", encode(&id));
            let webhook: WebhookView =
                client.send_json(reqwest::Method::POST, &path, &json!({})).await?;
            if global.json {
                output::json(&webhook);
            } else {
                output::note(format!("webhook {} enabled", webhook.id));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Queues a test delivery and follows it until it is answered or `wait` seconds pass.
async fn test(
    global: &GlobalArgs,
    target: &Target,
    id: &str,
    wait: u64,
) -> anyhow::Result<ExitCode> {
    let client = &target.client;
    let path = format!("/webhooks/{}/test", encode(id));
    let queued: WebhookDeliveryView =
        client.send_json(reqwest::Method::POST, &path, &json!({})).await?;
    if target.is_embedded() {
        if global.json {
            output::json(&queued);
        }
        output::note(format!(
            "test delivery {} queued; no server is running, so it is sent when one starts",
            queued.id
        ));
        return Ok(ExitCode::SUCCESS);
    }
    let one = format!("/webhooks/{}/deliveries/{}", encode(id), encode(&queued.id));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let mut latest = queued;
    while latest.attempts == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        latest = client.get(&one, &[]).await?;
    }
    if global.json {
        output::json(&latest);
    }
    match latest.status.as_str() {
        "succeeded" => {
            output::note(format!("delivered: {}", answer(&latest)));
            Ok(ExitCode::SUCCESS)
        }
        _ if latest.attempts == 0 => {
            output::note(format!(
                "delivery {} not sent yet; see `drover webhooks deliveries {id}`",
                latest.id
            ));
            Ok(ExitCode::FAILURE)
        }
        status => {
            let next = latest
                .next_attempt_at
                .as_deref()
                .map(|at| format!("; next attempt at {at}"))
                .unwrap_or_default();
            output::note(format!("{status}: {}{next}", answer(&latest)));
            Ok(ExitCode::FAILURE)
        }
    }
}
