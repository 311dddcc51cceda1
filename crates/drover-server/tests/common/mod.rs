//! What the server's integration tests share: a configuration for a test server (`config`,
//! `quick_agent`), a real server on port 0 with its own data directory (`start`,
//! `Running::stop`), and a WebSocket client of `/api/v1/ws`.
//! Each test file uses part of it.
#![allow(dead_code)]

use std::time::Duration;

use drover_config::{AgentConfig, Config};
use drover_server::{Mode, Server};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

/// A server's configuration for a test: data in `data_dir`, listening on a free loopback
/// port, no routing proxy, a port block of its own for environments.
pub(crate) fn config(data_dir: &std::path::Path) -> Config {
    let mut config = Config { data_dir: data_dir.to_path_buf(), ..Config::default() };
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.proxy.enabled = false;
    (config.environments.port_range_start, config.environments.port_range_end) =
        drover_testkit::port_range(40);
    config
}

/// Room for a port block per run when hundreds of runs are submitted at once (each run
/// gets an environment of its own, and a submission with no free block is refused): the
/// whole default range in blocks of one port. Only for tests whose environments run no
/// services, so nothing ever listens on those ports and tests sharing them cannot clash.
pub(crate) fn room_for_many_runs(config: &mut Config) {
    (config.environments.port_range_start, config.environments.port_range_end) = (20_000, 29_999);
    config.environments.block_size = 1;
    assert!(config.services.is_empty(), "runs' environments here must start no service");
}

/// `quick`: a command agent that prints a line and succeeds.
pub(crate) fn quick_agent() -> (String, AgentConfig) {
    let agent = AgentConfig {
        command: Some("sh".into()),
        args: Some(vec!["-c".into(), "echo working".into()]),
        ..AgentConfig::default()
    };
    ("quick".to_owned(), agent)
}

/// A server running in this process.
pub(crate) struct Running {
    pub(crate) url: String,
    pub(crate) shutdown: CancellationToken,
    pub(crate) task: tokio::task::JoinHandle<Result<(), drover_server::ServerError>>,
}

impl Running {
    /// Drains it and waits (at most 30 s) for a clean end.
    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task).await.unwrap().unwrap().unwrap();
    }
}

/// Builds and runs a full server from `config` (listen on port 0 for a free one).
pub(crate) async fn start(config: Config) -> Running {
    let server = Server::build(config, Mode::Full).await.unwrap();
    // A server on 0.0.0.0 is reached over loopback.
    let url = server.url().replace("0.0.0.0", "127.0.0.1");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    Running { url, shutdown, task }
}

/// An HTTP client that never goes through a proxy.
pub(crate) fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// `GET url` as JSON (`null` when the body is not JSON).
pub(crate) async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap_or(Value::Null)
}

pub(crate) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket of `/api/v1/ws`, with a bearer credential if given.
pub(crate) async fn ws_connect(url: &str, token: Option<&str>) -> Socket {
    let mut request =
        format!("{}/api/v1/ws", url.replace("http://", "ws://")).into_client_request().unwrap();
    if let Some(token) = token {
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

pub(crate) async fn ws_send(socket: &mut Socket, message: Value) {
    socket.send(Message::Text(message.to_string().into())).await.unwrap();
}

/// The next JSON frame, within `wait` (pings are answered by the library).
pub(crate) async fn ws_next_within(socket: &mut Socket, wait: Duration) -> Value {
    loop {
        let frame = tokio::time::timeout(wait, socket.next())
            .await
            .expect("a frame in time")
            .expect("the socket stays open")
            .unwrap();
        if let Message::Text(text) = frame {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// The next JSON frame within 30 s.
pub(crate) async fn ws_next(socket: &mut Socket) -> Value {
    ws_next_within(socket, Duration::from_secs(30)).await
}

/// The next frame whose `type` is `kind` (others are skipped).
pub(crate) async fn ws_next_of(socket: &mut Socket, kind: &str) -> Value {
    loop {
        let frame = ws_next(socket).await;
        if frame["type"] == kind {
            return frame;
        }
    }
}
