//! The Docker provider: a service with an `image` runs in a container, driven through the
//! Docker Engine API over its Unix socket.
//!
//! The container shares the host's network (so `PORT`, the port block and the proxy work
//! exactly as for a local process), sees the workspace at the same path, gets the memory
//! limit as its cgroup limit, and carries labels naming the drover data directory it
//! belongs to, so a restarted server removes what a killed one left behind. Its output is
//! the engine's multiplexed log stream, split back into stdout and stderr.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::ProcessError;
use crate::provider::{ExitInfo, Launch, Output, Provider, SpawnedProcess};

/// The Engine API version spoken: Docker 20.10 and later.
const API_VERSION: &str = "v1.41";
/// Label on every container drover starts.
const MANAGED_LABEL: &str = "dev.drover.managed";
/// Label naming the data directory (the drover installation) a container belongs to.
const HOME_LABEL: &str = "dev.drover.home";
/// Label naming the service instance.
const INSTANCE_LABEL: &str = "dev.drover.instance";
/// The timeout of calls that last as long as the container runs (wait, log follow).
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);
/// Output buffered per stream between the engine and the log writer.
const OUTPUT_BUFFER: usize = 64 * 1024;

/// Starts service instances as containers.
#[derive(Clone)]
pub struct DockerProvider {
    api: EngineApi,
    /// The data directory: containers are labelled with it and named after a hash of it.
    home: String,
}

impl DockerProvider {
    /// A provider for the engine listening on `socket`, for the drover installation whose
    /// data directory is `home`. Nothing is contacted until the first container starts.
    pub fn new(socket: &Path, home: &Path) -> Result<Self, ProcessError> {
        Ok(Self { api: EngineApi::new(socket)?, home: home.display().to_string() })
    }

    /// Whether the engine answers, with its version, or why not.
    pub async fn ping(&self) -> Result<String, ProcessError> {
        let version: VersionInfo = self.api.get_json("/version").await?;
        Ok(version.version)
    }

    fn container_name(&self, instance: &str) -> String {
        let mut hash: u32 = 0x811c_9dc5;
        for byte in self.home.bytes() {
            hash = (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193);
        }
        let instance: String = instance
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        format!("drover-{hash:08x}-{instance}")
    }

