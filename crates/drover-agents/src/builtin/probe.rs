//! HTTP probes shared by the e2e and deploy agents: wait for a health endpoint, then
//! check what the app answers.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{AgentFailure, Check, StageLog};

/// How long an app may take to answer its health probe after it starts.
pub(super) const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

pub(super) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        // Building a plain HTTP client only fails if the TLS backend cannot start, and
        // this client has none.
        .expect("plain HTTP client builds")
}

/// Polls `url` until it answers 2xx. `alive` reports whether the app process still runs;
/// an app that exits fails the probe at once instead of after the timeout.
pub(super) async fn wait_healthy<Alive>(
    client: &reqwest::Client,
    url: &str,
    cancel: &CancellationToken,
    mut alive: impl FnMut() -> Alive,
) -> Result<Duration, AgentFailure>
where
    Alive: std::future::Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    loop {
        alive().await.map_err(AgentFailure::transient)?;
        if let Ok(response) = client.get(url).send().await
            && response.status().is_success()
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > STARTUP_TIMEOUT {
            return Err(AgentFailure::transient(format!(
                "{url} did not answer within {}s",
                STARTUP_TIMEOUT.as_secs()
            )));
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(AgentFailure::transient("cancelled")),
            () = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct CheckResult {
    pub path: String,
    pub expected_status: u16,
    pub status: Option<u16>,
    pub passed: bool,
    pub problem: Option<String>,
}

/// Runs every check against `base` (no trailing slash), logging each outcome.
pub(super) async fn run_checks(
    client: &reqwest::Client,
    base: &str,
    checks: &[Check],
    log: &StageLog,
) -> Vec<CheckResult> {
    let mut results = Vec::with_capacity(checks.len());
    for check in checks {
        let url = format!("{base}{}", check.path);
        let result = match client.get(&url).send().await {
            Err(err) => CheckResult {
                path: check.path.clone(),
                expected_status: check.status,
                status: None,
                passed: false,
                problem: Some(format!("request failed: {err}")),
            },
            Ok(response) => {
                let status = response.status().as_u16();
                let body = response.text().await.unwrap_or_default();
                let problem = if status != check.status {
                    Some(format!("expected status {}, got {status}", check.status))
                } else {
                    check
                        .contains
                        .as_ref()
                        .filter(|needle| !body.contains(needle.as_str()))
                        .map(|needle| format!("body does not contain {needle:?}"))
                };
                CheckResult {
                    path: check.path.clone(),
                    expected_status: check.status,
                    status: Some(status),
                    passed: problem.is_none(),
                    problem,
                }
            }
        };
        let verdict = match &result.problem {
            None => "ok".to_owned(),
            Some(problem) => format!("FAIL: {problem}"),
        };
        log.line(format!("GET {} -> {:?} {verdict}", check.path, result.status)).await;
        results.push(result);
    }
    results
}

/// The failure describing every failed check, if any failed.
pub(super) fn failed_checks(results: &[CheckResult]) -> Option<AgentFailure> {
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| format!("GET {}: {}", r.path, r.problem.as_deref().unwrap_or("failed")))
        .collect();
    (!failed.is_empty()).then(|| AgentFailure::permanent(failed.join("; ")))
}
