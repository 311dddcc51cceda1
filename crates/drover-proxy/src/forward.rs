//! Forwarding one request: resolve its host, rewrite the hop-by-hop and forwarding
//! headers, stream the body both ways, and turn failures into problem responses: the
//! client's (a bad host or target, a malformed body) as 4xx, never blamed on the service;
//! a service's that does not answer as a 502.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use drover_domain::ErrorCode;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

use crate::host::requested_host;
use crate::routes::{RouteTable, normalize_host};
use crate::{NameEveryHost, UpstreamStates};

pub(crate) type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Marks requests this proxy forwarded, to refuse them if they come back (a loop).
const VIA: &str = "1.1 drover";

/// Headers that describe one connection, not the message: never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

#[derive(Clone)]
pub(crate) struct Forwarder {
    routes: RouteTable,
    client: Client<HttpConnector, ClientBody>,
    activity: Option<tokio::sync::mpsc::Sender<String>>,
    states: Option<Arc<dyn UpstreamStates>>,
    name_every_host: Option<NameEveryHost>,
}

impl Forwarder {
    pub(crate) fn new(
        routes: RouteTable,
        activity: Option<tokio::sync::mpsc::Sender<String>>,
        states: Option<Arc<dyn UpstreamStates>>,
        name_every_host: Option<NameEveryHost>,
    ) -> Self {
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self { routes, client, activity, states, name_every_host }
    }

    /// The hostnames an unknown host's 404 may name (see `Proxy::naming_every_host_while`).
    fn nameable_hosts(&self) -> Vec<String> {
        let every = self.name_every_host.as_ref().is_some_and(|every| every());
        let routes = self.routes.list().into_iter();
        routes
            .filter(|route| every || route.project.is_none())
            .map(|route| normalize_host(&route.host))
            .collect()
    }

    /// Forwards one request that arrived over `scheme` (`http` or `https`) from `peer`.
    pub(crate) async fn handle(
        &self,
        mut request: Request<Incoming>,
        peer: SocketAddr,
        scheme: &'static str,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let host = match requested_host(request.version(), request.uri(), request.headers()) {
            Ok(host) => host,
            Err(reason) => {
                return client_error(StatusCode::BAD_REQUEST, ErrorCode::InvalidHost, &reason);
            }
        };
        let looped = request
            .headers()
            .get_all(header::VIA)
            .iter()
            .any(|via| via.to_str().is_ok_and(|v| v.contains("drover")));
        if looped {
            return client_error(
                StatusCode::LOOP_DETECTED,
                ErrorCode::ProxyLoop,
                &format!("the request for {host} already passed through a drover proxy"),
            );
        }
        let Some(route) = self.routes.get(&host) else {
            let known = self.nameable_hosts();
            counted(StatusCode::NOT_FOUND);
            return problem(
                StatusCode::NOT_FOUND,
                ErrorCode::UnknownHost,
                &format!("no route for host `{}`", normalize_host(&host)),
                Some(known),
            );
        };
        if let (Some(sender), Some(key)) = (&self.activity, &route.activity) {
            let _ = sender.try_send(key.clone());
        }

        let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let upstream_uri = match format!("http://{}{path}", route.upstream).parse::<Uri>() {
            Ok(uri) => uri,
            Err(err) => {
                return client_error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::InvalidRequest,
                    &format!("bad request target: {err}"),
                );
            }
        };
        // An upgrade (WebSocket) keeps its `Upgrade` header and, once the upstream
        // switches protocols, both connections are spliced together.
        let upgrade = requested_upgrade(request.headers());
        let client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        *request.uri_mut() = upstream_uri;
        // Upstreams speak HTTP/1.1 whatever the client spoke (an HTTP/2 request carries
        // its host in `:authority`, which becomes `Host`).
        *request.version_mut() = Version::HTTP_11;
        strip_hop_by_hop(request.headers_mut());
        // The host it was routed by (`:authority` or an absolute target's included).
        if let Ok(value) = HeaderValue::from_str(&host) {
            request.headers_mut().insert(header::HOST, value);
        }
        if let Some(protocol) = &upgrade {
            request.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            request.headers_mut().insert(header::UPGRADE, protocol.clone());
        }
        add_forwarding_headers(request.headers_mut(), peer, &host, scheme);

        let service = route.service.clone();
        let (request, client_body) = ClientBody::wrap(request);
        match self.client.request(request).await {
            Ok(mut response) => {
                let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
                let upstream_side =
                    (switched && client_side.is_some()).then(|| hyper::upgrade::on(&mut response));
                let (mut parts, body) = response.into_parts();
                let protocol = parts.headers.get(header::UPGRADE).cloned();
                strip_hop_by_hop(&mut parts.headers);
                metrics::histogram!("drover_proxy_request_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("drover_proxy_requests_total", "status" => parts.status.as_u16().to_string()).increment(1);
                if let (Some(client_side), Some(upstream_side), Some(protocol)) =
                    (client_side, upstream_side, protocol)
                {
                    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    parts.headers.insert(header::UPGRADE, protocol);
                    tokio::spawn(splice(client_side, upstream_side));
                }
                Response::from_parts(parts, body.boxed())
            }
            // The client's body broke off or was malformed: the client's fault, never
            // the service's (not blamed, not asked about, not counted as a 502).
            Err(err) if client_body.failed() => client_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                &format!("the request body could not be read: {}", client_body.reason(&err)),
            ),
            Err(err) => {
                metrics::counter!("drover_proxy_requests_total", "status" => "502").increment(1);
                let environment = route
                    .environment
                    .as_deref()
                    .map(|e| format!(" of environment `{e}`"))
                    .unwrap_or_default();
                let state = match &self.states {
                    Some(states) => states.describe(&route).await,
                    None => None,
                };
                let state_text =
                    state.as_deref().map(|s| format!(" (state: {s})")).unwrap_or_default();
                let mut response = problem(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::UpstreamUnavailable,
                    &format!(
                        "service `{service}`{environment}{state_text} at {} is not answering: {err}",
                        route.upstream
                    ),
                    None,
                );
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                response
            }
        }
    }
}

