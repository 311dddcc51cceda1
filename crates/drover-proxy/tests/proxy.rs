//! The proxy over real sockets: two upstreams behind hostnames, forwarding headers, live
//! route changes, and the 404, 502 and loop problems.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use drover_proxy::{Proxy, Route, RouteTable};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// An upstream that answers with its name and the headers it received.
async fn upstream(name: &'static str) -> SocketAddr {
    let app =
        Router::new().fallback(get(move |headers: HeaderMap, uri: axum::http::Uri| async move {
            let forwarded_for = headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let forwarded_host = headers
                .get("x-forwarded-host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            axum::Json(serde_json::json!({
                "upstream": name,
                "path": uri.to_string(),
                "x_forwarded_for": forwarded_for,
                "x_forwarded_host": forwarded_host,
                "via": headers.get("via").and_then(|v| v.to_str().ok()),
                "x_forwarded_proto": headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()),
                "forwarded": headers.get("forwarded").and_then(|v| v.to_str().ok()),
            }))
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn route(host: &str, upstream: SocketAddr, environment: &str) -> Route {
    Route {
        host: host.into(),
        upstream,
        service: "app".into(),
        environment: Some(environment.into()),
        project: None,
        activity: Some(environment.into()),
        instance: None,
    }
}

async fn start(routes: RouteTable) -> (SocketAddr, CancellationToken) {
    start_reporting(routes, tokio::sync::mpsc::channel(16).0).await
}

async fn start_reporting(
    routes: RouteTable,
    activity: tokio::sync::mpsc::Sender<String>,
) -> (SocketAddr, CancellationToken) {
    let proxy = Proxy::bind("127.0.0.1:0".parse().unwrap()).await.unwrap().on_activity(activity);
    let addr = proxy.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(proxy.run(routes, stop.clone()));
    (addr, stop)
}

async fn get_via(proxy: SocketAddr, host: &str, path: &str) -> reqwest::Response {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("http://{proxy}{path}"))
        .header("host", host)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn each_hostname_reaches_its_own_upstream_with_forwarding_headers() {
    let routes = RouteTable::new();
    routes.upsert(route("app.run-a.localhost", upstream("a").await, "run-a"));
    routes.upsert(route("app.run-b.localhost", upstream("b").await, "run-b"));
    let (proxy, stop) = start(routes).await;

    let a: Value = get_via(proxy, "app.run-a.localhost:7080", "/x?y=1").await.json().await.unwrap();
    assert_eq!(a["upstream"], "a");
    assert_eq!(a["path"], "/x?y=1");
    assert_eq!(a["x_forwarded_for"], "127.0.0.1");
    assert_eq!(a["x_forwarded_host"], "app.run-a.localhost:7080");
    assert_eq!(a["via"], "1.1 drover");
    assert_eq!(a["x_forwarded_proto"], "http");
    assert_eq!(a["forwarded"], "for=\"127.0.0.1\";host=\"app.run-a.localhost:7080\";proto=http");
    let b: Value = get_via(proxy, "APP.run-b.localhost", "/").await.json().await.unwrap();
    assert_eq!(b["upstream"], "b");
    stop.cancel();
}

#[tokio::test]
async fn routes_change_live_without_restarting_the_proxy() {
    let routes = RouteTable::new();
    let (proxy, stop) = start(routes.clone()).await;
    assert_eq!(get_via(proxy, "app.late.localhost", "/").await.status(), 404);

    routes.upsert(route("app.late.localhost", upstream("late").await, "late"));
    let answer: Value = get_via(proxy, "app.late.localhost", "/").await.json().await.unwrap();
    assert_eq!(answer["upstream"], "late");

    routes.remove("app.late.localhost");
    assert_eq!(get_via(proxy, "app.late.localhost", "/").await.status(), 404);
    stop.cancel();
}

#[tokio::test]
async fn an_unknown_host_gets_a_404_problem_listing_the_known_hosts() {
    let routes = RouteTable::new();
    routes.upsert(route("app.run-a.localhost", upstream("a").await, "run-a"));
    let (proxy, stop) = start(routes).await;

    let response = get_via(proxy, "nope.localhost", "/").await;
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "unknown_host");
    assert_eq!(problem["known_hosts"], serde_json::json!(["app.run-a.localhost"]));
    stop.cancel();
}