    async fn create(&self, launch: &Launch<'_>, image: &str) -> Result<String, ProcessError> {
        let command = launch.command;
        let mut cmd: Vec<&str> = Vec::new();
        if !command.program.trim().is_empty() {
            cmd.push(&command.program);
            cmd.extend(command.args.iter().map(String::as_str));
        }
        let workspace = command.cwd.display().to_string();
        let binds: Vec<String> =
            if command.cwd.is_dir() { vec![format!("{workspace}:{workspace}")] } else { vec![] };
        let body = json!({
            "Image": image,
            "Cmd": if cmd.is_empty() { serde_json::Value::Null } else { json!(cmd) },
            "Env": command.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "WorkingDir": if binds.is_empty() { serde_json::Value::Null } else { json!(workspace) },
            "Labels": {
                MANAGED_LABEL: "true",
                HOME_LABEL: self.home,
                INSTANCE_LABEL: launch.instance,
            },
            "AttachStdout": true,
            "AttachStderr": true,
            "Tty": false,
            "HostConfig": {
                "NetworkMode": "host",
                "Binds": binds,
                "Memory": launch.memory_limit_bytes.unwrap_or(0),
                "Init": true,
            },
        });
        let name = self.container_name(launch.instance);
        let path = format!("/containers/create?name={name}");
        let mut pulled = false;
        let mut cleared = false;
        loop {
            match self.api.post_json::<Created>(&path, &body).await {
                Ok(created) => return Ok(created.id),
                Err(EngineError::Status { status: 404, .. }) if !pulled => {
                    pulled = true;
                    self.pull(image).await?;
                }
                // A container of the same name: left behind by a killed server.
                Err(EngineError::Status { status: 409, .. }) if !cleared => {
                    cleared = true;
                    self.api.remove(&name).await;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    async fn pull(&self, image: &str) -> Result<(), ProcessError> {
        tracing::info!(image, "pulling image");
        let (name, tag) = split_image(image);
        let mut query = vec![("fromImage", name)];
        if let Some(tag) = tag {
            query.push(("tag", tag));
        }
        let response = self
            .api
            .request(reqwest::Method::POST, "/images/create")
            .query(&query)
            .send()
            .await
            .map_err(|e| self.api.unreachable(e))?;
        let response = EngineApi::check(response).await?;
        // The body is a stream of JSON progress objects; an `error` in any of them fails.
        let mut body = response.bytes_stream();
        let mut tail = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| ProcessError::Provider(format!("pulling {image}: {e}")))?;
            tail.extend_from_slice(&chunk);
            while let Some(end) = tail.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = tail.drain(..=end).collect();
                if let Ok(progress) = serde_json::from_slice::<PullProgress>(&line)
                    && let Some(error) = progress.error
                {
                    return Err(ProcessError::Provider(format!("pulling {image}: {error}")));
                }
            }
            // A line longer than this is not progress; keep memory bounded.
            if tail.len() > OUTPUT_BUFFER {
                tail.clear();
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Provider for DockerProvider {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn spawn(&self, launch: &Launch<'_>) -> Result<Box<dyn SpawnedProcess>, ProcessError> {
        let image = launch.image.ok_or_else(|| {
            ProcessError::Provider("the Docker provider needs an image".to_owned())
        })?;
        let id = self.create(launch, image).await?;
        let started = self.api.post_empty(&format!("/containers/{id}/start")).await;
        if let Err(err) = started {
            self.api.remove(&id).await;
            return Err(err.into());
        }
        let inspected: Inspect = match self.api.get_json(&format!("/containers/{id}/json")).await {
            Ok(inspected) => inspected,
            Err(err) => {
                self.api.remove(&id).await;
                return Err(err.into());
            }
        };
        let output = follow_logs(&self.api, &id).await;
        Ok(Box::new(Container {
            api: self.api.clone(),
            id,
            pid: u32::try_from(inspected.state.pid).ok().filter(|pid| *pid > 0),
            output,
            limits_memory: launch.memory_limit_bytes.is_some(),
        }))
    }

    async fn sweep_orphans(&self) -> usize {
        let filters = json!({ "label": [format!("{HOME_LABEL}={}", self.home)] }).to_string();
        let listed: Result<Vec<Listed>, EngineError> = self
            .api
            .get_json_query("/containers/json", &[("all", "true"), ("filters", &filters)])
            .await;
        match listed {
            Ok(containers) => {
                for container in &containers {
                    tracing::warn!(container = %container.id, "removing a container a previous server left behind");
                    self.api.remove(&container.id).await;
                }
                containers.len()
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot list containers for the orphan sweep");
                0
            }
        }
    }
}

/// A running container.
struct Container {
    api: EngineApi,
    id: String,
    pid: Option<u32>,
    output: Option<(Output, Output)>,
    limits_memory: bool,
}

#[async_trait]
impl SpawnedProcess for Container {
    fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn limits_memory(&self) -> bool {
        self.limits_memory
    }

    fn take_output(&mut self) -> Option<(Output, Output)> {
        self.output.take()
    }

    async fn wait(&mut self) -> ExitInfo {
        let path = format!("/containers/{}/wait?condition=not-running", self.id);
        let waited = self
            .api
            .request(reqwest::Method::POST, &path)
            // Waiting lasts as long as the container runs.
            .timeout(FOREVER)
            .send()
            .await;
        let waited = match waited {
            Ok(response) => match EngineApi::check(response).await {
                Ok(response) => response.json::<Waited>().await.map_err(|e| e.to_string()),
                Err(err) => Err(err.to_string()),
            },
            Err(err) => Err(err.to_string()),
        };
        let oom_killed =
            match self.api.get_json::<Inspect>(&format!("/containers/{}/json", self.id)).await {
                Ok(inspected) => inspected.state.oom_killed,
                Err(_) => false,
            };
        match waited {
            Ok(_) if oom_killed => ExitInfo {
                success: false,
                description: "memory limit: killed by the kernel (container over its limit)"
                    .to_owned(),
            },
            Ok(Waited { status_code: 0, .. }) => {
                ExitInfo { success: true, description: "exited with code 0".to_owned() }
            }
            Ok(Waited { status_code, error }) => ExitInfo {
                success: false,
                description: match error.and_then(|e| e.message).filter(|m| !m.is_empty()) {
                    Some(message) => format!("exited with code {status_code}: {message}"),
                    None => format!("exited with code {status_code}"),
                },
            },
            Err(err) => ExitInfo {
                success: false,
                description: format!("lost track of container {}: {err}", short(&self.id)),
            },
        }
    }

    async fn terminate(&mut self, grace: Duration) {
        let seconds = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let path = format!("/containers/{}/stop?t={seconds}", self.id);
        let stop = self
            .api
            .request(reqwest::Method::POST, &path)
            .timeout(grace + Duration::from_secs(10))
            .send()
            .await;
        if let Err(err) = stop {
            tracing::warn!(container = %short(&self.id), error = %err, "stopping a container failed");
        }
    }

    fn kill_group(&mut self) {
        // Removing with force kills whatever still runs; the container is gone after.
        let api = self.api.clone();
        let id = self.id.clone();
        tokio::spawn(async move { api.remove(&id).await });
    }
}

/// Follows the container's log stream from its start, split into stdout and stderr.
async fn follow_logs(api: &EngineApi, id: &str) -> Option<(Output, Output)> {
    let path = format!("/containers/{id}/logs");
    let response = api
        .request(reqwest::Method::GET, &path)
        .query(&[("follow", "true"), ("stdout", "true"), ("stderr", "true")])
        .timeout(FOREVER)
        .send()
        .await
        .ok()?;
    let response = EngineApi::check(response).await.ok()?;
    let (mut out_writer, out_reader) = tokio::io::duplex(OUTPUT_BUFFER);
    let (mut err_writer, err_reader) = tokio::io::duplex(OUTPUT_BUFFER);
    tokio::spawn(async move {
        let mut frames = Demultiplexer::default();
        let mut body = response.bytes_stream();
        while let Some(Ok(chunk)) = body.next().await {
            for (stream, payload) in frames.push(&chunk) {
                let writer = if stream == 2 { &mut err_writer } else { &mut out_writer };
                if writer.write_all(&payload).await.is_err() {
                    return;
                }
            }
        }
    });
    Some((Box::new(out_reader), Box::new(err_reader)))
}

/// Splits the engine's multiplexed stream: frames of an 8-byte header (stream type, three
/// zero bytes, big-endian payload length) and the payload.
#[derive(Default)]
pub struct Demultiplexer {
    pending: Vec<u8>,
}

impl Demultiplexer {
    /// Feeds bytes in; returns the complete frames as (stream, payload), stream 1 being
    /// stdout and 2 stderr.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        self.pending.extend_from_slice(bytes);
        let mut frames = Vec::new();
        while let Some(header) = self.pending.get(..8) {
            let stream = header[0];
            let length = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
            if self.pending.len() < 8 + length {
                break;
            }
            let payload = self.pending[8..8 + length].to_vec();
            self.pending.drain(..8 + length);
            frames.push((stream, payload));
        }
        frames
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// `repo/name:tag` → (`repo/name`, `tag`); a digest stays with the name.
fn split_image(image: &str) -> (&str, Option<&str>) {
    if image.contains('@') {
        return (image, None);
    }
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
        _ => (image, None),
    }
}

#[derive(Debug, thiserror::Error)]
enum EngineError {
    #[error("the Docker engine at {socket} cannot be reached: {reason}")]
    Unreachable { socket: String, reason: String },
    #[error("the Docker engine answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("the Docker engine's answer is not understood: {0}")]
    Decode(String),
}

impl From<EngineError> for ProcessError {
    fn from(err: EngineError) -> Self {
        ProcessError::Provider(err.to_string())
    }
}

/// The few Engine API calls drover makes, over the Unix socket.
#[derive(Clone)]
struct EngineApi {
    http: reqwest::Client,
    socket: PathBuf,
}

impl EngineApi {
    fn new(socket: &Path) -> Result<Self, ProcessError> {
        let http = reqwest::Client::builder()
            .unix_socket(socket)
            .timeout(Duration::from_secs(600))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ProcessError::Provider(format!("cannot set up a Docker client: {e}")))?;
        Ok(Self { http, socket: socket.to_path_buf() })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        // The host is ignored on a Unix socket; the engine wants a version prefix.
        self.http.request(method, format!("http://docker/{API_VERSION}{path}"))
    }

    fn unreachable(&self, err: reqwest::Error) -> EngineError {
        EngineError::Unreachable {
            socket: self.socket.display().to_string(),
            reason: err.to_string(),
        }
    }

    async fn check(response: reqwest::Response) -> Result<reqwest::Response, EngineError> {
        let status = response.status();
        if status.is_success() || status == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<EngineMessage>(&text)
            .map(|m| m.message)
            .unwrap_or_else(|_| text.chars().take(200).collect());
        Err(EngineError::Status { status: status.as_u16(), message })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, EngineError> {
        self.get_json_query(path, &[]).await
    }

    async fn get_json_query<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, EngineError> {
        let response = self
            .request(reqwest::Method::GET, path)
            .query(query)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let response = Self::check(response).await?;
        response.json().await.map_err(|e| EngineError::Decode(e.to_string()))
    }

    async fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, EngineError> {
        let response = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let response = Self::check(response).await?;
        response.json().await.map_err(|e| EngineError::Decode(e.to_string()))
    }

    async fn post_empty(&self, path: &str) -> Result<(), EngineError> {
        let response = self
            .request(reqwest::Method::POST, path)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        Self::check(response).await.map(drop)
    }

    /// Removes a container (by id or name), killing it if it runs. Gone already is fine.
    async fn remove(&self, id: &str) {
        let removed = self
            .request(reqwest::Method::DELETE, &format!("/containers/{id}"))
            .query(&[("force", "true")])
            .send()
            .await;
        let failure = match removed {
            Ok(response) => match Self::check(response).await {
                Ok(_) | Err(EngineError::Status { status: 404, .. }) => return,
                Err(err) => err.to_string(),
            },
            Err(err) => err.to_string(),
        };
        tracing::warn!(container = %short(id), error = %failure, "removing a container failed");
    }
}

#[derive(Deserialize)]
struct VersionInfo {
    #[serde(rename = "Version")]
    version: String,
}

#[derive(Deserialize)]
struct Created {
    #[serde(rename = "Id")]
    id: String,
}

#[derive(Deserialize)]
struct Listed {
    #[serde(rename = "Id")]
    id: String,
}

#[derive(Deserialize)]
struct Inspect {
    #[serde(rename = "State")]
    state: ContainerState,
}

#[derive(Deserialize)]
struct ContainerState {
    #[serde(rename = "Pid", default)]
    pid: i64,
    #[serde(rename = "OOMKilled", default)]
    oom_killed: bool,
}

#[derive(Deserialize)]
struct Waited {
    #[serde(rename = "StatusCode")]
    status_code: i64,
    #[serde(rename = "Error", default)]
    error: Option<WaitError>,
}

#[derive(Deserialize)]
struct WaitError {
    #[serde(rename = "Message", default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct EngineMessage {
    message: String,
}

#[derive(Deserialize)]
struct PullProgress {
    #[serde(default)]
    error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(stream: u8, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![stream, 0, 0, 0];
        bytes.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn frames_split_across_chunks_come_out_whole_and_on_their_stream() {
        let mut bytes = frame(1, b"hello\n");
        bytes.extend(frame(2, b"oops\n"));
        bytes.extend(frame(1, b""));
        let mut demux = Demultiplexer::default();
        let mut frames = Vec::new();
        for chunk in bytes.chunks(3) {
            frames.extend(demux.push(chunk));
        }
        assert_eq!(
            frames,
            vec![(1, b"hello\n".to_vec()), (2, b"oops\n".to_vec()), (1, Vec::new())]
        );
        assert!(demux.pending.is_empty());
    }

    #[test]
    fn image_references_split_into_name_and_tag() {
        assert_eq!(split_image("postgres:16"), ("postgres", Some("16")));
        assert_eq!(split_image("localhost:5000/app"), ("localhost:5000/app", None));
        assert_eq!(split_image("localhost:5000/app:v2"), ("localhost:5000/app", Some("v2")));
        assert_eq!(split_image("app@sha256:abc"), ("app@sha256:abc", None));
        assert_eq!(split_image("busybox"), ("busybox", None));
    }

    #[test]
    fn container_names_are_valid_and_differ_by_installation() {
        let a = DockerProvider::new(Path::new("/nope.sock"), Path::new("/data/a")).unwrap();
        let b = DockerProvider::new(Path::new("/nope.sock"), Path::new("/data/b")).unwrap();
        let name = a.container_name("web@0196abcd/x y");
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{name}");
        assert_ne!(name, b.container_name("web@0196abcd/x y"));
    }
}
