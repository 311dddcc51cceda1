//! A typed client for `/api/v1`, used by every command that talks to a server.

use std::time::Duration;

use drover_api::Problem;
use drover_api::environments::{
    CreateEnvironmentBody, EnvironmentPage, EnvironmentView, ServicesOverview,
};
use drover_api::wire::{
    AttemptView, CreateRun, DeadLetterPage, DeadLetterView, EventView, LeaseRequest, PipelineList,
    RunPage, RunView, TaskSecretsRequest, TaskSecretsView, WorkerBootstrap, WorkerList,
    WorkerMessageAck,
};
use drover_bus::{TaskEnvelope, WorkerMessage};
use futures::{Stream, StreamExt};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;

use crate::sse::SseParser;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("cannot reach the drover server at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("{}", describe_problem(.0))]
    Api(Box<Problem>),
    #[error("unexpected response from the server ({status}): {body}")]
    Unexpected { status: StatusCode, body: String },
}

/// `Title: detail [code]`, with the field errors instead of the summary when there are
/// any: `Validation failed: request: must not be empty [validation_failed]`.
fn describe_problem(problem: &Problem) -> String {
    let detail = if problem.errors.is_empty() {
        problem.detail.clone()
    } else {
        problem
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ")
    };
    format!("{}: {detail} [{}]", problem.title, problem.code)
}

#[derive(Clone)]
pub(crate) struct Client {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
    /// The project requests act in (`X-Drover-Project`); the server's default if `None`.
    project: Option<String>,
}

impl Client {
    pub(crate) fn new(base: &str, token: Option<String>) -> Self {
        let base = base.trim_end_matches('/').to_owned();
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        if is_loopback(&base) {
            builder = builder.no_proxy();
        }
        // A client without TLS settings always builds.
        let http = builder.build().expect("HTTP client builds");
        Self { base, http, token, project: None }
    }