/// Says every service is in backoff after a crash.
struct Crashed;

#[async_trait::async_trait]
impl drover_proxy::UpstreamStates for Crashed {
    async fn describe(&self, route: &Route) -> Option<String> {
        Some(format!("backoff: {} exited with status 1", route.instance.as_deref()?))
    }
}

#[tokio::test]
async fn a_dead_upstream_gets_a_502_naming_the_service_and_its_state() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let routes = RouteTable::new();
    routes.upsert(Route {
        instance: Some("app@gone".into()),
        ..route("app.gone.localhost", closed, "gone")
    });
    let proxy = Proxy::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
        .with_states(std::sync::Arc::new(Crashed));
    let addr = proxy.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(proxy.run(routes, stop.clone()));

    let response = get_via(addr, "app.gone.localhost", "/").await;
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    assert_eq!(response.headers()["retry-after"], "1");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "upstream_unavailable");
    assert_eq!(problem["status"], 502);
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("service `app` of environment `gone`"), "{detail}");
    assert!(detail.contains("(state: backoff: app@gone exited with status 1)"), "{detail}");
    assert!(detail.contains(&closed.to_string()), "{detail}");
    stop.cancel();
}

#[tokio::test]
async fn a_request_that_already_passed_a_drover_proxy_is_refused() {
    let routes = RouteTable::new();
    let (proxy, stop) = start(routes.clone()).await;
    // The route points back at the proxy itself.
    routes.upsert(route("loop.localhost", proxy, "loop"));
    let response = get_via(proxy, "loop.localhost", "/").await;
    assert_eq!(response.status(), 508);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "proxy_loop");
    stop.cancel();
}

#[tokio::test]
async fn every_routed_request_reports_activity_for_its_environment() {
    let routes = RouteTable::new();
    routes.upsert(route("app.busy.localhost", upstream("busy").await, "busy"));
    let (sender, mut activity) = tokio::sync::mpsc::channel(16);
    let (proxy, stop) = start_reporting(routes, sender).await;
    get_via(proxy, "app.busy.localhost", "/").await;
    assert_eq!(activity.recv().await.as_deref(), Some("busy"));
    get_via(proxy, "nope.localhost", "/").await;
    assert!(activity.try_recv().is_err(), "unknown hosts are not activity");
    stop.cancel();
}