/// The protocol a request asks to switch to, if it asks (`Connection: upgrade` and an
/// `Upgrade` header).
fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned()).flatten()
}

/// Copies bytes both ways between an upgraded client connection and its upstream until
/// either side closes.
async fn splice(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(err) => {
            tracing::debug!(error = %err, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %err, "upgraded connection ended with an error");
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn add_forwarding_headers(headers: &mut HeaderMap, peer: SocketAddr, host: &str, scheme: &str) {
    let client_ip = peer.ip().to_string();
    let forwarded_node = match peer {
        SocketAddr::V4(_) => client_ip.clone(),
        SocketAddr::V6(_) => format!("[{client_ip}]"),
    };
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {client_ip}"),
        None => client_ip.clone(),
    };
    let pairs = [
        ("x-forwarded-for", forwarded_for),
        ("x-forwarded-host", host.to_owned()),
        ("x-forwarded-proto", scheme.to_owned()),
        ("forwarded", format!("for=\"{forwarded_node}\";host=\"{host}\";proto={scheme}")),
    ];
    for (name, value) in pairs {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    headers.append(header::VIA, HeaderValue::from_static(VIA));
}

/// Counts a request the proxy answered itself, by status.
fn counted(status: StatusCode) {
    metrics::counter!("drover_proxy_requests_total", "status" => status.as_u16().to_string())
        .increment(1);
}

/// A problem caused by the request itself, answered without reaching any service.
fn client_error(status: StatusCode, code: ErrorCode, detail: &str) -> Response<ProxyBody> {
    counted(status);
    problem(status, code, detail, None)
}

/// The client's request body on its way upstream. It remembers why reading it failed, so
/// that a forward that then fails is told apart from a service that does not answer.
pub(crate) struct ClientBody {
    inner: Incoming,
    failure: Arc<std::sync::OnceLock<String>>,
}

/// What a [`ClientBody`] handed to the upstream client leaves behind to ask.
pub(crate) struct BodyFailure(Arc<std::sync::OnceLock<String>>);

impl ClientBody {
    fn wrap(request: Request<Incoming>) -> (Request<Self>, BodyFailure) {
        let failure = Arc::new(std::sync::OnceLock::new());
        let watch = BodyFailure(failure.clone());
        (request.map(|inner| Self { inner, failure }), watch)
    }
}

impl BodyFailure {
    fn failed(&self) -> bool {
        self.0.get().is_some()
    }

    /// Why reading the body failed (`fallback` if it is not known).
    fn reason(&self, fallback: &dyn std::fmt::Display) -> String {
        self.0.get().cloned().unwrap_or_else(|| fallback.to_string())
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(err))) = &polled {
            let _ = self.failure.set(error_chain(err));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// `err` and its sources, as one line (hyper's own message is often only the outermost).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// An RFC 9457 problem from the proxy itself.
fn problem(
    status: StatusCode,
    code: ErrorCode,
    detail: &str,
    known_hosts: Option<Vec<String>>,
) -> Response<ProxyBody> {
    let mut body = json!({
        "type": format!("https://drover.dev/problems/{code}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
        "code": code.as_str(),
    });
    if let Some(hosts) = known_hosts {
        body["known_hosts"] = json!(hosts);
    }
    let bytes = Bytes::from(body.to_string());
    let mut response = Response::new(Full::new(bytes).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    response
}