    pub(crate) fn set_project(&mut self, project: Option<String>) {
        self.project = project;
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(project) = &self.project {
            request = request.header("x-drover-project", project);
        }
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(&self, request: RequestBuilder) -> Result<Response, ClientError> {
        let response = request.send().await.map_err(|err| ClientError::Unreachable {
            url: self.base.clone(),
            message: describe(&err),
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        match serde_json::from_str::<Problem>(&body) {
            Ok(problem) => Err(ClientError::Api(Box::new(problem))),
            Err(_) => Err(ClientError::Unexpected { status, body }),
        }
    }

    async fn json<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T, ClientError> {
        let response = self.send(request).await?;
        let status = response.status();
        let body = response.text().await.map_err(|err| ClientError::Unreachable {
            url: self.base.clone(),
            message: describe(&err),
        })?;
        serde_json::from_str(&body).map_err(|_| ClientError::Unexpected { status, body })
    }

    /// Whether a drover server answers `GET /healthz` within `timeout`.
    pub(crate) async fn is_up(&self, timeout: Duration) -> bool {
        let request = self.request(reqwest::Method::GET, "/healthz").timeout(timeout);
        matches!(request.send().await, Ok(response) if response.status().is_success())
    }

    pub(crate) async fn create_run(
        &self,
        request: &str,
        pipeline: &str,
        environment: Option<&str>,
        budget: Option<drover_api::wire::BudgetBody>,
    ) -> Result<RunView, ClientError> {
        let body = CreateRun {
            request: request.to_owned(),
            pipeline: Some(pipeline.to_owned()),
            environment: environment.map(str::to_owned),
            budget,
        };
        self.json(self.request(reqwest::Method::POST, "/api/v1/runs").json(&body)).await
    }

    pub(crate) async fn get_run(&self, id: &str) -> Result<RunView, ClientError> {
        self.json(self.request(reqwest::Method::GET, &format!("/api/v1/runs/{}", encode(id)))).await
    }

    pub(crate) async fn list_runs(
        &self,
        status: Option<&str>,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<RunPage, ClientError> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(status) = status {
            query.push(("status", status.to_owned()));
        }
        if let Some(cursor) = cursor {
            query.push(("cursor", cursor.to_owned()));
        }
        self.json(self.request(reqwest::Method::GET, "/api/v1/runs").query(&query)).await
    }

    pub(crate) async fn cancel_run(&self, id: &str) -> Result<RunView, ClientError> {
        let path = format!("/api/v1/runs/{}/cancel", encode(id));
        self.json(self.request(reqwest::Method::POST, &path)).await
    }

    /// Approves (`approve = true`) or rejects a run's gated stage.
    pub(crate) async fn decide_stage(
        &self,
        id: &str,
        stage: &str,
        approve: bool,
        reason: Option<&str>,
    ) -> Result<RunView, ClientError> {
        let verb = if approve { "approve" } else { "reject" };
        let path = format!("/api/v1/runs/{}/stages/{}/{verb}", encode(id), encode(stage));
        let body = drover_api::wire::ApprovalBody { reason: reason.map(str::to_owned) };
        self.json(self.request(reqwest::Method::POST, &path).json(&body)).await
    }

    pub(crate) async fn usage(
        &self,
        hours: u64,
    ) -> Result<drover_api::wire::UsageReportView, ClientError> {
        let query = [("hours", hours.to_string())];
        self.json(self.request(reqwest::Method::GET, "/api/v1/usage").query(&query)).await
    }

    /// A `GET` of `path` (under `/api/v1`) as JSON.
    pub(crate) async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ClientError> {
        self.json(self.request(reqwest::Method::GET, &format!("/api/v1{path}")).query(query)).await
    }

    /// A `method` of `path` (under `/api/v1`) with a JSON body, answered with JSON.
    pub(crate) async fn send_json<B: serde::Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.json(self.request(method, &format!("/api/v1{path}")).json(body)).await
    }

    /// A `DELETE` of `path` (under `/api/v1`), whatever it answers on success.
    pub(crate) async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.send(self.request(reqwest::Method::DELETE, &format!("/api/v1{path}"))).await.map(drop)
    }

    pub(crate) async fn workers(&self) -> Result<WorkerList, ClientError> {
        self.json(self.request(reqwest::Method::GET, "/api/v1/workers")).await
    }

    pub(crate) async fn worker_bootstrap(&self) -> Result<WorkerBootstrap, ClientError> {
        self.json(self.request(reqwest::Method::GET, "/api/v1/workers/config")).await
    }

    /// Waits up to `wait` for a task of one of `agents`; `None` when none came.
    pub(crate) async fn lease(
        &self,
        agents: &[String],
        wait: Duration,
    ) -> Result<Option<TaskEnvelope>, ClientError> {
        let body = LeaseRequest {
            agents: agents.to_vec(),
            wait_ms: Some(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
        };
        let response = self
            .send(self.request(reqwest::Method::POST, "/api/v1/tasks/lease").json(&body))
            .await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let status = response.status();
        let body = response.text().await.map_err(|err| ClientError::Unreachable {
            url: self.base.clone(),
            message: describe(&err),
        })?;
        serde_json::from_str(&body).map(Some).map_err(|_| ClientError::Unexpected { status, body })
    }

    pub(crate) async fn worker_message(
        &self,
        message: &WorkerMessage,
    ) -> Result<WorkerMessageAck, ClientError> {
        self.json(self.request(reqwest::Method::POST, "/api/v1/worker-messages").json(message))
            .await
    }

    /// The values of the project's secrets for the attempt this worker holds (`envelope`).
    /// A body that is not the expected JSON is reported without quoting it: it may hold a
    /// value.
    pub(crate) async fn task_secrets(
        &self,
        envelope: &TaskEnvelope,
    ) -> Result<drover_domain::SecretValues, ClientError> {
        let body = TaskSecretsRequest {
            project_id: envelope.project_id.to_string(),
            fencing_token: envelope.fencing_token.0,
        };
        let path = format!("/api/v1/tasks/{}/secrets", envelope.task_id);
        let response = self.send(self.request(reqwest::Method::POST, &path).json(&body)).await?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|err| ClientError::Unreachable {
            url: self.base.clone(),
            message: describe(&err),
        })?;
        serde_json::from_slice::<TaskSecretsView>(&bytes).map(|view| view.secrets).map_err(|_| {
            ClientError::Unexpected {
                status,
                body: "(an answer that is not the secrets)".to_owned(),
            }
        })
    }

    pub(crate) async fn dead_letters(
        &self,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<DeadLetterPage, ClientError> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(cursor) = cursor {
            query.push(("cursor", cursor.to_owned()));
        }
        self.json(self.request(reqwest::Method::GET, "/api/v1/dlq").query(&query)).await
    }

    pub(crate) async fn redrive(&self, id: &str) -> Result<AttemptView, ClientError> {
        let path = format!("/api/v1/dlq/{}/redrive", encode(id));
        self.json(self.request(reqwest::Method::POST, &path)).await
    }

    pub(crate) async fn discard(&self, id: &str) -> Result<DeadLetterView, ClientError> {
        let path = format!("/api/v1/dlq/{}/discard", encode(id));
        self.json(self.request(reqwest::Method::POST, &path)).await
    }

    pub(crate) async fn create_environment(
        &self,
        body: &CreateEnvironmentBody,
    ) -> Result<EnvironmentView, ClientError> {
        self.json(self.request(reqwest::Method::POST, "/api/v1/environments").json(body)).await
    }

    pub(crate) async fn environments(&self, all: bool) -> Result<EnvironmentPage, ClientError> {
        let query = [("all", all.to_string()), ("limit", "200".to_owned())];
        self.json(self.request(reqwest::Method::GET, "/api/v1/environments").query(&query)).await
    }

    pub(crate) async fn environment(&self, env: &str) -> Result<EnvironmentView, ClientError> {
        let path = format!("/api/v1/environments/{}", encode(env));
        self.json(self.request(reqwest::Method::GET, &path)).await
    }

    /// `start` or `stop`.
    pub(crate) async fn environment_action(
        &self,
        env: &str,
        action: &str,
    ) -> Result<EnvironmentView, ClientError> {
        let path = format!("/api/v1/environments/{}/{action}", encode(env));
        self.json(self.request(reqwest::Method::POST, &path)).await
    }

    pub(crate) async fn delete_environment(
        &self,
        env: &str,
        force: bool,
    ) -> Result<EnvironmentView, ClientError> {
        let path = format!("/api/v1/environments/{}", encode(env));
        let query = [("force", force.to_string())];
        self.json(self.request(reqwest::Method::DELETE, &path).query(&query)).await
    }

    pub(crate) async fn services_overview(&self) -> Result<ServicesOverview, ClientError> {
        self.json(self.request(reqwest::Method::GET, "/api/v1/services")).await
    }

    pub(crate) async fn routes(&self) -> Result<drover_api::routes::RouteList, ClientError> {
        self.json(self.request(reqwest::Method::GET, "/api/v1/routes")).await
    }

    /// A service's log file, or (following) its new lines as SSE data.
    pub(crate) async fn service_log(
        &self,
        env: &str,
        service: &str,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<Vec<u8>, ClientError>> + use<>, ClientError> {
        let path =
            format!("/api/v1/environments/{}/services/{}/logs", encode(env), encode(service));
        let response = self
            .send(
                self.request(reqwest::Method::GET, &path).query(&[("follow", follow.to_string())]),
            )
            .await?;
        let base = self.base.clone();
        let mut parser = SseParser::default();
        Ok(response.bytes_stream().map(move |chunk| {
            let chunk = chunk.map_err(|err| ClientError::Unreachable {
                url: base.clone(),
                message: describe(&err),
            })?;
            if !follow {
                return Ok(chunk.to_vec());
            }
            Ok(parser.push(&chunk).into_iter().flat_map(|m| (m.data + "\n").into_bytes()).collect())
        }))
    }

    pub(crate) async fn artifacts(
        &self,
        id: &str,
        stage: Option<&str>,
    ) -> Result<drover_api::artifacts::ArtifactList, ClientError> {
        let path = format!("/api/v1/runs/{}/artifacts", encode(id));
        let query: Vec<(&str, &str)> = stage.map(|s| ("stage", s)).into_iter().collect();
        self.json(self.request(reqwest::Method::GET, &path).query(&query)).await
    }

    /// One artifact's bytes, as they arrive.
    pub(crate) async fn artifact(
        &self,
        id: &str,
        name: &str,
    ) -> Result<impl Stream<Item = Result<Vec<u8>, ClientError>> + use<>, ClientError> {
        // Declared output files are named `STAGE.N.outputs/PATH`: keep the slashes.
        let name: Vec<String> = name.split('/').map(encode).collect();
        let path = format!("/api/v1/runs/{}/artifacts/{}", encode(id), name.join("/"));
        let response = self.send(self.request(reqwest::Method::GET, &path)).await?;
        let base = self.base.clone();
        Ok(response.bytes_stream().map(move |chunk| {
            chunk.map(|bytes| bytes.to_vec()).map_err(|err| ClientError::Unreachable {
                url: base.clone(),
                message: describe(&err),
            })
        }))
    }

    pub(crate) async fn agents(&self) -> Result<drover_api::wire::AgentList, ClientError> {
        self.json(self.request(reqwest::Method::GET, "/api/v1/agents")).await
    }

    pub(crate) async fn pipelines(&self) -> Result<PipelineList, ClientError> {
        self.json(self.request(reqwest::Method::GET, "/api/v1/pipelines")).await
    }

    /// The run's logs as a stream of byte chunks; following, the output as it is written
    /// until the run ends, each attempt headed like in the plain listing.
    pub(crate) async fn logs(
        &self,
        id: &str,
        stage: Option<&str>,
        attempt: Option<u32>,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<Vec<u8>, ClientError>> + use<>, ClientError> {
        let mut query = vec![("follow", follow.to_string())];
        if let Some(stage) = stage {
            query.push(("stage", stage.to_owned()));
        }
        if let Some(attempt) = attempt {
            query.push(("attempt", attempt.to_string()));
        }
        let path = format!("/api/v1/runs/{}/logs", encode(id));
        let response = self.send(self.request(reqwest::Method::GET, &path).query(&query)).await?;
        let base = self.base.clone();
        let mut parser = SseParser::default();
        Ok(response.bytes_stream().map(move |chunk| {
            let chunk = chunk.map_err(|err| ClientError::Unreachable {
                url: base.clone(),
                message: describe(&err),
            })?;
            if !follow {
                return Ok(chunk.to_vec());
            }
            let mut text = Vec::new();
            for message in parser.push(&chunk) {
                match message.event.as_deref() {
                    Some("attempt") => {
                        let header: serde_json::Value =
                            serde_json::from_str(&message.data).unwrap_or_default();
                        text.extend(
                            format!(
                                "==> {} attempt {} <==\n",
                                header["stage"].as_str().unwrap_or("?"),
                                header["attempt"]
                            )
                            .into_bytes(),
                        );
                    }
                    Some("line") => text.extend((message.data + "\n").into_bytes()),
                    _ => {}
                }
            }
            Ok(text)
        }))
    }

    /// `POST`s `body` to `path` (under `/api/v1`) and reads the answer as server-sent
    /// events, as they arrive. A dropped connection ends the stream with an error.
    pub(crate) async fn post_sse<B: serde::Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<impl Stream<Item = Result<crate::sse::SseMessage, ClientError>> + use<B>, ClientError>
    {
        let request = self
            .request(reqwest::Method::POST, &format!("/api/v1{path}"))
            .header("accept", "text/event-stream")
            .json(body);
        let response = self.send(request).await?;
        let base = self.base.clone();
        let mut parser = SseParser::default();
        Ok(response
            .bytes_stream()
            .map(move |chunk| match chunk {
                Ok(bytes) => parser.push(&bytes).into_iter().map(Ok).collect::<Vec<_>>(),
                Err(err) => vec![Err(ClientError::Unreachable {
                    url: base.clone(),
                    message: describe(&err),
                })],
            })
            .flat_map(futures::stream::iter))
    }

    /// The run's events from `after` on, as they happen; ends when the run ends or the
    /// connection drops (resume with the last seen `seq`).
    pub(crate) async fn events(
        &self,
        id: &str,
        after: Option<i64>,
    ) -> Result<impl Stream<Item = Result<EventView, ClientError>> + use<>, ClientError> {
        let path = format!("/api/v1/runs/{}/events", encode(id));
        let mut request =
            self.request(reqwest::Method::GET, &path).header("accept", "text/event-stream");
        if let Some(after) = after {
            request = request.header("last-event-id", after.to_string());
        }
        let response = self.send(request).await?;
        let base = self.base.clone();
        let mut parser = SseParser::default();
        Ok(response
            .bytes_stream()
            .map(move |chunk| match chunk {
                Ok(bytes) => parser
                    .push(&bytes)
                    .into_iter()
                    .filter_map(|message| serde_json::from_str::<EventView>(&message.data).ok())
                    .map(Ok)
                    .collect::<Vec<_>>(),
                Err(err) => vec![Err(ClientError::Unreachable {
                    url: base.clone(),
                    message: describe(&err),
                })],
            })
            .flat_map(futures::stream::iter))
    }
}

fn is_loopback(base: &str) -> bool {
    let host = base.split("://").nth(1).unwrap_or(base);
    host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")
}

/// Ids are UUIDs, but a user may type anything: keep the path intact.
pub(crate) fn encode(segment: &str) -> String {
    segment
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.~".contains(c) {
                c.to_string()
            } else {
                format!("%{:02X}", c as u32 & 0xff)
            }
        })
        .collect()
}

/// reqwest's error chain, flattened to one line.
fn describe(err: &reqwest::Error) -> String {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