/// An upstream with a WebSocket echo at `/ws` and an SSE stream at `/events` that sends
/// one event, then waits until `release` is notified before sending the second.
async fn streaming_upstream(release: std::sync::Arc<tokio::sync::Notify>) -> SocketAddr {
    use axum::extract::ws::{Message, WebSocketUpgrade};
    use axum::response::sse::{Event, Sse};
    let app = Router::new()
        .route(
            "/ws",
            get(|ws: WebSocketUpgrade| async move {
                ws.on_upgrade(|mut socket| async move {
                    while let Some(Ok(message)) = socket.recv().await {
                        if let Message::Text(text) = message
                            && socket
                                .send(Message::Text(format!("echo {text}").into()))
                                .await
                                .is_err()
                        {
                            return;
                        }
                    }
                })
            }),
        )
        .route(
            "/events",
            get(move || {
                let release = release.clone();
                async move {
                    let events = futures::stream::unfold(0, move |n| {
                        let release = release.clone();
                        async move {
                            match n {
                                0 => {}
                                1 => release.notified().await,
                                _ => return None,
                            }
                            let event = Event::default().data(format!("event {n}"));
                            Some((Ok::<_, std::convert::Infallible>(event), n + 1))
                        }
                    });
                    Sse::new(events)
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn a_websocket_echo_survives_a_route_change_for_another_host() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let routes = RouteTable::new();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    routes.upsert(route("ws.alice.localhost", streaming_upstream(release).await, "alice"));
    routes.upsert(route("app.bob.localhost", upstream("bob-1").await, "bob"));
    let (proxy, stop) = start(routes.clone()).await;

    let mut request = format!("ws://{proxy}/ws").into_client_request().unwrap();
    request.headers_mut().insert("host", "ws.alice.localhost".parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    socket.send(Message::text("one")).await.unwrap();
    let echoed = socket.next().await.unwrap().unwrap();
    assert_eq!(echoed.to_text().unwrap(), "echo one");

    // Another host's route moves to a new upstream (and then goes) while the socket is open.
    routes.upsert(route("app.bob.localhost", upstream("bob-2").await, "bob"));
    let moved: Value = get_via(proxy, "app.bob.localhost", "/").await.json().await.unwrap();
    assert_eq!(moved["upstream"], "bob-2");
    routes.remove("app.bob.localhost");

    socket.send(Message::text("two")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), socket.next()).await.unwrap();
    assert_eq!(echoed.unwrap().unwrap().to_text().unwrap(), "echo two");
    socket.close(None).await.unwrap();
    stop.cancel();
}

#[tokio::test]
async fn server_sent_events_stream_through_unbuffered() {
    use futures::StreamExt;
    let routes = RouteTable::new();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    routes.upsert(route(
        "events.alice.localhost",
        streaming_upstream(release.clone()).await,
        "alice",
    ));
    let (proxy, stop) = start(routes).await;

    let response = get_via(proxy, "events.alice.localhost", "/events").await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    // The first event arrives while the upstream still holds the stream open: nothing
    // waits for the body to end or a buffer to fill.
    let first = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .expect("the first event was held back by the proxy")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data: event 0"), "{first:?}");
    release.notify_one();
    let mut rest = String::new();
    while let Some(chunk) = body.next().await {
        rest.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(rest.contains("data: event 1"), "{rest}");
    stop.cancel();
}

#[tokio::test]
async fn http2_clients_are_served_by_prior_knowledge() {
    let routes = RouteTable::new();
    routes.upsert(route("app.h2.localhost", upstream("h2").await, "h2"));
    let (proxy, stop) = start(routes).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .resolve("app.h2.localhost", proxy)
        .build()
        .unwrap();
    let response = client
        .get(format!("http://app.h2.localhost:{}/over-h2", proxy.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["upstream"], "h2");
    assert_eq!(answer["path"], "/over-h2");
    assert_eq!(answer["x_forwarded_host"], format!("app.h2.localhost:{}", proxy.port()));
    stop.cancel();
}

#[tokio::test]
async fn https_uses_a_certificate_minted_for_the_host_and_signed_by_the_local_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = drover_proxy::LocalCa::load_or_create(dir.path()).unwrap();
    let ca_pem = std::fs::read(ca.cert_path()).unwrap();
    let routes = RouteTable::new();
    routes.upsert(route("app.secure.localhost", upstream("secure").await, "secure"));
    let proxy = Proxy::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
        .with_tls("127.0.0.1:0".parse().unwrap(), ca)
        .await
        .unwrap();
    let tls_addr = proxy.tls_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(proxy.run(routes, stop.clone()));

    // Trusting only the local CA (no system roots): the handshake verifies the minted leaf.
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca_pem).unwrap()])
        .resolve("app.secure.localhost", tls_addr)
        .resolve("other.secure.localhost", tls_addr)
        .build()
        .unwrap();
    let url = format!("https://app.secure.localhost:{}/tls", tls_addr.port());
    let response = client.get(&url).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2, "ALPN offers h2");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["upstream"], "secure");
    assert_eq!(answer["x_forwarded_proto"], "https");
    // A second name gets its own certificate (and, being unrouted, the 404 problem).
    let other = format!("https://other.secure.localhost:{}/", tls_addr.port());
    assert_eq!(client.get(&other).send().await.unwrap().status(), 404);

    // A client that does not trust the CA refuses the certificate.
    let untrusting = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([])
        .resolve("app.secure.localhost", tls_addr)
        .build()
        .unwrap();
    assert!(untrusting.get(&url).send().await.is_err());
    stop.cancel();
}

