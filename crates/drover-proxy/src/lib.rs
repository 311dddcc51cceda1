//! The routing proxy: clients reach a service by a stable hostname
//! (`web.alice.localhost`, `app.run-1a2b3c4d.localhost`), never by its port. Requests are
//! routed by their `Host` header through a [`RouteTable`] that changes live as services
//! start and stop, without restarting the listener or touching connections to other hosts.
//!
//! HTTP/1.1 and HTTP/2 (cleartext by prior knowledge, or by ALPN over TLS), streamed
//! bodies, SSE and WebSocket upgrades pass through. An unknown host gets a 404 problem
//! listing the shared hostnames (every one in local mode); a route whose upstream does not
//! answer gets a 502 naming the service; a request at fault itself (no single valid host,
//! a malformed body) a 400 that no service is blamed for. A request that already passed
//! through a drover proxy is refused (508) so a misrouted table cannot loop. HTTPS uses
//! certificates minted per hostname by a local CA ([`tls`]).

mod forward;
mod host;
mod routes;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub use routes::{Route, RouteTable};

/// Whether an unknown host's 404 may name every route now (see
/// [`Proxy::naming_every_host_while`]).
pub type NameEveryHost = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the proxy asks when a route's upstream does not answer, to say in the 502 what
/// state the service is in (`backoff: exited with status 1, restart 2`).
#[async_trait::async_trait]
pub trait UpstreamStates: Send + Sync + 'static {
    async fn describe(&self, route: &Route) -> Option<String>;
}
pub use tls::{LocalCa, TlsError};

/// How long a client may take to finish a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A bound proxy listener (and optionally an HTTPS one), not yet serving.
pub struct Proxy {
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<(TcpListener, SocketAddr, Arc<tls::CertStore>)>,
    activity: Option<tokio::sync::mpsc::Sender<String>>,
    states: Option<Arc<dyn UpstreamStates>>,
    name_every_host: Option<NameEveryHost>,
}

impl Proxy {
    pub async fn bind(addr: SocketAddr) -> Result<Self, ProxyError> {
        let (listener, addr) = bind(addr).await?;
        Ok(Self { listener, addr, tls: None, activity: None, states: None, name_every_host: None })
    }

    /// An unknown host's 404 names the shared routes (those of no project) only: the
    /// proxy cannot tell who asks, and one project's hostnames are no business of
    /// another's. While `every` says so (a server in local mode, whose every caller is the
    /// same user), it names every route.
    pub fn naming_every_host_while(mut self, every: NameEveryHost) -> Self {
        self.name_every_host = Some(every);
        self
    }

    /// Also serves HTTPS on `addr`, with certificates from `ca`.
    pub async fn with_tls(mut self, addr: SocketAddr, ca: LocalCa) -> Result<Self, ProxyError> {
        let (listener, addr) = bind(addr).await?;
        self.tls = Some((listener, addr, Arc::new(tls::CertStore::new(ca))));
        Ok(self)
    }

    /// Sends the `activity` key of every route a request goes through (dropping reports
    /// when the receiver lags: activity is a hint, not a log).
    pub fn on_activity(mut self, sender: tokio::sync::mpsc::Sender<String>) -> Self {
        self.activity = Some(sender);
        self
    }

    /// Asks `states` what a service whose upstream does not answer is doing.
    pub fn with_states(mut self, states: Arc<dyn UpstreamStates>) -> Self {
        self.states = Some(states);
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where HTTPS is served, if it is.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|(_, addr, _)| *addr)
    }

    /// Serves until `shutdown` fires, then lets open requests finish (up to 5 s).
    pub async fn run(self, routes: RouteTable, shutdown: CancellationToken) {
        let forwarder = forward::Forwarder::new(
            routes,
            self.activity.clone(),
            self.states.clone(),
            self.name_every_host.clone(),
        );
        let graceful = GracefulShutdown::new();
        let tls = self.tls.and_then(|(listener, _, certs)| match certs.server_config() {
            Ok(config) => Some((listener, certs, config)),
            Err(err) => {
                tracing::error!(error = %err, "HTTPS disabled");
                None
            }
        });
        // Handshakes run in their own tasks and hand finished streams back here, where
        // they are served like the others (and drained like them on shutdown).
        let (secured, mut handshaken) = tokio::sync::mpsc::channel(64);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => serve(stream, peer, "http", &forwarder, &graceful),
                    Err(err) => tracing::warn!(error = %err, "proxy accept failed"),
                },
                accepted = accept(tls.as_ref().map(|(listener, _, _)| listener)) => match accepted {
                    Ok((stream, peer)) => {
                        if let Some((_, certs, config)) = &tls {
                            let done = secured.clone();
                            let (certs, config) = (certs.clone(), config.clone());
                            tokio::spawn(async move {
                                if let Some(stream) = handshake(stream, peer, certs, config).await {
                                    let _ = done.send((stream, peer)).await;
                                }
                            });
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "proxy TLS accept failed"),
                },
                Some((stream, peer)) = handshaken.recv() => {
                    serve(stream, peer, "https", &forwarder, &graceful);
                }
            }
        }
        if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await.is_err() {
            tracing::warn!("proxy connections still open after 5s; dropping them");
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ProxyError> {
    let listener =
        TcpListener::bind(addr).await.map_err(|source| ProxyError::Bind { addr, source })?;
    let addr = listener.local_addr().map_err(|source| ProxyError::Bind { addr, source })?;
    Ok((listener, addr))
}

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Serves one connection (HTTP/1.1 with upgrades, or HTTP/2) until it closes.
fn serve<S>(
    stream: S,
    peer: SocketAddr,
    scheme: &'static str,
    forwarder: &forward::Forwarder,
    graceful: &GracefulShutdown,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let forwarder = forwarder.clone();
    let service = hyper::service::service_fn(move |request| {
        let forwarder = forwarder.clone();
        async move { Ok::<_, std::convert::Infallible>(forwarder.handle(request, peer, scheme).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    let connection = graceful.watch(connection.into_owned());
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "proxy connection ended with an error");
        }
    });
}

/// Reads the client's hello, mints a certificate for the name it asks for if none is
/// cached (off the async threads), then finishes the handshake.
async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    certs: Arc<tls::CertStore>,
    config: Arc<rustls::ServerConfig>,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let acceptor =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
        let start = acceptor.await?;
        let name = tls::requested_name(start.client_hello().server_name());
        tokio::task::spawn_blocking(move || certs.ensure(&name))
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?;
        start.into_stream(config).await
    })
    .await;
    match accepted {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(err)) => {
            tracing::debug!(%peer, error = %err, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}