/// An upstream that takes any method, reads the whole body, counts the requests that reach
/// it and answers with the `Host` it got and the body's length.
async fn counting_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    let app = Router::new().fallback(axum::routing::any(
        move |headers: HeaderMap, body: axum::body::Bytes| async move {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            axum::Json(serde_json::json!({
                "host": headers.get("host").and_then(|v| v.to_str().ok()),
                "body_len": body.len(),
            }))
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

/// Counts how often the proxy asks what state a service is in (it asks when it blames the
/// service for a failed request).
#[derive(Clone, Default)]
struct Blamed(std::sync::Arc<std::sync::atomic::AtomicUsize>);

#[async_trait::async_trait]
impl drover_proxy::UpstreamStates for Blamed {
    async fn describe(&self, _route: &Route) -> Option<String> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Some("ready".to_owned())
    }
}

/// A proxy routing `app.a.localhost` to a counting upstream, and how often it blamed it.
async fn proxy_with_counting_upstream()
-> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>, Blamed, CancellationToken) {
    let (upstream, seen) = counting_upstream().await;
    let routes = RouteTable::new();
    routes.upsert(Route {
        instance: Some("app@a".into()),
        ..route("app.a.localhost", upstream, "a")
    });
    let blamed = Blamed::default();
    let proxy = Proxy::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
        .with_states(std::sync::Arc::new(blamed.clone()));
    let addr = proxy.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(proxy.run(routes, stop.clone()));
    (addr, seen, blamed, stop)
}

/// Writes `request` to the proxy as it is and reads the answer: status, content type and
/// the body as JSON (`null` if it is not).
async fn raw(proxy: SocketAddr, request: &str) -> (u16, String, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    // Until the head and as many body bytes as it announces have arrived.
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
            .await
            .expect("an answer in time")
            .unwrap_or(0);
        answer.extend_from_slice(&buffer[..read]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|line| {
                    line.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned)
                })
                .and_then(|n| n.trim().parse::<usize>().ok());
            if read == 0 || length.is_some_and(|n| body.len() >= n) {
                let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                let content_type = head
                    .lines()
                    .find_map(|line| {
                        line.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_owned)
                    })
                    .unwrap_or_default();
                return (status, content_type, serde_json::from_str(body).unwrap_or(Value::Null));
            }
        }
        assert!(
            read > 0,
            "the proxy closed without an answer: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
}

#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_400_and_never_blamed_on_the_service() {
    let (proxy, _seen, blamed, stop) = proxy_with_counting_upstream().await;
    for body in ["zz\r\nhello\r\n0\r\n\r\n", "5\r\nhelloXX0\r\n\r\n", "ffffffffffffffffff\r\nx"] {
        let request = format!(
            "POST / HTTP/1.1\r\nHost: app.a.localhost\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        );
        let (status, content_type, problem) = raw(proxy, &request).await;
        assert_eq!(status, 400, "{body:?}: {problem}");
        assert_eq!(content_type, "application/problem+json");
        assert_eq!(problem["code"], "invalid_request", "{problem}");
        assert!(problem["detail"].as_str().unwrap().contains("body"), "{problem}");
    }
    assert_eq!(blamed.0.load(std::sync::atomic::Ordering::SeqCst), 0, "the service was blamed");
    // A well-formed chunked body goes through.
    let request = "POST / HTTP/1.1\r\nHost: app.a.localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let (status, _, answer) = raw(proxy, request).await;
    assert_eq!((status, &answer["body_len"]), (200, &serde_json::json!(5)), "{answer}");
    stop.cancel();
}

#[tokio::test]
async fn a_missing_repeated_empty_or_malformed_host_is_a_400_and_routes_nowhere() {
    let (proxy, seen, blamed, stop) = proxy_with_counting_upstream().await;
    for head in [
        "GET / HTTP/1.1\r\nHost: app.a.localhost\r\nHost: app.a.localhost\r\n",
        "GET / HTTP/1.1\r\nHost: app.a.localhost\r\nHost: other.localhost\r\n",
        "GET / HTTP/1.1\r\n",
        "GET / HTTP/1.0\r\n",
        "GET / HTTP/1.1\r\nHost: \r\n",
        "GET / HTTP/1.1\r\nHost: app.a.localhost:99999\r\n",
        "GET / HTTP/1.1\r\nHost: app.a.localhost:80x\r\n",
        "GET / HTTP/1.1\r\nHost: :80\r\n",
        "GET / HTTP/1.1\r\nHost: user@app.a.localhost\r\n",
        "GET / HTTP/1.1\r\nHost: app.a.localhost/x\r\n",
    ] {
        let (status, content_type, problem) =
            raw(proxy, &format!("{head}Connection: close\r\n\r\n")).await;
        assert_eq!(status, 400, "{head:?}: {problem}");
        assert_eq!(content_type, "application/problem+json", "{head:?}");
        assert_eq!(problem["code"], "invalid_host", "{head:?}: {problem}");
    }
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 0, "a bad host was routed");
    assert_eq!(blamed.0.load(std::sync::atomic::Ordering::SeqCst), 0);

    // A valid port, any case, a trailing dot: routed. An absolute-form target names the
    // host itself (RFC 9112 §3.2.2: its authority, not `Host`, is what counts).
    for (head, host) in [
        ("GET / HTTP/1.1\r\nHost: APP.a.localhost:7080\r\n", "APP.a.localhost:7080"),
        ("GET / HTTP/1.1\r\nHost: app.a.localhost.\r\n", "app.a.localhost."),
        ("GET http://app.a.localhost/ HTTP/1.1\r\nHost: other.localhost\r\n", "app.a.localhost"),
    ] {
        let (status, _, answer) = raw(proxy, &format!("{head}Connection: close\r\n\r\n")).await;
        assert_eq!(status, 200, "{head:?}: {answer}");
        assert_eq!(answer["host"], host, "{head:?}");
    }
    stop.cancel();
}

/// Sends one HTTP/2 request (prior knowledge) for `uri` with these extra headers.
async fn h2_request(
    proxy: SocketAddr,
    uri: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Value) {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let mut request = hyper::Request::get(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, content_type, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_http2_host_that_disagrees_with_its_authority_is_a_400() {
    let (proxy, seen, _blamed, stop) = proxy_with_counting_upstream().await;
    let (status, content_type, problem) =
        h2_request(proxy, "http://app.a.localhost/", &[("host", "other.localhost")]).await;
    assert_eq!((status, content_type.as_str()), (400, "application/problem+json"), "{problem}");
    assert_eq!(problem["code"], "invalid_host", "{problem}");
    let (status, _, problem) = h2_request(proxy, "http://app.a.localhost:99999/", &[]).await;
    assert_eq!((status, &problem["code"]), (400, &serde_json::json!("invalid_host")), "{problem}");
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 0, "a bad host was routed");

    // The same host in both (whatever its case), or `:authority` alone: routed, as `Host`.
    let (status, _, answer) =
        h2_request(proxy, "http://app.a.localhost/", &[("host", "APP.a.localhost")]).await;
    assert_eq!((status, &answer["host"]), (200, &serde_json::json!("app.a.localhost")), "{answer}");
    let (status, _, answer) = h2_request(proxy, "http://app.a.localhost/", &[]).await;
    assert_eq!((status, &answer["host"]), (200, &serde_json::json!("app.a.localhost")), "{answer}");
    stop.cancel();
}
